// Fused sparse (top-B) attention for the CPU: the forward of Sparsifiner's sparse MHSA
// (Wei et al., CVPR 2023, eq. 4-6), without a dense N x N matrix and without gathered copies.
//
//   out[b, h, i, :] = sum_j p_j * v[b, h, idx[b, h, i, j], :],
//   p = softmax_j( scale * q[b, h, i, :] . k[b, h, idx[b, h, i, j], :] ),   j = 0 .. Bk-1
//
// Shapes: q [B, H, Nq, d], k and v [B, H, Nk, d], idx [B, H, Nq, Bk] (int64 or int32), out [B, H, Nq, d].
// q, k, v may have any strides in their first three dimensions (e.g. the permuted views that timm's
// fused QKV projection gives), but the head dimension must be unit-stride; the Python wrapper copies
// otherwise. The output is allocated as [B, Nq, H, d] and returned as its [B, H, Nq, d] permutation,
// so that the usual `out.transpose(1, 2).reshape(B, Nq, H * d)` after attention is a free view.
//
// Per query row (one task of the parallel loop over B * H * Nq rows):
//   pass 1: s_j = (scale * q) . k_{idx_j} for the Bk selected keys, into a Bk-long score buffer, and max m
//           (key rows are prefetched 8 keys ahead: they lie at random addresses, in L3 for large N);
//   softmax: s_j <- exp(s_j - m), l = sum_j s_j (vectorised exp polynomial for float32);
//   pass 2: acc = sum_j s_j * v_{idx_j} in registers (float32 accumulation), out = acc / l.
// Two passes over a small score buffer instead of a one-pass online softmax: the online form rescales
// the d-wide accumulator whenever the running max grows, which costs as much as one more AV step per
// rescale, while the score buffer (Bk floats, in L1) costs nothing measurable. Keys are read once in
// pass 1 and values once in pass 2, each a unit-stride row of d floats.
//
// `sparse_attention_rows` and `sparse_attention_backward_rows` take a `dense_rows` count: the first dense_rows query
// rows of every (b, h) attend all Nk keys in the same loop (Sparsifiner's dense CLS row, so no separate dense row, no
// concatenation, no second gradient of k and v to add), and idx [B, H, Nq - dense_rows, Bk] covers the other rows.
//
// Work: 2 * Bk * d multiply-accumulates per query row (QK^T and AV), against 2 * Nk * d for dense.
// Errors: TORCH_CHECK_* (ValueError / TypeError / IndexError in Python) for wrong devices, dtypes,
// shapes, head-dim strides and out-of-range key indices (all indices are checked on the fly).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec16.h"

namespace {

template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const void* idx;
  scalar_t* out;
  int64_t H, Nq, Nk, Bk, d;
  int64_t qs_b, qs_h, qs_n;  // strides in elements
  int64_t ks_b, ks_h, ks_n;
  int64_t vs_b, vs_h, vs_n;
  int64_t is_b, is_h, is_n, is_j;
  int64_t os_b, os_h, os_n;
  scalar_t scale;
  int64_t dense_rows;  // the first dense_rows query rows of every (b, h) attend all Nk keys (idx covers the rest)
};

// Per-thread scratch (scores and validated key indices of one query row), reused across calls.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> scores;
  std::vector<int64_t> keys;
  std::vector<scalar_t> qbuf, abuf;
  void fit(int64_t bk, int64_t d) {
    const size_t padded = static_cast<size_t>((bk + 15) / 16 * 16);
    if (scores.size() < padded) scores.resize(padded);
    if (keys.size() < static_cast<size_t>(bk)) keys.resize(static_cast<size_t>(bk));
    if (qbuf.size() < static_cast<size_t>(d)) qbuf.resize(static_cast<size_t>(d));
    if (abuf.size() < static_cast<size_t>(d)) abuf.resize(static_cast<size_t>(d));
  }
};

template <typename scalar_t>
Scratch<scalar_t>& scratch() {
  thread_local Scratch<scalar_t> s;
  return s;
}

// Key index j of the row, checked against [0, Nk); an invalid index is recorded in `bad` (first one wins)
// and replaced by 0 so the row still computes (the call raises afterwards).
template <typename index_t>
inline int64_t checked_key(const index_t* ir, int64_t j, int64_t is_j, uint64_t nk, std::atomic<int64_t>& bad) {
  const int64_t kj = static_cast<int64_t>(ir[j * is_j]);
  if (static_cast<uint64_t>(kj) >= nk) {  // also catches negatives
    int64_t none = std::numeric_limits<int64_t>::min();
    bad.compare_exchange_strong(none, kj);
    return 0;
  }
  return kj;
}

