// Fused basis coefficients for the CPU: Sparsifiner's low-rank attention and its sparsification
// (Wei et al., CVPR 2023, eq. 1-2), inference only:
//
//   A_down[b, h, i, :]  = softmax_j( scale * q[b, h, i, :] . (W_down[h?] @ k[b, h])[j, :] ),  j < n_down
//   A~_down[b, h, i, j] = A_down[b, h, i, j] if A_down[b, h, i, j] > tau else 0      (topk == 0, the paper)
//                         A_down[b, h, i, j] if among the row's topk largest else 0 (topk > 0, the official code)
//
// Shapes: q [B, H, Nq, d], k [B, H, Nk, d] float32 with unit-stride head dims and any other strides (the
// permuted views of timm's fused QKV projection are read in place, no copies), w_down [Hw, n_down, Nk]
// contiguous (Hw in {1, H}); d in {16, 32, 64, 128}, n_down <= 64. Output: A~_down [B, H, Nq, n_down], contiguous.
//
// Two parallel passes. (1) K_down^T = scale * (W_down k)^T per (b, h): [d, n_down] (padded to a multiple of
// 16 columns), n_down * Nk * d multiply-adds per slice, as a register-blocked product over W_down^T (transposed
// once per call, a few KiB): a task is 4-16 columns of K_down^T for all n_down rows at once. (2) Four query rows at
// a time: the n_down scores as d broadcast FMAs over the rows of K_down^T (16 scores per vector, no horizontal
// sums, 4 x n_down / 16 independent accumulator chains), then, in registers, the softmax (vectorised exp of
// vec16.h) and the threshold (tau, or the top-k by vectorised rank counts). All accumulators are template-sized
// register arrays. Work as the PyTorch reference (`lowrank_attention` + `threshold_coefficients` of
// methods/sparse_attention.py), without its copies of the strided q and k and its intermediate tensors.
// Same values up to float rounding (a coefficient within rounding of tau may fall on the other side).
// Errors: TORCH_CHECK_* (ValueError / TypeError in Python) for devices, dtypes, shapes and strides.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

using namespace bench_suite_kernels;

struct LowRank {
  const float* q;
  const float* k;
  const float* wt;  // W_down^T, [Hw, Nk, nd16] (zero columns after nd)
  float* kt;        // scale * K_down^T, [B, H, d, nd16]
  float* out;       // [B, H, Nq, nd]
  int64_t H, Nq, Nk, Hw, nd, nd16, d;
  int64_t qs_b, qs_h, qs_n, ks_b, ks_h, ks_n;
  float scale, tau;
  int64_t topk;
};

constexpr int64_t kRowPrefetch = 8;  // key rows ahead that the first task of a slice prefetches

// Register blocking: a 16-lane vector is one of AVX-512's 32 registers but two of AVX2's 16, and GCC keeps arrays of
// vectors wider than the registers in memory (a load and a store around every FMA). So the products accumulate in
// `vacc` (vec16.h: the widest native vector), in blocks that fit the register file, and so do the softmax and
// threshold of each row.

#if defined(__AVX512F__)
constexpr int kRowsPerBlock = 4;  // query rows per coef_rows task: 4 x U accumulators
template <int U>
constexpr int kKdownCols = U == 1 ? 16 : (U == 4 ? 4 : 8);  // CB x U accumulators (<= 24 registers); CB divides 16
#else
constexpr int kRowsPerBlock = 2;  // 2 x 2U accumulators
template <int U>
constexpr int kKdownCols = U == 1 ? 4 : (U == 2 ? 2 : 1);  // CB x 2U accumulators (<= 8 registers)
#endif

// (1) Columns c0 .. c0+CB-1 of scale * K_down^T = scale * (W_down k)^T for slice bh, all nd16 rows of W_down at once:
// a register-blocked product (CB x U accumulators; per key row n, U vector loads of W_down^T row n and CB broadcasts
// of k[n, c0 ..]), stored as whole rows of kt (the padding columns come out 0 from W_down^T's zero columns).
template <int U, int CB>
void kdown_cols(const LowRank& L, int64_t bh, int64_t c0) {
  const int64_t h = bh % L.H, b = bh / L.H;
  const float* wt = L.wt + (L.Hw == 1 ? 0 : h) * L.Nk * L.nd16;
  const float* kb = L.k + b * L.ks_b + h * L.ks_h + c0;
  constexpr int UA = U * kAccPer16;
  vacc acc[CB][UA];
  for (int r = 0; r < CB; ++r)
    for (int u = 0; u < UA; ++u) acc[r][u] = vacc{};
  const bool first = c0 == 0;  // the slice's first task pulls whole key rows ahead (the others then find them cached)
  for (int64_t n = 0; n < L.Nk; ++n) {
    const float* kr = kb + n * L.ks_n;
    const float* wr = wt + n * L.nd16;
    if (first && n + kRowPrefetch < L.Nk)
      for (int64_t c = 0; c < L.d; c += 16) __builtin_prefetch(kr + kRowPrefetch * L.ks_n + c);
    vacc wv[UA];
    for (int u = 0; u < UA; ++u) wv[u] = load_acc(wr + kAccLanes * u);
    for (int r = 0; r < CB; ++r) {
      const vacc kc = splat_acc(kr[r]);
      for (int u = 0; u < UA; ++u) acc[r][u] += kc * wv[u];
    }
  }
  float* kt = L.kt + (bh * L.d + c0) * L.nd16;
  for (int r = 0; r < CB; ++r)
    for (int u = 0; u < UA; ++u) store_acc(kt + r * L.nd16 + kAccLanes * u, acc[r][u] * L.scale);
}

