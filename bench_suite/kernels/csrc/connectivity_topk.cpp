// Fused connectivity top-B for the CPU: Sparsifiner's connectivity mask (Wei et al., CVPR 2023, eq. 3)
//
//   idx[b, h, i, :] = the `budget` largest entries of  scores[b, h, i, :] = coef[b, h, i, :] @ w_up[b?, h?]
//
// without materialising the [B, H, Nq, Nk] score tensor: per query row, the scores are accumulated in a
// thread-local buffer over the *nonzero* coefficients only (the sparse coefficients A~_down of eq. 2; a
// zero coefficient contributes exactly nothing, so skipping it changes no value), then the top `budget`
// are selected on the order-preserving integer image ("keys") of the float scores: by a threshold search
// (count the keys above guessed thresholds until the count is just above the budget, collect, trim), or,
// when that does not settle quickly (large blocks of equal scores), by a radix select.
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
// conversion to keys and the row's mean and variance), then a few vectorised counting passes over the
// Nk keys (2-3 on normal-like scores), one collecting pass and a trim of at most 2 surplus candidates (or one
// pass over a tie block at the boundary).
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

#if defined(__AVX512F__)
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

inline v16u order_key16(v16f x) {
  v16u bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const v16u neg = (bits >> 31) != 0;  // all ones where the sign bit is set
  return neg ? ~bits : (bits | 0x80000000u);
}

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
  std::vector<uint32_t> keys, ckeys;
  std::vector<int32_t> cand, cand2, nz_j;
  std::vector<float> nz_c;
  std::vector<uint32_t> hist;
  void fit(int64_t nk, int64_t nd) {
    if (keys.size() < static_cast<size_t>(nk)) {
      keys.resize(static_cast<size_t>(nk));
      ckeys.resize(static_cast<size_t>(nk + 16));  // 16 lanes of slack for the full-vector compressed stores
      cand.resize(static_cast<size_t>(nk + 16));
      cand2.resize(static_cast<size_t>(nk));
    }
    if (nz_j.size() < static_cast<size_t>(nd)) {
      nz_j.resize(static_cast<size_t>(nd));
      nz_c.resize(static_cast<size_t>(nd));
    }
    if (hist.size() < 2048) hist.resize(2048);
  }
};

TopkScratch& topk_scratch() {
  thread_local TopkScratch s;
  return s;
}

// Scores of one query row, as order keys: keys[x] = order_key(sum_t c_t * W[j_t, x]) over the nz nonzero
// coefficients (c_t, j_t); 64 scores at a time stay in registers across the nonzero rows. Returns the
// smallest and largest key.
void row_score_keys(const float* wb, int64_t ws_j, int64_t nk, const int32_t* nz_j, const float* nz_c, int64_t nz,
                    uint32_t* keys, uint32_t& kmin, uint32_t& kmax, float& sum, float& sumsq) {
  v16u vmax = v16u{}, vmin = v16u{} + 0xFFFFFFFFu;
  v16f vs{}, vq{};
  int64_t x = 0;
  for (; x + 64 <= nk; x += 64) {
    v16f a0{}, a1{}, a2{}, a3{};
    for (int64_t t = 0; t < nz; ++t) {
      const float* wr = wb + nz_j[t] * ws_j + x;
      const v16f cv = splat(nz_c[t]);
      a0 += cv * load16(wr);
      a1 += cv * load16(wr + 16);
      a2 += cv * load16(wr + 32);
      a3 += cv * load16(wr + 48);
    }
    vs += (a0 + a1) + (a2 + a3);
    vq += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
    const v16f acc[4] = {a0, a1, a2, a3};
    for (int q = 0; q < 4; ++q) {
      const v16u k = order_key16(acc[q]);
      std::memcpy(keys + x + 16 * q, &k, sizeof(k));
      vmax = k > vmax ? k : vmax;
      vmin = k < vmin ? k : vmin;
    }
  }
  for (; x + 16 <= nk; x += 16) {
    v16f a{};
    for (int64_t t = 0; t < nz; ++t) a += splat(nz_c[t]) * load16(wb + nz_j[t] * ws_j + x);
    vs += a;
    vq += a * a;
    const v16u k = order_key16(a);
    std::memcpy(keys + x, &k, sizeof(k));
    vmax = k > vmax ? k : vmax;
    vmin = k < vmin ? k : vmin;
  }
  kmax = hmax16u(vmax);
  kmin = hmin16u(vmin);
  sum = hsum16(vs);
  sumsq = hsum16(vq);
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

// Selection by threshold search, for the usual case: find a key threshold t with
// budget <= #(keys >= t) <= budget + slack by counting (vectorised) at guessed thresholds -- the first guess
// from the row's mean and standard deviation (`guess`), then interpolation in float space alternating
// with bisection in key space, each interval end snapped to the keys that occur (so a few distinct values, as in
// sums of a few rows of a pruned W_up, settle in a few passes) -- collect those keys (AVX-512 compress where available), and drop the
// surplus smallest (among equal keys the highest index), so ties go to the lowest indices as in
// select_topk. When a block of equal keys straddles the boundary (the threshold interval closes to one key;
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
  for (int64_t a = 0; a < budget; ++a) out[a] = ci[a];
  return true;
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
  // first threshold guess of the search: mean + z sd with z the standard normal quantile of 1 - budget / Nk
  const double tail = static_cast<double>(budget) / static_cast<double>(Nk);
  double zlo = -8.0, zhi = 8.0;
  for (int it = 0; it < 60; ++it) {  // 0.5 erfc(z / sqrt 2) = tail, decreasing in z
    const double zm = 0.5 * (zlo + zhi);
    (0.5 * std::erfc(zm / std::sqrt(2.0)) > tail ? zlo : zhi) = zm;
  }
  const float z = static_cast<float>(0.5 * (zlo + zhi));

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
      int64_t nz = 0;  // the nonzero coefficients of the row (exact zeros contribute nothing)
      for (int64_t j = 0; j < nd; ++j) {
        nz_j[nz] = static_cast<int32_t>(j);
        nz_c[nz] = crow[j];
        nz += crow[j] != 0.0f;
      }
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
      if (!std::isfinite(mean + z * sd) ||
          !select_topk_search(keys, Nk, budget, orow, S, kmin, kmax, order_key(mean + z * sd))) {
        select_topk(keys, Nk, budget, orow, S, kmin, kmax);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bench_suite_kernels, CPU, m) { m.impl("connectivity_topk", &connectivity_topk_cpu); }
