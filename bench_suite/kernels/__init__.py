"""Sparse (top-B) attention kernels: fused C++ CPU kernels and pure-PyTorch fallbacks.

The operation is the sparse MHSA of Wei et al. (CVPR 2023, eq. 4-6): each query
row ``i`` attends only to its ``Bk`` selected keys ``idx[..., i, :]`` (the connectivity mask ``M`` of eq. 3
as key indices, distinct per row)::

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, idx[b, h, i, j]]) * v[b, h, idx[b, h, i, j]]

Shapes: ``q [B, H, Nq, d]``, ``k, v [B, H, Nk, d]`` (``Nq = Nk = N`` in self-attention),
``idx [B, H, Nq, Bk]`` int64 (the C++ kernel also takes int32), ``out [B, H, Nq, d]``. Cost:
``2 * B * H * Nq * Bk * d`` multiply-accumulates, against ``2 * B * H * Nq * Nk * d`` for dense attention.

This module is the one home of sparse attention: the PyTorch reference, the registry of implementations
(:data:`SPARSE_ATTENTION_IMPLS`, :func:`register_sparse_attention_impl`) and the one dispatcher
(:func:`sparse_attention`) that every model and benchmark calls. Implementations (``impl=``):

- ``"cpp"``: :func:`sparse_attention_cpp`, the fused kernel (``csrc/sparse_attention.cpp``; OpenMP over
  ``B * H * Nq`` query rows, float32 accumulation, no gathered copies, no dense ``N x N`` matrix), with a
  fused backward (``sparse_attention_backward_rows``: gradients of ``q``, ``k``, ``v`` from the recomputed row
  probabilities, ``5 * Bk * d`` multiply-accumulates per query row, parallel over the ``B * H`` slices so
  the scatter into ``dk``/``dv`` needs no atomics and is deterministic), so it trains too.
- ``"torch"``: :func:`sparse_attention_torch`, gather-based and differentiable on any device and dtype
  (the reference; it materialises ``[B, H, Nq, Bk, d]`` copies of the keys and values).
- ``"flex"``: :func:`bench_suite.kernels.flex.sparse_attention_flex`, PyTorch's FlexAttention with the connectivity mask as its block
  mask (a ``[B, H, Nq, Nk]`` boolean mask scattered from ``idx``; no gathered key/value copies): compiled to a
  fused kernel on CUDA, forward and backward (``torch.compile(flex_attention)``). On the CPU FlexAttention runs
  its forward only (unfused, for tests); a CPU call that needs a gradient takes the ``"torch"`` path.
- ``"auto"``: ``"cpp"`` when the inputs are CPU float32/float64 tensors and the kernel can be built; CPU
  bfloat16/float16 inputs (``bf16-mixed`` training, autocast) through the same kernel on float32 copies, the
  output cast back (float32 accumulation; PyTorch's half-precision gather-einsums take a slow path on most
  CPUs); ``"flex"`` on CUDA; else ``"torch"`` (one warning if the build fails).

Under ``"cpp"`` half-precision CPU inputs run the kernel on float32 copies as under ``"auto"``, and inputs the
kernel does not take (CUDA tensors) the PyTorch path, so a model built with the kernel still runs anywhere; a
failed build raises there (a benchmark never silently times the fallback). Other implementations register by
name; one registered as differentiable also runs while autograd records, for any other :func:`sparse_attention`
takes the PyTorch path whenever a gradient is needed. While ``torch.jit`` traces (FLOP counting) a call is recorded as the single op
``bench_suite::sparse_attention``, which :mod:`bench_suite.flops` counts as ``2 * Nq * Bk * d`` MACs per
``[B, H]`` pair, whichever implementation runs inside.

The paper's connectivity mask (eq. 3), ``idx = top-B(A~_down @ W_up)`` per query row, has a fused
kernel too: :func:`connectivity_topk` (``impl="cpp"``) accumulates each row's scores over the nonzero
coefficients only and selects the top ``B`` (one pass over a guessed window around the ``B``-th score, a
threshold search where the window misses, a radix select where that does not settle), never
materialising the ``[B, H, Nq, Nk]`` score tensor; ``impl="torch"`` is ``torch.topk(coef @ w_up, B)``.

Inference of the learned top-B attention on the CPU also fuses the rest of its core (:mod:`bench_suite.kernels.fused`):
the basis coefficients of eq. 1-2 in one kernel and the dense CLS row inside the sparse kernel, both reading the
strided ``q``/``k``/``v`` views of the fused QKV projection in place and writing the ``[B, N, H, d]`` layout
that merges the heads without a copy.

The connectivity top-B has no gradient (the mask is detached, as in the paper's official code); while
autograd records, the method computes the scores densely anyway, since the attention distillation loss
needs them.

The kernels are compiled just in time on first use and cached (see :mod:`bench_suite.kernels.loader`);
``python -m bench_suite speed --build`` compiles them ahead of time. Their accumulators are the widest native vectors
(``vacc`` in ``csrc/vec16.h``: 16 floats with AVX-512, 8 with AVX2), the top-B has AVX-512 and AVX2 versions of its
window pass and rank count, and everything has a portable fallback; ``BENCH_SUITE_KERNEL_CFLAGS=-mno-avx512f`` builds
the AVX2 paths on an AVX-512 machine (a slow test runs the kernel tests on that build).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from bench_suite.flops import register_flop_handle

from bench_suite.kernels.loader import KernelBuildError, build_info, kernel_available, load_kernel

__all__ = [
    "IMPLS",
    "DEFAULT_IMPL",
    "SPARSE_ATTENTION_IMPLS",
    "DIFFERENTIABLE_IMPLS",
    "CONNECTIVITY_TOPK_IMPLS",
    "SparseAttentionFn",
    "get_sparse_attention_impl",
    "register_sparse_attention_impl",
    "register_connectivity_topk_impl",
    "KernelBuildError",
    "build_info",
    "check_inputs",
    "connectivity_topk",
    "connectivity_topk_cpp",
    "connectivity_topk_torch",
    "kernel_available",
    "load_kernel",
    "sparse_attention",
    "sparse_attention_cpp",
    "sparse_attention_torch",
]

IMPLS = ("auto", "cpp", "torch", "flex")
"""The built-in implementation names (others may be registered)."""
DEFAULT_IMPL = "torch"
"""The implementation used where none is named (``impl=None``)."""
SparseAttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
"""``fn(q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,d], idx [B,H,Nq,Bk], scale) -> out [B,H,Nq,d]``."""
_FLOAT_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """Validate shapes and dtypes of a sparse attention call (no pass over the data).

    Raises:
        ValueError: a tensor is not 4-D, shapes disagree (``q [B, H, Nq, d]``, ``k``/``v [B, H, Nk, d]``,
            ``idx [B, H, Nq, Bk]``), the budget ``Bk`` is 0 or larger than ``Nk``, or devices differ.
        TypeError: ``q``/``k``/``v`` are not one floating dtype, or ``idx`` is not an integer tensor.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("idx", idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"sparse attention: {name} must be 4-D, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"sparse attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"sparse attention: idx must hold integer key indices (int64), got {idx.dtype}")
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"sparse attention: k and v must be [B, H, Nk, d] = [{b}, {h}, Nk, {d}], got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if idx.shape[:3] != (b, h, nq):
        raise ValueError(f"sparse attention: idx must be [B, H, Nq, Bk] = [{b}, {h}, {nq}, Bk], got "
                         f"{tuple(idx.shape)}")
    bk, nk = idx.shape[3], k.shape[2]
    if b * h * nq > 0 and not 1 <= bk <= nk:
        raise ValueError(f"sparse attention: the budget Bk = idx.shape[3] = {bk} must lie in [1, Nk = {nk}]")
    if len({t.device for t in (q, k, v, idx)}) != 1:
        raise ValueError("sparse attention: q, k, v, idx must be on one device, got "
                         + ", ".join(str(t.device) for t in (q, k, v, idx)))


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Gather-based sparse attention in PyTorch (differentiable, any device, any floating dtype).

    Materialises the gathered keys and values ``[B, H, Nq, Bk, d]``: simple and exact, but slow.

    Args:
        q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]``; idx: ``[B, H, Nq, Bk]`` key indices in ``[0, Nk)``.
        scale: score scale; default ``d ** -0.5``.

    Returns:
        ``[B, H, Nq, d]``.

    Raises:
        ValueError, TypeError: see :func:`check_inputs`. IndexError: an index outside ``[0, Nk)``.
    """
    check_inputs(q, k, v, idx)
    b, h, nq, d = q.shape
    bk = idx.shape[3]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k.shape[2]):
        raise IndexError(f"sparse attention: idx holds key indices outside [0, {k.shape[2]})")
    flat = idx.long().reshape(b, h, nq * bk, 1).expand(b, h, nq * bk, d)
    kg = k.gather(2, flat).reshape(b, h, nq, bk, d)
    vg = v.gather(2, flat).reshape(b, h, nq, bk, d)
    scores = torch.einsum("bhnd,bhnjd->bhnj", q, kg) * _default_scale(q, scale)
    return torch.einsum("bhnj,bhnjd->bhnd", scores.softmax(dim=-1), vg)


def sparse_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """The fused C++ CPU kernel; differentiable in ``q``, ``k``, ``v`` through the fused backward kernel
    (``once_differentiable``: no double backward). Builds it on first use.

    Inputs whose head dimension is unit-stride (contiguous tensors, or the permuted ``[B, H, N, d]`` views
    of a fused QKV projection) are read in place; others are copied once with ``.contiguous()``. The result
    is ``[B, H, Nq, d]`` stored as ``[B, Nq, H, d]`` (so ``out.transpose(1, 2)`` is contiguous).

    Args:
        q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]``, float32 (float32 accumulation) or float64.
        idx: ``[B, H, Nq, Bk]`` int64 or int32 key indices in ``[0, Nk)``, distinct per row (a repeated index
            is counted as often as it appears).
        scale: score scale; default ``d ** -0.5``.

    Raises:
        ValueError: shapes (see :func:`check_inputs`), a non-CPU tensor.
        TypeError: dtypes other than float32/float64 and int64/int32.
        IndexError: an index outside ``[0, Nk)`` (every index is checked inside the kernel).
        KernelBuildError: the kernel cannot be built here.
    """
    check_inputs(q, k, v, idx)
    if q.device.type != "cpu":
        raise ValueError(f"sparse attention: the C++ kernel runs on the CPU, got tensors on {q.device}; "
                         f"use impl='torch'")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sparse attention: the C++ kernel takes float32 or float64, got {q.dtype}; "
                        f"convert the inputs or use impl='torch'")
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"sparse attention: the C++ kernel takes int64 or int32 indices, got {idx.dtype}")
    load_kernel()
    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _SparseAttentionCpp.apply(q, k, v, idx, _default_scale(q, scale))
    return torch.ops.bench_suite_kernels.sparse_attention(q, k, v, idx, _default_scale(q, scale))


class _SparseAttentionCpp(torch.autograd.Function):
    """The C++ forward and backward as one autograd node (inputs as :func:`sparse_attention_cpp`; the first
    ``dense_rows`` query rows attend every key, as :func:`bench_suite.kernels.fused.sparse_attention_rows_cpp`).
    Saves ``q``, ``k``, ``v``, ``idx``: the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale, dense_rows=0):  # noqa: D102
        ctx.save_for_backward(q, k, v, idx)
        ctx.args = (scale, dense_rows)
        return torch.ops.bench_suite_kernels.sparse_attention_rows(q, k, v, idx, scale, dense_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, idx = ctx.saved_tensors
        g = grad_out if grad_out.shape[-1] <= 1 or grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = torch.ops.bench_suite_kernels.sparse_attention_backward_rows(g, q, k, v, idx, *ctx.args)
        return dq, dk, dv, None, None, None


_auto_warned = False


def _use_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _FLOAT_DTYPES and _kernel_builds()


def _kernel_builds() -> bool:
    """Whether the kernel is loaded or can be built now (one warning, the first time it cannot)."""
    global _auto_warned
    try:
        load_kernel()
    except KernelBuildError as e:
        if not _auto_warned:
            _auto_warned = True
            warnings.warn(f"{e}; impl='auto' falls back to the PyTorch implementation", RuntimeWarning,
                          stacklevel=4)
        return False
    return True


def _flex_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """``SPARSE_ATTENTION_IMPLS["flex"]``: :func:`bench_suite.kernels.flex.sparse_attention_flex`."""
    from bench_suite.kernels import flex

    return flex.sparse_attention_flex(q, k, v, idx, scale)


def _cpp_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """``SPARSE_ATTENTION_IMPLS["cpp"]``: the kernel (forward and backward) for CPU float inputs (bfloat16/float16
    ones on float32 copies, the output cast back), else the PyTorch path, so that a model built with the kernel
    still runs on CUDA. Unlike ``"auto"`` it never hides a failed build: that raises :class:`KernelBuildError`, so
    a benchmark cannot silently time the fallback."""
    if q.device.type == "cpu" and q.dtype in _FLOAT_DTYPES:
        return sparse_attention_cpp(q, k, v, idx, scale)
    if _half_on_cpu(q, k, v):
        return _half_through_float32_kernel(q, k, v, idx, scale)
    return sparse_attention_torch(q, k, v, idx, scale)


def _half_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _HALF_DTYPES and k.dtype == v.dtype == q.dtype


def _half_through_float32_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """Half-precision CPU inputs through the float32 kernel on float32 copies, the ``[B, H, Nq, d]`` output cast back
    to their dtype (the kernel's ``[B, Nq, H, d]`` storage kept); differentiable like the kernel."""
    return sparse_attention_cpp(q.float(), k.float(), v.float(), idx, scale).to(q.dtype)


def _auto_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """``SPARSE_ATTENTION_IMPLS["auto"]``: the C++ kernel where it applies and can be built (CPU bfloat16/float16
    inputs on float32 copies, the ``[B, H, Nq, d]`` output cast back to their dtype), FlexAttention on CUDA,
    else the PyTorch path (one warning if the build fails). Same results up to float rounding."""
    if q.device.type == "cuda":
        from bench_suite.kernels import flex

        if flex.flex_available():
            return flex.sparse_attention_flex(q, k, v, idx, scale)
    if _half_on_cpu(q, k, v) and _kernel_builds():
        return _half_through_float32_kernel(q, k, v, idx, scale)
    fn = sparse_attention_cpp if _use_cpp(q, k, v) else sparse_attention_torch
    return fn(q, k, v, idx, scale)


# --------------------------------------------------------------------------- connectivity top-B (eq. 3)
def _one_dtype(coef: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``coef`` and ``w_up`` in their promoted dtype when they differ (mixed precision: autocast makes the
    predictor's coefficients bfloat16 while ``W_up`` stays float32; the scores are then float32)."""
    if coef.dtype != w_up.dtype and coef.dtype.is_floating_point and w_up.dtype.is_floating_point:
        dtype = torch.promote_types(coef.dtype, w_up.dtype)
        return coef.to(dtype), w_up.to(dtype)
    return coef, w_up


def _check_topk_inputs(coef: torch.Tensor, w_up: torch.Tensor, budget: int) -> None:
    if coef.dim() != 4:
        raise ValueError(f"connectivity top-k: coef must be [B, H, Nq, n_down], got {tuple(coef.shape)}")
    if w_up.dim() not in (3, 4):
        raise ValueError(f"connectivity top-k: w_up must be [Hw, n_down, Nk] or [B, Hw, n_down, Nk], got "
                         f"{tuple(w_up.shape)}")
    b, h, _, nd = coef.shape
    wb, wh = (1, w_up.shape[0]) if w_up.dim() == 3 else w_up.shape[:2]
    if w_up.shape[-2] != nd or wb not in (1, b) or wh not in (1, h):
        raise ValueError(f"connectivity top-k: w_up {tuple(w_up.shape)} does not fit coef {tuple(coef.shape)} "
                         f"(n_down must match; batch/head dims 1 or equal)")
    if not 1 <= int(budget) <= w_up.shape[-1]:
        raise ValueError(f"connectivity top-k: budget must lie in [1, Nk = {w_up.shape[-1]}], got {budget}")
    if not (coef.dtype.is_floating_point and w_up.dtype == coef.dtype):
        raise TypeError(f"connectivity top-k: coef and w_up must share one floating dtype, got {coef.dtype} and "
                        f"{w_up.dtype}")


def connectivity_topk_torch(coef: torch.Tensor, w_up: torch.Tensor, budget: int) -> torch.Tensor:
    """``torch.topk(coef @ w_up, budget, sorted=False).indices`` (the dense reference of eq. 3).

    Args:
        coef: sparse coefficients ``A~_down [B, H, Nq, n_down]``; w_up: ``[Hw, n_down, Nk]`` or
            ``[B, Hw, n_down, Nk]`` (``Hw`` 1 or ``H``); budget: ``B`` in ``[1, Nk]``.

    Returns:
        int64 ``[B, H, Nq, budget]``.
    """
    _check_topk_inputs(coef, w_up, budget)
    return torch.topk(torch.matmul(coef, w_up), int(budget), dim=-1, sorted=False).indices


def connectivity_topk_cpp(coef: torch.Tensor, w_up: torch.Tensor, budget: int) -> torch.Tensor:
    """The fused C++ kernel: per query row, ``scores = sum over nonzero c_j of c_j W_up[j]`` in a thread-local
    buffer (no ``[B, H, Nq, Nk]`` tensor), then the ``budget`` largest by radix select. Same set as
    :func:`connectivity_topk_torch` up to float rounding of near-equal scores; ties at the boundary go to
    the lower key index. Forward only (the mask is not differentiated anyway). Inputs whose last dim is
    not unit-stride are copied.

    Raises:
        ValueError: shapes, budget outside ``[1, Nk]``, non-CPU tensors.
        TypeError: dtypes other than float32.
        KernelBuildError: the kernel cannot be built here.
    """
    _check_topk_inputs(coef, w_up, budget)
    if coef.device.type != "cpu" or w_up.device.type != "cpu":
        raise ValueError("connectivity top-k: the C++ kernel runs on the CPU; use impl='torch'")
    if coef.dtype != torch.float32:
        raise TypeError(f"connectivity top-k: the C++ kernel takes float32, got {coef.dtype}")
    load_kernel()
    coef = coef if coef.shape[-1] <= 1 or coef.stride(-1) == 1 else coef.contiguous()
    w_up = w_up if w_up.shape[-1] <= 1 or w_up.stride(-1) == 1 else w_up.contiguous()
    return torch.ops.bench_suite_kernels.connectivity_topk(coef.detach(), w_up.detach(), int(budget))


def connectivity_topk(coef: torch.Tensor, w_up: torch.Tensor, budget: int, impl: str = "auto") -> torch.Tensor:
    """Top-``budget`` key indices of ``coef @ w_up`` per query row (Wei et al. eq. 3), by ``impl``
    (``"cpp"``, ``"torch"``, or ``"auto"``: the kernel for CPU float32 when it can be built). Mixed dtypes
    (autocast) are promoted to one."""
    coef, w_up = _one_dtype(coef, w_up)
    if impl == "torch":
        return connectivity_topk_torch(coef, w_up, budget)
    if impl == "cpp":
        return connectivity_topk_cpp(coef, w_up, budget)
    if impl == "auto":
        _check_topk_inputs(coef, w_up, budget)
        use = coef.device.type == "cpu" and coef.dtype == torch.float32 and kernel_available()
        return (connectivity_topk_cpp if use else connectivity_topk_torch)(coef, w_up, budget)
    raise ValueError(f"unknown connectivity top-k impl {impl!r}; choose one of {', '.join(IMPLS)}")


def _cpp_topk_impl(coef: torch.Tensor, w_up: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``"cpp"`` connectivity top-k: the kernel for CPU float32, else ``torch.topk``."""
    coef, w_up = _one_dtype(coef, w_up)
    if coef.device.type == "cpu" and coef.dtype == torch.float32 and w_up.dtype == torch.float32:
        return connectivity_topk_cpp(coef, w_up, budget)
    return connectivity_topk_torch(coef, w_up, budget)


def _auto_topk_impl(coef: torch.Tensor, w_up: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``"auto"`` connectivity top-k: the kernel for CPU float32 when it can be built."""
    return connectivity_topk(coef, w_up, budget, impl="auto")


# --------------------------------------------------------------------------- the registries and the dispatcher
SPARSE_ATTENTION_IMPLS: dict[str, SparseAttentionFn] = {
    "torch": sparse_attention_torch, "cpp": _cpp_impl, "auto": _auto_impl, "flex": _flex_impl}
"""Name -> sparse attention implementation (the contract is :data:`SparseAttentionFn`)."""

DIFFERENTIABLE_IMPLS: set[str] = {"torch", "cpp", "auto", "flex"}
"""Implementations that may run while autograd records (they give gradients of ``q``, ``k``, ``v``)."""

CONNECTIVITY_TOPK_IMPLS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "cpp": _cpp_topk_impl, "auto": _auto_topk_impl}
"""Name -> fused ``fn(coef [B,H,Nq,n_down], w_up [(B,)Hw,n_down,Nk], budget) -> idx [B,H,Nq,budget]``: the
top-B of ``coef @ w_up`` per row without the score tensor, used with the sparse attention implementation of
the same name when no gradient, trace or record is needed (``"torch"`` has none: the caller computes the
dense scores and takes ``torch.topk``)."""


def register_sparse_attention_impl(name: str, fn: SparseAttentionFn, differentiable: bool = False) -> None:
    """Add (or replace) a sparse attention implementation under ``name``; ``differentiable=True`` if ``fn``
    supports autograd (then training uses it too).

    Raises:
        ValueError: for an empty name or replacing a built-in one (:data:`IMPLS`).
        TypeError: for a non-callable ``fn``.
    """
    if not name or name in IMPLS:
        raise ValueError(f"cannot register a sparse attention implementation named {name!r}")
    if not callable(fn):
        raise TypeError(f"sparse attention implementation {name!r} must be callable")
    SPARSE_ATTENTION_IMPLS[name] = fn
    if differentiable:
        DIFFERENTIABLE_IMPLS.add(name)
    else:
        DIFFERENTIABLE_IMPLS.discard(name)


def register_connectivity_topk_impl(name: str, fn: Callable[[Tensor, Tensor, int], Tensor]) -> None:
    """Add a fused connectivity top-B implementation under ``name`` (see :data:`CONNECTIVITY_TOPK_IMPLS`).

    Raises:
        ValueError: for an empty name or a non-callable ``fn``.
    """
    if not name or not callable(fn):
        raise ValueError(f"invalid connectivity top-k implementation {name!r}")
    CONNECTIVITY_TOPK_IMPLS[name] = fn


def get_sparse_attention_impl(name: str | None = None) -> SparseAttentionFn:
    """The implementation registered as ``name`` (``None``: :data:`DEFAULT_IMPL`).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    name = DEFAULT_IMPL if name is None else name
    try:
        return SPARSE_ATTENTION_IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown sparse attention implementation {name!r}; known: "
                         f"{', '.join(sorted(SPARSE_ATTENTION_IMPLS))}") from None


@torch.library.custom_op("bench_suite::sparse_attention", mutates_args=())
def _sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, impl: str) -> Tensor:
    """Opaque sparse attention for the FLOP trace (counted by :func:`_sparse_attention_flop_handle`)."""
    return get_sparse_attention_impl(impl)(q, k, v, idx, scale).contiguous()


@_sparse_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, impl: str) -> Tensor:
    return torch.empty_like(q)


def _sparse_attention_flop_handle(inputs: list, outputs: list) -> int:
    """fvcore handle of ``bench_suite::sparse_attention``: ``2 * B * H * Nq * Bk * d`` MACs (``q k`` at the
    selected keys and the attention-value product)."""
    q = inputs[0].type().sizes()
    idx = inputs[3].type().sizes()
    return 2 * math.prod(idx) * int(q[-1])


register_flop_handle("bench_suite::sparse_attention", _sparse_attention_flop_handle)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float | None = None,
                     impl: str | None = "auto") -> Tensor:
    """Sparse attention ``[B, H, Nq, d]`` with the implementation named ``impl`` (``None``: :data:`DEFAULT_IMPL`).

    Every model and benchmark of the suite calls this one dispatcher. When a gradient is needed and ``impl``
    is not differentiable the PyTorch path runs; while ``torch.jit`` traces, the call is the single op
    ``bench_suite::sparse_attention`` (counted exactly by the FLOP counter).

    Args:
        q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]``; idx: ``[B, H, Nq, Bk]`` key indices in ``[0, Nk)``.
        scale: score scale; default ``d ** -0.5``.
        impl: a name in :data:`SPARSE_ATTENTION_IMPLS`.

    Raises:
        ValueError: an unknown ``impl``; shapes (see :func:`check_inputs`).
        TypeError: dtypes (see :func:`check_inputs`).
        KernelBuildError: ``impl="cpp"`` where the kernel cannot be built.
    """
    name = DEFAULT_IMPL if impl is None else impl
    fn = get_sparse_attention_impl(name)
    check_inputs(q, k, v, idx)
    s = _default_scale(q, scale)
    if torch.jit.is_tracing():
        return _sparse_attention_op(q, k, v, idx, s, name)
    if name not in DIFFERENTIABLE_IMPLS and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        fn = sparse_attention_torch
    return fn(q, k, v, idx, s)