// Softmax and threshold of one row of scores (UA native vectors, lanes >= nd already -inf), written to orow (nd
// floats). Top-k (the official code): a coefficient is kept iff fewer than topk coefficients of its row exceed it,
// i.e. iff it is >= the topk-th largest (ties at the boundary all kept), counted for all nd coefficients at once (one
// broadcast compare per coefficient and vector; no sort, no branches).
template <int UA>
inline void finish_row(const LowRank& L, const vacc* sc, float* orow) {
  const int64_t nd = L.nd;
  vacc mv = sc[0];
  for (int u = 1; u < UA; ++u) mv = sc[u] > mv ? sc[u] : mv;
  const vacc m = splat_acc(hmax_acc(mv));
  vacc x[UA], lv{};
  for (int u = 0; u < UA; ++u) {
    x[u] = exp_nonpositive<vacc, vacc_i>(sc[u] - m);
    lv += x[u];
  }
  const float inv = 1.0f / hsum_acc(lv);
  for (int u = 0; u < UA; ++u) x[u] = x[u] * inv;  // padding lanes: 0
  if (L.topk <= 0 || L.topk >= nd) {
    if (L.topk <= 0)  // the threshold tau (else every coefficient is kept: topk >= nd)
      for (int u = 0; u < UA; ++u) x[u] = x[u] > L.tau ? x[u] : vacc{};
  } else {
    alignas(64) float xs[kAccLanes * UA];
    vacc_i cnt[UA];
    for (int u = 0; u < UA; ++u) {
      store_acc(xs + kAccLanes * u, x[u]);
      cnt[u] = vacc_i{};
    }
    for (int64_t i = 0; i < nd; ++i) {  // padding lanes (0) never exceed a coefficient (> 0) and are never stored
      const vacc xi = splat_acc(xs[i]);
      for (int u = 0; u < UA; ++u) cnt[u] -= (xi > x[u]);  // the mask is -1 where coefficient i exceeds the lane's
    }
    const int32_t k = static_cast<int32_t>(L.topk);
    for (int u = 0; u < UA; ++u) x[u] = cnt[u] < k ? x[u] : vacc{};
  }
  const int64_t full = nd / kAccLanes;
  for (int64_t u = 0; u < full; ++u) store_acc(orow + kAccLanes * u, x[u]);
  if (nd % kAccLanes) {
    alignas(64) float tail[kAccLanes];
    store_acc(tail, x[full]);
    std::memcpy(orow + kAccLanes * full, tail, static_cast<size_t>(nd % kAccLanes) * sizeof(float));
  }
}

// (2) query rows i0 .. i0+R-1 of slice bh (R <= kRowsPerBlock): R x U independent chains of broadcast FMAs over the
// d rows of K_down^T (16 scores per vector), then softmax and threshold per row.
template <int NV, int U>
void coef_rows(const LowRank& L, int64_t bh, int64_t i0, int R) {
  const int64_t h = bh % L.H, b = bh / L.H;
  constexpr int RB = kRowsPerBlock;
  const float* qr[RB];
  for (int r = 0; r < RB; ++r) qr[r] = L.q + b * L.qs_b + h * L.qs_h + (i0 + std::min(r, R - 1)) * L.qs_n;
  const float* kt = L.kt + bh * (16 * NV) * L.nd16;
  constexpr int UA = U * kAccPer16;
  vacc acc[RB][UA];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < UA; ++u) acc[r][u] = vacc{};
  for (int c = 0; c < 16 * NV; ++c) {
    vacc kv[UA];
    for (int u = 0; u < UA; ++u) kv[u] = load_acc(kt + c * L.nd16 + kAccLanes * u);
    for (int r = 0; r < RB; ++r) {
      const vacc qc = splat_acc(qr[r][c]);
      for (int u = 0; u < UA; ++u) acc[r][u] += qc * kv[u];
    }
  }
  const vacc ninf = splat_acc(-std::numeric_limits<float>::infinity());
  vacc_i valid[UA];  // lanes < nd
  for (int u = 0; u < UA; ++u)
    for (int l = 0; l < kAccLanes; ++l) valid[u][l] = kAccLanes * u + l < L.nd ? -1 : 0;
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < UA; ++u) acc[r][u] = valid[u] ? acc[r][u] : ninf;  // padding: exp gives 0
    finish_row<UA>(L, acc[r], L.out + ((bh * L.Nq) + i0 + r) * L.nd);
  }
}

