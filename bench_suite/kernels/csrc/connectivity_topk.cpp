// Fused connectivity top-B for the CPU: Sparsifiner's connectivity mask (Wei et al., CVPR 2023, eq. 3)
//
//   idx[b, h, i, :] = the `budget` largest entries of  scores[b, h, i, :] = coef[b, h, i, :] @ w_up[b?, h?]
//
// without materialising the [B, H, Nq, Nk] score tensor: per query row, the scores are accumulated in a
// thread-local buffer over the *nonzero* coefficients only (the sparse coefficients A~_down of eq. 2; a
// zero coefficient contributes exactly nothing, so skipping it changes no value), then the top `budget`
// are selected on the order-preserving integer image ("keys") of the float scores. Usually in one pass over a
// guessed window [tlo, thi) around the budget-th largest key (normal quantiles of budget +- ~sqrt(budget) keys from
// the row's mean and standard deviation): collect the keys >= tlo, count those >= thi; all keys >= thi are in and the
// few inside the window are ranked branch-free (select_topk_window). When the window misses, a threshold search
// (count the keys above guessed thresholds until the count is just above the budget, collect, trim), or, when that
// does not settle quickly (large blocks of equal scores), a radix select.
//
// Shapes: coef [B, H, Nq, n_down] float32; w_up [Hw, n_down, Nk] or [B', Hw, n_down, Nk] (Hw in {1, H},
// B' in {1, B}), float32; budget in [1, Nk]. Output int64 [B, H, Nq, budget], distinct indices in no
// particular order within a row (as torch.topk(sorted=False)). Ties at the budget-th largest score are
// broken toward lower key indices (torch.topk breaks them arbitrarily), so a row of equal scores (e.g. all
// coefficients zero) selects keys 0 .. budget-1. NaN scores count as the largest values (as in torch.topk).
//
// A row with a single positive coefficient c_j selects the top-B of W_up row j, which is selected once per call and
// copied (c > 0 keeps the order; equal products of distinct W entries, where c * w rounds two entries together,
// are the only case where the scaled row would break a tie differently).
// Cost per row: nnz(coef row) * Nk multiply-adds (register-blocked, 64 scores at a time, fused with the
// conversion to keys and the row's mean and variance), then one collecting pass over the Nk keys and a rank count
// over the window's keys (~2.5 sqrt(budget) of them); on a miss (~5 % of rows on normal-like scores), a few
// vectorised counting passes, one collecting pass and a trim of at most 2 surplus candidates (or one pass over a tie
// block at the boundary).
// Errors: TORCH_CHECK_* (ValueError / TypeError in Python) for devices, dtypes, shapes, strides, budget.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using namespace bench_suite_kernels;

// Order-preserving map float -> uint32 (larger float, larger key; +NaN above +inf).
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

typedef uint32_t v16u __attribute__((vector_size(64)));

// Horizontal reductions of 16 lanes (AVX-512: a shuffle tree of a few instructions; else a loop over the lanes).
inline uint32_t hmax16u(v16u x) {
#if defined(__AVX512F__)
  __m512i r;
  std::memcpy(&r, &x, sizeof(r));
  return _mm512_reduce_max_epu32(r);
#else
  uint32_t m = 0;
  for (int q = 0; q < 16; ++q) m = std::max(m, x[q]);
  return m;
#endif
}

inline uint32_t hmin16u(v16u x) { return ~hmax16u(~x); }  // min(x) = ~max(~x) for unsigned keys

inline int64_t hadd16u(v16u x) {
#if defined(__AVX512F__)
  __m512i r;
  std::memcpy(&r, &x, sizeof(r));
  return static_cast<uint32_t>(_mm512_reduce_add_epi32(r));
#else
  int64_t c = 0;
  for (int q = 0; q < 16; ++q) c += x[q];
  return c;
#endif
}

struct TopkScratch {
  std::vector<uint32_t> keys, ckeys, bkeys;
  std::vector<int32_t> cand, cand2, bidx, nz_j;
  std::vector<int64_t> pos;
  std::vector<float> nz_c;
  std::vector<uint32_t> hist;
  void fit(int64_t nk, int64_t nd) {
    if (keys.size() < static_cast<size_t>(nk)) {
      keys.resize(static_cast<size_t>(nk));
      // 16 lanes of slack for the full-vector compressed stores
      ckeys.resize(static_cast<size_t>(nk + 16));
      cand.resize(static_cast<size_t>(nk + 16));
      bkeys.resize(static_cast<size_t>(nk + 16));
      bidx.resize(static_cast<size_t>(nk + 16));
      cand2.resize(static_cast<size_t>(nk));
      pos.resize(static_cast<size_t>(nk));
    }
    if (nz_j.size() < static_cast<size_t>(nd + 16)) {
      nz_j.resize(static_cast<size_t>(nd + 16));
      nz_c.resize(static_cast<size_t>(nd + 16));
    }
    if (hist.size() < 2048) hist.resize(2048);
  }
};

TopkScratch& topk_scratch() {
  thread_local TopkScratch s;
  return s;
}

#if defined(__AVX512F__)
// The mask of the first min(count, 16) lanes (count >= 1).
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
// AVX2's stand-in for a compress: byte i of lanes[mask] is the lane of mask's i-th set bit (a vpermd index)
struct Compress8 {
  uint64_t lanes[256];
  constexpr Compress8() : lanes{} {
    for (int mask = 0; mask < 256; ++mask) {
      uint64_t e = 0;
      for (int bit = 0, o = 0; bit < 8; ++bit) {
        if ((mask >> bit) & 1) e |= static_cast<uint64_t>(bit) << (8 * o++);
      }
      lanes[mask] = e;
    }
  }
};
constexpr Compress8 kCompress8{};
#endif

