// 16-float vectors through GCC/Clang vector extensions: one AVX-512 register, two AVX2 registers, four
// SSE registers; the compiler maps them to the target's instruction set (-march=native).
#pragma once

#include <cstdint>

namespace bench_suite_kernels {

typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads/stores
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) { return *reinterpret_cast<const v16f_u*>(p); }
inline void store16(float* p, v16f x) { *reinterpret_cast<v16f_u*>(p) = x; }
inline v16f splat(float x) { return v16f{} + x; }

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

}  // namespace bench_suite_kernels
