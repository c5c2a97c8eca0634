"""The one place where timm's ViT is patched in place (ToMe-style).

Methods never copy timm's ``VisionTransformer``, ``Block`` or ``Attention``. They subclass timm's
``Block``/``Attention`` to override ``forward`` only, and swap the class of existing modules with
:func:`swap_class`, so the weights, names and state-dict keys of the backbone stay exactly timm's.
:func:`split_heads` and :func:`merge_heads` reproduce the projection steps of timm's ``Attention``
so that a method only writes its attention core.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = ["split_heads", "merge_heads", "swap_class", "blocks_of", "attentions_of", "attention_probs",
           "attention_inputs", "check_timm_block"]


def split_heads(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention``'s QKV projection: ``x [B, N, C]`` -> ``q, k, v`` each ``[B, H, N, d]``
    (with the module's q/k normalisation applied, before the ``d**-0.5`` scale)."""
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated timm attention is not supported by bench_suite methods")
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def merge_heads(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """timm ``Attention``'s output path: ``out [B, H, N, d]`` -> ``[B, N, C]`` (norm, proj, dropout)."""
    b, h, n, d = out.shape
    x = out.transpose(1, 2).reshape(b, n, h * d)
    return attn.proj_drop(attn.proj(attn.norm(x)))


def attention_probs(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dense attention probabilities ``softmax(q k^T / sqrt(d))`` as ``[B, H, N, N]`` (Vaswani et al. eq. 1)."""
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def check_timm_block(block: nn.Module, index: int) -> Block:
    """``block`` if it is a timm ``Block`` whose ``attn`` is a timm ``Attention`` (what every method patches).

    Raises:
        TypeError: naming the block otherwise.
    """
    if not isinstance(block, Block) or not isinstance(getattr(block, "attn", None), Attention):
        raise TypeError(f"block {index} ({type(block).__name__}) is not a timm Block with a timm Attention")
    return block


def swap_class(module: nn.Module, cls: type, **attrs: Any) -> nn.Module:
    """Change ``module``'s class in place to ``cls`` (a subclass of its own class) and set ``attrs``.

    Both classes must derive from the same timm base (``Block`` or ``Attention``), so the module keeps
    its parameters and only its ``forward`` changes.

    Raises:
        TypeError: if ``cls`` and the module do not share a timm ``Block``/``Attention`` base.
    """
    if not any(isinstance(module, base) and issubclass(cls, base) for base in (Block, Attention)):
        raise TypeError(f"cannot swap {type(module).__name__} for unrelated {cls.__name__}")
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def blocks_of(model: VisionTransformer) -> list[Block]:
    """The transformer blocks of a timm ViT, in order."""
    return list(model.blocks)


def attentions_of(model: VisionTransformer, layers: Iterable[int] | None = None) -> list[Attention]:
    """The attention modules of the chosen blocks (all blocks by default)."""
    blocks = blocks_of(model)
    idx = range(len(blocks)) if layers is None else layers
    return [blocks[i].attn for i in idx]


@torch.no_grad()
def attention_inputs(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """The input ``[B, N_l, C]`` of every block's attention module in one eval-mode forward of ``model`` on
    ``images [B, C, H, W]`` (the model's training mode is restored)."""
    seen: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen
