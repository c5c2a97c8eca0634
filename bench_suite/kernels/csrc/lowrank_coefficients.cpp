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
// 16 columns), n_down * Nk * d multiply-adds per slice, four rows of W_down per task. (2) Four query rows at a
// time: the n_down scores as d broadcast FMAs over the rows of K_down^T (16 scores per vector, no horizontal
// sums, 4 x n_down / 16 independent accumulator chains), the softmax (vectorised exp of vec16.h), the
// threshold (tau, or the top-k by vectorised rank counts). All accumulators are template-sized register arrays. Work as the PyTorch reference (`lowrank_attention` + `threshold_coefficients` of
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
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

using namespace bench_suite_kernels;

struct LowRank {
  const float* q;
  const float* k;
  const float* w;
  float* kt;   // scale * K_down^T, [B, H, d, nd16]
  float* out;  // [B, H, Nq, nd]
  int64_t H, Nq, Nk, Hw, nd, nd16;
  int64_t qs_b, qs_h, qs_n, ks_b, ks_h, ks_n;
  float scale, tau;
  int64_t topk;
};

// (1) rows j .. j+3 of K_down = W_down k for slice (b, h): 4 x NV independent accumulator chains in registers,
// each key row loaded once for the four rows of W_down; rows >= nd read a zero weight row.
template <int NV>
void kdown_rows(const LowRank& L, int64_t bh, int64_t j0, const float* zeros) {
  const int64_t h = bh % L.H, b = bh / L.H;
  const float* wr[4];
  for (int r = 0; r < 4; ++r)
    wr[r] = j0 + r < L.nd ? L.w + ((L.Hw == 1 ? 0 : h) * L.nd + j0 + r) * L.Nk : zeros;
  const float* kb = L.k + b * L.ks_b + h * L.ks_h;
  v16f acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = v16f{};
  for (int64_t n = 0; n < L.Nk; ++n) {
    const float* kr = kb + n * L.ks_n;
    v16f kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = load16(kr + 16 * c);
    for (int r = 0; r < 4; ++r) {
      const v16f w = splat(wr[r][n]);
      for (int c = 0; c < NV; ++c) acc[r][c] += w * kv[c];
    }
  }
  float* kt = L.kt + bh * (16 * NV) * L.nd16;
  for (int r = 0; r < 4 && j0 + r < L.nd; ++r)
    for (int c = 0; c < NV; ++c)
      for (int l = 0; l < 16; ++l) kt[(16 * c + l) * L.nd16 + j0 + r] = acc[r][c][l] * L.scale;
}

// Softmax and threshold of one row of n_down scores (row: 16 U floats, padded with -inf after nd), written to orow.
// Top-k (the official code): a coefficient is kept iff fewer than topk coefficients of its row exceed it, i.e. iff it
// is >= the topk-th largest (ties at the boundary all kept), counted for all nd coefficients at once (one broadcast
// compare per coefficient and vector; no sort, no branches).
template <int U>
inline void finish_row(const LowRank& L, float* row, float* orow) {
  const int64_t nd = L.nd;
  float m = row[0];
  for (int64_t j = 1; j < nd; ++j) m = std::max(m, row[j]);
  v16f lv{};
  for (int u = 0; u < U; ++u) {
    const v16f e = exp16_nonpositive(load16(row + 16 * u) - splat(m));
    store16(row + 16 * u, e);
    lv += e;
  }
  const float inv = 1.0f / hsum16(lv);
  if (L.topk <= 0 || L.topk >= nd) {
    for (int64_t j = 0; j < nd; ++j) {
      const float c = row[j] * inv;
      orow[j] = L.topk > 0 || c > L.tau ? c : 0.0f;  // every coefficient kept (topk >= nd), or the threshold tau
    }
    return;
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  v16f x[U];
  v16i cnt[U];
  for (int u = 0; u < U; ++u) {
    x[u] = load16(row + 16 * u) * inv;
    cnt[u] = v16i{};
  }
  for (int64_t j = nd; j < 16 * U; ++j) x[j / 16][j % 16] = ninf;  // padding: never exceeds a coefficient
  for (int64_t i = 0; i < nd; ++i) {
    const v16f xi = splat(x[i / 16][i % 16]);
    for (int u = 0; u < U; ++u) cnt[u] -= (xi > x[u]);  // the mask is -1 where coefficient i exceeds the lane's
  }
  const int32_t k = static_cast<int32_t>(L.topk);
  for (int u = 0; u < U; ++u) store16(row + 16 * u, cnt[u] < k ? x[u] : v16f{});
  for (int64_t j = 0; j < nd; ++j) orow[j] = row[j];
}

// (2) query rows i0 .. i0+R-1 of slice bh (R <= 4): R x U independent chains of broadcast FMAs over the d rows of
// K_down^T (16 scores per vector), then softmax and threshold per row.
template <int NV, int U>
void coef_rows(const LowRank& L, int64_t bh, int64_t i0, int R, float* row) {
  const int64_t h = bh % L.H, b = bh / L.H;
  const float* qr[4];
  for (int r = 0; r < 4; ++r) qr[r] = L.q + b * L.qs_b + h * L.qs_h + (i0 + std::min(r, R - 1)) * L.qs_n;
  const float* kt = L.kt + bh * (16 * NV) * L.nd16;
  v16f acc[4][U];
  for (int r = 0; r < 4; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = v16f{};
  for (int c = 0; c < 16 * NV; ++c) {
    v16f kv[U];
    for (int u = 0; u < U; ++u) kv[u] = load16(kt + c * L.nd16 + 16 * u);
    for (int r = 0; r < 4; ++r) {
      const v16f qc = splat(qr[r][c]);
      for (int u = 0; u < U; ++u) acc[r][u] += qc * kv[u];
    }
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) store16(row + 16 * u, acc[r][u]);
    for (int64_t j = L.nd; j < L.nd16; ++j) row[j] = ninf;  // padding: exp gives 0
    finish_row<U>(L, row, L.out + ((bh * L.Nq) + i0 + r) * L.nd);
  }
}

template <int NV, int U>
void run_lowrank(const LowRank& L, int64_t BH) {
  std::vector<float> zeros(static_cast<size_t>(L.Nk), 0.0f);
  const int64_t jblocks = (L.nd + 3) / 4;
  at::parallel_for(0, BH * jblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) kdown_rows<NV>(L, t / jblocks, 4 * (t % jblocks), zeros.data());
  });
  const int64_t iblocks = (L.Nq + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 4096 / (16 * NV * 16 * U));
  at::parallel_for(0, BH * iblocks, grain, [&](int64_t begin, int64_t end) {
    float row[16 * U];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / iblocks, i0 = 4 * (t % iblocks);
      coef_rows<NV, U>(L, bh, i0, static_cast<int>(std::min<int64_t>(4, L.Nq - i0)), row);
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
  at::Tensor kdt = at::zeros({B, H, d, nd16}, q.options());
  LowRank L{q.const_data_ptr<float>(), k.const_data_ptr<float>(), w_down.const_data_ptr<float>(),
            kdt.mutable_data_ptr<float>(), out.mutable_data_ptr<float>(),
            H, Nq, Nk, Hw, nd, nd16,
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
