"""Sparse attention on the GPU through PyTorch's FlexAttention: the ``"flex"`` implementation of
:func:`bench_suite.kernels.sparse_attention` (``"auto"`` picks it on CUDA).

The connectivity mask of Sparsifiner (eq. 3: ``B`` kept keys per query row, ``idx [B, H, Nq, Bk]``) becomes
FlexAttention's block mask; the kernel evaluates the masked softmax attention of eq. 4-6 without gathered
``[B, H, Nq, Bk, d]`` key/value copies (the PyTorch reference's), forward and backward, compiled on CUDA.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from bench_suite.kernels import _default_scale, check_inputs, sparse_attention_torch

__all__ = ["connectivity_block_mask", "flex_available", "sparse_attention_flex"]


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


_compiled_flex: Callable[..., Tensor] | None = None


def connectivity_block_mask(idx: Tensor, n_keys: int) -> object:
    """FlexAttention ``BlockMask`` of the connectivity mask: query row ``i`` of ``[b, h]`` may attend to key ``j``
    iff ``j`` is in ``idx[b, h, i]``. ``idx [B, H, Nq, Bk]`` -> a boolean ``[B, H, Nq, n_keys]`` mask read by the
    ``mask_mod`` (FlexAttention skips the key blocks that hold no kept key)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, nq, _ = idx.shape
    dense = torch.zeros(b, h, nq, n_keys, dtype=torch.bool, device=idx.device).scatter_(-1, idx.long(), True)

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return dense[bi, hi, qi, ki]

    return create_block_mask(mask_mod, b, h, nq, n_keys, device=idx.device, _compile=idx.device.type == "cuda")


def sparse_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Sparse attention through PyTorch's FlexAttention (Dong et al., 2024) with :func:`connectivity_block_mask`:
    exactly the top-B softmax of eq. 4-6 (the masked keys get ``-inf``), without gathered key/value copies. On
    CUDA the compiled fused kernel runs, forward and backward, in the inputs' dtype (bf16/fp16 too); on the CPU
    FlexAttention's unfused forward (it has no CPU backward: a call that needs a gradient there takes
    :func:`sparse_attention_torch`).

    Args:
        q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]``; idx: ``[B, H, Nq, Bk]`` distinct key indices per row.
        scale: score scale; default ``d ** -0.5``.

    Returns:
        ``[B, H, Nq, d]``.

    Raises:
        ValueError, TypeError: see :func:`check_inputs`. RuntimeError: FlexAttention is not in this torch.
    """
    global _compiled_flex
    check_inputs(q, k, v, idx)
    if not flex_available():
        raise RuntimeError("FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    s = _default_scale(q, scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        return sparse_attention_torch(q, k, v, idx, s)
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = connectivity_block_mask(idx, k.shape[2])
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=s)
    with warnings.catch_warnings():  # the CPU forward is the unfused reference: used by the tests only
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, scale=s)
