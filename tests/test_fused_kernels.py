"""Tests of Sparsifiner's fused CPU inference path (bench_suite/kernels/fused.py) against the PyTorch reference:
the coefficient kernel against ``lowrank_attention`` + ``threshold_coefficients`` (paper eq. 1-2), the sparse
kernel with a dense leading row against a float64 dense masked computation, and the attention core with the
fused path against the unfused one."""
from __future__ import annotations

import pytest
import torch

from bench_suite.kernels import sparse_attention_cpp
from bench_suite.kernels.fused import fused_applies, lowrank_coefficients_cpp, sparse_attention_rows_cpp
from methods.sparse_attention import (ConnectivityPredictor, lowrank_attention, sparsifiner_attention,
                                      threshold_coefficients)
from tests.test_kernels import built  # noqa: F401  (module fixture: builds the kernels or skips)


def qkv_views(b: int, h: int, n: int, d: int, seed: int = 0, dtype=torch.float32):
    """``q, k, v [B, H, N, d]`` as the permuted views of a fused QKV projection (timm's layout)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("d,n_down,hw,n", [(16, 8, 1, 50), (32, 32, 1, 37), (64, 32, 3, 197), (128, 40, 1, 23),
                                           (64, 64, 3, 66)])
@pytest.mark.parametrize("mode", ["tau", "topk"])
def test_lowrank_coefficients_equal_the_reference(d, n_down, hw, n, mode) -> None:
    h = 3
    q, k, _ = qkv_views(2, h, n, d)
    g = torch.Generator().manual_seed(1)
    w_down = torch.randn(hw, n_down, n, generator=g) * 0.1
    scale = d ** -0.5
    a_ref = lowrank_attention(q[:, :, 1:], k, w_down, scale)
    if mode == "tau":
        tau, topk = float(a_ref.flatten().quantile(0.8)), None
    else:
        tau, topk = 0.05, min(8, n_down)
    ref = threshold_coefficients(a_ref, tau, topk)
    got = lowrank_coefficients_cpp(q[:, :, 1:], k, w_down, scale, tau, topk)
    assert got.shape == ref.shape and got.is_contiguous()
    # a coefficient within float rounding of the threshold may fall either way; every other one agrees
    near = (a_ref - tau).abs() < 1e-6 if mode == "tau" else torch.zeros_like(a_ref, dtype=torch.bool)
    assert near.float().mean() < 0.01
    torch.testing.assert_close(got[~near], ref[~near], atol=1e-6, rtol=1e-5)
    kept = (got != 0).sum(-1)
    if mode == "topk":
        assert torch.equal(kept, torch.full_like(kept, topk))
    else:
        assert 0.1 < (got != 0).float().mean() < 0.3  # the 0.8 quantile keeps about 20 %


def test_lowrank_coefficients_errors() -> None:
    q, k, _ = qkv_views(1, 2, 10, 24)
    w = torch.randn(1, 4, 10)
    with pytest.raises(ValueError, match="head dim"):
        lowrank_coefficients_cpp(q, k, w, 0.2, 0.05)
    q, k, _ = qkv_views(1, 2, 10, 16)
    with pytest.raises(ValueError, match="does not fit"):
        lowrank_coefficients_cpp(q, k, torch.randn(1, 4, 9), 0.2, 0.05)
    with pytest.raises(TypeError, match="float32"):
        lowrank_coefficients_cpp(q.double(), k.double(), w.double(), 0.2, 0.05)


def dense_cls_reference(q, k, v, idx, scale):
    """Row 0 attends every key, rows 1.. their idx keys; float64, ``[B, H, N, d]``."""
    q, k, v = q.double(), k.double(), v.double()
    logits = (q @ k.transpose(-1, -2)) * scale
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, :, 0] = True
    mask[:, :, 1:] = mask[:, :, 1:].scatter(-1, idx.long(), True)
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("d,n,bk", [(64, 197, 20), (32, 50, 13), (24, 31, 7), (16, 17, 17)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_attention_with_a_dense_first_row(d, n, bk, index_dtype) -> None:
    q, k, v = qkv_views(2, 3, n, d)
    g = torch.Generator().manual_seed(2)
    idx = torch.rand(2, 3, n - 1, n, generator=g).argsort(-1)[..., :bk].to(index_dtype)
    out = sparse_attention_rows_cpp(q, k, v, idx, d ** -0.5, 1)
    torch.testing.assert_close(out.double(), dense_cls_reference(q, k, v, idx, d ** -0.5), atol=2e-5, rtol=1e-4)
    assert out.transpose(1, 2).is_contiguous()  # stored [B, N, H, d]: merging the heads is a view
    # no dense rows: the plain kernel; all rows dense: full attention
    plain = sparse_attention_rows_cpp(q[:, :, 1:], k, v, idx, d ** -0.5, 0)
    assert torch.equal(plain, sparse_attention_cpp(q[:, :, 1:], k, v, idx, d ** -0.5))
    dense = sparse_attention_rows_cpp(q, k, v, idx[:, :, :0], d ** -0.5, n)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(dense.double(), sdpa, atol=2e-5, rtol=1e-4)


def test_sparse_attention_rows_float64_and_errors() -> None:
    q, k, v = qkv_views(1, 2, 12, 16, dtype=torch.float64)
    idx = torch.arange(5).expand(1, 2, 11, 5).contiguous()
    out = sparse_attention_rows_cpp(q, k, v, idx, 0.25, 1)
    torch.testing.assert_close(out, dense_cls_reference(q, k, v, idx, 0.25), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="Nq - dense_rows"):
        sparse_attention_rows_cpp(q, k, v, idx, 0.25, 2)
    with pytest.raises(ValueError, match="dense_rows must lie"):
        sparse_attention_rows_cpp(q, k, v, idx, 0.25, 13)
    with pytest.raises(IndexError, match="outside"):
        sparse_attention_rows_cpp(q, k, v, idx + 10, 0.25, 1)


def test_fused_applies_only_where_the_kernels_run() -> None:
    q, k, v = qkv_views(1, 2, 10, 16)
    assert fused_applies("cpp", q, k, v) and fused_applies("auto", q, k)
    assert not fused_applies("torch", q, k) and not fused_applies(None, q, k)
    assert not fused_applies("cpp", q.double(), k.double())
    q24, k24, _ = qkv_views(1, 2, 10, 24)
    assert not fused_applies("cpp", q24, k24)
    qg = q.detach().requires_grad_(True)
    assert not fused_applies("cpp", qg, k)
    with torch.no_grad():
        assert fused_applies("cpp", qg, k)


@pytest.mark.parametrize("keep_rate", [0.5, 0.1])
@pytest.mark.parametrize("impl", ["cpp", "auto"])
def test_the_core_takes_the_fused_path_with_the_same_mask_and_output(keep_rate, impl) -> None:
    b, h, n, d = 2, 3, 50, 32
    q, k, v = qkv_views(b, h, n, d, seed=3)
    torch.manual_seed(0)
    pred = ConnectivityPredictor(n, d, h, 8).eval()
    with torch.no_grad():
        pred.w_up.copy_(torch.rand_like(pred.w_up) + 0.05)  # distinct scores: no ties at the top-B boundary
        pred.tau = 0.1
        fused = sparsifiner_attention(q, k, v, pred, keep_rate, impl=impl)
        pred.allow_fused = False
        unfused = sparsifiner_attention(q, k, v, pred, keep_rate, impl=impl)
        pred.allow_fused = True
    assert fused.pred.a_down is None and unfused.pred.a_down is not None  # the fused path ran, then did not
    torch.testing.assert_close(fused.pred.coef, unfused.pred.coef, atol=1e-6, rtol=1e-5)
    assert torch.equal(fused.idx.sort(-1).values, unfused.idx.sort(-1).values)
    torch.testing.assert_close(fused.out, unfused.out, atol=1e-5, rtol=1e-5)
    assert fused.out.transpose(1, 2).is_contiguous()


def test_the_core_keeps_the_reference_path_where_it_must() -> None:
    b, h, n, d = 1, 2, 17, 16
    q, k, v = qkv_views(b, h, n, d)
    pred = ConnectivityPredictor(n, d, h, 8).eval()
    with torch.no_grad():
        assert sparsifiner_attention(q, k, v, pred, 0.5, impl="torch").pred.a_down is not None
        assert sparsifiner_attention(q, k, v, pred, 0.5, impl="cpp", need_cls_attn=True).cls_attn is not None
        assert sparsifiner_attention(q, k, v, pred, 0.5, impl="cpp", need_scores=True).pred.scores is not None
    pred.train()  # training with the thresholds on (phase 2) may take the kernel; with one off (phase 1) never
    with torch.no_grad():
        assert sparsifiner_attention(q, k, v, pred, 0.5, impl="cpp").pred.a_down is None
        pred.threshold_coef = False
        assert sparsifiner_attention(q, k, v, pred, 0.5, impl="cpp").pred.a_down is not None


def test_a_frozen_predictor_trains_the_attention_through_the_fused_mask() -> None:
    """Phase 2: with the predictor frozen the fused top-B (no dense scores) picks the mask; the output and the
    gradients of q, k, v equal the reference path's (distinct scores, so both select the same keys)."""
    b, h, n, d = 2, 2, 33, 16
    torch.manual_seed(4)
    pred = ConnectivityPredictor(n, d, h, 8).train()
    with torch.no_grad():
        pred.w_up.copy_(torch.rand_like(pred.w_up) + 0.05)
    pred.tau = 0.1
    pred.requires_grad_(False)
    results = {}
    for impl in ("torch", "cpp"):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in qkv_views(b, h, n, d, seed=5))
        res = sparsifiner_attention(q, k, v, pred, 0.25, impl=impl)
        res.out.square().sum().backward()
        results[impl] = (res, q.grad, k.grad, v.grad)
    fast, ref = results["cpp"], results["torch"]
    assert fast[0].pred.scores is None and ref[0].pred.scores is not None  # no dense scores on the fused path
    # the dense CLS row inside the differentiable kernel: one autograd node, no concatenation, [B, N, H, d] storage
    assert type(fast[0].out.grad_fn).__name__.startswith("_SparseAttentionCpp")
    assert fast[0].out.transpose(1, 2).is_contiguous() and type(ref[0].out.grad_fn).__name__ == "CatBackward0"
    assert torch.equal(fast[0].idx.sort(-1).values, ref[0].idx.sort(-1).values)
    for got, want in zip(fast, ref):
        if isinstance(got, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[0].out, ref[0].out, atol=1e-5, rtol=1e-5)
    pred.requires_grad_(True)  # a trainable predictor keeps the reference path under autograd
    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(b, h, n, d, seed=5))
    assert sparsifiner_attention(q, k, v, pred, 0.25, impl="cpp").pred.scores is not None


