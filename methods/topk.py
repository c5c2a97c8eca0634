"""Top-K token pruning: EViT's attentive-token selection without its fusion (the "Top-K" baseline of
Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCV 2023
workshops; JoakimHaurum/TokenReduction, where plain Top-K is among the strongest baselines and only EViT
beats it).

In EViT's pruning blocks (0-based 3, 6, 9 of 12, :func:`bench_suite.backbones.pruning_stages`), between the
MHSA and the MLP, the top ``k = ceil(keep_rate * (N - 1))`` of the ``N - 1`` non-CLS tokens by head-averaged
CLS attention are kept and the others are dropped (:func:`methods.evit.evit_reorganise` with
``fuse=False``; EViT's paper calls this its "w/o fusion" ablation). The keep rate means what it means for
EViT, so the two share the runner's grid. No parameters, no auxiliary loss.
"""
from __future__ import annotations

from torch import nn

from bench_suite.backbones import keep_count, num_tokens
from bench_suite.registry import register_method
from methods.evit import EViT, apply_evit

__all__ = ["topk_token_schedule", "TopK"]


def topk_token_schedule(n_tokens: int, depth: int, keep_rate: float, stages: tuple[int, ...]) -> list[int]:
    """Tokens each block's MHSA sees under Top-K pruning: ``N`` up to the first pruning block, then after
    block ``s`` ``1 + ceil(keep_rate * (N_s - 1))`` (CLS plus the kept tokens, no fused token)."""
    out, n = [], n_tokens
    for layer in range(depth):
        out.append(n)
        if layer in stages:
            n = 1 + keep_count(keep_rate, n - 1)
    return out


@register_method("topk", keep_rates=(0.7, 0.5, 0.3),
                 description="Top-K token pruning: keep the top CLS-attention tokens, drop the rest (no fusion)")
class TopK(EViT):
    """Top-K token pruning fine-tuned from the full-attention teacher: EViT's selection without fusion.

    Args: as :class:`methods.evit.EViT` (``keep_rate``: token keep rate of each pruning block, ``stages``).

    Raises:
        ValueError: for a keep rate outside (0, 1] or invalid stages.
    """

    display_name = "Top-K"
    plot_color, plot_marker = "#56b4e9", "v"

    def adapt(self, model: nn.Module) -> None:
        apply_evit(model, self.keep_rate, self._evit_stages_arg)
        for i in model.evit_stages:
            model.blocks[i].fuse_token = False

    def sparsity_report(self) -> dict[str, float]:
        """As EViT's: ``tokens_in``, ``tokens_after_block<i>``, ``token_keep_frac`` (Top-K's schedule)."""
        out = super().sparsity_report()
        if out:
            n = num_tokens(self.model)
            seen = topk_token_schedule(n, len(self.model.blocks), self.keep_rate, tuple(self.model.evit_stages))
            out["token_keep_frac"] = float(sum(seen) / (n * len(seen)))
        return out
