"""Top-k attention as a bench_suite method (a plugin: registered through the ``bench_suite.methods``
entry point of this package, nothing in the suite changes).

Top-k attention (Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention"; Wang et al.,
ECCV 2022, "KVT: k-NN Attention for Boosting Vision Transformers", eq. 3): for each query ``i`` keep the
``B = ceil(keep_rate * N)`` keys ``j`` with the largest scores ``s_ij = q_i k_j^T / sqrt(d)``, then

    A_ij = exp(s_ij) / sum_{j' in topB(i)} exp(s_ij')   for j in topB(i), else 0;      out_i = sum_j A_ij v_j.

It is Sparsifiner's connectivity mask (Sparsifiner eq. 3-6) chosen from the exact scores instead of a
low-rank approximation: an oracle for the mask, but the dense ``Q K^T`` is still computed.

MHSA FLOPs per head and image (1 MAC = 1 FLOP, as counted by ``bench_suite.flops``): ``N^2 d`` for
``Q K^T`` plus ``N B d`` for the sparse ``A V`` (an exact einsum over the gathered values); top-k,
gather and softmax are free. At keep rate 1.0 (``B = N``) it is full attention.
"""
from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from bench_suite.backbones import keep_count, num_tokens
from bench_suite.registry import register_method
from methods.adapter import attentions_of, merge_heads, split_heads, swap_class
from methods.base import BenchModule

__all__ = ["topk_attention", "TopKAttention", "TopKAttentionMethod"]


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
    """Attention over each query's ``budget`` highest-scoring keys.

    Args:
        q, k, v: ``[B, H, N, d]``.
        scale: the score scale, ``d ** -0.5``.
        budget: keys kept per query, ``1 <= budget <= N``.

    Returns:
        ``[B, H, N, d]``.

    Raises:
        ValueError: for a budget outside ``[1, N]``.
    """
    n, d = k.shape[-2], v.shape[-1]
    if not 1 <= budget <= n:
        raise ValueError(f"top-k attention needs 1 <= budget <= N, got budget={budget}, N={n}")
    scores = (q * scale) @ k.transpose(-2, -1)                       # [B, H, N, N]: N^2 d MACs
    top, idx = scores.topk(budget, dim=-1)                           # [B, H, N, budget]
    probs = top.softmax(dim=-1)
    rows = v.unsqueeze(2).expand(*v.shape[:2], q.shape[-2], n, d)     # [B, H, N, N, d] (a view)
    kept = torch.gather(rows, 3, idx.unsqueeze(-1).expand(*idx.shape, d))  # [B, H, N, budget, d]
    return torch.einsum("bhik,bhikd->bhid", probs, kept)              # N budget d MACs


class TopKAttention(Attention):
    """timm ``Attention`` whose core is :func:`topk_attention` (swapped in place, weights unchanged).

    Attributes set by :func:`TopKAttentionMethod.adapt`: ``topk_budget`` (keys kept per query).
    """

    topk_budget: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``.

        Raises:
            NotImplementedError: for an attention mask or causal attention.
        """
        if attn_mask is not None or is_causal:
            raise NotImplementedError("top-k attention takes no attention mask / causal attention")
        q, k, v = split_heads(self, x)                               # [B, H, N, d] each
        out = topk_attention(q, k, v, self.scale, min(self.topk_budget, x.shape[1]))
        return merge_heads(self, self.attn_drop(out))


@register_method("topk_attention", keep_rates=(0.5, 0.25, 0.1),
                 description="top-k attention: each query keeps its ceil(rho N) highest-scoring keys (plugin example)")
class TopKAttentionMethod(BenchModule):
    """Top-k attention on every block of the timm ViT; the keep rate is ``B / N``.

    Fine-tuned like every method (cross-entropy plus logit distillation from the teacher); no extra
    losses or parameters, so DDP needs no search for unused parameters.

    Raises:
        ValueError: for a keep rate outside (0, 1].
    """

    ddp_find_unused_parameters = False

    def adapt(self, model: nn.Module) -> None:
        budget = keep_count(self.keep_rate, num_tokens(model))
        for attn in attentions_of(model):
            swap_class(attn, TopKAttention, topk_budget=budget)

    def sparsity_report(self) -> dict[str, float]:
        """``attn_density``: kept keys per query over ``N`` (the realised keep rate)."""
        n = num_tokens(self.model)
        return {"attn_density": keep_count(self.keep_rate, n) / n}
