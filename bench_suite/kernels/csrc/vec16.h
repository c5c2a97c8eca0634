// 16-float vectors through GCC/Clang vector extensions: one AVX-512 register, two AVX2 registers, four
// SSE registers; the compiler maps them to the target's instruction set (-march=native). Arrays of accumulators
// use `vacc` below, the widest native vector (GCC keeps arrays of wider vectors in memory).
#pragma once

#include <cstdint>
#include <cstring>

namespace bench_suite_kernels {

typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads/stores
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) { return *reinterpret_cast<const v16f_u*>(p); }
inline void store16(float* p, v16f x) { *reinterpret_cast<v16f_u*>(p) = x; }
// All lanes x: one broadcast (from memory where x is loaded). Not `v16f{} + x`, which the compiler must keep as a
// scalar add of +0 (it turns -0 into +0) followed by a register broadcast: two extra instructions per splat.
inline v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

inline float hsum16(v16f x) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  typedef float v8f __attribute__((vector_size(32)));
  typedef float v4f __attribute__((vector_size(16)));
  const v8f a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else
  float s = 0;
  for (int c = 0; c < 16; ++c) s += x[c];
  return s;
#endif
}

// The largest lane of x (NaN-free input; a shuffle tree like hsum16).
inline float hmax16(v16f x) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  typedef float v8f __attribute__((vector_size(32)));
  typedef float v4f __attribute__((vector_size(16)));
  const v8f a0 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f a1 = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8f a = a0 > a1 ? a0 : a1;
  const v4f b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3), b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4f b = b0 > b1 ? b0 : b1;
  const float c0 = b[0] > b[2] ? b[0] : b[2], c1 = b[1] > b[3] ? b[1] : b[3];
  return c0 > c1 ? c0 : c1;
#else
  float m = x[0];
  for (int c = 1; c < 16; ++c) m = x[c] > m ? x[c] : m;
  return m;
#endif
}

#if !defined(__AVX512F__) && defined(__AVX__)
typedef float v8f __attribute__((vector_size(32)));

// The 8 horizontal sums of t[0..7] as one 8-lane vector: a transposing tree whose shuffles stay within one or two
// AVX registers (128-bit halves, then pairs and single lanes within them).
inline v8f hsum8x8(const v8f* t) {
  v8f b[4], c[2];
  for (int i = 0; i < 4; ++i)  // lanes 0-3 of t[2i] and t[2i+1], plus lanes 4-7
    b[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f d = __builtin_shufflevector(c[0], c[1], 0, 2, 8, 10, 4, 6, 12, 14) +
                __builtin_shufflevector(c[0], c[1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(d, d, 0, 4, 1, 5, 2, 6, 3, 7);  // d holds the sums of t 0 2 4 6 1 3 5 7
}
#endif

// `vacc`: the widest native float vector, for arrays of accumulators (GCC keeps arrays of vectors wider than the
// registers in memory: a load and a store around every FMA). AVX-512 (or no AVX): v16f; AVX2: v8f, kAccPer16 of them
// per 16 floats. vacc_i: the int32 vector of its width (compare results).
#if defined(__AVX512F__) || !defined(__AVX__)
typedef v16f vacc;
typedef v16i vacc_i;
constexpr int kAccPer16 = 1;
inline vacc load_acc(const float* p) { return load16(p); }
inline void store_acc(float* p, vacc x) { store16(p, x); }
inline vacc splat_acc(float x) { return splat(x); }
inline float hmax_acc(vacc x) { return hmax16(x); }
inline float hsum_acc(vacc x) { return hsum16(x); }
#else
typedef v8f vacc;
typedef int32_t vacc_i __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // unaligned loads/stores
constexpr int kAccPer16 = 2;
inline vacc load_acc(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline void store_acc(float* p, vacc x) { *reinterpret_cast<v8f_u*>(p) = x; }
inline vacc splat_acc(float x) { return vacc{x, x, x, x, x, x, x, x}; }
inline float hmax_acc(vacc x) {
  typedef float v4f __attribute__((vector_size(16)));
  const v4f lo = __builtin_shufflevector(x, x, 0, 1, 2, 3), hi = __builtin_shufflevector(x, x, 4, 5, 6, 7);
  const v4f b = lo > hi ? lo : hi;
  const float c0 = b[0] > b[2] ? b[0] : b[2], c1 = b[1] > b[3] ? b[1] : b[3];
  return c0 > c1 ? c0 : c1;
}
inline float hsum_acc(vacc x) {
  typedef float v4f __attribute__((vector_size(16)));
  const v4f b = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
#endif
constexpr int kAccLanes = 16 / kAccPer16;

// The 16 horizontal sums of a[0..15] as one vector (lane r = sum of a[r]): a transposing reduction tree, two
// two-source shuffles and one add per output vector and level (30 shuffles and 15 adds for 16 sums, against
// about 3 shuffles and 4 adds per sum with hsum16).
inline v16f hsum16x16(const v16f* a) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  v16f b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  v16f out;
  for (int r = 0; r < 16; ++r) out[r] = hsum16(a[r]);
  return out;
#endif
}

// The kAccLanes horizontal sums of a[0 .. kAccLanes) as one native vector (lane r = sum of a[r]): the transposing
// reduction of the native width (hsum16x16 on AVX-512, hsum8x8 on AVX2).
inline vacc hsum_block(const vacc* a) {
#if !defined(__AVX512F__) && defined(__AVX__)
  return hsum8x8(a);
#else
  return hsum16x16(a);
#endif
}

// exp(x) for x <= 0 (the softmax argument s_j - max), all lanes of a float vector VF (VI: the int32 vector of its
// width) at a time: Cephes-style range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r,
// 2^n from the exponent bits. Relative error about 2e-7; exactly 0 below -87 (e^-87 ~ 1.6e-38) and for the -inf
// padding.
template <typename VF, typename VI>
inline VF exp_nonpositive(VF x) {
  const VF lo = VF{} - 87.0f;  // a constant: folded
  const VI under = x < lo;
  const VF xc = under ? lo : x;
  VF n = xc * 1.44269504088896341f + 0.5f;
  // floor for negative and positive values: truncate, then subtract 1 where truncation rounded up
  const VI ni = __builtin_convertvector(n, VI);
  VF nf = __builtin_convertvector(ni, VF);
  nf = (nf > n) ? nf - 1.0f : nf;
  VF r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(nf, VI) + 127) << 23;
  VF pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  const VF e = p * pow2;
  return under ? VF{} : e;
}

}  // namespace bench_suite_kernels