inline void row_coords(int64_t t, int64_t H, int64_t Nq, int64_t& b, int64_t& h, int64_t& i) {
  i = t % Nq;
  const int64_t bh = t / Nq;
  h = bh % H;
  b = bh / H;
}

// 0 .. n-1 as index_t, thread-local: the key list of a dense row.
template <typename index_t>
const index_t* arange_keys(int64_t n) {
  thread_local std::vector<index_t> a;
  if (static_cast<int64_t>(a.size()) < n) {
    a.resize(static_cast<size_t>(n));
    for (int64_t x = 0; x < n; ++x) a[static_cast<size_t>(x)] = static_cast<index_t>(x);
  }
  return a.data();
}

// The key list of query row i of slice (b, h): a dense row (i < dense_rows) reads all Nk keys in order, the
// others their idx row i - dense_rows. Sets ir, its stride is_j and the row's budget bk.
template <typename scalar_t, typename index_t>
inline void row_keys(const Problem<scalar_t>& P, int64_t b, int64_t h, int64_t i, const index_t*& ir, int64_t& is_j,
                     int64_t& bk) {
  if (i < P.dense_rows) {
    ir = arange_keys<index_t>(P.Nk);
    is_j = 1;
    bk = P.Nk;
  } else {
    ir = static_cast<const index_t*>(P.idx) + b * P.is_b + h * P.is_h + (i - P.dense_rows) * P.is_n;
    is_j = P.is_j;
    bk = P.Bk;
  }
}

inline int64_t max_row_keys(int64_t bk, int64_t nk, int64_t dense_rows) { return dense_rows > 0 ? std::max(bk, nk) : bk; }

// ------------------------------------------------------------------------------------------------
// Generic path: any head dim, float32 or float64 (plain loops the compiler may vectorise).
template <typename scalar_t, typename index_t>
void attend_rows_generic(const Problem<scalar_t>& P, int64_t begin, int64_t end, std::atomic<int64_t>& bad) {
  const int64_t d = P.d;
  Scratch<scalar_t>& S = scratch<scalar_t>();
  S.fit(max_row_keys(P.Bk, P.Nk, P.dense_rows), d);
  scalar_t* s = S.scores.data();
  int64_t* keys = S.keys.data();
  scalar_t* qsc = S.qbuf.data();
  scalar_t* acc = S.abuf.data();
  const uint64_t nk = static_cast<uint64_t>(P.Nk);
  for (int64_t t = begin; t < end; ++t) {
    int64_t b, h, i, is_j, Bk;
    row_coords(t, P.H, P.Nq, b, h, i);
    const index_t* ir;
    row_keys(P, b, h, i, ir, is_j, Bk);
    const scalar_t* qr = P.q + b * P.qs_b + h * P.qs_h + i * P.qs_n;
    const scalar_t* kb = P.k + b * P.ks_b + h * P.ks_h;
    const scalar_t* vb = P.v + b * P.vs_b + h * P.vs_h;
    scalar_t* orow = P.out + b * P.os_b + h * P.os_h + i * P.os_n;
    for (int64_t c = 0; c < d; ++c) qsc[c] = qr[c] * P.scale;
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < Bk; ++j) {
      keys[j] = checked_key(ir, j, is_j, nk, bad);
      const scalar_t* kr = kb + keys[j] * P.ks_n;
      scalar_t a = 0;
      for (int64_t c = 0; c < d; ++c) a += qsc[c] * kr[c];
      s[j] = a;
      m = std::max(m, a);
    }
    scalar_t l = 0;
    for (int64_t j = 0; j < Bk; ++j) {
      s[j] = std::exp(s[j] - m);
      l += s[j];
    }
    for (int64_t c = 0; c < d; ++c) acc[c] = 0;
    for (int64_t j = 0; j < Bk; ++j) {
      const scalar_t p = s[j];
      const scalar_t* vr = vb + keys[j] * P.vs_n;
      for (int64_t c = 0; c < d; ++c) acc[c] += p * vr[c];
    }
    const scalar_t inv = scalar_t(1) / l;
    for (int64_t c = 0; c < d; ++c) orow[c] = acc[c] * inv;
  }
}

