"""Sparsif-EViT (Wei et al., CVPR 2023, Table 1): Sparsifiner's sparse attention plus EViT's token reorganisation.

Sparsif-EViT (paper Table 1; no official code): Sparsifiner's attention sparsity in every layer plus
EViT's token reorganisation (:func:`methods.evit.evit_reorganise`) in the pruning blocks. Every layer
with ``N_l`` tokens has the budget ``B_l = ceil(attention keep rate * N_l)`` (the paper: "the fraction
of attention connectivities at any given MHSA layer"). The predictor's ``W_down``/``W_up`` are indexed by
the original token positions; the suite tracks each token's (soft) position through the
reorganisation (one-hot for kept tokens, the normalised class-attention weights for the fused token)
and uses ``W p`` as the token's column (:func:`methods.sparse_attention.mix_positions`). EViT ranks by
the CLS row, which the full CLS row keeps exact. Token distillation uses the tokens that keep one
original position (the CLS and the kept patch tokens), as the official code restricts it to kept tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from bench_suite.backbones import keep_count, pruning_stages
from bench_suite.registry import register_method
from methods.adapter import swap_class
from methods.base import check_keep_rate
from methods.evit import evit_reorganise
from methods.sparsifiner import Sparsifiner, apply_sparsifiner

__all__ = ["SparsifEViTBlock", "apply_sparsif_evit", "SparsifEViT"]


class SparsifEViTBlock(Block):
    """timm ``Block`` with EViT's token reorganisation after a Sparsifiner MHSA (Sparsif-EViT).

    ``x = x + attn(norm1(x))``; :func:`methods.evit.evit_reorganise` with the head-averaged CLS
    attention (the CLS row is dense); the tokens' soft positions ``[B, N', N0]`` are reorganised the
    same way (rows renormalised) and shared with the later attention modules through ``token_state``;
    then the MLP. Blocks that would keep every token, and the training forward of phase 1 (the
    official code prunes no tokens while it trains the predictor), run timm's forward unchanged.

    Attributes: ``token_keep_rate`` (float), ``token_state`` (dict shared with the attention modules),
    ``tokens_out`` (tokens after the last forward).
    """

    token_keep_rate: float = 1.0
    token_state: dict | None = None
    tokens_out: int | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N', C]``, ``N' = 2 + ceil(token_keep_rate (N - 1))`` when pruning."""
        b, n, _ = x.shape
        n0 = self.attn.predictor.num_tokens
        prune = not (self.training and self.attn.phase1_dense) and keep_count(self.token_keep_rate, n - 1) < n - 1
        self.attn.need_cls_attn = prune
        if not prune:
            self.tokens_out = n
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Sparsif-EViT blocks take no attention mask / causal attention")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        cls_attn = self.attn.last.pop("cls_attn")[:, :, 1:].mean(dim=1)  # [B, N-1], head-averaged
        x, _ = evit_reorganise(x, cls_attn, self.token_keep_rate)
        pos = self.token_state.get("positions") if n != n0 else None
        if pos is None:
            pos = torch.eye(n0, dtype=x.dtype, device=x.device).expand(b, n0, n0)
        pos, _ = evit_reorganise(pos, cls_attn.detach(), self.token_keep_rate)
        self.token_state["positions"] = pos / pos.sum(-1, keepdim=True).clamp_min(1e-12)
        self.tokens_out = x.shape[1]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def apply_sparsif_evit(model: nn.Module, keep_rate: float, token_keep_rate: float = 0.7,
                       stages: Sequence[int] | None = None, **predictor_kwargs: Any) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place into Sparsif-EViT: :func:`apply_sparsifiner` in every
    block, and :class:`SparsifEViTBlock` (EViT reorganisation) in the pruning blocks.

    Args:
        keep_rate: attention keep rate; token_keep_rate: EViT token keep rate (both in (0, 1]).
        stages: 0-based pruning blocks (default :func:`bench_suite.backbones.pruning_stages`).
        **predictor_kwargs: :func:`apply_sparsifiner` settings (``cls_full_row`` must stay True: EViT
            ranks tokens by the CLS row).

    Raises:
        ValueError: for invalid keep rates or stages, ``cls_full_row=False``, or a model without one CLS
            token.
    """
    token_keep_rate = check_keep_rate(token_keep_rate)
    if not predictor_kwargs.get("cls_full_row", True):
        raise ValueError("Sparsif-EViT ranks tokens by the CLS attention row, which must stay full")
    depth = len(model.blocks)
    stages = tuple(sorted(set(pruning_stages(depth) if stages is None else (int(s) for s in stages))))
    if not stages or stages[0] < 0 or stages[-1] >= depth:
        raise ValueError(f"stages must be block indices in [0, {depth}), got {stages}")
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
        raise ValueError("Sparsif-EViT needs a ViT with one CLS token and global_pool='token'")
    apply_sparsifiner(model, keep_rate, **predictor_kwargs)
    state: dict[str, Any] = {"positions": None}
    for blk in model.blocks:
        blk.attn.token_state = state
    for i in stages:
        swap_class(model.blocks[i], SparsifEViTBlock, token_keep_rate=token_keep_rate, token_state=state,
                   tokens_out=None)
    model.evit_stages = stages
    return model


@register_method("sparsif_evit", keep_rates=(0.5, 0.25, 0.1),
                 description="Sparsif-EViT (Wei et al. CVPR 2023, Table 1): Sparsifiner attention + EViT tokens")
class SparsifEViT(Sparsifiner):
    """Sparsif-EViT (Sparsifiner paper, Table 1): Sparsifiner's sparse attention in every layer and EViT's
    token reorganisation (keep the top CLS-attention tokens, fuse the rest) in the pruning blocks.

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: attention keep rate (the registry's keep rate); ``B_l = ceil(keep_rate * N_l)``.
        teacher: frozen full-attention model (see :class:`Sparsifiner`).
        token_keep_rate: EViT token keep rate of each pruning block (paper Table 1: 0.7 and 0.5).
        stages: 0-based pruning blocks (default :func:`bench_suite.backbones.pruning_stages`).
        **kwargs: :class:`Sparsifiner` settings.

    Raises:
        ValueError: for invalid keep rates or stages.
    """

    display_name = "Sparsifiner + EViT"
    plot_color, plot_marker = "#ca9161", "P"

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.25, teacher: nn.Module | None = None,
                 token_keep_rate: float = 0.7, stages: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        check_keep_rate(token_keep_rate)
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)

    @classmethod
    def noop_settings(cls) -> dict[str, Any]:
        """Full attention needs both rates at 1.0: attention keep rate and token keep rate."""
        return {"keep_rate": 1.0, "token_keep_rate": 1.0}

    def adapt(self, model: nn.Module) -> None:
        hp = self.hparams
        apply_sparsif_evit(model, self.keep_rate, hp.token_keep_rate, hp.stages, **self._predictor_kwargs())

    def sparsity_report(self) -> dict[str, float]:
        """:meth:`Sparsifiner.sparsity_report` plus ``tokens_after_block<i>`` of each pruning block."""
        out = super().sparsity_report()
        if out:
            for i in self.model.evit_stages:
                out[f"tokens_after_block{i}"] = float(self.model.blocks[i].tokens_out or 0)
        return out
