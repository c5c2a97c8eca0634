"""DynamicViT: dynamic token sparsification (Rao et al., "DynamicViT: Efficient Vision Transformers with
Dynamic Token Sparsification", NeurIPS 2021; official code raoyongming/DynamicViT, ``models/dyvit.py``,
``losses.py``).

A light prediction module before each pruning stage (blocks 3, 6, 9 of 12; 4, 8, 12 of 16, see
:func:`bench_suite.backbones.pruning_stages`) scores every patch token; the CLS (prefix) tokens are
always kept.

* Training (paper sec. 3.3, "attention masking"): hard Gumbel-softmax keep decisions ``D`` multiply the
  previous stage's decisions, so a dropped token stays dropped. No token is removed: every later
  attention masks the dropped keys, ``A_ij = exp(P_ij) G_ij / sum_k exp(P_ik) G_ik`` with ``G_ij = 1`` if
  ``i == j`` else ``D_j`` (each token still attends to itself), which keeps the decisions
  differentiable through the straight-through Gumbel estimator.
* Inference (paper sec. 3.4): at stage ``s = 1, 2, 3`` the ``int(N_patches * rho^s)`` best-scored patch
  tokens are kept and the rest are really removed (gathered away), so the later blocks see fewer tokens
  and the measured FLOPs fall.

Objective (paper sec. 3.4; official ``DistillDiffPruningLoss_dynamic`` with ``mse_token=True``)::

    L = CE + 0.5 * KL(p_teacher || p_student)  (F.kl_div(log p_student, log p_teacher), as the official code)
           + 0.5 * MSE over the kept final patch tokens (student vs teacher)
           + 2.0 * (1/S) sum_s mean_b (mean_i D_i^{b,s} - rho^s)^2

with a backbone learning rate of ``lr * 0.01`` and the predictors at ``lr`` (official ``--lr_scale``).
As the official recipe (``optim_factory.py``, ``engine.py``): the backbone is frozen for the first
``backbone_freeze_frac`` of the optimiser steps (official ``fix_step``: learning rate 0 for the first 5 of
30 epochs, i.e. 1/6; here its parameters take no gradient and its BatchNorm statistics stay, so it is
unchanged), while the prediction modules train; ``cls_token`` and ``pos_embed`` are never trained (they are
in no parameter group officially). ``backbone_freeze_frac=0`` and ``train_cls_pos=True`` say otherwise.

Integration with timm: every ``Block`` and ``Attention`` of the backbone is class-swapped in place with
:func:`methods.adapter.swap_class` (weights and timm's state-dict keys unchanged); the prediction module
of a stage is added to its block as ``blocks.<i>.predictor`` so it lives in the backbone (counted by the
FLOP counter, moved with ``.to()``) but outside ``blocks.<i>.attn`` (not MHSA). The per-forward pruning
state (policy, decisions) is a plain object shared by the swapped modules, reset by block 0.

Deliberate details (versus the official code):
* the kept tokens of a stage stay in their original order (the official code orders them by score);
  blocks are permutation-equivariant and the head reads the CLS token, so the output is the same;
* at least one patch token is kept per stage (the official ``int()`` can keep zero on tiny grids);
* ``keep_rate = 1.0`` is the exact no-op: no prediction, no masking, timm's own attention;
* the official optimizer freezes ``cls_token``/``pos_embed``; here they are backbone parameters at
  ``lr * backbone_lr_scale`` like the rest of the backbone;
* the prediction module's global average divides by ``max(sum(D), 1e-6)`` so an all-dropped sample
  gives zeros instead of NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from bench_suite.backbones import pruning_stages
from bench_suite.registry import Metric, register_method
from methods.adapter import check_timm_block, merge_heads, split_heads, swap_class
from methods.base import BenchModule, ForwardOutput, check_keep_rate

__all__ = [
    "DynamicViT",
    "DynamicViTAttention",
    "DynamicViTBlock",
    "PredictorLG",
    "apply_dynamicvit",
    "softmax_with_policy",
    "stage_keep_counts",
    "token_schedule",
]


# ------------------------------------------------------------------------------------------ maths
def stage_keep_counts(n_patches: int, keep_rate: float, num_stages: int) -> list[int]:
    """Patch tokens kept after each pruning stage at inference: ``max(1, int(n_patches * rho^s))`` for
    ``s = 1..num_stages`` (official ``num_keep_node = int(init_n * token_ratio[s])`` with
    ``token_ratio = [rho, rho^2, rho^3]``). ``keep_rate = 1.0`` keeps all ``n_patches``.

    Raises:
        ValueError: for ``n_patches < 1`` or a keep rate outside (0, 1].
    """
    if n_patches < 1:
        raise ValueError(f"need at least one patch token, got {n_patches}")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must lie in (0, 1], got {keep_rate}")
    # 1e-9 guards float error such as 0.7**2 * 100 = 48.99999...; int() of an exact product is unchanged.
    return [max(1, min(n_patches, math.floor(n_patches * keep_rate ** s + 1e-9))) for s in range(1, num_stages + 1)]


def token_schedule(depth: int, n_patches: int, num_prefix: int, keep_rate: float,
                   stages: tuple[int, ...]) -> list[int]:
    """Tokens ``N_l`` that block ``l`` processes at inference (prefix tokens included), e.g. DeiT-S at
    ``rho = 0.7``: ``[197]*3 + [138]*3 + [97]*3 + [68]*3``. Pruning happens *before* a stage block.

    Raises:
        ValueError: if a stage index is outside ``[0, depth)`` or the stages are not increasing.
    """
    if any(not 0 <= s < depth for s in stages) or list(stages) != sorted(set(stages)):
        raise ValueError(f"pruning stages {stages} must be increasing block indices in [0, {depth})")
    keeps = stage_keep_counts(n_patches, keep_rate, len(stages))
    out, current = [], n_patches
    for layer in range(depth):
        if layer in stages:
            current = keeps[stages.index(layer)]
        out.append(num_prefix + current)
    return out


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention masking (paper sec. 3.3): softmax over the keys kept by ``policy``, every query keeping
    its own key (the diagonal), computed in float32 with the official ``eps`` smoothing::

        G_ij = 1 if i == j else D_j;   A_ij = (exp(P_ij) G_ij + eps/N) / (sum_k exp(P_ik) G_ik + eps)

    Args:
        logits: scaled attention logits ``P = Q K^T / sqrt(d)``, ``[B, H, N, N]``.
        policy: keep decisions ``D`` of all ``N`` tokens (prefix tokens 1), ``[B, N, 1]``, values in
            {0, 1} with straight-through gradients.
        eps: numerical smoothing of the official ``softmax_with_policy``.

    Returns:
        Attention probabilities ``[B, H, N, N]`` in ``logits``' dtype; rows sum to 1.

    Raises:
        ValueError: if ``policy`` does not have shape ``[B, N, 1]`` matching ``logits``.
    """
    b, _, n, n_k = logits.shape
    if policy.shape != (b, n_k, 1) or n != n_k:
        raise ValueError(f"policy {tuple(policy.shape)} does not match attention logits {tuple(logits.shape)}")
    keys = policy.reshape(b, 1, 1, n_k).float()
    eye = torch.eye(n_k, dtype=keys.dtype, device=keys.device).view(1, 1, n_k, n_k)
    gate = keys + (1.0 - keys) * eye                                   # G: [B, 1, N, N]
    logits32 = logits.float()
    weights = (logits32 - logits32.amax(dim=-1, keepdim=True)).exp() * gate
    probs = (weights + eps / n_k) / (weights.sum(dim=-1, keepdim=True) + eps)
    return probs.to(logits.dtype)


