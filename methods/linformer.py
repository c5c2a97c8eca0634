"""Linformer: low-rank self-attention (Wang et al., "Linformer: Self-Attention with Linear Complexity",
2020, sec. 4 eq. 7), the low-rank baseline of the Sparsifiner paper's Table 4.

Keys and values are projected along the token axis by learned matrices ``E, F`` of shape ``[k, N]``::

    head_h = softmax(Q_h (E K_h)^T / sqrt(d)) (F V_h)        # [B, N, d]

so each query attends to ``k`` mixed "landmark" keys instead of ``N`` tokens.

Decisions (documented, switchable where useful):
* Sharing: one ``E`` and one ``F`` per layer, shared across the heads (Linformer's "headwise sharing";
  the Sparsifiner repository's ``src/models/linformer.py`` baseline, ``share_kv_proj=False``).
  ``share_kv=True`` ties ``F = E`` (Linformer's key-value sharing).
* Initialisation (``proj_init``): ``"uniform"`` (default, the paper's baseline): for ``k < N`` each
  entry ~ ``U(-1/sqrt(k), 1/sqrt(k))`` (the Sparsifiner repository's and lucidrains/linformer's
  initialisation); ``"pool"``: average pooling of the tokens, in their order (CLS, then the patches
  row by row), into ``k`` contiguous groups (``adaptive_avg_pool1d``; a documented alternative, not in
  the papers), so that a short fine-tune starts from an approximation of the teacher's attention
  instead of random landmarks. Both give ``E = F = I`` for ``k = N``, so that keep rate 1.0
  reproduces full attention exactly. Everything else (QKV, projections, MLPs, head) comes from the
  backbone the runner passes in (initialised from the teacher).
* Budget: ``k`` directly, or ``k = ceil(keep_rate * N)`` (:func:`bench_suite.backbones.keep_count`),
  the same rule as Sparsifiner's attention budget ``B``, so Table 4's "same budget" comparison is one
  flag (the paper sets Linformer's ``k`` to Sparsifiner-S's budget).
* ``E``/``F`` live inside ``blocks.<i>.attn`` (parameters ``attn.E``, ``attn.F``), so the FLOP counter
  attributes ``E K`` and ``F V`` to MHSA: per layer ``4 N k D`` multiply-accumulates (``E K``, ``F V``,
  ``Q (E K)^T``, ``A (F V)``) against dense attention's ``2 N^2 D``. The projections are written as
  batched matmuls with equal batch shapes so that fvcore counts them exactly.
* The token count is fixed by ``E``/``F``: an input with another number of tokens raises.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from bench_suite.backbones import keep_count, num_tokens
from bench_suite.registry import Metric, register_method
from methods.adapter import (
    attention_inputs,
    check_timm_block,
    merge_heads,
    split_heads,
    swap_class,
)
from methods.base import BenchModule

__all__ = ["Linformer", "LinformerAttention", "apply_linformer", "init_projection"]


PROJ_INITS = ("uniform", "pool")


def init_projection(k: int, n: int, init: str = "uniform") -> torch.Tensor:
    """A fresh ``[k, n]`` token projection: the identity when ``k == n``; otherwise, for ``init="uniform"``,
    entries ``U(-1/sqrt(k), 1/sqrt(k))`` (Sparsifiner / lucidrains Linformer init), for ``init="pool"``
    the average pooling of ``n`` tokens into ``k`` contiguous groups (row ``r`` is ``1 / |G_r|`` on its
    group ``G_r = [floor(r n / k), ceil((r + 1) n / k))``, the groups of ``adaptive_avg_pool1d``).

    Raises:
        ValueError: unless ``1 <= k <= n``, or for an unknown ``init``.
    """
    if init not in PROJ_INITS:
        raise ValueError(f"unknown Linformer projection init {init!r}; choose one of {', '.join(PROJ_INITS)}")
    if not 1 <= k <= n:
        raise ValueError(f"Linformer needs 1 <= k <= N, got k={k}, N={n}")
    if k == n:
        return torch.eye(n)
    if init == "pool":
        return F.adaptive_avg_pool1d(torch.eye(n).unsqueeze(0), k)[0].t().contiguous()  # [k, n]
    bound = 1.0 / math.sqrt(k)
    return torch.empty(k, n).uniform_(-bound, bound)


class LinformerAttention(Attention):
    """timm ``Attention`` with Linformer's projected keys and values (paper eq. 7).

    Attributes set by :func:`methods.adapter.swap_class`: ``E`` and ``F``, ``nn.Parameter [k, N]``
    (the same parameter when key-value sharing is on).

    Shapes: ``x [B, N, C]`` -> ``[B, N, C]``; attention probabilities ``[B, H, N, k]``.

    Raises:
        ValueError: if the input does not have the ``N`` tokens the projections were built for.
        NotImplementedError: for ``attn_mask``/``is_causal`` (no meaning after mixing the tokens).
    """

    E: nn.Parameter
    F: nn.Parameter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Linformer attention does not support attn_mask/is_causal")
        b, n, _ = x.shape
        k_dim, n_proj = self.E.shape
        if n != n_proj:
            raise ValueError(f"Linformer projections were built for {n_proj} tokens, got {n}")
        q, k, v = split_heads(self, x)                                    # [B, H, N, d]
        h = q.shape[1]
        # [B, H, k, N] @ [B, H, N, d]: equal batch shapes, so fvcore counts B*H*k*N*d MACs each.
        k_low = self.E.expand(b, h, k_dim, n) @ k                         # E K: [B, H, k, d]
        v_low = self.F.expand(b, h, k_dim, n) @ v                         # F V: [B, H, k, d]
        probs = ((q * self.scale) @ k_low.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, k]
        return merge_heads(self, self.attn_drop(probs) @ v_low)          # [B, N, C]


def apply_linformer(model: nn.Module, k: int, share_kv: bool = False, proj_init: str = "uniform") -> nn.Module:
    """Patch every attention of a timm ``VisionTransformer`` in place into :class:`LinformerAttention`
    with fresh per-layer projections ``E``, ``F`` ``[k, N]`` (:func:`init_projection`), shared across
    heads. Records ``model.linformer_k``. Calling it again re-patches with fresh projections.

    Args:
        model: timm ``VisionTransformer`` (its ``N`` = patches + prefix tokens is fixed by ``E``/``F``).
        k: low-rank dimension, ``1 <= k <= N``; ``k = N`` gives identity projections (full attention).
        share_kv: tie ``F = E`` (Linformer key-value sharing).
        proj_init: ``"uniform"`` or ``"pool"`` (:func:`init_projection`).

    Returns:
        ``model`` (the same object).

    Raises:
        ValueError: unless ``1 <= k <= N``, or for an unknown ``proj_init``.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    n = num_tokens(model)
    init_projection(k, n, proj_init)  # validates k and the init before anything is patched
    for i, blk in enumerate(model.blocks):
        attn = check_timm_block(blk, i).attn
        like = attn.qkv.weight
        e = nn.Parameter(init_projection(k, n, proj_init).to(like))
        f = e if share_kv else nn.Parameter(init_projection(k, n, proj_init).to(like))
        swap_class(attn, LinformerAttention, E=e, F=f)
    model.linformer_k = int(k)
    return model


