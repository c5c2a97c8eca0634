"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), patched into timm in
place as the official code does (facebookresearch/ToMe, ``tome/merge.py`` and ``tome/patch/timm.py``).

In every block, between the MHSA and the MLP, ``r`` tokens are merged away by *bipartite soft matching*
(:func:`bipartite_soft_matching`): the tokens are split alternately into sets A (even positions) and B (odd),
each A token is linked to its most similar B token by the cosine similarity of the keys averaged over the
heads, and the ``r`` A tokens with the most similar links are merged into their B partners; the CLS token
(position 0, in A) is protected. Merged tokens are *size-weighted averages* (:func:`merge_wavg`; a token's
size is how many original patches it holds), and the MHSA uses *proportional attention*: ``log(size)`` of
each key is added to its attention logits. At most half of the non-protected tokens are merged in a block.

``r`` from the runner's keep rate (so ToMe shares EViT's grid 0.7 / 0.5 / 0.3): block ``l`` (0-based) sees
``N - r l`` tokens with a constant ``r``, so the tokens averaged over the ``L`` blocks are
``N - r (L - 1) / 2``; ``r = round(2 N (1 - rho) / (L - 1))`` makes that ``rho N`` (:func:`r_from_keep_rate`;
196 + 1 tokens, 12 blocks: 0.7 -> 11, 0.5 -> 18, 0.3 -> 25). ``r=`` sets it directly.

Two ways to run it, as in the ToMe paper: ``tome`` fine-tunes the merged model like every method, and
``tome_offshelf`` applies ToMe to the teacher without any training (``fine_tune = False``: the runner only
evaluates it). FLOPs: the MHSA on the merged tokens is counted as every attention module's; the matching
(the similarity product and the key norms) is counted in the total FLOPs, the merge's additions are free.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from bench_suite.backbones import num_tokens
from bench_suite.flops import register_flop_handle, zero_flop_handle
from bench_suite.registry import Metric, register_method
from methods.adapter import check_timm_block, merge_heads, split_heads, swap_class
from methods.base import BenchModule

__all__ = ["bipartite_soft_matching", "merge_wavg", "r_from_keep_rate", "tome_token_schedule", "ToMeAttention",
           "ToMeBlock", "apply_tome", "ToMe", "ToMeOffShelf"]


# --------------------------------------------------------------------------- the algorithm (framework-free)
def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> Callable[..., torch.Tensor]:
    """ToMe's bipartite soft matching (official ``bipartite_soft_matching``).

    Args:
        metric: ``[B, N, c]``, the similarity features (keys averaged over the heads).
        r: tokens to merge away; at most ``(N - protected) // 2``.
        class_token: protect token 0 (it is never merged).

    Returns:
        ``merge(x [B, N, C], mode) -> [B, N - r, C]``: the unmerged A tokens (in order, the CLS first), then
        the B tokens with the merged A tokens reduced into them by ``mode`` (``"sum"``, ``"mean"``, ``"amax"``).
        ``r <= 0`` returns the identity.
    """
    t = metric.shape[1]
    r = min(int(r), (t - int(class_token)) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb] cosine similarities
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # A tokens kept
        src_idx = edge_idx[..., :r, :]  # A tokens merged
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B partners
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # the CLS token first

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable[..., torch.Tensor], x: torch.Tensor,
               size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x [B, N, C]`` as size-weighted averages; returns ``(x [B, N - r, C], size [B, N - r, 1])``
    (official ``merge_wavg``)."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def r_from_keep_rate(keep_rate: float, n_tokens: int, depth: int) -> int:
    """``r = round(2 N (1 - rho) / (L - 1))``: the tokens averaged over the blocks are then about ``rho N``
    (see the module docstring)."""
    if depth < 2:
        return 0
    return int(round(2 * n_tokens * (1.0 - float(keep_rate)) / (depth - 1)))