// ------------------------------------------------------------------------------------------------
// Fast path: float32, head dim D = 16 * NV, with the 16-float vectors of vec16.h.
using namespace bench_suite_kernels;

// exp_nonpositive (the vectorised exp of the softmax numerators) and the native vectors (vacc) live in vec16.h.

constexpr int64_t kPrefetch = 8;  // software prefetch distance in keys (rows at random addresses)

template <typename index_t, int NV>
void attend_rows_f32(const Problem<float>& P, int64_t begin, int64_t end, std::atomic<int64_t>& bad) {
  Scratch<float>& S = scratch<float>();
  S.fit(max_row_keys(P.Bk, P.Nk, P.dense_rows), 16 * NV);
  float* s = S.scores.data();
  int64_t* keys = S.keys.data();
  const uint64_t nk = static_cast<uint64_t>(P.Nk);
  const float ninf = -std::numeric_limits<float>::infinity();
  const vacc scale = splat_acc(P.scale);

  for (int64_t t = begin; t < end; ++t) {
    int64_t b, h, i, is_j, Bk;
    row_coords(t, P.H, P.Nq, b, h, i);
    const index_t* ir;
    row_keys(P, b, h, i, ir, is_j, Bk);
    const int64_t Bk16 = (Bk + 15) / 16 * 16;
    const float* qr = P.q + b * P.qs_b + h * P.qs_h + i * P.qs_n;
    const float* kb = P.k + b * P.ks_b + h * P.ks_h;
    const float* vb = P.v + b * P.vs_b + h * P.vs_h;
    float* orow = P.out + b * P.os_b + h * P.os_h + i * P.os_n;

    constexpr int NA = NV * kAccPer16;  // native vectors per head row (vacc, vec16.h)
    vacc qv[NA];
    for (int c = 0; c < NA; ++c) qv[c] = load_acc(qr + kAccLanes * c) * scale;

    // pass 1: scores s_j = (scale q) . k_{idx_j}, and their max; 16 keys at a time, whose 16 partial-sum
    // vectors one transposing reduction (vec16.h) turns into one vector of 16 scores, then one key at a time
    // key j's partial-sum vector of (scale q) . k_{idx_j} (records the checked key; prefetches the row
    // kPrefetch keys ahead, which lies at a random address: an out-of-range index only prefetches junk)
    auto partial = [&](int64_t j) -> vacc {
      const int64_t kj = checked_key(ir, j, is_j, nk, bad);
      keys[j] = kj;
      if (j + kPrefetch < Bk) {
        const int64_t ka = static_cast<int64_t>(ir[(j + kPrefetch) * is_j]);
        if (static_cast<uint64_t>(ka) < nk) {
          const char* pr = reinterpret_cast<const char*>(kb + ka * P.ks_n);
          for (int c = 0; c < NV * 64; c += 64) __builtin_prefetch(pr + c);
        }
      }
      const float* kr = kb + kj * P.ks_n;
      vacc acc = qv[0] * load_acc(kr);
      for (int c = 1; c < NA; ++c) acc += qv[c] * load_acc(kr + kAccLanes * c);
      return acc;
    };
    float m = ninf;
    int64_t j0 = 0;
    // kAccLanes keys per reduction (16 on AVX-512; 8 on AVX2, where 16 keys' partials would spill)
    for (; j0 + kAccLanes <= Bk; j0 += kAccLanes) {
      vacc a[kAccLanes];
      for (int r = 0; r < kAccLanes; ++r) a[r] = partial(j0 + r);
      const vacc sv = hsum_block(a);
      store_acc(s + j0, sv);
      for (int r = 0; r < kAccLanes; ++r) m = sv[r] > m ? sv[r] : m;
    }
    for (int64_t j = j0; j < Bk; ++j) {
      const float sj = hsum_acc(partial(j));
      s[j] = sj;
      m = sj > m ? sj : m;
    }
    for (int64_t j = Bk; j < Bk16; ++j) s[j] = ninf;  // padding: exp gives exactly 0

    // softmax numerators e_j = exp(s_j - m) (in place) and their sum l
    const vacc mv = splat_acc(m);
    vacc lv{};
    for (int64_t j = 0; j < Bk16; j += kAccLanes) {
      const vacc e = exp_nonpositive<vacc, vacc_i>(load_acc(s + j) - mv);
      store_acc(s + j, e);
      lv += e;
    }
    const float l = hsum_acc(lv);

    // pass 2: acc = sum_j e_j v_{idx_j}; two accumulator sets hide the FMA latency
    vacc acc0[NA], acc1[NA];
    for (int c = 0; c < NA; ++c) acc0[c] = acc1[c] = vacc{};
    int64_t j = 0;
    for (; j + 1 < Bk; j += 2) {
      if (j + kPrefetch + 1 < Bk) {
        const char* p0 = reinterpret_cast<const char*>(vb + keys[j + kPrefetch] * P.vs_n);
        const char* p1 = reinterpret_cast<const char*>(vb + keys[j + kPrefetch + 1] * P.vs_n);
        for (int c = 0; c < NV * 64; c += 64) {
          __builtin_prefetch(p0 + c);
          __builtin_prefetch(p1 + c);
        }
      }
      const float* v0 = vb + keys[j] * P.vs_n;
      const float* v1 = vb + keys[j + 1] * P.vs_n;
      const vacc p0 = splat_acc(s[j]), p1 = splat_acc(s[j + 1]);
      for (int c = 0; c < NA; ++c) {
        acc0[c] += p0 * load_acc(v0 + kAccLanes * c);
        acc1[c] += p1 * load_acc(v1 + kAccLanes * c);
      }
    }
    if (j < Bk) {
      const float* v0 = vb + keys[j] * P.vs_n;
      const vacc p0 = splat_acc(s[j]);
      for (int c = 0; c < NA; ++c) acc0[c] += p0 * load_acc(v0 + kAccLanes * c);
    }
    const float inv = 1.0f / l;
    for (int c = 0; c < NA; ++c) store_acc(orow + kAccLanes * c, (acc0[c] + acc1[c]) * inv);
  }
}

