"""The fused CPU inference path of the learned top-B attention core of Wei et al. (CVPR 2023, eq. 1-6).

Two kernels that take the strided ``[B, H, N, d]`` views of timm's fused QKV projection as they are, so that
the core makes no copies of ``q``, ``k`` or ``v`` and its output needs none to merge the heads:

- :func:`lowrank_coefficients_cpp` (``csrc/lowrank_coefficients.cpp``): the basis coefficients ``A~_down`` of
  eq. 1-2 (low-rank attention, softmax, threshold ``tau`` or the official top-k) in one pass per query row;
  the PyTorch reference is :func:`methods.sparse_attention.lowrank_attention` followed by
  :func:`methods.sparse_attention.threshold_coefficients`.
- :func:`sparse_attention_rows_cpp` (``csrc/sparse_attention.cpp``): sparse attention whose first
  ``dense_rows`` query rows attend every key (the official code's dense CLS row) and whose output is stored
  ``[B, N, H, d]``; the reference is the sparse kernel on the patch rows, a dense CLS row and a concatenation.

The coefficients kernel is forward-only (inference, or a frozen predictor in training); the sparse attention
kernel is differentiable in ``q``, ``k``, ``v`` (its backward kernel takes the same dense rows), so a training step
with a frozen predictor runs the dense CLS row inside it too. The FLOP trace takes the reference path. Results
equal the reference up to float rounding (tested); a coefficient within rounding of ``tau`` may fall on the other
side.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench_suite.kernels.loader import kernel_available, load_kernel

__all__ = ["FUSED_IMPLS", "HEAD_DIMS", "fused_applies", "lowrank_coefficients_cpp", "sparse_attention_rows_cpp"]

HEAD_DIMS = (16, 32, 64, 128)
"""Head dims the fused kernels take (register-blocked in multiples of 16 floats)."""
FUSED_IMPLS = ("auto", "cpp")
"""Sparse attention implementations (:data:`bench_suite.kernels.SPARSE_ATTENTION_IMPLS`) whose inference
takes the fused path where :func:`fused_applies`."""


def fused_applies(impl: str | None, *tensors: Tensor, differentiable: bool = False) -> bool:
    """Whether the fused kernels run for ``impl`` on these ``[B, H, N, d]`` tensors: an implementation of
    :data:`FUSED_IMPLS`, CPU float32, ``d`` in :data:`HEAD_DIMS` with unit stride, no gradient recorded (unless
    ``differentiable``: the caller's kernel has a backward, as :func:`sparse_attention_rows_cpp`), the kernels
    built (``"cpp"`` raises elsewhere if they cannot be; ``"auto"`` falls back)."""
    if impl not in FUSED_IMPLS or torch.jit.is_tracing():
        return False
    for t in tensors:
        if (t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 or t.shape[-1] not in HEAD_DIMS
                or t.stride(-1) != 1):
            return False
        if not differentiable and torch.is_grad_enabled() and t.requires_grad:
            return False
    return kernel_available()


def lowrank_coefficients_cpp(q: Tensor, k: Tensor, w_down: Tensor, scale: float, tau: float,
                             topk: int | None = None) -> Tensor:
    """Sparse basis coefficients ``A~_down [B, H, Nq, n_down]`` (paper eq. 1-2), fused.

    Args:
        q: query rows ``[B, H, Nq, d]``; k: keys ``[B, H, Nk, d]``; float32, unit-stride head dims (other
            strides free), ``d`` in :data:`HEAD_DIMS`.
        w_down: ``W_down [Hw, n_down, Nk]`` (``Hw`` 1 or ``H``, ``n_down <= 64``).
        scale: the low-rank attention's scale (``c ** -0.5``).
        tau: coefficients ``<= tau`` become 0 (eq. 2), unless ``topk``.
        topk: keep the ``topk`` largest per row instead (the official code's 8); ties at the boundary are all kept.

    Raises:
        ValueError: shapes, strides, non-CPU tensors. TypeError: dtypes other than float32.
        KernelBuildError: the kernels cannot be built here.
    """
    load_kernel()
    return torch.ops.bench_suite_kernels.lowrank_coefficients(q.detach(), k.detach(), w_down.detach().contiguous(),
                                                              float(scale), float(tau), int(topk or 0))


def sparse_attention_rows_cpp(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float,
                              dense_rows: int = 1) -> Tensor:
    """Sparse attention ``[B, H, N, d]`` (stored ``[B, N, H, d]``) whose first ``dense_rows`` query rows attend
    all ``Nk`` keys and whose other rows attend their ``idx`` keys (paper eq. 4-6 with the official code's
    dense CLS row). Differentiable in ``q``, ``k``, ``v`` (the backward kernel recomputes each row's
    probabilities, the dense rows' over all keys; ``once_differentiable``).

    Args:
        q: ``[B, H, N, d]``; k, v: ``[B, H, Nk, d]``; float32 or float64 with unit-stride head dims.
        idx: ``[B, H, N - dense_rows, Bk]`` int64/int32 key indices in ``[0, Nk)``.
        scale: score scale.
        dense_rows: leading rows attended densely (0: plain sparse attention).

    Raises:
        ValueError, TypeError, IndexError: as :func:`bench_suite.kernels.sparse_attention_cpp`.
        KernelBuildError: the kernels cannot be built here.
    """
    load_kernel()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        from bench_suite.kernels import _SparseAttentionCpp

        return _SparseAttentionCpp.apply(q, k, v, idx, float(scale), int(dense_rows))
    return torch.ops.bench_suite_kernels.sparse_attention_rows(q.detach(), k.detach(), v.detach(), idx, float(scale),
                                                               int(dense_rows))
