"""EViT: token reorganisation guided by CLS attention (Liang et al., "Not All Patches are What You
Need: Expediting Vision Transformers via Token Reorganizations", ICLR 2022).

In a few *pruning blocks* (0-based blocks 3, 6, 9 of a 12-block ViT, :func:`bench_suite.backbones.
pruning_stages`), between the MHSA and the MLP of the block, the ``N - 1`` non-CLS tokens are
reorganised:

* attentive tokens (paper sec. 3.1): the class attention ``a = softmax(q_cls K^T / sqrt(d))`` of the
  CLS query to the other tokens, averaged over the heads, ranks the tokens; the top
  ``k = ceil(keep_rate * (N - 1))`` are kept;
* inattentive token fusion (paper sec. 3.2): the other ``N - 1 - k`` tokens are fused into ONE token
  ``x_fused = sum_{i dropped} a_i x_i`` (class-attention-weighted sum, not normalised).

The block then continues with ``[cls, kept..., fused]`` (``k + 2`` tokens); ``N - 1`` at a later stage
includes the fused token of an earlier one. The keep rate is constant over the stages (the paper's
fine-tuning setting); there are no new parameters and no auxiliary loss.

The layout is ToMe's: a framework-free pure function (:func:`evit_reorganise`), a thin adapter that
patches timm's ``Block``/``Attention`` in place (:func:`apply_evit`, via :mod:`methods.adapter`), and the
registered LightningModule (:class:`EViT`).

Differences from the official code (youweiliang/evit, ``evit.py``/``helpers.py``), all deliberate:

* ``k`` uses the project's budget rule :func:`bench_suite.backbones.keep_count`
  (``ceil(rate * n - 1e-9)``), which guards against floating-point round-up (e.g. ``0.7 * 10`` is
  ``7.000000000000001``; the official ``math.ceil`` keeps 8 there). For DeiT-S (196 + 1 tokens) both
  give 138 / 99 / 71 tokens at keep rate 0.7.
* A block that would drop nothing (``k == N - 1``, e.g. keep rate 1.0) runs timm's own block and
  attention unchanged (fused SDPA), so keep rate 1.0 is bit-identical to the full model; the official
  code then runs its explicit attention, equal up to rounding.
* The inattentive tokens are summed in ascending token order, as the official ``complement_idx``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from bench_suite.backbones import keep_count, num_tokens, pruning_stages
from bench_suite.registry import Metric, register_method
from methods.adapter import (
    attention_probs,
    check_timm_block,
    merge_heads,
    split_heads,
    swap_class,
)
from methods.base import BenchModule, check_keep_rate

__all__ = [
    "evit_reorganise",
    "evit_token_schedule",
    "EViTAttention",
    "EViTBlock",
    "apply_evit",
    "EViT",
]


# --------------------------------------------------------------------------- the algorithm
def evit_reorganise(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float,
                    fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT token reorganisation (Liang et al. 2022, sec. 3.1 attentive tokens, sec. 3.2 fusion).

    Args:
        x: tokens ``[B, N, C]``, the CLS token first (``N - 1`` may include an earlier fused token).
        cls_attn: head-averaged attention of the CLS query to the other tokens ``[B, N - 1]``
            (attention probabilities, rows of the softmax without the CLS column).
        keep_rate: fraction of the ``N - 1`` non-CLS tokens kept, in (0, 1]; ``k = ceil(keep_rate * (N - 1))``.
        fuse: fuse the dropped (inattentive) tokens into one extra token (EViT); ``False`` only drops
            them (the paper's "w/o fusion" ablation).

    Returns:
        ``(x_new, keep_idx)``: ``x_new [B, 1 + k + fuse, C]`` ordered ``[cls, kept..., fused]``, the kept
        tokens in ``torch.topk`` order (descending class attention, as the official code); and
        ``keep_idx [B, k]`` (int64), the positions of the kept tokens among the ``N - 1`` non-CLS
        tokens of ``x`` (0-based). When ``k == N - 1`` nothing is dropped: ``x`` is returned unchanged
        (same tensor) with ``keep_idx = arange(N - 1)``.

        The fused token is ``sum_{i dropped} cls_attn[b, i] * x[b, 1 + i]`` (not normalised by the
        attention mass, as in the paper and the official code); gradients reach ``x`` and ``cls_attn``.

    Raises:
        ValueError: for a keep rate outside (0, 1], an ``x`` that is not ``[B, N, C]`` with ``N >= 1``,
            or a ``cls_attn`` that is not ``[B, N - 1]``.
    """
    keep_rate = check_keep_rate(keep_rate)
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be [B, N, C] with a CLS token, got shape {tuple(x.shape)}")
    b, n, c = x.shape
    if cls_attn.shape != (b, n - 1):
        raise ValueError(f"cls_attn must be [B, N-1] = [{b}, {n - 1}], got {tuple(cls_attn.shape)}")
    n_keep = keep_count(keep_rate, n - 1)
    if n_keep >= n - 1:
        return x, torch.arange(n - 1, device=x.device).expand(b, n - 1)
    cls_tok, others = x[:, :1], x[:, 1:]  # [B, 1, C], [B, N-1, C]
    _, keep_idx = torch.topk(cls_attn, n_keep, dim=1, largest=True, sorted=True)  # [B, k]
    kept = torch.gather(others, 1, keep_idx.unsqueeze(-1).expand(-1, -1, c))  # [B, k, C]
    if not fuse:
        return torch.cat([cls_tok, kept], dim=1), keep_idx
    # complement of keep_idx in ascending token order: a stable sort puts the dropped (0) first
    is_kept = torch.zeros(b, n - 1, dtype=torch.int8, device=x.device).scatter_(1, keep_idx, 1)
    drop_idx = torch.argsort(is_kept, dim=1, stable=True)[:, : n - 1 - n_keep]  # [B, N-1-k]
    dropped = torch.gather(others, 1, drop_idx.unsqueeze(-1).expand(-1, -1, c))  # [B, N-1-k, C]
    weight = torch.gather(cls_attn, 1, drop_idx).unsqueeze(-1)  # [B, N-1-k, 1]
    fused = (dropped * weight).sum(dim=1, keepdim=True)  # [B, 1, C]
    return torch.cat([cls_tok, kept, fused], dim=1), keep_idx