template <typename scalar_t, typename index_t>
void run(const Problem<scalar_t>& P, int64_t rows_total, std::atomic<int64_t>& bad) {
  // about 64k multiply-accumulates per task chunk: large enough to amortise scheduling
  const int64_t per_row = std::max<int64_t>(1, 2 * P.Bk * P.d);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_row);
  at::parallel_for(0, rows_total, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      switch (P.d) {
        case 16: return attend_rows_f32<index_t, 1>(P, begin, end, bad);
        case 32: return attend_rows_f32<index_t, 2>(P, begin, end, bad);
        case 64: return attend_rows_f32<index_t, 4>(P, begin, end, bad);
        case 128: return attend_rows_f32<index_t, 8>(P, begin, end, bad);
        default: break;
      }
    }
    attend_rows_generic<scalar_t, index_t>(P, begin, end, bad);
  });
}

// The forward op; the first `dense_rows` query rows of every (b, h) slice attend all Nk keys and idx covers the
// other Nq - dense_rows rows (Sparsifiner's dense CLS row: dense_rows = 1; plain sparse attention: 0).
at::Tensor sparse_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& idx, double scale, int64_t dense_rows) {
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && idx.device().is_cpu(),
                    "sparse_attention: the C++ kernel runs on the CPU only");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && idx.dim() == 4,
                    "sparse_attention: q, k, v, idx must be 4-D ([B, H, N, d] and [B, H, N, Bk])");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "sparse_attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                   ", ", v.scalar_type());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "sparse_attention: q, k, v must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                   "sparse_attention: idx must be int64 or int32, got ", idx.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Nk = k.size(2), Bk = idx.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes(),
                    "sparse_attention: k and v must be [B, H, Nk, d] matching q ", q.sizes(), ", got k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(dense_rows >= 0 && dense_rows <= Nq, "sparse_attention: dense_rows must lie in [0, Nq = ", Nq,
                    "], got ", dense_rows);
  TORCH_CHECK_VALUE(idx.size(0) == B && idx.size(1) == H && idx.size(2) == Nq - dense_rows,
                    "sparse_attention: idx must be [B, H, Nq - dense_rows, Bk] = [", B, ", ", H, ", ",
                    Nq - dense_rows, ", Bk], got ", idx.sizes());
  TORCH_CHECK_VALUE(Bk >= 1 || B * H * Nq == 0, "sparse_attention: the budget Bk (idx.size(3)) must be >= 1");
  TORCH_CHECK_VALUE(d == 0 || (q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1) || B * H * Nq == 0,
                    "sparse_attention: the head dimension of q, k, v must be unit-stride (call .contiguous())");

  // [B, Nq, H, d] storage, returned as the [B, H, Nq, d] view
  at::Tensor out = at::empty({B, Nq, H, d}, q.options()).permute({0, 2, 1, 3});
  if (B * H * Nq == 0 || d == 0) return out;
  TORCH_CHECK_VALUE(Nk >= 1, "sparse_attention: there are no keys (Nk = 0)");

  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::min()};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_cpu", [&] {
    Problem<scalar_t> P{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                        idx.const_data_ptr(), out.mutable_data_ptr<scalar_t>(),
                        H, Nq, Nk, Bk, d,
                        q.stride(0), q.stride(1), q.stride(2),
                        k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2),
                        idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3),
                        out.stride(0), out.stride(1), out.stride(2),
                        static_cast<scalar_t>(scale), dense_rows};
    if (idx.scalar_type() == at::kLong) {
      run<scalar_t, int64_t>(P, B * H * Nq, bad);
    } else {
      run<scalar_t, int32_t>(P, B * H * Nq, bad);
    }
  });
  const int64_t bad_value = bad.load();
  TORCH_CHECK_INDEX(bad_value == std::numeric_limits<int64_t>::min(), "sparse_attention: idx holds key index ",
                    bad_value, " outside [0, ", Nk, ")");
  return out;
}