def tome_token_schedule(n_tokens: int, depth: int, r: int, class_token: bool = True) -> list[int]:
    """Tokens each block's MHSA sees: ``N`` in block 0, then minus ``min(r, (N_l - cls) // 2)`` per block."""
    out, n = [], n_tokens
    for _ in range(depth):
        out.append(n)
        n -= max(0, min(r, (n - int(class_token)) // 2))
    return out


# --------------------------------------------------------------------------- the timm adapter
class ToMeAttention(Attention):
    """timm ``Attention`` with proportional attention (``log(size)`` added to the logits of each key) that also
    leaves the keys averaged over the heads, ``[B, N, d]``, in ``tome_state["metric"]``.
    ``x [B, N, C]`` -> ``[B, N, C]``."""

    tome_state: dict

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("ToMe attention takes no attention mask / causal attention")
        q, k, v = split_heads(self, x)  # [B, H, N, d]
        logits = torch.matmul(q * self.scale, k.transpose(-2, -1))
        size = self.tome_state.get("size")
        if size is not None and self.tome_state.get("prop_attn", True):
            logits = logits + size.log()[:, None, None, :, 0]
        out = torch.matmul(self.attn_drop(logits.softmax(dim=-1)), v)
        self.tome_state["metric"] = k.mean(1)
        return merge_heads(self, out)


class ToMeBlock(Block):
    """timm ``Block`` with ToMe between the MHSA and the MLP (official ``ToMeBlock``): ``r`` tokens merged.
    ``x [B, N, C]`` -> ``[B, N - r, C]``."""

    tome_r: int = 0
    tome_state: dict

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if self.tome_r > 0:
            merge = bipartite_soft_matching(self.tome_state.pop("metric"), self.tome_r, class_token=True)
            x, self.tome_state["size"] = merge_wavg(merge, x, self.tome_state.get("size"))
        self.tome_state.pop("metric", None)
        self.tome_tokens_out = x.shape[1]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def apply_tome(model: nn.Module, r: int, prop_attn: bool = True) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place with ToMe (``r`` tokens merged per block). The shared state
    (``model.tome_state``: token sizes, the last metric) is reset before every forward by a pre-hook on the
    patch embedding (the official code wraps the model's forward instead).

    Raises:
        ValueError: for ``r < 0`` or a model without exactly one CLS token read by the head.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "global_pool", "token") != "token":
        raise ValueError("ToMe here needs a ViT with exactly one CLS token read by the head (global_pool='token')")
    state: dict[str, Any] = {"prop_attn": bool(prop_attn), "size": None}
    for i, blk in enumerate(model.blocks):
        check_timm_block(blk, i)
        swap_class(blk.attn, ToMeAttention, tome_state=state)
        swap_class(blk, ToMeBlock, tome_r=int(r), tome_state=state, tome_tokens_out=None)
    model.tome_state = state
    model.patch_embed.register_forward_pre_hook(lambda module, args: state.update(size=None, metric=None))
    return model


register_flop_handle("aten::scatter_reduce", zero_flop_handle)  # the merge: additions only (free, as the paper's)


def _norm_macs(inputs: list, outputs: list) -> int:
    """``aten::linalg_vector_norm``: one multiply-accumulate per input element (the squares' sum)."""
    import numpy as np

    shape = inputs[0].type().sizes()
    return int(np.prod(shape)) if shape else 0


register_flop_handle("aten::linalg_vector_norm", _norm_macs)


# --------------------------------------------------------------------------- the LightningModules
@register_method("tome", keep_rates=(0.7, 0.5, 0.3),
                 description="ToMe (Bolya et al. ICLR 2023): merge r similar tokens per block, fine-tuned")
class ToMe(BenchModule):
    """ToMe token merging, fine-tuned from the teacher (see the module docstring).

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: ``rho``; ``r = round(2 N (1 - rho) / (L - 1))`` unless ``r`` is given (1.0: ``r = 0``).
        teacher: frozen full-attention model (logit distillation, as every method).
        r: tokens merged per block (overrides the keep rate's).
        prop_attn: proportional attention (official default True).
        **kwargs: :class:`methods.base.BenchModule` settings.

    Raises:
        ValueError: for a keep rate outside (0, 1] or ``r < 0``.
    """

    display_name = "ToMe"
    plot_color, plot_marker = "#fbafe4", "h"
    reported_metrics = (
        Metric("tome_r", "tokens per block", description="r, tokens merged in every block"),
        Metric("token_keep_frac", "fraction", description="mean over blocks of the tokens each MHSA sees / N"),
    )

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.7, teacher: nn.Module | None = None,
                 r: int | None = None, prop_attn: bool = True, **kwargs: Any) -> None:
        if r is not None and r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)

    def merge_r(self) -> int:
        """``r`` of this module: the ``r`` setting, else :func:`r_from_keep_rate`."""
        hp = self.hparams
        if hp.r is not None:
            return int(hp.r)
        return r_from_keep_rate(self.keep_rate, num_tokens(self.model), len(self.model.blocks))

    def adapt(self, model: nn.Module) -> None:
        apply_tome(model, self.merge_r(), self.hparams.prop_attn)

    def sparsity_report(self) -> dict[str, float]:
        n, depth, r = num_tokens(self.model), len(self.model.blocks), self.merge_r()
        seen = tome_token_schedule(n, depth, r)
        return {"tome_r": float(r), "token_keep_frac": float(sum(seen) / (n * depth))}


@register_method("tome_offshelf", keep_rates=(0.7, 0.5, 0.3),
                 description="ToMe applied to the teacher off the shelf (no fine-tuning)")
class ToMeOffShelf(ToMe):
    """ToMe applied to the teacher without any training (ToMe's "off-the-shelf" setting): the runner evaluates
    it only (``fine_tune = False``). Args as :class:`ToMe`."""

    display_name = "ToMe (off the shelf)"
    plot_color, plot_marker = "#9467bd", "H"
    fine_tune = False
