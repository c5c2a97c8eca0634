"""Fixed-pattern sparse attention at Sparsifiner's budget: the comparison the Sparsifiner paper claims
(learned, instance-dependent connectivity beats fixed sparse patterns at the same compute; its Figure 1 and
introduction) but never measures.

Every patch query keeps exactly ``B = ceil(keep_rate * N)`` keys (:func:`methods.sparse_attention.
attention_budget`, Sparsifiner's budget), chosen by a fixed rule that is the same for every image, and runs
through the same sparse attention kernels as Sparsifiner (:func:`bench_suite.kernels.sparse_attention`). As
in Sparsifiner (``cls_full_row``, default), the CLS query row stays dense. Each pattern's key set always
contains the CLS key and ``B - 1`` patch keys:

* ``fixed_local`` (a local 2D window): the ``B - 1`` patches nearest to the query's patch on the grid
  (Euclidean distance of grid positions, ties by token index; the query's own patch first);
* ``fixed_strided`` (a strided / dilated pattern, as Child et al.'s fixed Sparse Transformer patterns):
  patches ``(i + t s) mod (N - 1)``, ``t = 0 .. B - 2``, for patch ``i``, with stride
  ``s = max(1, floor((N - 1) / (B - 1)))``: evenly spread over the image, shifted with the query;
* ``fixed_random``: ``B - 1`` distinct patches drawn once per layer, head and query from a generator seeded
  by ``(seed, layer)``, then fixed.

Without ``cls_full_row`` the CLS query also keeps ``B`` keys: itself and ``B - 1`` strided patches.
At keep rate 1.0 every query keeps every key (full attention, tested). No parameters are added; the
fine-tune objective is Sparsifiner's phase 2 (CE + 0.5 KL + 0.5 patch-token MSE), so that learned and
fixed connectivity differ only in how the keys are chosen. FLOPs: ``2 d nnz(M)`` per head, counted from the
kernel op (``bench_suite::sparse_attention``) and the dense CLS row.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention
from torch import nn

from bench_suite.backbones import num_tokens
from bench_suite.kernels import get_sparse_attention_impl, sparse_attention
from bench_suite.registry import Metric, register_method
from methods.adapter import check_timm_block, merge_heads, split_heads, swap_class
from methods.base import BenchModule
from methods.sparse_attention import attention_budget

__all__ = ["PATTERNS", "fixed_pattern", "FixedSparseAttention", "apply_fixed_sparse", "FixedLocal",
           "FixedStrided", "FixedRandom"]

PATTERNS = ("local", "strided", "random")


def _strided(n_patches: int, count: int, offset: int) -> torch.Tensor:
    stride = max(1, n_patches // max(1, count))
    return (offset + stride * torch.arange(count)) % n_patches


def fixed_pattern(pattern: str, grid: tuple[int, int], budget: int, num_heads: int, cls_full_row: bool = True,
                  seed: int = 0, layer: int = 0) -> torch.Tensor:
    """The key indices of a fixed sparse pattern, ``[H, Nq, B]`` int64 (token indices, the CLS token 0).

    Args:
        pattern: ``"local"``, ``"strided"`` or ``"random"`` (see the module docstring).
        grid: the patch grid ``(rows, cols)``; ``N = rows * cols + 1`` tokens.
        budget: ``B`` keys per query, in ``[1, N]``.
        num_heads: ``H`` (only ``random`` differs between heads).
        cls_full_row: the CLS query row is dense and not in the pattern (``Nq = N - 1``), else ``Nq = N``.
        seed, layer: the random pattern's generator seed ``(seed, layer)``.

    Raises:
        ValueError: for an unknown pattern or a budget outside ``[1, N]``.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    rows, cols = grid
    n_p = rows * cols
    if not 1 <= budget <= n_p + 1:
        raise ValueError(f"budget must lie in [1, {n_p + 1}], got {budget}")
    m = budget - 1  # patch keys besides the CLS key
    pos = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(n_p, 2)
    out = torch.empty(num_heads, n_p, budget, dtype=torch.long)
    if pattern == "local":
        dist = torch.cdist(pos.double(), pos.double())  # [Np, Np]
        order = torch.sort(dist, dim=-1, stable=True).indices  # by distance; ties in token order
        out[:] = torch.cat([torch.zeros(n_p, 1, dtype=torch.long), order[:, :m] + 1], -1)
    elif pattern == "strided":
        rows_idx = torch.stack([_strided(n_p, m, i) for i in range(n_p)]) if m else torch.empty(n_p, 0, dtype=torch.long)
        out[:] = torch.cat([torch.zeros(n_p, 1, dtype=torch.long), rows_idx + 1], -1)
    else:
        g = torch.Generator().manual_seed(int(seed) * 100_003 + int(layer))
        for h in range(num_heads):
            keys = torch.argsort(torch.rand(n_p, n_p, generator=g), dim=-1)[:, :m] + 1
            out[h] = torch.cat([torch.zeros(n_p, 1, dtype=torch.long), keys], -1)
    if not cls_full_row:  # the CLS query: itself and m strided patches
        cls_row = torch.cat([torch.zeros(1, dtype=torch.long), _strided(n_p, m, 0) + 1])
        out = torch.cat([cls_row.expand(num_heads, 1, budget), out], dim=1)
    return out