def evit_token_schedule(n_tokens: int, depth: int, keep_rate: float,
                        stages: Sequence[int] | None = None, fuse: bool = True) -> list[int]:
    """Number of tokens each block's MHSA sees under EViT (what :func:`apply_evit` really runs).

    Block ``l`` sees ``n_l`` tokens; after a pruning block, ``n -> 1 + ceil(keep_rate * (n - 1)) + fuse``
    (unless that keeps every token). DeiT-S at keep rate 0.7: 197 (blocks 0-3), 140, 100, 72.

    Raises:
        ValueError: for a keep rate outside (0, 1] or stages outside ``[0, depth)``.
    """
    keep_rate = check_keep_rate(keep_rate)
    stages = _check_stages(pruning_stages(depth) if stages is None else stages, depth)
    out, n = [], int(n_tokens)
    for layer in range(depth):
        out.append(n)
        if layer in stages:
            k = keep_count(keep_rate, n - 1)
            if k < n - 1:
                n = 1 + k + int(fuse)
    return out


# --------------------------------------------------------------------------- the timm adapter
class EViTAttention(Attention):
    """timm ``Attention`` that also exposes the head-averaged class attention (EViT sec. 3.1).

    When ``store_cls_attn`` is true, the forward computes the attention probabilities explicitly,
    ``A = attn_drop(softmax(q k^T / sqrt(d)))`` ``[B, H, N, N]``, returns ``merge_heads(A v)`` and stores
    ``cls_attn = A[:, :, 0, 1:].mean(heads)`` ``[B, N - 1]`` for the block to read. As in the official
    code the class attention is taken after ``attn_drop`` (the probabilities that really mix the
    values; identical in eval or with ``attn_drop = 0``). When false it is timm's forward unchanged.
    """

    store_cls_attn: bool = True
    cls_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``.

        Raises:
            NotImplementedError: for an attention mask or causal attention while storing class attention.
        """
        if not self.store_cls_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("EViT attention takes no attention mask / causal attention")
        q, k, v = split_heads(self, x)  # [B, H, N, d] each
        attn = self.attn_drop(attention_probs(self, q, k))  # [B, H, N, N]
        self.cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
        return merge_heads(self, attn @ v)


class EViTBlock(Block):
    """timm ``Block`` with EViT's token reorganisation between the MHSA and the MLP.

    ``x = x + drop_path(ls1(attn(norm1(x))))``; then :func:`evit_reorganise` with the stored class
    attention; then ``x = x + drop_path(ls2(mlp(norm2(x))))``. A block that would keep every token runs
    timm's forward unchanged. After each forward, ``evit_tokens_out`` holds the number of tokens it
    outputs and ``evit_keep_idx`` the kept positions ``[B, k]`` (detached; ``None`` if nothing dropped).

    Attributes set by :func:`apply_evit`: ``keep_rate`` (float), ``fuse_token`` (bool).
    """

    keep_rate: float = 1.0
    fuse_token: bool = True
    evit_tokens_out: int | None = None
    evit_keep_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N', C]`` with ``N' = 1 + ceil(keep_rate (N - 1)) + fuse_token`` (or ``N``).

        Raises:
            NotImplementedError: for an attention mask or causal attention in a block that prunes.
        """
        n = x.shape[1]
        prune = keep_count(self.keep_rate, n - 1) < n - 1
        self.attn.store_cls_attn = prune
        if not prune:
            self.evit_tokens_out, self.evit_keep_idx = n, None
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("EViT blocks take no attention mask / causal attention")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        cls_attn, self.attn.cls_attn = self.attn.cls_attn, None  # do not keep the graph alive
        x, keep_idx = evit_reorganise(x, cls_attn, self.keep_rate, fuse=self.fuse_token)
        self.evit_tokens_out, self.evit_keep_idx = x.shape[1], keep_idx.detach()
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _check_stages(stages: Sequence[int], depth: int) -> tuple[int, ...]:
    out = tuple(sorted({int(s) for s in stages}))
    if not out or any(s < 0 or s >= depth for s in out) or len(out) != len(tuple(stages)):
        raise ValueError(f"EViT stages must be distinct block indices in [0, {depth}), got {tuple(stages)}")
    return out