// The nonzero coefficients of one row (exact zeros contribute nothing to the scores; NaN counts as nonzero): their
// positions j into nz_j and values into nz_c (both with 16 lanes of slack), in increasing j; returns how many.
inline int64_t row_nonzeros(const float* crow, int64_t nd, int32_t* nz_j, float* nz_c) {
  int64_t nz = 0, j = 0;
#if defined(__AVX512F__)
  __m512i jv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j < nd; j += 16) {
    const __mmask16 lanes = first_lanes(nd - j);
    const __m512 c = _mm512_maskz_loadu_ps(lanes, crow + j);
    const __mmask16 msk = _mm512_mask_cmp_ps_mask(lanes, c, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    _mm512_storeu_si512(nz_j + nz, _mm512_maskz_compress_epi32(msk, jv));
    _mm512_storeu_ps(nz_c + nz, _mm512_maskz_compress_ps(msk, c));
    nz += __builtin_popcount(static_cast<unsigned>(msk));
    jv = _mm512_add_epi32(jv, _mm512_set1_epi32(16));
  }
#else
  for (; j < nd; ++j) {
    nz_j[nz] = static_cast<int32_t>(j);
    nz_c[nz] = crow[j];
    nz += crow[j] != 0.0f;
  }
#endif
  return nz;
}

// order_key on the lanes of a native vector (vec16.h's vacc): no compare, no blend (bits ^ (sign ? ~0 : 1 << 31))
typedef uint32_t vacc_u __attribute__((vector_size(sizeof(vacc))));
inline vacc_u order_key_acc(vacc x) {
  vacc_i bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const vacc_i flip = (bits >> 31) | static_cast<int32_t>(0x80000000u);  // arithmetic shift: all ones if negative
  const vacc_i key = bits ^ flip;
  vacc_u out;
  std::memcpy(&out, &key, sizeof(out));
  return out;
}

inline uint32_t hmax_acc_u(vacc_u x) {
#if defined(__AVX512F__)
  return hmax16u(x);
#else
  uint32_t m = x[0];
  for (int q = 1; q < kAccLanes; ++q) m = std::max(m, x[q]);
  return m;
#endif
}

// Scores of one query row, as order keys: keys[x] = order_key(sum_t c_t * W[j_t, x]) over the nz nonzero
// coefficients (c_t, j_t); 64 scores at a time stay in registers (native vectors, vec16.h) across the nonzero rows.
// Returns the smallest and largest key, and the scores' sum and sum of squares (for the window's guess).
// (Always inlined: the generic form grew past GCC's inlining limit, and the call per row cost ~8 % on deit_s shapes.)
__attribute__((always_inline)) inline void row_score_keys(const float* wb, int64_t ws_j, int64_t nk,
                                                          const int32_t* nz_j, const float* nz_c, int64_t nz,
                                                          uint32_t* keys, uint32_t& kmin, uint32_t& kmax, float& sum,
                                                          float& sumsq) {
  constexpr int NB = 64 / kAccLanes;  // accumulators per 64 scores
  vacc_u vmax = vacc_u{}, vmin = vacc_u{} + 0xFFFFFFFFu;
  vacc vs{}, vq{};
  int64_t x = 0;
  for (; x + 64 <= nk; x += 64) {
    vacc acc[NB];
    for (int q = 0; q < NB; ++q) acc[q] = vacc{};
    for (int64_t t = 0; t < nz; ++t) {
      const float* wr = wb + nz_j[t] * ws_j + x;
      const vacc cv = splat_acc(nz_c[t]);
      for (int q = 0; q < NB; ++q) acc[q] += cv * load_acc(wr + kAccLanes * q);
    }
    vacc ts[NB], tq[NB];  // pairwise sums: ((a0 + a1) + (a2 + a3)) + ...
    for (int q = 0; q < NB; ++q) {
      ts[q] = acc[q];
      tq[q] = acc[q] * acc[q];
    }
    for (int w = NB / 2; w >= 1; w /= 2) {
      for (int q = 0; q < w; ++q) {
        ts[q] = ts[2 * q] + ts[2 * q + 1];
        tq[q] = tq[2 * q] + tq[2 * q + 1];
      }
    }
    vs += ts[0];
    vq += tq[0];
    for (int q = 0; q < NB; ++q) {
      const vacc_u k = order_key_acc(acc[q]);
      std::memcpy(keys + x + kAccLanes * q, &k, sizeof(k));
      vmax = k > vmax ? k : vmax;
      vmin = k < vmin ? k : vmin;
    }
  }
  for (; x + kAccLanes <= nk; x += kAccLanes) {
    vacc a{};
    for (int64_t t = 0; t < nz; ++t) a += splat_acc(nz_c[t]) * load_acc(wb + nz_j[t] * ws_j + x);
    vs += a;
    vq += a * a;
    const vacc_u k = order_key_acc(a);
    std::memcpy(keys + x, &k, sizeof(k));
    vmax = k > vmax ? k : vmax;
    vmin = k < vmin ? k : vmin;
  }
#if defined(__AVX512F__)
  // the last nk % 16 scores as one masked vector (their scalar loop, with a gather per nonzero row, cost as much as
  // the three 64-score blocks before it at nk = 197); lanes past nk load 0, add 0 to the sums and are kept out of
  // the min / max
  static_assert(kAccLanes == 16, "AVX-512: one native vector is 16 scores");
  if (x < nk) {
    const __mmask16 lanes = first_lanes(nk - x);
    vacc a{};
    for (int64_t t = 0; t < nz; ++t) {
      const vacc w = _mm512_maskz_loadu_ps(lanes, wb + nz_j[t] * ws_j + x);
      a += splat_acc(nz_c[t]) * w;
    }
    vs += a;
    vq += a * a;
    const vacc_u k = order_key_acc(a);
    __m512i kv;
    std::memcpy(&kv, &k, sizeof(kv));
    _mm512_mask_storeu_epi32(keys + x, lanes, kv);
    vacc_u valid;  // all ones in the lanes below nk
    const __m512i vm = _mm512_maskz_mov_epi32(lanes, _mm512_set1_epi32(-1));
    std::memcpy(&valid, &vm, sizeof(valid));
    const vacc_u kmaxed = k & valid, kmined = k | ~valid;  // outside: 0 (below every key), all ones (above)
    vmax = kmaxed > vmax ? kmaxed : vmax;
    vmin = kmined < vmin ? kmined : vmin;
    x = nk;
  }
#endif
  kmax = hmax_acc_u(vmax);
  kmin = ~hmax_acc_u(~vmin);
  sum = hsum_acc(vs);
  sumsq = hsum_acc(vq);
  for (; x < nk; ++x) {
    float a = 0;
    for (int64_t t = 0; t < nz; ++t) a += nz_c[t] * wb[nz_j[t] * ws_j + x];
    sum += a;
    sumsq += a * a;
    keys[x] = order_key(a);
    kmax = std::max(kmax, keys[x]);
    kmin = std::min(kmin, keys[x]);
  }
}

