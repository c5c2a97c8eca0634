"""Shared ViT backbones, created through timm.

Every backbone is a stock ``timm.models.vision_transformer.VisionTransformer``: the paper-scale
profiles use timm's own model names (``deit_small_patch16_224``, ``deit_tiny_patch16_224`` at 384) and the
CPU profiles are registered into timm's model registry with ``@register_model`` so that
``timm.create_model`` builds them too. Methods never copy timm's ViT code; they swap attention or
blocks in place (see :mod:`methods.adapter`).

A *profile* fixes the backbone, its input resolution and the token-pruning stages, so that a result
row names one profile and is comparable with every other row of the same profile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from bench_suite.errors import UnknownProfileError

__all__ = [
    "ConvStemPatchEmbed",
    "Profile",
    "PROFILES",
    "UnknownProfileError",
    "get_profile",
    "create_backbone",
    "backbone_spec",
    "backbone_from_spec",
    "pruning_stages",
    "lvvit_official_to_suite",
    "STATE_ADAPTERS",
]


class ConvStemPatchEmbed(nn.Module):
    """Convolutional patch embedding in the style of LV-ViT (Jiang et al., NeurIPS 2021).

    Three convolutions (7x7 stride 2, then two 3x3 stride 1, each with BatchNorm and ReLU) followed
    by a linear patch projection with kernel and stride ``patch_size // 2``, so that the token grid is
    ``img_size // patch_size`` per side, exactly as with timm's ``PatchEmbed``. It has the same
    constructor and attributes as ``timm.layers.PatchEmbed`` and is passed through
    ``VisionTransformer(embed_layer=...)``.

    Shapes: input ``[B, in_chans, H, W]``, output ``[B, N, embed_dim]`` with
    ``N = (H // patch_size) * (W // patch_size)``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        stem_chs: int = 64,
        bias: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"ConvStemPatchEmbed needs an even patch_size, got {patch_size}")
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img[0] // patch_size, img[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.output_fmt = "NCHW"
        self.dynamic_img_pad = False

        def conv_bn(cin: int, cout: int, k: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(
            *conv_bn(in_chans, stem_chs, 7, 2), *conv_bn(stem_chs, stem_chs, 3, 1), *conv_bn(stem_chs, stem_chs, 3, 1)
        )
        half = patch_size // 2
        self.proj = nn.Conv2d(stem_chs, embed_dim, kernel_size=half, stride=half, bias=bias)
        self.norm = nn.Identity()

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.stem(x))
        return x.flatten(2).transpose(1, 2)


def _vit(pretrained: bool, default: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError("bench_suite CPU backbones have no hub weights; load a checkpoint instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory bookkeeping
        kwargs.pop(key, None)
    return VisionTransformer(**{**default, **kwargs})


@register_model
def bench_vit_mini_convstem(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The default CPU backbone: 28x28 input, LV-ViT-style conv stem, patch 4 (49 + 1 tokens),
    width 128, 12 blocks, 4 heads of dim 32. About 2.4 M parameters."""
    default = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=12,
                   num_heads=4, mlp_ratio=2.0, embed_layer=_mini_stem)
    return _vit(pretrained, default, **kwargs)


@register_model
def bench_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A test-sized backbone: 28x28 input, patch 7 (16 + 1 tokens), width 32, 4 blocks, 2 heads."""
    default = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=4,
                   num_heads=2, mlp_ratio=2.0)
    return _vit(pretrained, default, **kwargs)


@register_model
def bench_vit_mini197_convstem(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The CPU backbone at the paper's token count: 28x28 input, LV-ViT-style conv stem (its 7x7 stride-2
    convolution gives the 14x14 grid), patch 2 (196 + 1 = 197 tokens, as DeiT-S at 224), width 64,
    12 blocks, 4 heads of dim 16, MLP ratio 2. About 0.45 M parameters; full-attention MHSA
    12 * 2 * 197^2 * 64 = 59.61 MFLOPs (the paper's counting)."""
    default = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=12,
                   num_heads=4, mlp_ratio=2.0, embed_layer=_mini_stem)
    return _vit(pretrained, default, **kwargs)


def _mini_stem(**kwargs: Any) -> ConvStemPatchEmbed:
    return ConvStemPatchEmbed(stem_chs=32, **kwargs)


@register_model
def bench_lvvit_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """LV-ViT-S (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
    NeurIPS 2021; official ``lvvit_s`` in zihangJiang/TokenLabeling), built from timm layers because timm
    does not ship it: 224x224 input, the 4-layer convolutional patch embedding (:class:`ConvStemPatchEmbed`
    with 64 stem channels: 7x7 stride 2, 3x3, 3x3, each BatchNorm + ReLU, then the 8x8 stride-8 patch
    projection; 14x14 patches + CLS = 197 tokens), 16 blocks, width 384, 6 heads of dim 64, MLP ratio 3,
    no qkv bias. Full-attention MHSA: 16 * 2 * 197^2 * 384 = 476.88 MFLOPs (paper Table 1: 476.9).

    Differences from the official model: its residual scaling ``skip_lam = 2`` (each branch divided by 2)
    is timm's ``LayerScale`` initialised to 1/2 (equal at initialisation, learnable per channel); the
    token-labelling auxiliary head and MixToken (training-time only) are left out, the classifier reads
    the CLS token. No pretrained weights."""
    default = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=16,
                   num_heads=6, mlp_ratio=3.0, qkv_bias=False, init_values=0.5, embed_layer=ConvStemPatchEmbed)
    return _vit(pretrained, default, **kwargs)


_LVVIT_STEM = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4", "conv3": "stem.6",
               "bn3": "stem.7"}