template <int NV, int U>
void run_lowrank(const LowRank& L, int64_t BH) {
  constexpr int CB = kKdownCols<U>;
  const int64_t cblocks = 16 * NV / CB;
  at::parallel_for(0, BH * cblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) kdown_cols<U, CB>(L, t / cblocks, CB * (t % cblocks));
  });
  const int64_t iblocks = (L.Nq + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / (16 * NV * 16 * U));
  at::parallel_for(0, BH * iblocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / iblocks, i0 = kRowsPerBlock * (t % iblocks);
      coef_rows<NV, U>(L, bh, i0, static_cast<int>(std::min<int64_t>(kRowsPerBlock, L.Nq - i0)));
    }
  });
}

template <int NV>
void dispatch_u(const LowRank& L, int64_t BH) {
  switch (L.nd16 / 16) {
    case 1: return run_lowrank<NV, 1>(L, BH);
    case 2: return run_lowrank<NV, 2>(L, BH);
    case 3: return run_lowrank<NV, 3>(L, BH);
    default: return run_lowrank<NV, 4>(L, BH);
  }
}

at::Tensor lowrank_coefficients_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w_down,
                                    double scale, double tau, int64_t topk) {
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && w_down.device().is_cpu(),
                    "lowrank_coefficients: the C++ kernel runs on the CPU only");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                       w_down.scalar_type() == at::kFloat,
                   "lowrank_coefficients: q, k and w_down must be float32");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && w_down.dim() == 3,
                    "lowrank_coefficients: q [B, H, Nq, d], k [B, H, Nk, d] and w_down [Hw, n_down, Nk] expected, got ",
                    q.sizes(), ", ", k.sizes(), ", ", w_down.sizes());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Nk = k.size(2), Hw = w_down.size(0), nd = w_down.size(1);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == d, "lowrank_coefficients: k ", k.sizes(),
                    " does not match q ", q.sizes());
  TORCH_CHECK_VALUE(w_down.size(2) == Nk && (Hw == 1 || Hw == H) && nd >= 1 && nd <= 64,
                    "lowrank_coefficients: w_down ", w_down.sizes(), " does not fit k ", k.sizes(),
                    " (or n_down > 64)");
  TORCH_CHECK_VALUE(d == 16 || d == 32 || d == 64 || d == 128,
                    "lowrank_coefficients: the head dim must be 16, 32, 64 or 128, got ", d);
  TORCH_CHECK_VALUE(q.stride(3) == 1 && k.stride(3) == 1 && w_down.is_contiguous(),
                    "lowrank_coefficients: q and k need unit-stride head dims and w_down must be contiguous");
  TORCH_CHECK_VALUE(topk >= 0, "lowrank_coefficients: topk must be >= 0, got ", topk);

  at::Tensor out = at::empty({B, H, Nq, nd}, q.options());
  if (B * H * Nq == 0) return out;
  const int64_t nd16 = (nd + 15) / 16 * 16;
  at::Tensor kdt = at::empty({B, H, d, nd16}, q.options());
  // W_down^T [Hw, Nk, nd16], zero-padded columns: the B-operand rows of the K_down product
  at::Tensor wt = at::zeros({Hw, Nk, nd16}, q.options());
  wt.narrow(2, 0, nd).copy_(w_down.transpose(1, 2));
  LowRank L{q.const_data_ptr<float>(), k.const_data_ptr<float>(), wt.const_data_ptr<float>(),
            kdt.mutable_data_ptr<float>(), out.mutable_data_ptr<float>(),
            H, Nq, Nk, Hw, nd, nd16, d,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            static_cast<float>(scale), static_cast<float>(tau), topk};
  switch (d) {
    case 16: dispatch_u<1>(L, B * H); break;
    case 32: dispatch_u<2>(L, B * H); break;
    case 64: dispatch_u<4>(L, B * H); break;
    default: dispatch_u<8>(L, B * H); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bench_suite_kernels, CPU, m) { m.impl("lowrank_coefficients", &lowrank_coefficients_cpu); }