@register_method("linformer", keep_rates=(0.5, 0.25, 0.1),
                 description="Linformer low-rank attention: keys/values projected to k = ceil(keep*N) tokens")
class Linformer(BenchModule):
    """Linformer low-rank attention (Wang et al., 2020) on a timm ViT, Sparsifiner Table 4's baseline.

    Args:
        backbone: timm ``VisionTransformer`` (teacher-initialised by the runner), patched in place.
        keep_rate: sets ``k = ceil(keep_rate * N)`` when ``k`` is not given (1.0: ``k = N``, identity
            projections, exactly full attention at initialisation).
        teacher: frozen full-attention model for distillation.
        k: the low-rank dimension directly (overrides ``keep_rate`` for the projections).
        share_kv: tie ``F = E`` (Linformer key-value sharing); default separate ``E``, ``F``.
        proj_init: initialisation of ``E``, ``F`` for ``k < N``: ``"uniform"`` (the paper's baseline) or
            ``"pool"`` (token average pooling; see the module docstring).
        distill_tokens: final-token MSE weight; 0.5 as Sparsifiner's phase 2, since Table 4 trains
            both models under identical settings.
        **kwargs: further :class:`methods.base.BenchModule` settings.

    Raises:
        ValueError: for a keep rate outside (0, 1], ``k`` outside ``[1, N]`` or an unknown ``proj_init``.
    """

    display_name = "Linformer"
    # No official ViT recipe: the paper's Table 4 compares it with Sparsifiner, so it gets Sparsifiner's fine-tuning
    # (50 epochs in all, phase 2's learning rates as DeiT-base values, wd 0.05, 3 warm-up epochs).
    paper_recipe = {"epochs": 50, "lr": 8e-5 * 512 / 1344, "min_lr": 2e-6 * 512 / 1344, "weight_decay": 0.05,
                    "warmup_frac": 3 / 50}
    plot_color, plot_marker = "#cc78bc", "v"
    reported_metrics = (
        Metric("k", "tokens", description="projected length of keys and values"),
        Metric("k_over_n", "fraction", description="k / N, the attention keep rate used"),
    )

    def __init__(
        self,
        backbone: nn.Module,
        keep_rate: float = 0.5,
        teacher: nn.Module | None = None,
        k: int | None = None,
        share_kv: bool = False,
        proj_init: str = "uniform",
        distill_tokens: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise ValueError(f"k must be an int or None, got {k!r}")
        if proj_init not in PROJ_INITS:
            raise ValueError(f"unknown Linformer projection init {proj_init!r}; choose one of {', '.join(PROJ_INITS)}")
        self._k_arg, self._share_kv, self._proj_init = k, bool(share_kv), proj_init
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, distill_tokens=distill_tokens, **kwargs)

    def adapt(self, model: nn.Module) -> None:
        n = num_tokens(model)
        k = int(self._k_arg) if self._k_arg is not None else keep_count(self.keep_rate, n)
        apply_linformer(model, k, share_kv=self._share_kv, proj_init=self._proj_init)
        self.n_tokens, self.k = n, k

    def sparsity_report(self) -> dict[str, float]:
        """The low-rank dimension ``k`` and ``k / N`` (the attention keep rate actually used)."""
        return {"k": float(self.k), "k_over_n": self.k / self.n_tokens}

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Per layer (see :meth:`BenchModule.attention_maps`): ``full`` (dense ``softmax(q k^T / sqrt(d))`` of the
        layer's own queries and keys) and ``lowrank``, Linformer's attention over the tokens ``P F``
        ``[B, H, N, N]`` with ``P = softmax(Q (E K)^T / sqrt(d))`` ``[B, H, N, k]`` (Linformer eq. 7: the output
        is ``(P F) V``; it can be negative)."""
        maps = super().attention_maps(images)
        for layer, blk, x in zip(maps, self.model.blocks, attention_inputs(self.model, images)):
            attn = blk.attn
            q, k, _ = split_heads(attn, x)
            probs = ((q * attn.scale) @ (attn.E @ k).transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, k]
            layer["lowrank"] = probs @ attn.F  # [B, H, N, N]
        return maps