at::Tensor sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& idx, double scale) {
  return sparse_attention_forward(q, k, v, idx, scale, 0);
}


// ------------------------------------------------------------------------------------------------
// Backward (training): gradients of out = softmax_j(scale q . k_{idx_j}) v_{idx_j} w.r.t. q, k, v, given
// g = dL/dout. Per query row, with p the row's probabilities (recomputed, as FlashAttention does, instead
// of stored) and dp_j = g . v_{idx_j}:
//   D     = sum_j p_j dp_j            (= g . out)
//   ds_j  = p_j (dp_j - D)            (softmax backward)
//   dq   += scale ds_j k_{idx_j},  dk_{idx_j} += scale ds_j q,  dv_{idx_j} += p_j g
// Work: 5 * Bk * d multiply-accumulates per query row (scores, dp, dq, dk, dv), no N x N matrix and no
// gathered copies. The parallel loop runs over the B * H (batch, head) slices: a slice's dk/dv rows are
// written by one thread only, so the scatter-adds need no atomics and the result does not depend on the
// number of threads. dq is [B, H, Nq, d], dk and dv [B, H, Nk, d], all contiguous.
template <typename scalar_t>
struct BackwardProblem {
  Problem<scalar_t> f;  // q, k, v, idx and their strides (f.out unused)
  const scalar_t* g;
  int64_t gs_b, gs_h, gs_n;
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
};