# ------------------------------------------------------------------------------------------ modules
class PredictorLG(nn.Module):
    """DynamicViT's prediction module (paper sec. 3.2; official ``PredictorLG``).

    ``z = GELU(Linear(LayerNorm(x)))`` ``[B, N, C]``; the first ``C/2`` channels are the local feature,
    the last ``C/2`` are averaged over the tokens still kept (``D``-weighted) into a global feature;
    ``[z_local, z_global]`` goes through ``C -> C/2 -> C/4 -> 2`` with GELU and a log-softmax.
    Column 0 is the log-probability of *keeping* the token (the official code's convention).

    Args:
        dim: token width ``C`` (even, at least 4).

    Raises:
        ValueError: for a width that is odd or below 4.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"PredictorLG needs an even width >= 4, got {dim}")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # official DynamicViT init of new layers
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` patch tokens, ``policy [B, N, 1]`` current keep decisions -> ``[B, N, 2]``
        log-probabilities (keep, drop)."""
        z = self.in_conv(x)
        b, n, c = z.shape
        local, glob = z[..., : c // 2], z[..., c // 2:]
        glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, glob.expand(b, n, c - c // 2)], dim=-1))


@dataclass
class _PruningState:
    """Per-forward pruning state shared (not registered) by the swapped blocks and attentions.

    Attributes:
        keep_counts: kept patch tokens per stage at inference.
        keep_targets: target keep ratios ``rho^s`` per stage.
        num_prefix: prefix (CLS) tokens, never pruned.
        active: False at keep rate 1.0 (no-op).
        policy: ``[B, N, 1]`` attention policy during training (None: plain attention).
        prev_decision: ``[B, N_patches, 1]`` cumulative keep decisions of the current forward.
        decisions: per stage ``[B, N_patches]`` cumulative hard decisions (training only).
    """

    keep_counts: list[int]
    keep_targets: list[float]
    num_prefix: int
    active: bool
    policy: torch.Tensor | None = None
    prev_decision: torch.Tensor | None = None
    decisions: list[torch.Tensor] = field(default_factory=list)

    def reset(self) -> None:
        self.policy, self.prev_decision, self.decisions = None, None, []


class DynamicViTAttention(Attention):
    """timm ``Attention`` whose softmax honours the training policy (:func:`softmax_with_policy`).
    Without a policy (inference, keep 1.0, blocks before the first stage) it is timm's forward.

    Raises:
        NotImplementedError: if an ``attn_mask``/``is_causal`` is combined with a training policy.
    """

    _dvit: _PruningState

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        policy = self._dvit.policy
        if policy is None or not self.training:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("DynamicViT's attention masking cannot be combined with attn_mask/is_causal")
        q, k, v = split_heads(self, x)                                   # [B, H, N, d]
        probs = softmax_with_policy((q * self.scale) @ k.transpose(-2, -1), policy)
        return merge_heads(self, self.attn_drop(probs) @ v)             # [B, N, C]


class DynamicViTBlock(Block):
    """timm ``Block`` that runs the stage's prediction module before itself (paper sec. 3.2).

    Training: hard Gumbel-softmax decisions times the previous ones set the attention policy of this
    and every later block. Inference: the top ``keep_counts[s]`` patch tokens by keep score are gathered
    (the others removed). Block 0 resets the shared state at the start of each forward.
    """

    _dvit: _PruningState
    _dvit_index: int
    _dvit_stage: int | None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        st = self._dvit
        if self._dvit_index == 0:
            st.reset()
        if st.active and self._dvit_stage is not None:
            x = self._prune(x, st)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def _prune(self, x: torch.Tensor, st: _PruningState) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N', C]`` (inference, ``N' = prefix + keep``) or ``x`` unchanged
        with ``st.policy`` updated (training)."""
        b, _, c = x.shape
        p = st.num_prefix
        patches = x[:, p:]                                                # [B, N_patches_now, C]
        prev = st.prev_decision
        if prev is None or prev.shape[1] != patches.shape[1]:
            prev = patches.new_ones(b, patches.shape[1], 1)
        log_probs = self.predictor(patches, prev)                         # [B, N_patches_now, 2]
        if self.training:
            keep = F.gumbel_softmax(log_probs, hard=True)[..., :1] * prev  # [B, N_patches, 1]
            st.prev_decision = keep
            st.decisions.append(keep.squeeze(-1))
            st.policy = torch.cat([keep.new_ones(b, p, 1), keep], dim=1)   # [B, N, 1]
            return x
        n_keep = min(st.keep_counts[self._dvit_stage], patches.shape[1])
        idx = log_probs[..., 0].topk(n_keep, dim=1).indices.sort(dim=1).values  # [B, n_keep]
        kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
        st.prev_decision = kept.new_ones(b, n_keep, 1)
        return torch.cat([x[:, :p], kept], dim=1)


def apply_dynamicvit(model: nn.Module, keep_rate: float, stages: Sequence[int] | None = None) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place into DynamicViT (ToMe-style, timm's weights untouched).

    Every block becomes a :class:`DynamicViTBlock` and every attention a :class:`DynamicViTAttention`;
    each stage block gets a fresh :class:`PredictorLG` as ``blocks.<i>.predictor``. Records
    ``model.dynamicvit_stages``, ``model.dynamicvit_keep_rate`` and ``model.dynamicvit_state`` (the shared
    per-forward pruning state: ``decisions``/``prev_decision`` of the last forward). Calling it again
    re-patches with fresh prediction modules.

    Args:
        model: timm ``VisionTransformer`` whose head reads the CLS token (``global_pool='token'``).
        keep_rate: ``rho`` in (0, 1]; 1.0 leaves the computation exactly timm's.
        stages: 0-based blocks preceded by a prediction module; default
            :func:`bench_suite.backbones.pruning_stages` ((3, 6, 9) for 12 blocks).

    Returns:
        ``model`` (the same object).

    Raises:
        ValueError: for a keep rate outside (0, 1], invalid stages, or a model without a CLS token read
            by the head.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    keep_rate = check_keep_rate(keep_rate)
    depth = len(model.blocks)
    stages = tuple(int(s) for s in (pruning_stages(depth) if stages is None else stages))
    token_schedule(depth, 1, 0, keep_rate, stages)  # validates the stages
    if int(getattr(model, "num_prefix_tokens", 0)) < 1 or getattr(model, "global_pool", "token") != "token":
        raise ValueError("DynamicViT needs a ViT with a CLS token read by the head (global_pool='token')")
    n_patches = int(model.patch_embed.num_patches)
    state = _PruningState(keep_counts=stage_keep_counts(n_patches, keep_rate, len(stages)),
                          keep_targets=[keep_rate ** s for s in range(1, len(stages) + 1)],
                          num_prefix=int(model.num_prefix_tokens), active=keep_rate < 1.0)
    dim = int(model.embed_dim)
    for i, blk in enumerate(model.blocks):
        check_timm_block(blk, i)
        blk._modules.pop("predictor", None)  # a re-patch starts from fresh prediction modules
        stage = stages.index(i) if i in stages else None
        extra = {"predictor": PredictorLG(dim).to(blk.norm1.weight)} if stage is not None else {}
        swap_class(blk.attn, DynamicViTAttention, _dvit=state)
        swap_class(blk, DynamicViTBlock, _dvit=state, _dvit_index=i, _dvit_stage=stage, **extra)
    model.dynamicvit_stages = stages
    model.dynamicvit_keep_rate = keep_rate
    model.dynamicvit_state = state
    return model


# ------------------------------------------------------------------------------------------ method
@register_method("dynamicvit", keep_rates=(0.7, 0.5, 0.3),
                 description="DynamicViT token pruning: learned keep scores, rho^s of the patches kept at 3 stages")
class DynamicViT(BenchModule):
    """DynamicViT token sparsification (Rao et al., NeurIPS 2021) as a bench_suite method.

    Args:
        backbone: timm ``VisionTransformer`` (teacher-initialised by the runner), patched in place.
        keep_rate: ``rho``; stage ``s`` keeps ``rho^s`` of the patch tokens (1.0 = full attention).
        teacher: frozen full-attention model for the distillation terms.
        ratio_weight: weight of the keep-ratio MSE (official 2.0; averaged over the stages).
        distill_logits: weight of KL(p_teacher || p_student) of the logits (official 0.5).
        distill_tokens: weight of the final-token MSE over kept patch tokens (official 0.5).
        backbone_lr_scale: learning-rate factor of the backbone parameters (official 0.01); the
            prediction modules train at ``lr``.
        backbone_freeze_frac: fraction of the optimiser steps at the start of training during which the
            backbone is frozen and only the prediction modules train (official 5 of 30 epochs = 1/6).
        train_cls_pos: also train ``cls_token`` and ``pos_embed`` (official: frozen, False).
        **kwargs: further :class:`methods.base.BenchModule` settings (``lr``, ``weight_decay``, ...).

    Raises:
        ValueError: for a keep rate outside (0, 1], a backbone too shallow for three stages, or a
            negative loss weight / learning-rate scale.
    """

    display_name = "DynamicViT"
    # DynamicViT's README: 30 epochs (8 x 96 per step), backbone lr x 0.01, backbone frozen for the first 5 epochs
    # (backbone_lr_scale, backbone_freeze_frac: the defaults); lr DeiT's base 5e-4 (its main.py default, scaled by
    # the batch as DeiT's), wd 0.05.
    paper_recipe = {"epochs": 30, "lr": 5e-4, "weight_decay": 0.05, "backbone_lr_scale": 0.01,
                    "backbone_freeze_frac": 5 / 30}
    plot_color, plot_marker = "#d55e00", "D"
    reported_metrics = (
        Metric("mean_token_ratio", "fraction", description="mean over blocks of the tokens kept at inference / N"),
    )
    # the backbone is frozen for the first steps, cls_token/pos_embed always: DDP must look for unused parameters
    ddp_find_unused_parameters = True

    def __init__(
        self,
        backbone: nn.Module,
        keep_rate: float = 0.7,
        teacher: nn.Module | None = None,
        ratio_weight: float = 2.0,
        distill_logits: float = 0.5,
        distill_tokens: float = 0.5,
        backbone_lr_scale: float = 0.01,
        backbone_freeze_frac: float = 1 / 6,
        train_cls_pos: bool = False,
        **kwargs: Any,
    ) -> None:
        if min(ratio_weight, distill_logits, distill_tokens, backbone_lr_scale) < 0:
            raise ValueError("DynamicViT loss weights and backbone_lr_scale must be >= 0")
        if not 0.0 <= backbone_freeze_frac <= 1.0:
            raise ValueError(f"backbone_freeze_frac must lie in [0, 1], got {backbone_freeze_frac}")
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, distill_logits=distill_logits,
                         distill_tokens=distill_tokens, **kwargs)
        self._freeze_steps = 0
        self._frozen: bool | None = None

    # ---------------------------------------------------------------- patching
    def adapt(self, model: nn.Module) -> None:
        apply_dynamicvit(model, self.keep_rate)
        self.stages: tuple[int, ...] = model.dynamicvit_stages
        self._state: _PruningState = model.dynamicvit_state
        self.num_prefix = self._state.num_prefix
        self.n_patches = int(model.patch_embed.num_patches)
        self.keep_targets = self._state.keep_targets
        self.keep_counts = self._state.keep_counts

    def token_schedule(self) -> list[int]:
        """Tokens per block at inference (prefix included), see :func:`token_schedule`."""
        return token_schedule(len(self.model.blocks), self.n_patches, self.num_prefix, self.keep_rate, self.stages)

    # ---------------------------------------------------------------- forward / losses
    def forward_train(self, x: torch.Tensor) -> ForwardOutput:
        """Logits ``[B, K]``, final tokens ``[B, N, C]`` (all tokens in training, kept ones in
        evaluation), ``decisions`` (list of ``[B, N_patches]`` per stage) and ``policy``
        (``[B, N_patches, 1]`` final keep decisions, or None)."""
        tokens = self.model.forward_features(x)
        st = self._state
        return ForwardOutput(logits=self.model.forward_head(tokens), tokens=tokens,
                             decisions=list(st.decisions), policy=st.prev_decision)

    def ratio_loss(self, decisions: list[torch.Tensor]) -> torch.Tensor:
        """Unweighted keep-ratio loss ``(1/S) sum_s mean_b (mean_i D_i^{b,s} - rho^s)^2`` (official
        ``pred_loss / len(pruning_loc)``).

        Raises:
            ValueError: if the number of decision tensors differs from the number of stages.
        """
        if len(decisions) != len(self.keep_targets):
            raise ValueError(f"expected {len(self.keep_targets)} stage decisions, got {len(decisions)}")
        terms = [((d.mean(dim=1) - t) ** 2).mean() for d, t in zip(decisions, self.keep_targets)]
        return torch.stack(terms).sum() / len(terms)

    def token_distill_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                           policy: torch.Tensor | None) -> torch.Tensor:
        """MSE between student and teacher final patch tokens over the kept tokens only (official
        ``mse_token``: boolean mask ``policy > 0.5``, mean over kept tokens and channels; 0 if none kept).

        Args:
            student, teacher: final normed tokens ``[B, N, C]`` (prefix tokens are skipped).
            policy: final keep decisions ``[B, N_patches, 1]`` (None: all kept).
        """
        s, t = student[:, self.num_prefix:], teacher[:, self.num_prefix:]
        w = torch.ones_like(s[..., :1]) if policy is None else (policy.detach() > 0.5).to(s.dtype)
        kept = w.sum()
        if kept < 0.1:
            return s.sum() * 0.0
        return (w * (s - t) ** 2).sum() / (kept * s.shape[-1])

    def extra_losses(self, out: ForwardOutput, teacher_out: ForwardOutput | None,
                     batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ratio`` (weighted keep-ratio MSE) and, with a teacher, ``token_mse``: the policy-masked
        patch-token MSE, which deliberately *replaces* the base class's unmasked ``token_mse`` under the
        same key (``BenchModule.losses`` applies these terms last)."""
        hp = self.hparams
        terms: dict[str, torch.Tensor] = {}
        decisions = out.get("decisions") or []
        if decisions:
            terms["ratio"] = hp.ratio_weight * self.ratio_loss(decisions)
        if teacher_out is not None and hp.distill_tokens > 0 and out.tokens.shape == teacher_out.tokens.shape:
            terms["token_mse"] = hp.distill_tokens * self.token_distill_loss(out.tokens, teacher_out.tokens,
                                                                              out.get("policy"))
        return terms

    # ---------------------------------------------------------------- backbone freeze (official fix_step)
    def _always_frozen(self, name: str) -> bool:
        return not self.hparams.get("train_cls_pos", True) and name in ("cls_token", "pos_embed")

    def freeze_length(self) -> int:
        """Optimiser steps with the backbone frozen: ``ceil(backbone_freeze_frac * total steps)``."""
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0.0
        frac = float(self.hparams.get("backbone_freeze_frac", 0.0))
        if not math.isfinite(total) or total <= 0:
            return 0
        return int(math.ceil(frac * total))

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (no gradient, BatchNorm statistics kept) or release the backbone; the prediction modules
        always train, ``cls_token``/``pos_embed`` stay frozen unless ``train_cls_pos``. Public for tests."""
        for name, p in self.model.named_parameters():
            new = ".predictor." in f".{name}"
            p.requires_grad_(new or not (frozen or self._always_frozen(name)))
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(self.training and not frozen)
        self._frozen = frozen

    def on_train_start(self) -> None:
        super().on_train_start()
        self._freeze_steps = self.freeze_length()
        self._frozen = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        frozen = self.global_step < self._freeze_steps
        if frozen != self._frozen:
            self.set_backbone_frozen(frozen)
        elif frozen:  # Lightning puts the module in train mode every epoch
            self.set_backbone_frozen(True)

    # ---------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: prediction modules at ``lr``, backbone at ``lr * backbone_lr_scale``; timm's
        no-weight-decay rule (1-D parameters, biases, ``no_weight_decay()`` names) in both. The cosine
        ``LambdaLR`` of the base class scales each group's own initial learning rate."""
        hp = self.hparams
        no_wd = set(getattr(self.model, "no_weight_decay", lambda: set())())
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        self._frozen = None  # the freeze is re-applied at the next batch
        for name, p in self.model.named_parameters():
            p.requires_grad_(not self._always_frozen(name))
            if not p.requires_grad:
                continue
            new = ".predictor." in f".{name}"
            decay = not (p.ndim <= 1 or name.endswith(".bias") or name in no_wd)
            groups.setdefault((new, decay), []).append(p)
        return [
            {"params": ps, "weight_decay": hp.weight_decay if decay else 0.0,
             "lr": hp.lr if new else hp.lr * hp.backbone_lr_scale}
            for (new, decay), ps in sorted(groups.items())
        ]

    # ---------------------------------------------------------------- reporting
    def token_pruning_stages(self) -> tuple[int, ...] | None:
        """The prediction stages; the paper's convention (:meth:`BenchModule.paper_mhsa_flops`) charges
        ``ceil(rho^s * (N-1))`` tokens there, while the measured count
        (:func:`bench_suite.flops.count_flops`) uses the tokens really kept, ``int(rho^s * (N-1))``
        (DeiT-S: 193.09 M against 165.63 M at 0.7)."""
        return self.stages if self._state.active else None

    def sparsity_report(self) -> dict[str, float]:
        """Kept patch tokens per stage at inference and the mean token keep ratio over the blocks."""
        sched = self.token_schedule()
        full = self.num_prefix + self.n_patches
        report = {f"kept_patches_stage{s + 1}": float(k if self._state.active else self.n_patches)
                  for s, k in enumerate(self.keep_counts)}
        report["mean_token_ratio"] = sum(sched) / (len(sched) * full)
        return report