inline float key_to_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Number of keys >= t, and the existing keys next to t: the smallest key >= t (min_ge; 0xFFFFFFFF if none) and
// the largest key < t (max_lt; 0 if none), so that a search can snap its interval to keys that occur.
inline int64_t count_ge_snap(const uint32_t* keys, int64_t n, uint32_t t, uint32_t& min_ge, uint32_t& max_lt) {
  v16u acc{}, vmin = v16u{} + 0xFFFFFFFFu, vmax{};
  const v16u tv = v16u{} + t;
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    v16u k;
    std::memcpy(&k, keys + x, sizeof(k));
    const v16u ge = k >= tv;
    acc -= ge;
    vmin = ge ? (k < vmin ? k : vmin) : vmin;
    vmax = ge ? vmax : (k > vmax ? k : vmax);
  }
  int64_t c = hadd16u(acc);
  min_ge = hmin16u(vmin);
  max_lt = hmax16u(vmax);
  for (; x < n; ++x) {
    const bool ge = keys[x] >= t;
    c += ge;
    if (ge) min_ge = std::min(min_ge, keys[x]);
    else max_lt = std::max(max_lt, keys[x]);
  }
  return c;
}

// Drop the m - budget smallest of the candidate keys ck[0..m) (among equal keys the highest index ci), in place:
// the kept candidates end up in ck/ci[0..budget) (ck and ci have 16 lanes of slack past m). A surplus of a few keys:
// each drop is one vectorised pass for the smallest key, one for the highest index holding it, one for its position.
inline void trim_candidates(uint32_t* ck, int32_t* ci, int64_t m, int64_t budget) {
#if defined(__AVX512F__)
  while (m > budget) {
    __m512i vmin = _mm512_set1_epi32(-1);
    for (int64_t a = 0; a < m; a += 16) {
      const __mmask16 lanes = first_lanes(m - a);
      vmin = _mm512_mask_min_epu32(vmin, lanes, vmin, _mm512_loadu_si512(ck + a));
    }
    const __m512i kmin = _mm512_set1_epi32(static_cast<int>(_mm512_reduce_min_epu32(vmin)));
    __m512i vidx = _mm512_set1_epi32(-1);
    for (int64_t a = 0; a < m; a += 16) {
      const __mmask16 lanes = first_lanes(m - a);
      const __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_loadu_si512(ck + a), kmin);
      vidx = _mm512_mask_max_epi32(vidx, eq, vidx, _mm512_loadu_si512(ci + a));
    }
    const __m512i imax = _mm512_set1_epi32(_mm512_reduce_max_epi32(vidx));
    int64_t pos = m - 1;
    for (int64_t a = 0; a < m; a += 16) {
      const __mmask16 lanes = first_lanes(m - a);
      const unsigned hit = _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_loadu_si512(ci + a), imax);
      if (hit) {
        pos = a + __builtin_ctz(hit);
        break;
      }
    }
    ck[pos] = ck[m - 1];
    ci[pos] = ci[m - 1];
    --m;
  }
#else
  while (m > budget) {  // drop the smallest key; among equal ones, the highest index
    int64_t pos = 0;
    for (int64_t a = 1; a < m; ++a) {
      const bool lower = ck[a] < ck[pos] || (ck[a] == ck[pos] && ci[a] > ci[pos]);
      pos = lower ? a : pos;
    }
    ck[pos] = ck[m - 1];
    ci[pos] = ci[m - 1];
    --m;
  }
#endif
}

// Selection by threshold search, for the usual case: find a key threshold t with
// budget <= #(keys >= t) <= budget + slack by counting (vectorised) at guessed thresholds -- the first guess
// from the row's mean and standard deviation (`guess`), then interpolation in float space alternating
// with bisection in key space, each interval end snapped to the keys that occur (so a few distinct values, as in
// sums of a few rows of a pruned W_up, settle in a few passes) -- collect those keys (AVX-512 compress where
// available), and drop the surplus smallest (among equal keys the highest index), so ties go to the lowest indices
// as in select_topk. When a block of equal keys straddles the boundary (the threshold interval closes to one key;
// common after training: many scores are exactly 0 where W_up is pruned), one pass keeps the keys above it
// and the lowest-index keys of the block. Returns false (the caller falls back to select_topk) if the search
// does not settle within 48 counting passes.
bool select_topk_search(const uint32_t* keys, int64_t n, int64_t budget, int64_t* out, TopkScratch& S, uint32_t kmin,
                        uint32_t kmax, uint32_t guess) {
  const int64_t slack = 2;  // measured: a narrower window costs more counting passes, a wider one more trimming
  uint64_t lo = kmin, hi = static_cast<uint64_t>(kmax) + 1;  // invariant: #(>= lo) >= budget > #(>= hi)
  int64_t clo = n, chi = 0, c = 0;
  uint64_t t = guess;
  if (t <= lo || t >= hi) t = lo + (hi - lo) / 2;
  for (int step = 1;; ++step) {
    uint32_t min_ge, max_lt;
    c = count_ge_snap(keys, n, static_cast<uint32_t>(t), min_ge, max_lt);
    if (c >= budget && c <= budget + slack) break;
    if (c > budget) {  // snapped up to the smallest key that occurs at or above t: the same count
      lo = min_ge;
      clo = c;
    } else {  // snapped down to just above the largest key below t: the same count
      hi = static_cast<uint64_t>(max_lt) + 1;
      chi = c;
    }
    if (hi - lo <= 1) {  // a block of equal keys straddles the boundary: take all keys >= lo, trim below
      t = lo;
      c = clo;
      break;
    }
    if (step > 48) return false;
    if (step % 3 == 0) {
      t = lo + (hi - lo) / 2;
    } else {
      const double f = static_cast<double>(clo - (budget + slack / 2)) / static_cast<double>(clo - chi);
      const double flo = key_to_float(static_cast<uint32_t>(lo));
      const double fhi = key_to_float(static_cast<uint32_t>(std::min<uint64_t>(hi, kmax)));
      t = order_key(static_cast<float>(flo + f * (fhi - flo)));
      t = std::min(std::max(t, lo + 1), hi - 1);
    }
  }
  if (c > static_cast<int64_t>(S.cand.size())) return false;
  int32_t* ci = S.cand.data();
  uint32_t* ck = S.ckeys.data();
  const uint32_t tt = static_cast<uint32_t>(t);
  int64_t m = 0, x = 0;
#if defined(__AVX512F__)
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(tt));
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; x + 16 <= n; x += 16) {
    const __m512i k = _mm512_loadu_si512(keys + x);
    const __mmask16 msk = _mm512_cmpge_epu32_mask(k, tv);
    // compress in registers, then store all 16 lanes (the buffers have 16 lanes of slack): the memory form of
    // vpcompressd is microcoded and far slower on some CPUs (AMD Zen 4)
    _mm512_storeu_si512(ci + m, _mm512_maskz_compress_epi32(msk, iv));
    _mm512_storeu_si512(ck + m, _mm512_maskz_compress_epi32(msk, k));
    m += __builtin_popcount(static_cast<unsigned>(msk));
    iv = _mm512_add_epi32(iv, sixteen);
  }
#endif
  for (; x < n; ++x) {
    ci[m] = static_cast<int32_t>(x);
    ck[m] = keys[x];
    m += keys[x] >= tt;
  }
  if (m - budget > slack) {  // the tie case: keys > tt all in, then the keys == tt of the lowest indices (one pass)
    int64_t above = 0;
    for (int64_t a = 0; a < m; ++a) above += ck[a] > tt;
    int64_t eq = budget - above, w = 0;  // >= 1: fewer than budget keys lie above the tie block
    for (int64_t a = 0; a < m && w < budget; ++a) {
      if (ck[a] > tt) {
        out[w++] = ci[a];
      } else if (eq > 0) {
        out[w++] = ci[a];
        --eq;
      }
    }
    return true;
  }
  trim_candidates(ck, ci, m, budget);
  for (int64_t a = 0; a < budget; ++a) out[a] = ci[a];
  return true;
}

void select_topk(const uint32_t* keys, int64_t n, int64_t budget, int64_t* out, TopkScratch& S, uint32_t kmin,
                 uint32_t kmax);

#ifndef BENCH_SUITE_TOPK_WINDOW_LO
#define BENCH_SUITE_TOPK_WINDOW_LO 1.3
#define BENCH_SUITE_TOPK_WINDOW_HI 0.9
#endif
// The window of select_topk_window: the normal quantiles of budget + kWindowLo sqrt(budget) and budget - kWindowHi
// sqrt(budget) keys (tuned on captured predictor scores: a window that misses costs a whole search, a wide one ranks
// more keys)
constexpr double kWindowLo = BENCH_SUITE_TOPK_WINDOW_LO, kWindowHi = BENCH_SUITE_TOPK_WINDOW_HI;
constexpr int kRankVectors = 3;  // window keys up to 48 are ranked by counting (branch-free), more by a search

#if defined(__AVX512F__)
// The cnt int32 indices of idx32's low lanes, widened to int64, to out[0 .. cnt) (masked stores: nothing past it).
inline void store_indices(int64_t* out, __m512i idx32, int cnt) {
  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(idx32));
  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(idx32, 1));
  _mm512_mask_storeu_epi64(out, static_cast<__mmask8>(cnt >= 8 ? 0xFFu : (1u << cnt) - 1u), lo);
  if (cnt > 8) _mm512_mask_storeu_epi64(out + 8, static_cast<__mmask8>((1u << (cnt - 8)) - 1u), hi);
}
#endif

