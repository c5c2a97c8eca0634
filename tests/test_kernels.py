"""Tests of the fused sparse attention CPU kernel (bench_suite/kernels) against references.

The reference is dense masked attention in float64: ``softmax(masked_fill(q k^T * scale, ~M, -inf)) v`` with
the connectivity mask ``M`` built from the key indices (Sparsifiner eq. 4-6), independent of both
implementations under test. The first test to need the kernel compiles it (cached afterwards).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench_suite import kernels
from bench_suite.backbones import keep_count
from bench_suite.kernels import (KernelBuildError, check_inputs, sparse_attention, sparse_attention_cpp,
                                 sparse_attention_torch)
from bench_suite.kernels import flex, loader
from bench_suite.versions import hardware


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    try:
        kernels.load_kernel()
    except KernelBuildError as e:  # pragma: no cover - a machine without a compiler
        pytest.skip(f"kernel cannot be built here: {e}")


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                    scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """Dense masked attention in float64, ``[B, H, Nq, d]`` (query rows in chunks to bound memory)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for s in range(0, q.shape[2], chunk):
        qi, ii = q[:, :, s:s + chunk], idx[:, :, s:s + chunk].long()
        logits = (qi @ k.transpose(-1, -2)) * scale
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ii, True)
        outs.append(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v)
    return torch.cat(outs, dim=2)


def random_case(b: int, h: int, nq: int, nk: int, d: int, bk: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, scale_inputs: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype) * scale_inputs
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype) * scale_inputs
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    idx = torch.rand(b, h, nq, nk, generator=g).argsort(dim=-1)[..., :bk].contiguous()
    return q, k, v, idx


# ----------------------------------------------------------------- agreement with the reference
SHAPES = [  # (B, H, Nq, Nk, d, Bk)
    (1, 1, 1, 1, 64, 1),        # one query, one key: output is that key's value
    (1, 1, 17, 17, 64, 1),      # budget 1
    (2, 3, 17, 17, 64, 17),     # B = N (dense), batch and heads > 1
    (2, 3, 197, 197, 64, 20),   # DeiT-S tokens, keep 0.1
    (1, 2, 50, 50, 32, 13),     # head dim 32 (vector path with 2 registers)
    (1, 2, 37, 37, 128, 5),     # head dim 128
    (2, 2, 31, 31, 24, 7),      # head dim 24 (generic path), N prime
    (1, 1, 23, 41, 64, 19),     # Nq != Nk (e.g. the patch rows without the CLS row)
    (3, 1, 9, 9, 1, 3),         # head dim 1
]


@pytest.mark.parametrize("b,h,nq,nk,d,bk", SHAPES)
def test_kernel_matches_dense_masked_reference(b, h, nq, nk, d, bk) -> None:
    q, k, v, idx = random_case(b, h, nq, nk, d, bk, seed=b * 1000 + nq)
    ref = dense_reference(q, k, v, idx)
    out = sparse_attention_cpp(q, k, v, idx)
    assert out.shape == (b, h, nq, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(sparse_attention_torch(q, k, v, idx).double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("n", [197, 577, 2305])
def test_every_benchmark_shape(n: int) -> None:
    """The kernel grid's shapes (DeiT-T heads 3 x 64, keep 0.25 / 0.1 / 0.05), on a subset of query rows for
    N = 2305 (the kernel treats every row alike; the rows' keys span all of N)."""
    for r in (0.25, 0.1, 0.05):
        bk = keep_count(r, n)
        nq = n if n < 1000 else 200
        q, k, v, idx = random_case(1, 3, nq, n, 64, bk, seed=n)
        torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx).double(), dense_reference(q, k, v, idx),
                                   rtol=1e-5, atol=2e-6)


def test_full_budget_equals_dense_sdpa() -> None:
    q, k, v, _ = random_case(2, 3, 65, 65, 64, 1, seed=3)
    idx = torch.arange(65).flip(0).expand(2, 3, 65, 65).contiguous()  # every key, in reverse order
    torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)


def test_single_key_returns_its_value() -> None:
    q, k, v, _ = random_case(2, 2, 11, 11, 64, 1, seed=4)
    idx = torch.randint(0, 11, (2, 2, 11, 1))
    expected = torch.gather(v, 2, idx.expand(-1, -1, -1, 64))
    torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx), expected, rtol=0, atol=1e-6)


def test_float64_is_exact_to_double_precision() -> None:
    q, k, v, idx = random_case(2, 2, 40, 40, 64, 9, seed=5, dtype=torch.float64)
    out = sparse_attention_cpp(q, k, v, idx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense_reference(q, k, v, idx), rtol=1e-12, atol=1e-12)


def test_large_logits_are_stable() -> None:
    """Scores of magnitude ~1e3: the max-subtracted softmax neither overflows nor underflows to NaN."""
    q, k, v, idx = random_case(1, 2, 30, 30, 64, 12, seed=6, scale_inputs=8.0)
    out = sparse_attention_cpp(q, k, v, idx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, idx), rtol=1e-4, atol=1e-5)


def test_explicit_scale_and_int32_indices() -> None:
    q, k, v, idx = random_case(2, 2, 33, 33, 64, 8, seed=7)
    ref = dense_reference(q, k, v, idx, scale=0.37)
    torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx.int(), 0.37).double(), ref, rtol=1e-5, atol=2e-6)


def test_duplicate_index_counts_twice() -> None:
    """Documented behaviour: a repeated index is a repeated term of the softmax."""
    q, k, v, _ = random_case(1, 1, 1, 4, 64, 1, seed=8)
    idx = torch.tensor([[[[2, 2, 0]]]])
    s = (q[0, 0, 0] @ k[0, 0].T) * 64 ** -0.5
    w = torch.stack([s[2], s[2], s[0]]).softmax(0)
    expected = w[0] * v[0, 0, 2] + w[1] * v[0, 0, 2] + w[2] * v[0, 0, 0]
    torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx)[0, 0, 0], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- layouts
def test_permuted_qkv_views_are_read_in_place() -> None:
    """timm's fused QKV gives q, k, v as non-contiguous [B, H, N, d] views with a unit-stride head dim."""
    g = torch.Generator().manual_seed(9)
    b, n, h, d = 2, 29, 3, 64
    qkv = torch.randn(b, n, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    idx = torch.rand(b, h, n, n, generator=g).argsort(-1)[..., :6]
    out = sparse_attention_cpp(q, k, v, idx)
    torch.testing.assert_close(out, sparse_attention_cpp(q.contiguous(), k.contiguous(), v.contiguous(), idx))
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, idx), rtol=1e-5, atol=2e-6)


def test_strided_head_dim_and_strided_indices_are_handled() -> None:
    q, k, v, idx = random_case(2, 2, 21, 21, 32, 5, seed=10)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim stride != 1
    idx_wide = torch.zeros(2, 2, 21, 10, dtype=torch.int64)
    idx_wide[..., ::2] = idx  # idx with stride 2 in the last dim
    idx_s = idx_wide[..., ::2]
    assert qt.stride(-1) != 1 and idx_s.stride(-1) == 2
    torch.testing.assert_close(sparse_attention_cpp(qt, k, v, idx_s).double(), dense_reference(q, k, v, idx),
                               rtol=1e-5, atol=2e-6)


def test_output_layout_makes_head_merge_free() -> None:
    q, k, v, idx = random_case(2, 3, 13, 13, 64, 4, seed=11)
    out = sparse_attention_cpp(q, k, v, idx)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, d] storage: merge_heads' reshape is a view


def test_empty_batch() -> None:
    q, k, v, idx = random_case(1, 2, 5, 5, 64, 2)
    out = sparse_attention_cpp(q[:0], k[:0], v[:0], idx[:0])
    assert out.shape == (0, 2, 5, 64)


# ----------------------------------------------------------------- errors
def test_out_of_range_indices_raise_index_error() -> None:
    q, k, v, idx = random_case(1, 2, 9, 9, 64, 3)
    for bad in (9, -1, 2**40):
        wrong = idx.clone()
        wrong[0, 1, 4, 2] = bad
        with pytest.raises(IndexError, match=rf"{bad}.*outside \[0, 9\)"):
            sparse_attention_cpp(q, k, v, wrong)
        with pytest.raises(IndexError):
            sparse_attention_torch(q, k, v, wrong)


def test_wrong_dtypes_raise_type_error() -> None:
    q, k, v, idx = random_case(1, 1, 5, 5, 64, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        sparse_attention_cpp(q.half(), k.half(), v.half(), idx)
    with pytest.raises(TypeError, match="share one floating dtype"):
        sparse_attention_cpp(q, k.double(), v, idx)
    with pytest.raises(TypeError, match="integer key indices"):
        sparse_attention_cpp(q, k, v, idx.float())
    with pytest.raises(TypeError, match="int64 or int32"):
        sparse_attention_cpp(q, k, v, idx.to(torch.int16))


@pytest.mark.parametrize("case", ["not4d", "heads", "headdim", "v_shape", "idx_rows", "budget0", "budget_big"])
def test_shape_errors_raise_value_error(case: str) -> None:
    q, k, v, idx = random_case(2, 2, 7, 7, 64, 3)
    args = {"not4d": (q[0], k, v, idx), "heads": (q, k[:, :1], v[:, :1], idx),
            "headdim": (q, k[..., :32], v[..., :32], idx), "v_shape": (q, k, v[:, :, :5], idx),
            "idx_rows": (q, k, v, idx[:, :, :4]), "budget0": (q, k, v, idx[..., :0]),
            "budget_big": (q, k, v, torch.zeros(2, 2, 7, 8, dtype=torch.int64))}[case]
    with pytest.raises(ValueError):
        sparse_attention_cpp(*args)
    with pytest.raises(ValueError):
        check_inputs(*args)


def dense_reference_grads(q, k, v, idx, g, scale=None):
    """Gradients of ``(out * g).sum()`` w.r.t. ``q, k, v`` through :func:`dense_reference` (float64 autograd)."""
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = dense_reference(qd, kd, vd, idx, scale)
    return torch.autograd.grad(out, (qd, kd, vd), g.double())


GRAD_SHAPES = [  # (B, H, Nq, Nk, d, Bk)
    (1, 1, 1, 1, 64, 1),        # one key: dq = dk = 0, dv = g
    (2, 3, 17, 17, 64, 17),     # B = N (dense)
    (2, 4, 49, 50, 32, 13),     # the mini profile: 49 predicted rows (CLS row full), keep 0.25
    (1, 2, 37, 41, 24, 5),      # generic head dim, Nq != Nk
    (1, 2, 33, 40, 128, 21),    # head dim 128 (8 vector registers), budget not a multiple of 16
    (2, 4, 36, 37, 16, 20),     # head dim 16 (one vector register: the mini197 profile's 4 x 16)
]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_dense_masked_reference(shape: tuple[int, ...], index_dtype: torch.dtype) -> None:
    b, h, nq, nk, d, bk = shape
    q, k, v, idx = random_case(b, h, nq, nk, d, bk, seed=nq + bk)
    idx = idx.to(index_dtype)
    g = torch.randn(b, h, nq, d, generator=torch.Generator().manual_seed(7))
    qc, kc, vc = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = sparse_attention_cpp(qc, kc, vc, idx)
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out, (qc, kc, vc), g)
    for name, got, want in zip("qkv", grads, dense_reference_grads(q, k, v, idx, g)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_backward_gradcheck_float64_strided_views_int32() -> None:
    g = torch.Generator().manual_seed(21)
    b, h, n, d, bk = 2, 3, 9, 8, 4
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)  # timm's layout
    q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(0))
    assert not q.is_contiguous() and q.stride(-1) == 1
    idx = torch.rand(b, h, n, n, generator=g).argsort(-1)[..., :bk].to(torch.int32)
    assert torch.autograd.gradcheck(lambda q_, k_, v_: sparse_attention_cpp(q_, k_, v_, idx, 0.7), (q, k, v))


def test_backward_is_independent_of_the_thread_count() -> None:
    q, k, v, idx = random_case(4, 3, 30, 30, 32, 8, seed=22)
    g = torch.randn(4, 3, 30, 32, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            qc, kc, vc = (t.clone().requires_grad_(True) for t in (q, k, v))
            results.append(torch.autograd.grad(sparse_attention_cpp(qc, kc, vc, idx), (qc, kc, vc), g))
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)  # each (batch, head) slice is reduced by one thread in a fixed order


def test_backward_kernel_checks_indices_and_shapes() -> None:
    q, k, v, idx = random_case(1, 2, 6, 6, 32, 3, seed=23)
    bad = idx.clone()
    bad[0, 1, 2, 0] = 6
    with pytest.raises(IndexError, match="outside"):
        torch.ops.bench_suite_kernels.sparse_attention_backward(q, q, k, v, bad, 0.5)
    with pytest.raises(ValueError, match="shapes disagree"):
        torch.ops.bench_suite_kernels.sparse_attention_backward(q[:, :, :5], q, k, v, idx, 0.5)


def test_auto_trains_through_the_kernel_and_falls_back_for_other_dtypes() -> None:
    q, k, v, idx = random_case(1, 2, 12, 12, 64, 4, seed=12)
    q.requires_grad_(True)
    out = sparse_attention(q, k, v, idx, impl="auto")
    assert type(out.grad_fn).__name__.startswith("_SparseAttentionCpp")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="unknown sparse attention impl"):
        sparse_attention(q, k, v, idx, impl="cuda")


@pytest.mark.parametrize("impl", ["auto", "cpp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_runs_half_precision_through_the_float32_kernel(dtype, impl) -> None:
    """bf16-mixed training on the CPU: ``auto`` (and ``cpp``) computes half-precision inputs with the float32 kernel on
    float32 copies and casts the output back (forward and gradients equal to the kernel on the upcast inputs,
    cast to the inputs' dtype; the torch path's half-precision result within half-precision rounding)."""
    q, k, v, idx = random_case(2, 3, 10, 12, 16, 5, seed=14)
    qh, kh, vh = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out = sparse_attention(qh, kh, vh, idx, impl=impl)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()  # the kernel's layout, cast
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (qh, kh, vh))
    ref = sparse_attention(q32, k32, v32, idx, impl="cpp")
    assert type(ref.grad_fn).__name__.startswith("_SparseAttentionCpp")
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    for half, full in ((qh, q32), (kh, k32), (vh, v32)):
        assert half.grad.dtype == dtype
        torch.testing.assert_close(half.grad, full.grad.to(dtype), rtol=0, atol=0)
    torch_path = sparse_attention(qh.detach(), kh.detach(), vh.detach(), idx, impl="torch")
    torch.testing.assert_close(out, torch_path, rtol=2e-2, atol=2e-2)


def test_auto_uses_the_kernel_for_inference() -> None:
    q, k, v, idx = random_case(1, 2, 12, 12, 64, 4, seed=13)
    with torch.inference_mode():
        a = sparse_attention(q, k, v, idx, impl="auto")
    assert a.transpose(1, 2).is_contiguous()  # the kernel's output layout, not the torch path's
    torch.testing.assert_close(a, sparse_attention(q, k, v, idx, impl="torch"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- build and registration
def test_build_is_cached_and_named_by_source_flags_and_cpu() -> None:
    info = kernels.build_info()
    assert info["loaded"] and info["cached"]
    assert "-fopenmp" in info["flags"] and "-O3" in info["flags"]
    assert info["name"].startswith("bench_suite_sparse_attention_")
    assert info["name"] == loader._extension_name(info["flags"])
    kernels.load_kernel()  # idempotent


def test_extra_compiler_flags_enter_the_build_and_its_cache_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loader.CFLAGS_ENV, raising=False)
    default = kernels.build_info()
    monkeypatch.setenv(loader.CFLAGS_ENV, "-mno-avx512f  -DBENCH_SUITE_X='a b'")
    info = kernels.build_info()
    assert info["flags"] == default["flags"] + ["-mno-avx512f", "-DBENCH_SUITE_X=a b"]  # last: they override
    assert info["name"] != default["name"] and info["name"] == loader._extension_name(info["flags"])


@pytest.mark.slow
@pytest.mark.skipif(not {"avx512f", "avx2"} <= set(hardware()["isa"].split()),
                    reason="needs a CPU with AVX-512 (to turn it off)")
def test_the_avx2_code_paths_pass_the_kernel_tests() -> None:
    """The kernels built with ``-mno-avx512f`` (AVX2 left: the code paths of CPUs without AVX-512, e.g. AMD Zen 2/3)
    pass this file's and the fused kernels' tests (top-B, sparse attention forward and backward, coefficients): in
    a subprocess, since one process loads one build."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, loader.CFLAGS_ENV: "-mno-avx512f"}
    code = ("from bench_suite.kernels import loader; loader.load_kernel(); "
            "print('flags:', ' '.join(loader.build_info()['flags']))")
    built = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0 and built.stdout.strip().endswith("-mno-avx512f"), built.stderr[-2000:]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           "tests/test_kernels.py", "tests/test_fused_kernels.py"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in tail and "failed" not in tail, proc.stdout[-3000:]


def test_missing_compiler_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_loaded", False)
    monkeypatch.setattr(loader, "_load_error", None)
    monkeypatch.setattr(loader, "_compiler", lambda: None)
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler.*impl='torch'"):
        loader.load_kernel()
    with pytest.raises(KernelBuildError):  # remembered, not retried
        loader.load_kernel()
    assert not loader.kernel_available()


def test_cpp_impl_is_registered_and_trains() -> None:
    fn = kernels.get_sparse_attention_impl("cpp")
    q, k, v, idx = random_case(2, 3, 40, 41, 64, 6, seed=14)
    scale = 64 ** -0.5
    with torch.inference_mode():
        out = kernels.sparse_attention(q, k, v, idx, scale, impl="cpp")
        torch.testing.assert_close(out, kernels.SPARSE_ATTENTION_IMPLS["torch"](q, k, v, idx, scale), rtol=1e-5,
                                   atol=1e-6)
        assert fn(q, k, v, idx, scale).transpose(1, 2).is_contiguous()  # the kernel ran
    q.requires_grad_(True)  # the registered entry trains through the kernel's backward
    out = fn(q, k, v, idx, scale)
    assert type(out.grad_fn).__name__.startswith("_SparseAttentionCpp")
    out.sum().backward()
    assert q.grad is not None
    assert "cpp" in kernels.DIFFERENTIABLE_IMPLS and "auto" in kernels.DIFFERENTIABLE_IMPLS


def test_kernel_matches_torch_on_many_random_shapes() -> None:
    g = torch.Generator().manual_seed(15)
    for trial in range(20):
        b, h = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
        nk = int(torch.randint(1, 90, (1,), generator=g))
        nq = int(torch.randint(1, 90, (1,), generator=g))
        d = [16, 32, 48, 64, 80][trial % 5]
        bk = int(torch.randint(1, nk + 1, (1,), generator=g))
        q, k, v, idx = random_case(b, h, nq, nk, d, bk, seed=100 + trial)
        torch.testing.assert_close(sparse_attention_cpp(q, k, v, idx).double(), dense_reference(q, k, v, idx),
                                   rtol=1e-5, atol=2e-6, msg=lambda m: f"{(b, h, nq, nk, d, bk)}: {m}")


# ----------------------------------------------------------------- connectivity top-B (Sparsifiner eq. 3)
def _topk_case(b: int, h: int, nq: int, nd: int, nk: int, density: float, w_shape: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(b, h, nq, nd, generator=g) * (torch.rand(b, h, nq, nd, generator=g) < density)
    w_up = torch.randn(*w_shape, nd, nk, generator=g) * 0.02
    return coef, w_up


def _assert_valid_topk(idx: torch.Tensor, coef: torch.Tensor, w_up: torch.Tensor, budget: int, tol: float) -> None:
    """Every row: ``budget`` distinct keys, and every selected score >= every unselected score (float64
    reference, up to ``tol`` for float32 rounding of near-equal scores)."""
    scores = coef.double() @ w_up.double()
    assert idx.shape == (*coef.shape[:3], budget) and idx.dtype == torch.int64
    sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    assert (sel.sum(-1) == budget).all(), "indices are not distinct"
    lowest_in = scores.masked_fill(~sel, float("inf")).amin(-1)
    highest_out = scores.masked_fill(sel, float("-inf")).amax(-1)
    assert (lowest_in >= highest_out - tol).all()


@pytest.mark.parametrize("b,h,nq,nd,nk,budget,density,w_shape", [
    (2, 3, 576, 94, 577, 58, 0.13, (1,)),     # DeiT-T-384, keep 0.1, paper coefficient density, shared W_up
    (1, 3, 196, 32, 197, 20, 0.13, (3,)),     # DeiT-S, per-head W_up
    (2, 2, 40, 16, 50, 50, 0.3, (2, 2)),      # per-sample W_up, budget = Nk
    (1, 2, 30, 8, 41, 1, 0.5, (1,)),          # budget 1, Nk not a multiple of 16
    (1, 1, 64, 94, 2305, 231, 0.1, (1,)),     # N = 2305
    (1, 1, 5, 94, 7, 3, 1.0, (1,)),           # Nk < 16 (scalar tail only), dense coefficients
])
def test_connectivity_topk_is_a_valid_top_b(b, h, nq, nd, nk, budget, density, w_shape) -> None:
    coef, w_up = _topk_case(b, h, nq, nd, nk, density, w_shape, seed=nk)
    idx = kernels.connectivity_topk_cpp(coef, w_up, budget)
    _assert_valid_topk(idx, coef, w_up, budget, tol=1e-6)
    ref = kernels.connectivity_topk_torch(coef, w_up, budget)
    same = (torch.zeros(*coef.shape[:3], nk, dtype=torch.bool).scatter_(-1, idx, True)
            == torch.zeros(*coef.shape[:3], nk, dtype=torch.bool).scatter_(-1, ref, True)).all(-1)
    some = (coef != 0).any(-1)  # rows without a nonzero coefficient are all ties (any keys are right)
    assert same[some].float().mean() > 0.99  # the same set as torch.topk but for float near-ties


@pytest.mark.parametrize("w_shape", [(1,), (3,)])
def test_connectivity_topk_rows_with_one_coefficient_reuse_the_basis_row_selection(w_shape) -> None:
    """A row with a single positive coefficient c_j selects W_up row j's top-B (computed once, copied): the same
    keys as scoring the row; a single negative coefficient reverses the order and takes the general path."""
    b, h, nq, nd, nk, budget = 2, 3, 60, 16, 197, 20
    g = torch.Generator().manual_seed(7)
    coef = torch.zeros(b, h, nq, nd)
    j = torch.randint(0, nd, (b, h, nq, 1), generator=g)
    coef.scatter_(-1, j, torch.rand(b, h, nq, 1, generator=g) + 0.05)
    coef[:, :, ::3] = torch.rand(b, h, (nq + 2) // 3, nd, generator=g)  # every third row: dense coefficients
    coef[0, 0, 1] = 0.0
    coef[0, 0, 1, 2] = -0.5  # one negative coefficient: the bottom of W_up row 2
    w_up = torch.randn(*w_shape, nd, nk, generator=g)
    idx = kernels.connectivity_topk_cpp(coef, w_up, budget)
    _assert_valid_topk(idx, coef, w_up, budget, tol=1e-6)
    ref = kernels.connectivity_topk_torch(coef, w_up, budget)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)  # continuous W_up: no ties anywhere
    bottom = w_up[0 if w_shape == (1,) else 0, 2].argsort()[:budget]
    assert sorted(idx[0, 0, 1].tolist()) == sorted(bottom.tolist())


def test_connectivity_topk_ties_go_to_lower_indices() -> None:
    coef = torch.zeros(2, 2, 9, 6)  # no nonzero coefficient: every score is 0
    w_up = torch.randn(1, 6, 37)
    for budget in (1, 5, 36, 37):
        idx = kernels.connectivity_topk_cpp(coef, w_up, budget)
        assert (idx.sort(-1).values == torch.arange(budget)).all()
    # ties at the boundary only: scores 3, 2, 2, 2, 1 -> the 2 largest are key 0 and key 1 (lowest tied)
    w = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]]).reshape(1, 1, 5)
    idx = kernels.connectivity_topk_cpp(torch.ones(1, 1, 1, 1), w, 2)
    assert sorted(idx.flatten().tolist()) == [0, 1]


@pytest.mark.parametrize("n_zero,budget", [(200, 60), (10, 25), (200, 21)])
def test_connectivity_topk_tie_block_at_the_boundary(n_zero: int, budget: int) -> None:
    """20 positive, ``n_zero`` zero and 30 negative scores in shuffled positions: the positives, then the
    lowest-index zeros (a large tie block takes the radix path, a small one the threshold search)."""
    g = torch.Generator().manual_seed(n_zero)
    values = torch.cat([torch.arange(1, 21).float(), torch.zeros(n_zero), -torch.arange(1, 31).float()])
    perm = torch.randperm(len(values), generator=g)
    w_up = values[perm].reshape(1, 1, -1)
    idx = kernels.connectivity_topk_cpp(torch.ones(1, 2, 2, 1), w_up, budget)
    pos = w_up.flatten()
    positives = (pos > 0).nonzero().flatten()
    zeros = (pos == 0).nonzero().flatten()  # increasing index order
    rest = budget - len(positives)
    expected = set(positives.tolist()) | set(zeros[:rest].tolist()) if rest > 0 else None
    for row in idx.reshape(-1, budget).tolist():
        if expected is not None:
            assert set(row) == expected
        else:
            assert set(row) <= set(positives.tolist()) and len(set(row)) == budget
            assert min(pos[row]) >= pos[positives].sort(descending=True).values[budget - 1]


def test_connectivity_topk_many_close_keys_use_the_low_bits() -> None:
    """Scores that share their top 11 bits (one histogram bin) are resolved by the lower key bits."""
    nk = 300
    base = torch.full((nk,), 1.0) + torch.arange(nk) * 1e-6  # all in one exponent/mantissa bin
    w_up = base[torch.randperm(nk, generator=torch.Generator().manual_seed(0))].reshape(1, 1, nk)
    idx = kernels.connectivity_topk_cpp(torch.ones(1, 1, 3, 1), w_up, 17)
    expected = set(w_up.flatten().topk(17).indices.tolist())
    assert all(set(r) == expected for r in idx.reshape(3, 17).tolist())


def test_connectivity_topk_errors() -> None:
    coef, w_up = _topk_case(1, 2, 4, 8, 10, 0.5, (1,), seed=1)
    with pytest.raises(ValueError, match="budget"):
        kernels.connectivity_topk_cpp(coef, w_up, 11)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.connectivity_topk_cpp(coef, w_up[:, :5], 3)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.connectivity_topk_cpp(coef, torch.zeros(3, 8, 10), 3)
    with pytest.raises(TypeError, match="float32"):
        kernels.connectivity_topk_cpp(coef.double(), w_up.double(), 3)
    with pytest.raises(ValueError, match="unknown"):
        kernels.connectivity_topk(coef, w_up, 3, impl="gpu")
    strided = kernels.connectivity_topk_cpp(coef.transpose(-1, -2).contiguous().transpose(-1, -2), w_up, 3)
    assert torch.equal(strided, kernels.connectivity_topk_cpp(coef, w_up, 3))


def test_sparsifiner_model_with_cpp_kernels_matches_torch_path():
    """End to end on the tiny profile: the fused connectivity top-B and sparse attention kernels give the
    torch path's logits (eval, random continuous weights so that no two connectivity scores tie)."""
    import copy

    from bench_suite.backbones import create_backbone
    from methods.sparsifiner import Sparsifiner

    torch.manual_seed(0)
    backbone = create_backbone("tiny", num_classes=10)
    ref = Sparsifiner(copy.deepcopy(backbone), keep_rate=0.25, attention_impl="torch").eval()
    with torch.no_grad():  # dense, distinct coefficients: every coefficient above tau, W_up kept
        for blk in ref.model.blocks:
            pred = blk.attn.predictor
            pred.tau = 0.0
            pred.w_up.copy_(torch.rand_like(pred.w_up) + 0.05)
    fast = copy.deepcopy(ref)
    for blk in fast.model.blocks:
        blk.attn.impl = "cpp"
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "cpp", "auto"])
def test_connectivity_topk_promotes_mixed_dtypes(impl):
    """Under bf16 autocast the predictor's coefficients are bfloat16 while W_up stays float32: the top-B is
    taken on the promoted (float32) scores, the same set as with float32 coefficients of the same values."""
    from bench_suite.kernels import CONNECTIVITY_TOPK_IMPLS, connectivity_topk
    g = torch.Generator().manual_seed(0)
    coef = torch.rand(2, 3, 7, 5, generator=g).to(torch.bfloat16)
    w_up = torch.randn(1, 5, 11, generator=g)
    want = torch.topk(coef.float() @ w_up, 4, dim=-1).indices.sort(-1).values
    got = connectivity_topk(coef, w_up, 4, impl=impl)
    assert torch.equal(got.sort(-1).values, want)
    if impl in CONNECTIVITY_TOPK_IMPLS:
        assert torch.equal(CONNECTIVITY_TOPK_IMPLS[impl](coef, w_up, 4).sort(-1).values, want)