class FixedSparseAttention(Attention):
    """timm ``Attention`` whose patch queries attend to a fixed set of ``B`` keys (``pattern_idx [H, Nq, B]``,
    a non-persistent buffer), through :func:`bench_suite.kernels.sparse_attention`; the CLS row dense when
    ``cls_full_row``. ``x [B, N, C]`` -> ``[B, N, C]``."""

    cls_full_row: bool = True
    impl: str | None = None
    pattern_idx: torch.Tensor

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("fixed sparse attention takes no attention mask / causal attention")
        q, k, v = split_heads(self, x)  # [B, H, N, d]
        b = q.shape[0]
        first = 1 if self.cls_full_row else 0
        idx = self.pattern_idx.unsqueeze(0).expand(b, -1, -1, -1)
        out = sparse_attention(q[:, :, first:], k, v, idx, self.scale, self.impl)
        if self.cls_full_row:
            cls = torch.matmul(torch.matmul(q[:, :, :1] * self.scale, k.transpose(-2, -1)).softmax(dim=-1), v)
            out = torch.cat([cls, out], dim=2)
        return merge_heads(self, out)


def apply_fixed_sparse(model: nn.Module, keep_rate: float, pattern: str, cls_full_row: bool = True,
                       seed: int = 0, impl: str | None = None) -> nn.Module:
    """Patch every block's attention of a timm ``VisionTransformer`` in place into :class:`FixedSparseAttention`
    with the pattern at ``B = ceil(keep_rate * N)``.

    Raises:
        ValueError: for an unknown pattern or implementation, a keep rate outside (0, 1], attention dropout,
            or a model without exactly one CLS token.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    get_sparse_attention_impl(impl)
    if getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError("fixed sparse attention needs a ViT with exactly one prefix (CLS) token")
    n = num_tokens(model)
    budget = attention_budget(keep_rate, n)
    grid = tuple(model.patch_embed.grid_size)
    for i, blk in enumerate(model.blocks):
        check_timm_block(blk, i)
        if blk.attn.attn_drop.p > 0:
            raise ValueError(f"block {i}: attention dropout is not supported by the sparse attention")
        idx = fixed_pattern(pattern, grid, budget, blk.attn.num_heads, cls_full_row, seed, layer=i)
        swap_class(blk.attn, FixedSparseAttention, cls_full_row=cls_full_row, impl=impl)
        blk.attn.register_buffer("pattern_idx", idx.to(blk.attn.qkv.weight.device), persistent=False)
    return model


class _FixedSparse(BenchModule):
    """Fixed-pattern sparse attention at Sparsifiner's budget (see the module docstring).

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: attention keep rate in (0, 1]; ``B = ceil(keep_rate * N)`` keys per patch query.
        teacher: frozen full-attention model for distillation.
        cls_full_row: keep the CLS query row dense (as Sparsifiner's default).
        seed: seed of the random pattern (``fixed_random``).
        attention_impl: sparse attention implementation (as Sparsifiner's).
        distill_logits, distill_tokens: Sparsifiner's phase-2 weights (0.5 / 0.5).
        **kwargs: other :class:`methods.base.BenchModule` settings.

    Raises:
        ValueError: for a keep rate outside (0, 1] or an unknown implementation.
    """

    pattern: str = "local"
    reported_metrics = (
        Metric("attention_budget", "keys per query row", description="B, keys kept by every patch query"),
        Metric("mask_density", "fraction", description="nnz(M) / N^2 of the fixed mask, CLS row included"),
    )

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.25, teacher: nn.Module | None = None,
                 cls_full_row: bool = True, seed: int = 0, attention_impl: str = "auto",
                 distill_logits: float = 0.5, distill_tokens: float = 0.5, **kwargs: Any) -> None:
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, distill_logits=distill_logits,
                         distill_tokens=distill_tokens, **kwargs)

    def adapt(self, model: nn.Module) -> None:
        hp = self.hparams
        apply_fixed_sparse(model, self.keep_rate, self.pattern, hp.cls_full_row, hp.seed, hp.attention_impl)

    def sparsity_report(self) -> dict[str, float]:
        n = num_tokens(self.model)
        b = attention_budget(self.keep_rate, n)
        nnz = n + (n - 1) * b if self.hparams.cls_full_row else n * b
        return {"attention_budget": float(b), "mask_density": nnz / (n * n)}


@register_method("fixed_local", keep_rates=(0.5, 0.25, 0.1),
                 description="fixed local 2D window: the B - 1 nearest patches + CLS per query (Sparsifiner's B)")
class FixedLocal(_FixedSparse):
    pattern = "local"
    display_name = "Fixed local window"
    plot_color, plot_marker = "#a0a0a0", "<"


@register_method("fixed_strided", keep_rates=(0.5, 0.25, 0.1),
                 description="fixed strided/dilated pattern: B - 1 evenly spaced patches + CLS per query")
class FixedStrided(_FixedSparse):
    pattern = "strided"
    display_name = "Fixed strided"
    plot_color, plot_marker = "#7f7f7f", ">"


@register_method("fixed_random", keep_rates=(0.5, 0.25, 0.1),
                 description="fixed random pattern per layer and head: B - 1 patches + CLS per query")
class FixedRandom(_FixedSparse):
    pattern = "random"
    display_name = "Fixed random"
    plot_color, plot_marker = "#4d4d4d", "d"