// The indices idx of the `need` largest of the nb keys k (positions in increasing index order; ties to the lower
// position), into out[0 .. need), 0 < need <= nb. Up to 16 * kRankVectors keys: the rank of every key (greater keys,
// and equal keys at lower positions) for all lanes at once, one broadcast compare per key and vector, branch-free;
// more: select_topk_search on the keys (k and idx must then not be S.cand / S.ckeys, its scratch).
void select_largest(const uint32_t* k, const int32_t* idx, int64_t nb, int64_t need, int64_t* out, TopkScratch& S) {
  if (need == nb) {
    for (int64_t a = 0; a < nb; ++a) out[a] = idx[a];
    return;
  }
  if (nb <= 16 * kRankVectors) {
#if defined(__AVX512F__)
    __m512i kv[kRankVectors], cnt[kRankVectors];
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int nv = static_cast<int>((nb + 15) / 16);
    for (int u = 0; u < nv; ++u) {
      kv[u] = _mm512_maskz_loadu_epi32(first_lanes(nb - 16 * u), k + 16 * u);
      cnt[u] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t a = 0; a < nb; ++a) {
      const __m512i ka = _mm512_set1_epi32(static_cast<int>(k[a]));
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a));
      for (int u = 0; u < nv; ++u) {
        const __m512i pos = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * u));
        const __mmask16 gt = _mm512_cmpgt_epu32_mask(ka, kv[u]);  // key a beats the lane's key
        const __mmask16 tie = _mm512_mask_cmpeq_epi32_mask(_mm512_cmpgt_epi32_mask(pos, av), ka, kv[u]);
        cnt[u] = _mm512_mask_add_epi32(cnt[u], gt | tie, cnt[u], one);
      }
    }
    const __m512i needv = _mm512_set1_epi32(static_cast<int>(need));
    int64_t o = 0;
    for (int u = 0; u < nv; ++u) {
      const __mmask16 keep = _mm512_mask_cmplt_epi32_mask(first_lanes(nb - 16 * u), cnt[u], needv);
      const int nk = __builtin_popcount(static_cast<unsigned>(keep));
      if (nk) store_indices(out + o, _mm512_maskz_compress_epi32(keep, _mm512_loadu_si512(idx + 16 * u)), nk);
      o += nk;
    }
#else  // the same count on 8-lane vector extensions (one AVX2 register; GCC scalarises 16-lane unsigned
       // compares without AVX-512)
    typedef int32_t v8i __attribute__((vector_size(32)));
    constexpr int kLanes = 8, kVecs = 16 * kRankVectors / kLanes;
    // keys with the sign bit flipped compare as signed integers in the same order (AVX2 has signed compares only)
    v8i kv[kVecs], cnt[kVecs], pos[kVecs];
    const int nv = static_cast<int>((nb + kLanes - 1) / kLanes);
    for (int u = 0; u < nv; ++u) {
      for (int q = 0; q < kLanes; ++q) {
        const int64_t a = kLanes * u + q;
        kv[u][q] = static_cast<int32_t>((a < nb ? k[a] : 0u) ^ 0x80000000u);  // padding lanes are never kept
        pos[u][q] = static_cast<int32_t>(a);
      }
      cnt[u] = v8i{};
    }
    for (int64_t a = 0; a < nb; ++a) {
      const v8i ka = v8i{} + static_cast<int32_t>(k[a] ^ 0x80000000u);
      const v8i av = v8i{} + static_cast<int32_t>(a);
      for (int u = 0; u < nv; ++u)  // compares give -1 per true lane: subtracting counts
        cnt[u] -= (ka > kv[u]) | ((pos[u] > av) & (ka == kv[u]));
    }
    int64_t o = 0;
    for (int u = 0; u < nv; ++u) {
      for (int q = 0; q < kLanes && kLanes * u + q < nb; ++q) {
        if (cnt[u][q] < need) out[o++] = idx[kLanes * u + q];
      }
    }
#endif
    return;
  }
  uint32_t kmin = 0xFFFFFFFFu, kmax = 0;
  for (int64_t a = 0; a < nb; ++a) {
    kmin = std::min(kmin, k[a]);
    kmax = std::max(kmax, k[a]);
  }
  int64_t* pos = S.pos.data();
  const uint32_t guess = kmin + static_cast<uint32_t>(static_cast<double>(kmax - kmin) *
                                                      (1.0 - static_cast<double>(need) / static_cast<double>(nb)));
  if (!select_topk_search(k, nb, need, pos, S, kmin, kmax, guess)) select_topk(k, nb, need, pos, S, kmin, kmax);
  for (int64_t a = 0; a < need; ++a) out[a] = idx[pos[a]];
}