template <typename scalar_t, typename index_t>
void backward_slices(const BackwardProblem<scalar_t>& BP, int64_t begin, int64_t end, std::atomic<int64_t>& bad) {
  const Problem<scalar_t>& P = BP.f;
  const int64_t d = P.d;
  const int64_t Nq = P.Nq, Nk = P.Nk;
  const int64_t most = max_row_keys(P.Bk, Nk, P.dense_rows);
  Scratch<scalar_t>& S = scratch<scalar_t>();
  S.fit(2 * most, d);
  scalar_t* p = S.scores.data();  // [0, most): probabilities; [most, 2 most): dp
  scalar_t* dp = p + most;
  int64_t* keys = S.keys.data();
  scalar_t* dqr = S.abuf.data();
  const uint64_t nk = static_cast<uint64_t>(Nk);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / P.H, h = t % P.H;
    const scalar_t* kb = P.k + b * P.ks_b + h * P.ks_h;
    const scalar_t* vb = P.v + b * P.vs_b + h * P.vs_h;
    scalar_t* dkb = BP.dk + t * Nk * d;
    scalar_t* dvb = BP.dv + t * Nk * d;
    for (int64_t i = 0; i < Nq; ++i) {
      const scalar_t* qr = P.q + b * P.qs_b + h * P.qs_h + i * P.qs_n;
      const scalar_t* gr = BP.g + b * BP.gs_b + h * BP.gs_h + i * BP.gs_n;
      const index_t* ir;
      int64_t is_j, Bk;
      row_keys(P, b, h, i, ir, is_j, Bk);
      // probabilities of the row (as the forward) and dp_j = g . v_j
      scalar_t m = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t j = 0; j < Bk; ++j) {
        const int64_t kj = checked_key(ir, j, is_j, nk, bad);
        keys[j] = kj;
        const scalar_t* kr = kb + kj * P.ks_n;
        const scalar_t* vr = vb + kj * P.vs_n;
        scalar_t a = 0, e = 0;
        for (int64_t c = 0; c < d; ++c) {
          a += qr[c] * kr[c];
          e += gr[c] * vr[c];
        }
        p[j] = a * P.scale;
        dp[j] = e;
        m = std::max(m, p[j]);
      }
      scalar_t l = 0;
      for (int64_t j = 0; j < Bk; ++j) {
        p[j] = std::exp(p[j] - m);
        l += p[j];
      }
      const scalar_t inv = scalar_t(1) / l;
      scalar_t D = 0;
      for (int64_t j = 0; j < Bk; ++j) {
        p[j] *= inv;
        D += p[j] * dp[j];
      }
      for (int64_t c = 0; c < d; ++c) dqr[c] = 0;
      for (int64_t j = 0; j < Bk; ++j) {
        const scalar_t ds = p[j] * (dp[j] - D) * P.scale;
        const scalar_t pj = p[j];
        const scalar_t* kr = kb + keys[j] * P.ks_n;
        scalar_t* dkr = dkb + keys[j] * d;
        scalar_t* dvr = dvb + keys[j] * d;
        for (int64_t c = 0; c < d; ++c) {
          dqr[c] += ds * kr[c];
          dkr[c] += ds * qr[c];
          dvr[c] += pj * gr[c];
        }
      }
      scalar_t* dq_row = BP.dq + (t * Nq + i) * d;
      for (int64_t c = 0; c < d; ++c) dq_row[c] = dqr[c];
    }
  }
}