def lvvit_official_to_suite(state: dict[str, Any], skip_lam: float = 2.0) -> dict[str, Any]:
    """Map an official LV-ViT state dict (zihangJiang/TokenLabeling ``tlt/models/lvvit.py``: ``PatchEmbed4_2``'s
    ``patch_embed.conv1/bn1/conv2/bn2/conv3/bn3/proj``, blocks with ``attn.qkv/proj`` and ``mlp.fc1/fc2``, and
    ``aux_head``) onto :func:`bench_lvvit_s`'s keys: the stem convolutions and BatchNorms to
    ``patch_embed.stem.<i>``, the constant residual scaling ``1 / skip_lam`` to every block's LayerScale
    ``ls1.gamma``/``ls2.gamma``, and the token-labelling head ``aux_head`` dropped (training only). Keys that are
    already the suite's pass unchanged, so the function is idempotent."""
    out: dict[str, Any] = {}
    dims: dict[str, int] = {}
    for key, value in state.items():
        if key.startswith("aux_head."):
            continue
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "patch_embed" and parts[1] in _LVVIT_STEM:
            key = ".".join(["patch_embed", _LVVIT_STEM[parts[1]], *parts[2:]])
        out[key] = value
        if len(parts) >= 4 and parts[0] == "blocks" and parts[2] == "norm1" and parts[3] == "weight":
            dims[parts[1]] = int(value.shape[0])
    for i, dim in dims.items():
        for ls in ("ls1", "ls2"):
            name = f"blocks.{i}.{ls}.gamma"
            if name not in out:
                out[name] = torch.full((dim,), 1.0 / skip_lam)
    return out


STATE_ADAPTERS: dict[str, Any] = {"bench_lvvit_s": lvvit_official_to_suite}
"""timm architecture -> a function mapping foreign checkpoints (the official release's key names) onto it."""


@dataclass(frozen=True)
class Profile:
    """A backbone at a fixed resolution.

    Attributes:
        name: profile name used on the command line (``--profile``).
        model: timm model name passed to ``timm.create_model``.
        img_size: input resolution in pixels (square).
        in_chans: input channels the backbone expects.
        description: one line for ``python -m bench_suite list``.
        model_kwargs: extra keyword arguments for ``timm.create_model``.
        epochs, train_subset, batch_size: the profile's fine-tuning protocol, used by ``run`` unless its
            options say otherwise (default: the paper's 30 epochs on all training images, batch 64; the
            CPU profiles keep short recipes).
        paper_recipes: ``run`` fine-tunes each method with its own paper recipe here (the method's
            ``paper_recipe``: its official epochs and learning rates; see ``list``) unless ``--epochs`` /
            ``--hparams`` say otherwise; the CPU profiles share one short protocol instead.
    """

    name: str
    model: str
    img_size: int
    in_chans: int
    description: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    train_subset: int | None = None
    batch_size: int = 64
    paper_recipes: bool = False

    def run_defaults(self) -> dict[str, Any]:
        """``{"epochs", "train_subset", "batch_size"}`` of the profile's fine-tuning protocol."""
        return {"epochs": self.epochs, "train_subset": self.train_subset, "batch_size": self.batch_size}


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile("mini", "bench_vit_mini_convstem", 28, 1,
                "CPU default: conv-stem ViT, 12 blocks, width 128, 50 tokens at 28x28",
                epochs=1, train_subset=10000, batch_size=128),
        Profile("mini197", "bench_vit_mini197_convstem", 28, 1,
                "CPU at the paper's 197 tokens: conv-stem ViT, 12 blocks, width 64, 197 tokens at 28x28",
                epochs=1, train_subset=10000, batch_size=128),
        Profile("tiny", "bench_vit_tiny", 28, 1, "test-sized ViT: 4 blocks, width 32, 17 tokens at 28x28",
                epochs=1, train_subset=512, batch_size=64),
        Profile("deit_s", "deit_small_patch16_224", 224, 3, "DeiT-S, 12 blocks, width 384, 197 tokens at 224",
                paper_recipes=True),
        # timm ships DeiT-T only at 224; the paper's DeiT-T-384 is the same architecture at 384x384
        # (timm resizes the position embedding grid for img_size=384: 24x24 patches + CLS = 577 tokens).
        Profile("deit_t384", "deit_tiny_patch16_224", 384, 3, "DeiT-T, 12 blocks, width 192, 577 tokens at 384",
                paper_recipes=True),
        Profile("lvvit_s", "bench_lvvit_s", 224, 3,
                "LV-ViT-S (timm layers, conv stem), 16 blocks, width 384, 197 tokens at 224", paper_recipes=True),
    ]
}