def test_lowrank_top_k_keeps_every_tie_at_the_boundary() -> None:
    """The fused top-k keeps a coefficient iff fewer than k of its row exceed it: with pairs of equal coefficients
    (duplicated W_down rows) a pair straddling the k-th place is kept whole, and a row of equal coefficients
    (zero queries) keeps every coefficient."""
    q, k, _ = qkv_views(2, 3, 40, 16)
    g = torch.Generator().manual_seed(5)
    half = torch.randn(1, 16, 40, generator=g) * 0.3
    w_down = half.repeat_interleave(2, dim=1)  # rows 2j and 2j + 1 equal: coefficients come in equal pairs
    got = lowrank_coefficients_cpp(q[:, :, 1:], k, w_down, 0.25, 0.05, 7)
    a = lowrank_attention(q[:, :, 1:], k, w_down, 0.25)
    torch.testing.assert_close(a[..., 0::2], a[..., 1::2], atol=0, rtol=0)
    greater = (a.unsqueeze(-2) > a.unsqueeze(-1)).sum(-1)  # [..., j]: coefficients of the row above a_j
    assert torch.equal(got != 0, greater < 7)
    assert ((got != 0).sum(-1) == 8).all()  # 7 = three pairs and one of the fourth: the fourth pair is kept whole
    torch.testing.assert_close(got[got != 0], a[got != 0], atol=1e-6, rtol=1e-5)
    flat = lowrank_coefficients_cpp(torch.zeros_like(q[:, :, 1:]), k, w_down, 0.25, 0.05, 7)
    assert (flat != 0).all()