// Fast path of the backward: float32, head dim D = 16 * NV, the 16-float vectors of vec16.h (the generic
// loops above leave the dot products scalar: without -ffast-math the compiler may not reorder a float sum).
template <typename index_t, int NV>
void backward_slices_f32(const BackwardProblem<float>& BP, int64_t begin, int64_t end, std::atomic<int64_t>& bad) {
  const Problem<float>& P = BP.f;
  constexpr int64_t d = 16 * NV;
  const int64_t Nq = P.Nq, Nk = P.Nk;
  const int64_t most16 = (max_row_keys(P.Bk, Nk, P.dense_rows) + 15) / 16 * 16;
  Scratch<float>& S = scratch<float>();
  S.fit(2 * most16, d);
  float* p = S.scores.data();  // [0, most16): probabilities (padding -> 0); [most16, 2 most16): dp
  float* dp = p + most16;
  int64_t* keys = S.keys.data();
  const uint64_t nk = static_cast<uint64_t>(Nk);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / P.H, h = t % P.H;
    const float* kb = P.k + b * P.ks_b + h * P.ks_h;
    const float* vb = P.v + b * P.vs_b + h * P.vs_h;
    float* dkb = BP.dk + t * Nk * d;
    float* dvb = BP.dv + t * Nk * d;
    for (int64_t i = 0; i < Nq; ++i) {
      const float* qr = P.q + b * P.qs_b + h * P.qs_h + i * P.qs_n;
      const float* gr = BP.g + b * BP.gs_b + h * BP.gs_h + i * BP.gs_n;
      const index_t* ir;
      int64_t is_j, Bk;
      row_keys(P, b, h, i, ir, is_j, Bk);  // a dense row: all Nk keys in order
      const int64_t Bk16 = (Bk + 15) / 16 * 16;
      constexpr int NA = NV * kAccPer16;  // native vectors per head row (vacc, vec16.h)
      vacc qv[NA], gv[NA];
      for (int c = 0; c < NA; ++c) {
        qv[c] = load_acc(qr + kAccLanes * c);
        gv[c] = load_acc(gr + kAccLanes * c);
      }
      // scores and dp, kAccLanes keys at a time: as many partial-sum vectors, one transposing reduction (vec16.h)
      // each for the scores and for dp (instead of two horizontal sums per key), then the remaining keys one at a time
      vacc mvb = splat_acc(ninf);
      int64_t j0 = 0;
      for (; j0 + kAccLanes <= Bk; j0 += kAccLanes) {
        vacc a[kAccLanes];
        for (int r = 0; r < kAccLanes; ++r) {
          const int64_t kj = checked_key(ir, j0 + r, is_j, nk, bad);
          keys[j0 + r] = kj;
          const float* kr = kb + kj * P.ks_n;
          a[r] = qv[0] * load_acc(kr);
          for (int c = 1; c < NA; ++c) a[r] += qv[c] * load_acc(kr + kAccLanes * c);
        }
        const vacc sv = hsum_block(a) * P.scale;
        store_acc(p + j0, sv);
        mvb = sv > mvb ? sv : mvb;
        for (int r = 0; r < kAccLanes; ++r) {
          const float* vr = vb + keys[j0 + r] * P.vs_n;
          a[r] = gv[0] * load_acc(vr);
          for (int c = 1; c < NA; ++c) a[r] += gv[c] * load_acc(vr + kAccLanes * c);
        }
        store_acc(dp + j0, hsum_block(a));
      }
      float m = hmax_acc(mvb);
      for (int64_t j = j0; j < Bk; ++j) {
        const int64_t kj = checked_key(ir, j, is_j, nk, bad);
        keys[j] = kj;
        const float* kr = kb + kj * P.ks_n;
        const float* vr = vb + kj * P.vs_n;
        vacc a = qv[0] * load_acc(kr), e = gv[0] * load_acc(vr);
        for (int c = 1; c < NA; ++c) {
          a += qv[c] * load_acc(kr + kAccLanes * c);
          e += gv[c] * load_acc(vr + kAccLanes * c);
        }
        p[j] = hsum_acc(a) * P.scale;
        dp[j] = hsum_acc(e);
        m = p[j] > m ? p[j] : m;
      }
      for (int64_t j = Bk; j < Bk16; ++j) {
        p[j] = ninf;  // exp gives exactly 0
        dp[j] = 0.0f;
      }
      const vacc mv = splat_acc(m);
      vacc lv{};
      for (int64_t j = 0; j < Bk16; j += kAccLanes) {
        const vacc ej = exp_nonpositive<vacc, vacc_i>(load_acc(p + j) - mv);
        store_acc(p + j, ej);
        lv += ej;
      }
      const vacc inv = splat_acc(1.0f / hsum_acc(lv));
      vacc Dv{};
      for (int64_t j = 0; j < Bk16; j += kAccLanes) {
        const vacc pj = load_acc(p + j) * inv;
        store_acc(p + j, pj);
        Dv += pj * load_acc(dp + j);
      }
      const float D = hsum_acc(Dv);
      vacc dq[NA];
      for (int c = 0; c < NA; ++c) dq[c] = vacc{};
      for (int64_t j = 0; j < Bk; ++j) {
        const vacc ds = splat_acc(p[j] * (dp[j] - D) * P.scale);
        const vacc pj = splat_acc(p[j]);
        const float* kr = kb + keys[j] * P.ks_n;
        float* dkr = dkb + keys[j] * d;
        float* dvr = dvb + keys[j] * d;
        for (int c = 0; c < NA; ++c) {
          dq[c] += ds * load_acc(kr + kAccLanes * c);
          store_acc(dkr + kAccLanes * c, load_acc(dkr + kAccLanes * c) + ds * qv[c]);
          store_acc(dvr + kAccLanes * c, load_acc(dvr + kAccLanes * c) + pj * gv[c]);
        }
      }
      float* dq_row = BP.dq + (t * Nq + i) * d;
      for (int c = 0; c < NA; ++c) store_acc(dq_row + kAccLanes * c, dq[c]);
    }
  }
}

template <typename scalar_t>
void run_backward(const BackwardProblem<scalar_t>& BP, int64_t slices, bool i64, int64_t d, std::atomic<int64_t>& bad) {
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      switch (i64 ? d : -d) {  // vectorised float32 path for head dims 16, 32, 64, 128
        case 16: return backward_slices_f32<int64_t, 1>(BP, begin, end, bad);
        case 32: return backward_slices_f32<int64_t, 2>(BP, begin, end, bad);
        case 64: return backward_slices_f32<int64_t, 4>(BP, begin, end, bad);
        case 128: return backward_slices_f32<int64_t, 8>(BP, begin, end, bad);
        case -16: return backward_slices_f32<int32_t, 1>(BP, begin, end, bad);
        case -32: return backward_slices_f32<int32_t, 2>(BP, begin, end, bad);
        case -64: return backward_slices_f32<int32_t, 4>(BP, begin, end, bad);
        case -128: return backward_slices_f32<int32_t, 8>(BP, begin, end, bad);
        default: break;
      }
    }
    // other head dims and float64 (gradcheck): the generic loops
    if (i64) return backward_slices<scalar_t, int64_t>(BP, begin, end, bad);
    return backward_slices<scalar_t, int32_t>(BP, begin, end, bad);
  });
}