def get_profile(name: str) -> Profile:
    """Look up a profile by name.

    Raises:
        UnknownProfileError: if ``name`` is not a known profile; the message lists the known ones.
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None


def create_backbone(profile: str | Profile, num_classes: int = 10, **kwargs: Any) -> VisionTransformer:
    """Create the profile's backbone through ``timm.create_model`` (randomly initialised).

    Args:
        profile: profile name or :class:`Profile`.
        num_classes: classifier classes of the dataset.
        **kwargs: forwarded to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        A timm ``VisionTransformer`` whose forward maps ``[B, in_chans, H, W]`` to ``[B, num_classes]``.

    Raises:
        UnknownProfileError: for an unknown profile name.
    """
    p = get_profile(profile) if isinstance(profile, str) else profile
    args = {**p.model_kwargs, "num_classes": num_classes, "img_size": p.img_size, "in_chans": p.in_chans, **kwargs}
    model = timm.create_model(p.model, pretrained=False, **args)
    model.bench_suite_profile = p.name  # read by backbone_spec (checkpoints rebuild their backbone from it)
    return model


def backbone_spec(model: VisionTransformer) -> dict[str, Any]:
    """What rebuilds ``model``'s architecture (stored in every method checkpoint): its profile (the one it
    was created from, or one whose timm architecture, resolution and channels match), the timm architecture,
    classes, resolution and channels. Weights are not part of it."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    img = model.patch_embed.img_size
    img_size = int(img[0] if isinstance(img, (tuple, list)) else img)
    in_chans = int(getattr(model.patch_embed, "in_chans", None) or
                   next(m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels)
    profile = getattr(model, "bench_suite_profile", None) or next(
        (p.name for p in PROFILES.values() if p.model == arch and p.img_size == img_size and p.in_chans == in_chans),
        None)
    return {"profile": profile, "model": arch, "num_classes": int(model.num_classes), "img_size": img_size,
            "in_chans": in_chans}


def backbone_from_spec(spec: dict[str, Any]) -> VisionTransformer:
    """A fresh (randomly initialised) backbone of the architecture :func:`backbone_spec` described.

    Raises:
        ValueError: for a spec without a profile or a timm architecture.
    """
    if spec.get("profile") in PROFILES:
        return create_backbone(spec["profile"], num_classes=int(spec["num_classes"]))
    if not spec.get("model"):
        raise ValueError(f"cannot rebuild a backbone from {spec!r}: no profile and no timm architecture")
    return timm.create_model(spec["model"], pretrained=False, num_classes=int(spec["num_classes"]),
                             img_size=int(spec["img_size"]), in_chans=int(spec["in_chans"]))


def pruning_stages(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """Block indices (0-based) at 1/4, 1/2 and 3/4 of the depth, where token pruning happens.

    The token-pruning methods' placement in their papers (blocks 3, 6, 9 of 12; 4, 8, 12 of 16 for LV-ViT-S).

    Raises:
        ValueError: if the backbone is too shallow for ``num_stages`` distinct stages.
    """
    step = depth // (num_stages + 1)
    if step < 1:
        raise ValueError(f"a backbone of depth {depth} is too shallow for {num_stages} pruning stages")
    return tuple(step * (s + 1) for s in range(num_stages))


def num_tokens(model: VisionTransformer) -> int:
    """Number of tokens ``N`` (patches plus prefix tokens) the backbone's blocks see."""
    return int(model.patch_embed.num_patches + model.num_prefix_tokens)


def keep_count(keep_rate: float, n: int) -> int:
    """``ceil(keep_rate * n)``, the paper's budget rule (Wei et al., CVPR 2023, sec. 4; also the token count
    kept by token pruning)."""
    return int(math.ceil(keep_rate * n - 1e-9))