@pytest.mark.parametrize("d,n,bk,dense_rows", [(64, 197, 20, 1), (32, 50, 13, 1), (16, 17, 17, 1), (24, 31, 7, 1),
                                               (16, 20, 5, 3), (32, 12, 4, 12), (16, 12, 4, 0)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_attention_rows_gradients_equal_the_dense_reference(d, n, bk, dense_rows, index_dtype) -> None:
    """The backward kernel with dense leading rows (float32: the vectorised path for d = 16 .. 128, the generic one
    for d = 24) gives the gradients of a float64 dense masked attention; the output keeps the [B, N, H, d] layout."""
    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(2, 3, n, d, seed=4))
    g = torch.Generator().manual_seed(5)
    idx = torch.rand(2, 3, n - dense_rows, n, generator=g).argsort(-1)[..., :bk].to(index_dtype)
    grad_out = torch.randn(2, 3, n, d, generator=g)
    out = sparse_attention_rows_cpp(q, k, v, idx, d ** -0.5, dense_rows)
    assert type(out.grad_fn).__name__.startswith("_SparseAttentionCpp") and out.transpose(1, 2).is_contiguous()
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    logits = (q64 @ k64.transpose(-1, -2)) * d ** -0.5
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, :, :dense_rows] = True
    mask[:, :, dense_rows:] = mask[:, :, dense_rows:].scatter(-1, idx.long(), True)
    ref_out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v64
    ref = torch.autograd.grad(ref_out, (q64, k64, v64), grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_sparse_attention_rows_gradcheck_float64() -> None:
    """Finite differences against the float64 kernels (the generic loops) with one dense row."""
    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(1, 2, 9, 8, seed=6, dtype=torch.float64))
    idx = torch.rand(1, 2, 8, 9, generator=torch.Generator().manual_seed(7)).argsort(-1)[..., :3]
    assert torch.autograd.gradcheck(lambda a, b, c: sparse_attention_rows_cpp(a, b, c, idx, 0.3, 1), (q, k, v))