// Selection around a guessed window [tlo, thi) (tlo < thi), for the usual case: one pass collects the keys >= tlo
// (AVX-512 compress, in index order) and counts the keys >= thi. If the window brackets the budget-th largest key
// (#(>= tlo) >= budget >= #(>= thi)), every key >= thi is in and the remaining budget - #(>= thi) are the largest of
// the few keys inside the window (select_largest); if #(>= thi) > budget, the top-B all lie among the collected keys
// (select_largest on them). Same set as select_topk_search / select_topk. Returns false, having written nothing, when
// fewer than budget keys are >= tlo: the caller searches the keys below tlo (its upper bound: `below`).
bool select_topk_window(const uint32_t* keys, int64_t n, int64_t budget, int64_t* out, TopkScratch& S, uint32_t tlo,
                        uint32_t thi, uint32_t& below) {
#if defined(__AVX512F__)
  int32_t* ci = S.cand.data();
  uint32_t* ck = S.ckeys.data();
  const __m512i lov = _mm512_set1_epi32(static_cast<int>(tlo)), hiv = _mm512_set1_epi32(static_cast<int>(thi));
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0, chi = 0;
  for (int64_t x = 0; x < n; x += 16) {
    const __mmask16 lanes = first_lanes(n - x);
    const __m512i k = _mm512_maskz_loadu_epi32(lanes, keys + x);
    const __mmask16 ml = _mm512_mask_cmpge_epu32_mask(lanes, k, lov);
    const __mmask16 mh = _mm512_mask_cmpge_epu32_mask(lanes, k, hiv);
    _mm512_storeu_si512(ci + m, _mm512_maskz_compress_epi32(ml, iv));
    _mm512_storeu_si512(ck + m, _mm512_maskz_compress_epi32(ml, k));
    m += __builtin_popcount(static_cast<unsigned>(ml));
    chi += __builtin_popcount(static_cast<unsigned>(mh));
    iv = _mm512_add_epi32(iv, sixteen);
  }
  if (m < budget) {
    below = tlo - 1;  // tlo > every key's minimum here: fewer than budget <= n keys are >= tlo
    return false;
  }
  int32_t* bi = S.bidx.data();
  uint32_t* bk = S.bkeys.data();
  if (chi > budget) {  // the top-B all lie among the m collected keys
    std::memcpy(bk, ck, static_cast<size_t>(m) * sizeof(uint32_t));
    std::memcpy(bi, ci, static_cast<size_t>(m) * sizeof(int32_t));
    select_largest(bk, bi, m, budget, out, S);
    return true;
  }
  // keys >= thi straight to out, the window's keys to bk / bi
  int64_t w = 0, nb = 0;
  for (int64_t a = 0; a < m; a += 16) {
    const __mmask16 lanes = first_lanes(m - a);
    const __m512i k = _mm512_loadu_si512(ck + a), idx = _mm512_loadu_si512(ci + a);
    const __mmask16 above = _mm512_mask_cmpge_epu32_mask(lanes, k, hiv);
    const __mmask16 inside = lanes & static_cast<__mmask16>(~above);
    const int na = __builtin_popcount(static_cast<unsigned>(above));
    if (na) store_indices(out + w, _mm512_maskz_compress_epi32(above, idx), na);
    w += na;
    _mm512_storeu_si512(bi + nb, _mm512_maskz_compress_epi32(inside, idx));
    _mm512_storeu_si512(bk + nb, _mm512_maskz_compress_epi32(inside, k));
    nb += __builtin_popcount(static_cast<unsigned>(inside));
  }
  if (budget > chi) select_largest(bk, bi, nb, budget - chi, out + w, S);  // nb >= budget - chi since m >= budget
  return true;
#else  // the same pass without AVX-512's compress: AVX2 permutes from a table, else branch-free scalar stores
  int32_t* ci = S.cand.data();
  uint32_t* ck = S.ckeys.data();
  int64_t m = 0, chi = 0, x = 0;
#if defined(__AVX2__)
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned order as signed compares
  const __m256i lov = _mm256_set1_epi32(static_cast<int>(tlo ^ 0x80000000u));
  const __m256i hiv = _mm256_set1_epi32(static_cast<int>(thi ^ 0x80000000u));
  __m256i iv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; x + 8 <= n; x += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + x));
    const __m256i ks = _mm256_xor_si256(k, flip);
    const auto below = [&](__m256i t) {  // lanes whose key is < t, as 8 bits
      return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(t, ks))));
    };
    const unsigned ml = ~below(lov) & 0xFFu, mh = ~below(hiv) & 0xFFu;
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompress8.lanes[ml])));
    // all 8 lanes stored (the buffers have 16 lanes of slack), the first popcount(ml) of them kept
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + m), _mm256_permutevar8x32_epi32(iv, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ck + m), _mm256_permutevar8x32_epi32(k, perm));
    m += __builtin_popcount(ml);
    chi += __builtin_popcount(mh);
    iv = _mm256_add_epi32(iv, _mm256_set1_epi32(8));
  }
#endif
  for (; x < n; ++x) {
    const uint32_t k = keys[x];
    ci[m] = static_cast<int32_t>(x);
    ck[m] = k;
    m += k >= tlo;
    chi += k >= thi;
  }
  if (m < budget) {
    below = tlo - 1;
    return false;
  }
  int32_t* bi = S.bidx.data();
  uint32_t* bk = S.bkeys.data();
  if (chi > budget) {
    std::memcpy(bk, ck, static_cast<size_t>(m) * sizeof(uint32_t));
    std::memcpy(bi, ci, static_cast<size_t>(m) * sizeof(int32_t));
    select_largest(bk, bi, m, budget, out, S);
    return true;
  }
  int64_t w = 0, nb = 0;
  for (int64_t a = 0; a < m; ++a) {
    if (ck[a] >= thi) {
      out[w++] = ci[a];
    } else {
      bk[nb] = ck[a];
      bi[nb++] = ci[a];
    }
  }
  if (budget > chi) select_largest(bk, bi, nb, budget - chi, out + w, S);
  return true;
#endif
}