# ----------------------------------------------------------------- FlexAttention (the GPU path), forward on the CPU
FLEX_SHAPES = [  # (B, H, Nq, Nk, d, Bk): budget 1, Nq < Nk (the CLS row kept full), dense, DeiT-S keep 0.1
    (1, 1, 17, 17, 16, 1), (2, 3, 16, 17, 16, 5), (2, 2, 17, 17, 16, 17), (1, 2, 196, 197, 64, 20)]


@pytest.mark.parametrize("shape", FLEX_SHAPES)
def test_flex_attention_equals_the_dense_masked_reference(shape) -> None:
    from methods.sparse_attention import dense_masked_attention, indices_to_mask

    b, h, nq, nk, d, bk = shape
    q, k, v, idx = random_case(b, h, nq, nk, d, bk, seed=31)
    scale = d ** -0.5
    with torch.no_grad():
        out = kernels.sparse_attention(q, k, v, idx, scale, impl="flex")
        want, _ = dense_masked_attention(q, k, v, indices_to_mask(idx, nk), scale)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out, kernels.sparse_attention_torch(q, k, v, idx, scale), rtol=1e-5, atol=2e-6)


def test_flex_block_mask_keeps_exactly_the_connectivity_mask() -> None:
    from methods.sparse_attention import indices_to_mask

    _, _, _, idx = random_case(2, 3, 16, 17, 16, 4, seed=32)
    block = flex.connectivity_block_mask(idx, 17)
    b, h, qi, ki = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 16, 17)), indexing="ij")
    assert torch.equal(block.mask_mod(b, h, qi, ki), indices_to_mask(idx, 17))


def test_flex_on_the_cpu_trains_through_the_torch_path_and_auto_never_picks_it_there(monkeypatch) -> None:
    """FlexAttention has no CPU backward: a CPU call that needs a gradient takes the gather path (the same
    gradients); ``auto`` picks FlexAttention on CUDA only."""
    q, k, v, idx = random_case(1, 2, 9, 9, 16, 3, seed=33)
    grads = []
    for impl in ("flex", "torch"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = kernels.sparse_attention(qq, kk, vv, idx, impl=impl)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert "flex" in kernels.IMPLS and "flex" in kernels.DIFFERENTIABLE_IMPLS

    def boom(*args, **kwargs):
        raise AssertionError("auto took FlexAttention on the CPU")

    monkeypatch.setattr(flex, "sparse_attention_flex", boom)
    with torch.no_grad():
        out = kernels.sparse_attention(q, k, v, idx, impl="auto")
    torch.testing.assert_close(out, kernels.sparse_attention_torch(q, k, v, idx), rtol=1e-5, atol=2e-6)


def test_sparsifiner_model_with_flex_equals_torch_in_evaluation() -> None:
    from bench_suite.registry import get_method
    from tests.conftest import random_images, tiny_vit

    x = random_images(2)
    outs = []
    for impl in ("torch", "flex"):
        module = get_method("sparsifiner").factory(tiny_vit(), keep_rate=0.25, attention_impl=impl).eval()
        with torch.no_grad():
            outs.append(module(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["normal", "exponential", "lognormal", "bimodal", "integers", "few_large"])
@pytest.mark.parametrize("nk,budget", [(197, 20), (197, 99), (577, 58), (577, 145), (50, 13)])
def test_connectivity_topk_exact_set_on_skewed_and_tied_scores(shape: str, nk: int, budget: int) -> None:
    """Rows of exactly representable scores (two coefficients 1 over a score row and a zero row) from distributions
    far from the normal the first threshold guess assumes, so that the guessed window hits, misses low and misses
    high: the selected set is exactly the ``budget`` largest, ties to the lowest indices (a stable sort)."""
    g = torch.Generator().manual_seed(nk * 1000 + budget)
    rows = 24
    draw = {
        "normal": lambda: torch.randn(rows, nk, generator=g),
        "exponential": lambda: torch.empty(rows, nk).exponential_(generator=g),
        "lognormal": lambda: torch.randn(rows, nk, generator=g).mul(2.0).exp(),
        "bimodal": lambda: torch.randn(rows, nk, generator=g) + 8.0 * (torch.rand(rows, nk, generator=g) < 0.3),
        "integers": lambda: torch.randint(0, 6, (rows, nk), generator=g).float(),
        "few_large": lambda: torch.where(torch.rand(rows, nk, generator=g) < 0.05, 100.0, 0.0)
        + torch.randn(rows, nk, generator=g) * 1e-3 * (torch.rand(rows, nk, generator=g) < 0.5),
    }[shape]()
    w_up = torch.zeros(rows, 2, nk)  # per-sample basis: row r's scores = 1 * draw[r] + 1 * 0, exact in float32
    w_up[:, 0] = draw
    coef = torch.ones(rows, 1, 1, 2)
    idx = kernels.connectivity_topk_cpp(coef, w_up.unsqueeze(1), budget).reshape(rows, budget)
    order = torch.sort(-draw.double(), dim=-1, stable=True).indices[:, :budget]  # ties: the lower index first
    for r in range(rows):
        assert sorted(idx[r].tolist()) == sorted(order[r].tolist()), f"{shape} row {r}"