// The backward op; as the forward op, the first `dense_rows` query rows of every (b, h) slice attend all Nk keys and
// idx [B, H, Nq - dense_rows, Bk] covers the others.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_rows(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& idx, double scale, int64_t dense_rows) {
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                        idx.device().is_cpu(),
                    "sparse_attention_backward: the C++ kernel runs on the CPU only");
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && idx.dim() == 4,
                    "sparse_attention_backward: grad_out, q, k, v, idx must be 4-D");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                       q.scalar_type() == grad_out.scalar_type(),
                   "sparse_attention_backward: grad_out, q, k, v must share one dtype");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "sparse_attention_backward: float32 or float64 only, got ", q.scalar_type());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                   "sparse_attention_backward: idx must be int64 or int32, got ", idx.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Nk = k.size(2), Bk = idx.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes() &&
                        grad_out.sizes() == q.sizes() && dense_rows >= 0 && dense_rows <= Nq && idx.size(0) == B &&
                        idx.size(1) == H && idx.size(2) == Nq - dense_rows,
                    "sparse_attention_backward: shapes disagree: grad_out ", grad_out.sizes(), ", q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes(), ", idx ", idx.sizes(), ", dense_rows ", dense_rows);
  TORCH_CHECK_VALUE(d == 0 || B * H * Nq == 0 ||
                        (q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && grad_out.stride(3) == 1),
                    "sparse_attention_backward: the head dimension must be unit-stride (call .contiguous())");
  at::Tensor dq = at::empty({B, H, Nq, d}, q.options());  // every row written; dk, dv accumulate
  at::Tensor dk = at::zeros({B, H, Nk, d}, q.options());
  at::Tensor dv = at::zeros({B, H, Nk, d}, q.options());
  if (B * H * Nq == 0 || d == 0) return {dq, dk, dv};
  TORCH_CHECK_VALUE(Bk >= 1 && Nk >= 1, "sparse_attention_backward: the budget and Nk must be >= 1");

  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::min()};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_backward_cpu", [&] {
    BackwardProblem<scalar_t> BP{
        Problem<scalar_t>{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                          idx.const_data_ptr(), nullptr, H, Nq, Nk, Bk, d,
                          q.stride(0), q.stride(1), q.stride(2),
                          k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2),
                          idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3),
                          0, 0, 0, static_cast<scalar_t>(scale), dense_rows},
        grad_out.const_data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>()};
    const bool i64 = idx.scalar_type() == at::kLong;
    run_backward<scalar_t>(BP, B * H, i64, d, bad);
  });
  const int64_t bad_value = bad.load();
  TORCH_CHECK_INDEX(bad_value == std::numeric_limits<int64_t>::min(), "sparse_attention_backward: idx holds key index ",
                    bad_value, " outside [0, ", Nk, ")");
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& idx, double scale) {
  return sparse_attention_backward_rows(grad_out, q, k, v, idx, scale, 0);
}

}  // namespace

// The library's operators are declared here; connectivity_topk.cpp adds its own with a fragment.
TORCH_LIBRARY(bench_suite_kernels, m) {
  m.def("sparse_attention(Tensor q, Tensor k, Tensor v, Tensor idx, float scale) -> Tensor");
  m.def("sparse_attention_rows(Tensor q, Tensor k, Tensor v, Tensor idx, float scale, int dense_rows) -> Tensor");
  m.def("lowrank_coefficients(Tensor q, Tensor k, Tensor w_down, float scale, float tau, int topk) -> Tensor");
  m.def("connectivity_topk(Tensor coef, Tensor w_up, int budget) -> Tensor");
  m.def("sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor idx, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sparse_attention_backward_rows(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor idx, float scale, "
        "int dense_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bench_suite_kernels, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("sparse_attention_rows", &sparse_attention_forward);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cpu);
  m.impl("sparse_attention_backward_rows", &sparse_attention_backward_rows);
}