// Indices of the `budget` largest of keys[0..n) (keys within [kmin, kmax]) into out, unordered.
// Radix select: a histogram of the top 11 key bits (over the touched range of bins) finds the boundary bin;
// one branch-free pass collects the keys at or above it; keys above it are in; inside the bin, an exact
// rank count (ties by index) when it is small, else histograms of the lower bits [20:10] and [9:0].
void select_topk(const uint32_t* keys, int64_t n, int64_t budget, int64_t* out, TopkScratch& S, uint32_t kmin,
                 uint32_t kmax) {
  uint32_t* hist = S.hist.data();
  int32_t* cand = S.cand.data();
  int32_t* bin = S.cand2.data();
  uint32_t* bin_keys = S.ckeys.data();
  const int64_t dmin = kmin >> 21, dmax = kmax >> 21;
  std::memset(hist + dmin, 0, static_cast<size_t>(dmax - dmin + 1) * sizeof(uint32_t));
  for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> 21];
  int64_t need = budget, d = dmax;
  while (static_cast<int64_t>(hist[d]) < need) need -= hist[d--];
  const uint32_t lo = static_cast<uint32_t>(d) << 21;
  const uint64_t hi = static_cast<uint64_t>(lo) + (uint64_t(1) << 21);
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    cand[c] = static_cast<int32_t>(i);
    c += keys[i] >= lo;
  }
  int64_t w = 0, m = 0;
  for (int64_t a = 0; a < c; ++a) {
    const int32_t i = cand[a];
    const uint32_t k = keys[i];
    const bool above = k >= hi;
    out[w] = i;  // w < budget here: at most budget - 1 keys lie above the boundary bin
    w += above;
    bin[m] = i;
    bin_keys[m] = k;
    m += !above;
  }
  if (m == need) {
    for (int64_t a = 0; a < m; ++a) out[w++] = bin[a];
    return;
  }
  if (m <= 128) {
    for (int64_t a = 0; a < m; ++a) {
      const uint32_t ka = bin_keys[a];
      int32_t rank = 0;
      for (int64_t b = 0; b < m; ++b) rank += bin_keys[b] > ka;
      for (int64_t b = 0; b < a; ++b) rank += bin_keys[b] == ka;
      if (rank < need) out[w++] = bin[a];  // (a branch-free store could write one past the row)
    }
    return;
  }
  int32_t* cur = bin;
  int32_t* alt = cand;
  int64_t cc = m;
  for (int shift : {10, 0}) {
    if (cc == need) break;
    const uint32_t mask = shift == 10 ? 0x7FFu : 0x3FFu;
    std::memset(hist, 0, 2048 * sizeof(uint32_t));
    uint32_t emax = 0;
    for (int64_t a = 0; a < cc; ++a) {
      const uint32_t dig = (keys[cur[a]] >> shift) & mask;
      ++hist[dig];
      emax = std::max(emax, dig);
    }
    int64_t e = emax;
    while (static_cast<int64_t>(hist[e]) < need) need -= hist[e--];
    int64_t c2 = 0;
    for (int64_t a = 0; a < cc; ++a) {
      const int64_t dig = (keys[cur[a]] >> shift) & mask;
      if (dig > e) {
        out[w++] = cur[a];
      } else if (dig == e) {
        alt[c2++] = cur[a];
      }
    }
    std::swap(cur, alt);
    cc = c2;
  }
  for (int64_t a = 0; a < need; ++a) out[w++] = cur[a];  // equal keys: the lowest indices
}

