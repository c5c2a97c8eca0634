"""Sparsifiner with token pruning (Wei et al., CVPR 2023, Table 1): two variants, ``token_pruning=``.

``"official"`` (default): the official code's token pruning (lim142857/Sparsifiner ``src/models/
sparsifiner.py`` with ``SPAR.TOKEN_PRUNING_LOC = [3, 6, 9]`` and ``TOKEN_KEEP_RATE_BASE = rho``; ``main.py``
builds the per-layer rates ``rho^s``). After block ``3, 6, 9`` (0-based; :func:`bench_suite.backbones.
pruning_stages`) the ``ceil(rho^s * (N0 - 1))`` patch tokens with the largest head-averaged CLS attention
of that block stay, cumulatively counted against the original ``N0 - 1`` patches (138 / 97 / 68 of 196
at ``rho = 0.7``); the rest are pruned without fusion. From then on every layer has the budget
``min(ceil(keep_rate * N0), N_l - 1)`` (the code's ``attn_budget`` capped by its ``token_budget``). The
official code *masks* the pruned tokens (queries, keys and values zeroed, their columns ``-inf`` in the
connectivity scores, their rows dropped); the suite *removes* them, which computes the same for every
kept token with one exception it reproduces: the CLS row's mask is all ones, so each pruned (zeroed) key
adds ``exp(0)`` to the CLS softmax denominator (``cls_zero_keys`` of
:func:`methods.sparse_attention.sparsifiner_attention`). The official block prunes after its MLP, the
suite before it (the same kept tokens; the MLP runs on fewer tokens).

``"evit"``: Sparsif-EViT as the suite built it before the official variant was found: EViT's token
reorganisation (:func:`methods.evit.evit_reorganise`: ``ceil(rho * (N_l - 1))`` tokens of the current
``N_l - 1`` kept, the rest *fused* into one token; 138 / 98 / 70 kept at 0.7) and per-layer budgets
``B_l = ceil(keep_rate * N_l)``.

Which Table 1 row is which: the paper lists, at the same token and attention keep rates, both
"Sparsifiner" (79.3 at token 0.7 / attention 0.25) and "Sparsif-EViT" (79.5). The official code's variant
prunes by class attention without fusion, so the suite maps it onto the "Sparsifiner" rows with a token
keep rate, and the ``"evit"`` variant (EViT's fused token, which is what distinguishes EViT from plain
top-k pruning) onto the "Sparsif-EViT" rows (``bench_suite/data/paper_results.csv``).

In both, the predictor's ``W_down``/``W_up`` are indexed by the original token positions; the suite
tracks each token's (soft) position (one-hot for kept tokens, the normalised class-attention weights for
the fused token) and uses ``W p`` as the token's column (:func:`methods.sparse_attention.mix_positions`).
Token distillation compares the patch tokens that keep one original position against the teacher's
tokens at those positions (the official code: the final kept tokens).
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

__all__ = ["SparsifEViTBlock", "SparsifinerPruningBlock", "TOKEN_PRUNING_VARIANTS", "official_keep_counts",
           "apply_sparsif_evit", "SparsifEViT"]

TOKEN_PRUNING_VARIANTS = ("official", "evit")


def official_keep_counts(n_patches: int, token_keep_rate: float, num_stages: int) -> list[int]:
    """Patch tokens kept after each pruning stage by the official code: ``ceil(rho^s * n_patches)``,
    ``s = 1..num_stages`` (196 patches at 0.7: 138, 97, 68)."""
    return [max(1, keep_count(token_keep_rate ** s, n_patches)) for s in range(1, num_stages + 1)]


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
        prune = not (self.attn.training and self.attn.phase1_dense) and keep_count(self.token_keep_rate, n - 1) < n - 1
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


class SparsifinerPruningBlock(Block):
    """timm ``Block`` with the official Sparsifiner token pruning after its MHSA (``token_pruning="official"``).

    ``x = x + attn(norm1(x))``; keep the CLS token and the ``keep_patches`` patch tokens with the largest
    head-averaged CLS attention (in their original order), drop the others (no fusion); the kept tokens'
    one-hot positions ``[B, N', N0]`` are shared with the later attention modules through ``token_state``;
    then the MLP. The training forward of phase 1 prunes nothing (official ``USE_ATTN_RECON``).

    Attributes: ``keep_patches`` (int), ``token_state`` (dict), ``tokens_out`` (tokens after the last forward).
    """

    keep_patches: int = 0
    token_state: dict | None = None
    tokens_out: int | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, 1 + keep_patches, C]`` when pruning."""
        b, n, c = x.shape
        n0 = self.attn.predictor.num_tokens
        prune = not (self.attn.training and self.attn.phase1_dense) and self.keep_patches < n - 1
        self.attn.need_cls_attn = prune
        if not prune:
            self.tokens_out = n
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Sparsifiner pruning blocks take no attention mask / causal attention")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        cls_attn = self.attn.last.pop("cls_attn")[:, :, 1:].mean(dim=1)  # [B, N-1], head-averaged
        kept = torch.topk(cls_attn.detach(), self.keep_patches, dim=-1).indices.sort(dim=-1).values + 1
        idx = torch.cat([torch.zeros(b, 1, dtype=kept.dtype, device=kept.device), kept], dim=1)  # [B, N']
        x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, c))
        pos = self.token_state.get("positions") if n != n0 else None
        if pos is None:
            pos = torch.eye(n0, dtype=x.dtype, device=x.device).expand(b, n0, n0)
        self.token_state["positions"] = torch.gather(pos, 1, idx.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        self.tokens_out = x.shape[1]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def apply_sparsif_evit(model: nn.Module, keep_rate: float, token_keep_rate: float = 0.7,
                       stages: Sequence[int] | None = None, token_pruning: str = "official",
                       **predictor_kwargs: Any) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place into Sparsifiner with token pruning: :func:`apply_sparsifiner`
    in every block, and in the pruning blocks :class:`SparsifinerPruningBlock` (``token_pruning="official"``)
    or :class:`SparsifEViTBlock` (``"evit"``, EViT's reorganisation with a fused token).

    Args:
        keep_rate: attention keep rate; token_keep_rate: token keep rate ``rho`` (both in (0, 1]).
        stages: 0-based pruning blocks (default :func:`bench_suite.backbones.pruning_stages`).
        token_pruning: ``"official"`` or ``"evit"`` (see the module docstring).
        **predictor_kwargs: :func:`apply_sparsifiner` settings (``cls_full_row`` must stay True: EViT
            ranks tokens by the CLS row).

    Raises:
        ValueError: for invalid keep rates, stages or variant, ``cls_full_row=False``, or a model without one
            CLS token.
    """
    token_keep_rate = check_keep_rate(token_keep_rate)
    if token_pruning not in TOKEN_PRUNING_VARIANTS:
        raise ValueError(f"token_pruning must be one of {TOKEN_PRUNING_VARIANTS}, got {token_pruning!r}")
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
    official = token_pruning == "official"
    for blk in model.blocks:
        blk.attn.token_state = state
        blk.attn.official_pruning = official
    if official:
        counts = official_keep_counts(int(model.patch_embed.num_patches), token_keep_rate, len(stages))
        for i, keep in zip(stages, counts):
            swap_class(model.blocks[i], SparsifinerPruningBlock, keep_patches=keep, token_state=state,
                       tokens_out=None)
    else:
        for i in stages:
            swap_class(model.blocks[i], SparsifEViTBlock, token_keep_rate=token_keep_rate, token_state=state,
                       tokens_out=None)
    model.evit_stages = stages
    return model


@register_method("sparsif_evit", keep_rates=(0.5, 0.25, 0.1),
                 description="Sparsifiner + token pruning (Wei et al. CVPR 2023, Table 1): official or EViT-fused")
class SparsifEViT(Sparsifiner):
    """Sparsifiner's sparse attention in every layer plus token pruning in the pruning blocks (Sparsifiner
    paper, Table 1): the official code's class-attention top-k without fusion (default) or EViT's
    reorganisation with a fused token (see the module docstring).

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: attention keep rate (the registry's keep rate).
        teacher: frozen full-attention model (see :class:`Sparsifiner`).
        token_keep_rate: token keep rate ``rho`` (paper Table 1: 0.7 and 0.5).
        stages: 0-based pruning blocks (default :func:`bench_suite.backbones.pruning_stages`).
        token_pruning: ``"official"`` (default) or ``"evit"``.
        **kwargs: :class:`Sparsifiner` settings.

    Raises:
        ValueError: for invalid keep rates, stages or variant.
    """

    display_name = "Sparsifiner + EViT"
    plot_color, plot_marker = "#ca9161", "P"

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.25, teacher: nn.Module | None = None,
                 token_keep_rate: float = 0.7, stages: tuple[int, ...] | None = None,
                 token_pruning: str = "official", **kwargs: Any) -> None:
        check_keep_rate(token_keep_rate)
        if token_pruning not in TOKEN_PRUNING_VARIANTS:
            raise ValueError(f"token_pruning must be one of {TOKEN_PRUNING_VARIANTS}, got {token_pruning!r}")
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)

    @classmethod
    def noop_settings(cls) -> dict[str, Any]:
        """Full attention needs both rates at 1.0: attention keep rate and token keep rate."""
        return {"keep_rate": 1.0, "token_keep_rate": 1.0}

    def adapt(self, model: nn.Module) -> None:
        hp = self.hparams
        apply_sparsif_evit(model, self.keep_rate, hp.token_keep_rate, hp.stages,
                           hp.get("token_pruning", "evit"), **self._predictor_kwargs())

    def sparsity_report(self) -> dict[str, float]:
        """:meth:`Sparsifiner.sparsity_report` plus ``tokens_after_block<i>`` of each pruning block."""
        out = super().sparsity_report()
        if out:
            for i in self.model.evit_stages:
                out[f"tokens_after_block{i}"] = float(self.model.blocks[i].tokens_out or 0)
        return out