def _unpatch(model: nn.Module) -> None:
    """Undo an earlier :func:`apply_evit` (restore the original classes of the patched modules)."""
    for blk in model.blocks:
        for mod in (blk, blk.attn):
            base = mod.__dict__.pop("_evit_base_cls", None)
            if base is not None:
                mod.__class__ = base
                for key in ("keep_rate", "fuse_token", "store_cls_attn", "cls_attn",
                            "evit_tokens_out", "evit_keep_idx"):
                    mod.__dict__.pop(key, None)


def apply_evit(model: nn.Module, keep_rate: float, stages: Sequence[int] | None = None) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place into EViT (ToMe-style, weights untouched).

    The blocks ``stages`` (default :func:`bench_suite.backbones.pruning_stages`, (3, 6, 9) for 12 blocks)
    become :class:`EViTBlock` with :class:`EViTAttention`; every other block keeps timm's own attention
    (fused SDPA). Records ``model.evit_stages`` (sorted tuple; the pruning blocks hold their ``keep_rate``).
    Calling it again re-patches.

    Args:
        model: timm ``VisionTransformer`` with one CLS token and ``global_pool='token'``.
        keep_rate: token keep rate in (0, 1] of each pruning block (1.0 gives the full model exactly).
        stages: 0-based indices of the pruning blocks.

    Returns:
        ``model`` (the same object).

    Raises:
        ValueError: for a keep rate outside (0, 1], stages outside ``[0, depth)``, or a model without a
            single CLS token read by the head.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    keep_rate = check_keep_rate(keep_rate)
    depth = len(model.blocks)
    stages = _check_stages(pruning_stages(depth) if stages is None else stages, depth)
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 1) != 1 \
            or getattr(model, "global_pool", "token") != "token":
        raise ValueError("EViT needs a ViT with exactly one CLS token (no register/distillation tokens) "
                         "and global_pool='token'")
    _unpatch(model)
    for i in stages:
        blk = model.blocks[i]
        check_timm_block(blk, i)
        swap_class(blk.attn, EViTAttention, _evit_base_cls=type(blk.attn), store_cls_attn=True, cls_attn=None)
        swap_class(blk, EViTBlock, _evit_base_cls=type(blk), keep_rate=keep_rate, fuse_token=True,
                   evit_tokens_out=None, evit_keep_idx=None)
    model.evit_stages = stages
    return model