at::Tensor connectivity_topk_cpu(const at::Tensor& coef, const at::Tensor& w_up_in, int64_t budget) {
  TORCH_CHECK_VALUE(coef.device().is_cpu() && w_up_in.device().is_cpu(),
                    "connectivity_topk: the C++ kernel runs on the CPU only");
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat && w_up_in.scalar_type() == at::kFloat,
                   "connectivity_topk: coef and w_up must be float32, got ", coef.scalar_type(), " and ",
                   w_up_in.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 4, "connectivity_topk: coef must be [B, H, Nq, n_down], got ", coef.sizes());
  TORCH_CHECK_VALUE(w_up_in.dim() == 3 || w_up_in.dim() == 4,
                    "connectivity_topk: w_up must be [Hw, n_down, Nk] or [B, Hw, n_down, Nk], got ", w_up_in.sizes());
  const at::Tensor w_up = w_up_in.dim() == 3 ? w_up_in.unsqueeze(0) : w_up_in;
  const int64_t B = coef.size(0), H = coef.size(1), Nq = coef.size(2), nd = coef.size(3);
  const int64_t Bw = w_up.size(0), Hw = w_up.size(1), Nk = w_up.size(3);
  TORCH_CHECK_VALUE(w_up.size(2) == nd, "connectivity_topk: w_up has ", w_up.size(2), " rows, coef has n_down = ", nd);
  TORCH_CHECK_VALUE((Bw == 1 || Bw == B) && (Hw == 1 || Hw == H),
                    "connectivity_topk: w_up's batch/head dims must be 1 or match coef's (", B, ", ", H, "), got ",
                    w_up_in.sizes());
  TORCH_CHECK_VALUE(Nk >= 1 && budget >= 1 && budget <= Nk, "connectivity_topk: budget must lie in [1, Nk = ", Nk,
                    "], got ", budget);
  TORCH_CHECK_VALUE(Nk < (int64_t(1) << 31), "connectivity_topk: too many keys");
  TORCH_CHECK_VALUE((nd <= 1 || coef.stride(3) == 1) && (Nk <= 1 || w_up.stride(3) == 1),
                    "connectivity_topk: the last dims of coef and w_up must be unit-stride (call .contiguous())");

  at::Tensor out = at::empty({B, H, Nq, budget}, coef.options().dtype(at::kLong));
  const int64_t rows = B * H * Nq;
  if (rows == 0) return out;
  const float* cp = coef.const_data_ptr<float>();
  const float* wp = w_up.const_data_ptr<float>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t cs_b = coef.stride(0), cs_h = coef.stride(1), cs_n = coef.stride(2);
  const int64_t ws_b = Bw == 1 ? 0 : w_up.stride(0), ws_h = Hw == 1 ? 0 : w_up.stride(1), ws_j = w_up.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Nk, 1));
  // first threshold guess of the search: mean + z sd with z the standard normal quantile of 1 - budget / Nk; the
  // window of select_topk_window of select_topk_window around it
  auto normal_quantile = [](double tail) {  // z with 0.5 erfc(z / sqrt 2) = tail (decreasing in z)
    double zlo = -8.0, zhi = 8.0;
    for (int it = 0; it < 60; ++it) {
      const double zm = 0.5 * (zlo + zhi);
      (0.5 * std::erfc(zm / std::sqrt(2.0)) > tail ? zlo : zhi) = zm;
    }
    return static_cast<float>(0.5 * (zlo + zhi));
  };
  const double tail = static_cast<double>(budget) / static_cast<double>(Nk);
  const float z = normal_quantile(tail);
  const double root = std::sqrt(static_cast<double>(budget));
  const float z_lo = normal_quantile(std::min(1.0, (budget + kWindowLo * root) / static_cast<double>(Nk)));
  const float z_hi = normal_quantile(std::max(0.5, budget - kWindowHi * root) / static_cast<double>(Nk));

  // The top-B of one row of a single positive coefficient c_j is the top-B of W_up row j (c > 0 keeps the order):
  // selected once per (w batch, w head, j) and copied to every such row (after training many rows have at most
  // one coefficient above tau). Skipped when W_up is per sample and there would be as many lists as rows.
  const int64_t lists = Bw * Hw * nd;
  std::vector<int64_t> single;
  if (budget < Nk && lists * 4 <= rows) {
    single.resize(static_cast<size_t>(lists * budget));
    at::parallel_for(0, lists, 1, [&](int64_t begin, int64_t end) {
      TopkScratch& S = topk_scratch();
      S.fit(Nk, nd);
      const int32_t j0 = 0;
      const float one = 1.0f;
      for (int64_t l = begin; l < end; ++l) {
        const int64_t j = l % nd, bh = l / nd, hw = bh % Hw, bw = bh / Hw;
        const float* wrow = wp + bw * (Bw == 1 ? 0 : w_up.stride(0)) + hw * (Hw == 1 ? 0 : w_up.stride(1)) + j * ws_j;
        uint32_t kmin, kmax;
        float sum, sumsq;
        row_score_keys(wrow, 0, Nk, &j0, &one, 1, S.keys.data(), kmin, kmax, sum, sumsq);
        int64_t* orow = single.data() + l * budget;
        if (kmin == kmax) {
          for (int64_t x = 0; x < budget; ++x) orow[x] = x;
          continue;
        }
        const float mean = sum / static_cast<float>(Nk);
        const float sd = std::sqrt(std::max(0.0f, sumsq / static_cast<float>(Nk) - mean * mean));
        if (!std::isfinite(mean + z * sd) ||
            !select_topk_search(S.keys.data(), Nk, budget, orow, S, kmin, kmax, order_key(mean + z * sd))) {
          select_topk(S.keys.data(), Nk, budget, orow, S, kmin, kmax);
        }
      }
    });
  }

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    TopkScratch& S = topk_scratch();
    S.fit(Nk, nd);
    uint32_t* keys = S.keys.data();
    int32_t* nz_j = S.nz_j.data();
    float* nz_c = S.nz_c.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % Nq, bh = t / Nq, h = bh % H, b = bh / H;
      const float* crow = cp + b * cs_b + h * cs_h + i * cs_n;
      const int64_t nz = row_nonzeros(crow, nd, nz_j, nz_c);
      int64_t* orow = op + t * budget;
      if (nz == 1 && nz_c[0] > 0.0f && !single.empty()) {  // one positive coefficient: W_up row j's top-B
        const int64_t l = ((Bw == 1 ? 0 : b) * Hw + (Hw == 1 ? 0 : h)) * nd + nz_j[0];
        std::memcpy(orow, single.data() + l * budget, static_cast<size_t>(budget) * sizeof(int64_t));
        continue;
      }
      uint32_t kmin, kmax;
      float sum, sumsq;
      row_score_keys(wp + b * ws_b + h * ws_h, ws_j, Nk, nz_j, nz_c, nz, keys, kmin, kmax, sum, sumsq);
      if (budget == Nk || kmin == kmax) {  // everything, or all scores equal: keys 0 .. budget-1
        for (int64_t x = 0; x < budget; ++x) orow[x] = x;
        continue;
      }
      const float mean = sum / static_cast<float>(Nk);
      const float sd = std::sqrt(std::max(0.0f, sumsq / static_cast<float>(Nk) - mean * mean));
      const float flo = mean + z_lo * sd, fhi = mean + z_hi * sd;
      uint32_t below = kmax;
      if (std::isfinite(flo) && std::isfinite(fhi) && order_key(flo) < order_key(fhi) &&
          select_topk_window(keys, Nk, budget, orow, S, order_key(flo), order_key(fhi), below)) {
        continue;
      }
      // the window missed low: the budget-th largest key lies below its lower end (the search's upper bound)
      if (!std::isfinite(mean + z * sd) ||
          !select_topk_search(keys, Nk, budget, orow, S, kmin, std::min(kmax, below), order_key(mean + z * sd))) {
        select_topk(keys, Nk, budget, orow, S, kmin, kmax);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bench_suite_kernels, CPU, m) { m.impl("connectivity_topk", &connectivity_topk_cpu); }