# --------------------------------------------------------------------------- the LightningModule
@register_method("evit", keep_rates=(0.7, 0.5, 0.3),
                 description="EViT (Liang et al. ICLR 2022): keep top CLS-attention tokens, fuse the rest")
class EViT(BenchModule):
    """EViT token reorganisation (Liang et al., ICLR 2022) fine-tuned from the full-attention teacher.

    Keeps ``ceil(keep_rate * (N - 1))`` tokens by head-averaged CLS attention in the pruning blocks and
    fuses the others into one token (:func:`evit_reorganise`, :func:`apply_evit`). EViT adds no
    parameters and no auxiliary loss: the objective is the base class's cross-entropy plus KL logit
    distillation from the teacher (the final token counts differ from the teacher's, so the base
    class skips token MSE distillation).

    Recipe: the official fine-tuning recipe (``finetune.sh``) is a constant keep rate, AdamW lr 2e-5
    (cosine to 2e-6), weight decay 1e-6, no warm-up, 30 epochs on ImageNet from a pretrained DeiT,
    without distillation. This benchmark instead uses the base-class defaults of every method (lr,
    schedule, epochs of the CPU profile, KL distillation) so that all methods get the same budget; the
    keep rate is constant as in the official fine-tuning (the keep-rate warm-up of the from-scratch
    recipe is not used).

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: token keep rate in (0, 1] of each pruning block.
        teacher: frozen full-attention model for logit distillation (or ``None``).
        stages: 0-based pruning blocks; ``None`` uses :func:`bench_suite.backbones.pruning_stages`.
        **kwargs: :class:`methods.base.BenchModule` settings (lr, distill_logits, ...).

    Raises:
        ValueError: for a keep rate outside (0, 1] or invalid stages.
    """

    in_default_run = True
    display_name = "EViT"
    # EViT's fine-tune (finetune.sh: 8 x 128 = 1024 images per step): 30 epochs, lr 2e-5 down to 2e-6, wd 1e-6, no
    # warm-up, constant keep rate; lr / min_lr as DeiT-base values (x 512 / 1024).
    paper_recipe = {"epochs": 30, "lr": 2e-5 * 512 / 1024, "min_lr": 2e-6 * 512 / 1024, "weight_decay": 1e-6,
                    "warmup_frac": 0.0}
    plot_color, plot_marker = "#029e73", "^"
    reported_metrics = (
        Metric("tokens_in", "tokens", description="tokens entering the first block"),
        Metric("token_keep_frac", "fraction", description="mean over blocks of the tokens each MHSA sees / N"),
    )

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.7, teacher: nn.Module | None = None,
                 stages: tuple[int, ...] | None = None, **kwargs) -> None:
        self._evit_stages_arg = None if stages is None else tuple(int(s) for s in stages)
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)

    def adapt(self, model: nn.Module) -> None:
        apply_evit(model, self.keep_rate, self._evit_stages_arg)

    def token_pruning_stages(self) -> tuple[int, ...]:
        return tuple(self.model.evit_stages)

    def sparsity_report(self) -> dict[str, float]:
        """Token counts of the last forward: ``tokens_in`` and ``tokens_after_block<i>`` for each pruning
        block, and ``token_keep_frac`` = mean over blocks of the tokens each block's MHSA saw / N."""
        if self.model.blocks[self.model.evit_stages[0]].evit_tokens_out is None:
            return {}
        n = num_tokens(self.model)
        seen = evit_token_schedule(n, len(self.model.blocks), self.keep_rate, self.model.evit_stages)
        out = {"tokens_in": float(n)}
        for i in self.model.evit_stages:
            out[f"tokens_after_block{i}"] = float(self.model.blocks[i].evit_tokens_out)
        out["token_keep_frac"] = float(sum(seen) / (n * len(seen)))
        return out
