"""Sparsifiner (Wei et al., CVPR 2023): learned instance-dependent sparse attention.

Layout as ToMe/EViT: the algorithm is framework-free in :mod:`methods.sparse_attention`; this module
patches timm's ViT in place (:func:`apply_sparsifiner`, through :mod:`methods.adapter`) and holds the
registered LightningModule :class:`Sparsifiner` with the paper's distillation objective and two-phase
schedule. Sparsif-EViT (paper Table 1) builds on it in :mod:`methods.sparsif_evit`.

Training (paper eq. 7-12, sec. 4). ``L = CE + l_tok MSE(x, x_teach) + l_cls KL(y_teach || y)
+ l_attn MSE(A~_down W_up, A_teach)``, the L2 of eq. 11 realised as AdamW weight decay 0.05 on ``W_up``
(the KL of the student from the teacher, ``F.kl_div(log p, log p_teach)``, as the official code; the token
MSE on the final patch tokens, as the official code). Two phases inside one Lightning fit, switched in
:meth:`Sparsifiner.on_train_batch_start`:

* phase 1 (``phase1_epochs`` epochs, default 1, *before* the protocol's fine-tuning epochs, which are all
  phase 2, as the official recipe runs 5 phase-1 epochs before 45 of phase 2, longer than EViT's 30: the
  runner trains Sparsifiner ``--epochs + phase1_epochs`` epochs through :meth:`Sparsifiner.train_epochs`;
  with ``phase1_epochs=0`` the first ``phase1_frac`` of the optimiser steps, at least ``phase1_min_steps``
  but at most half, the suite's earlier rule; ``phase1_steps`` sets the length in steps):
  backbone frozen (parameters and BatchNorm statistics), only the connectivity predictors train, with
  the attention distillation loss only (weights token 0, cls 0, attn 1.0). As in the official code
  (``USE_ATTN_RECON``), the predictor trains on the *dense* coefficients ``A_down`` and the *unthresholded*
  basis ``W_up``: every coefficient and every ``W_up`` entry gets a gradient. (Thresholding while training,
  the suite's earlier behaviour, starves the predictor at the paper's ``n_down = 32``: a coefficient
  starts near ``1/32 < tau = 0.05``, so over 94% of them are zero and get no gradient, and ``W_up``
  entries under 1e-2 at initialisation never revive; ``threshold_coef_in_phase1`` /
  ``threshold_w_up_in_phase1`` bring it back.) Both thresholds apply everywhere else: in validation and
  testing (also during phase 1), in phase 2 and when FLOPs are counted;
* at the switch, ``W_up`` entries below 1e-2 are zeroed in place (Fig. 6: "pruned after training"),
  so phase 2, validation, testing and FLOP counting use a truly sparse basis (the threshold stays in
  the forward too, so a module that never ran phase 1 is sparse as well);
* phase 2: the backbone trains with weights token 0.5, cls 0.5, attn 0.0 (paper); the predictor is
  frozen (official code). With the attention weight 0 and the mask detached the predictor gets no
  gradient anyway; the paper's "jointly" would only let weight decay shrink it.

Differences from the official code (lim142857/Sparsifiner ``src/models/sparsifiner.py``, ``losses.py``,
``main.py``, ``sparsifiner_default_config.yaml``) and which one the suite follows:

============================== ======================================= =================================
topic                          official code                           this suite (flag for the other)
============================== ======================================= =================================
q/k channels of the predictor  shrunk per head by Linear d -> d/2       paper: full ``d``
                               (``proj_c_q``/``proj_c_k``)             (``reduce_c_factor=2``)
low-rank logit scale           ``num_heads ** -0.5``                   paper eq. 1: ``c ** -0.5``
n_down                         ``N // 6`` = 32 at 197 tokens           paper 32; below 197 tokens
                                                                       ``round(32 N / 197)`` >= 8
                                                                       (``n_down=``)
coefficients (eq. 2)           top-8 per row (``BASIS_COEF.TOPK``)     official: top-8 (measured
                               at eval/phase 2; dense in phase 1       reason under ``coef_topk``);
                                                                       paper ``> tau = 0.05`` by
                                                                       ``coef_topk=None``
W_up threshold                 2e-2 on ``abs(W_up)`` (the sign is      paper: 1e-2 on the magnitude,
                               lost), eval/phase 2 only                sign kept; not while phase 1
                                                                       trains, as official
                                                                       (``threshold_w_up_in_phase1``)
coefficient threshold          not while phase 1 trains (dense         same (``threshold_coef_in_phase1``)
                               ``A_down``), eval/phase 2 only
W_down / W_up per head         shared by the heads of a layer          same (paper Fig. 6; ``shared_heads``)
CLS query row                  full (not predicted)                    same (``cls_full_row``)
mask gradient                  detached                                same
attention loss                 MSE ``reduction='sum'`` / layers,       squared error summed per image
                               weight 0.01, CLS row excluded           (heads, query rows, keys), mean
                                                                       over the batch and the layers,
                                                                       weight 1.0, CLS row excluded when
                                                                       it is full (``attn_loss_reduction``:
                                                                       ``"image_sum"``; ``"sum"`` is the
                                                                       official, ``"mean"`` the suite's
                                                                       earlier mean MSE)
phase-1 forward                full attention, no token pruning        same (``phase1_full_attention``)
phase-2 predictor              frozen                                  same (``train_predictor_phase2``)
learning rates                 separate optimisers/schedules per       one AdamW + the suite's cosine
                               phase (3e-4 / 8e-5 peak)                schedule; the predictor's groups
                                                                       at ``predictor_lr`` (1e-2, for
                                                                       the short CPU phase 1)
budget under token pruning     ``min(ceil(keep * 197), kept tokens)``  ``ceil(keep * N_l)`` per layer
                               (tokens masked, not removed)            (tokens removed; Sparsif-EViT)
============================== ======================================= =================================
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from torchmetrics import MeanMetric

from bench_suite.backbones import num_tokens
from bench_suite.kernels import get_sparse_attention_impl
from bench_suite.registry import Metric, register_method
from methods.adapter import (
    attention_probs,
    attentions_of,
    check_timm_block,
    merge_heads,
    split_heads,
    swap_class,
)
from methods.base import BenchModule, ForwardOutput, check_keep_rate
from methods.sparse_attention import (
    ConnectivityPredictor,
    attention_budget,
    default_n_down,
    map_attention_to_tokens,
    mask_recall,
    sparsifiner_attention,
)

__all__ = [
    "ATTN_LOSS_REDUCTIONS",
    "SparsifinerAttention",
    "apply_sparsifiner",
    "emulate_coef_density",
    "Sparsifiner",
]


TAU = 0.05  # the paper's coefficient threshold (eq. 2), used with coef_topk=None
COEF_TOPK = 8  # basis coefficients kept per row: the official experiments' BASIS_COEF.TOPK (None: the paper's tau)
ATTN_LOSS_REDUCTIONS = ("image_sum", "sum", "mean")  # normalisations of eq. 10 (see Sparsifiner)
MASK_RECALL_IMAGES = 1024  # test images the mask recall is measured on (first batches of the test set)
PROBE_IMAGES = 32  # images of the phase-1 probe (attention distillation loss at the start / end of phase 1)


# --------------------------------------------------------------------------- the timm adapter
class SparsifinerAttention(Attention):
    """timm ``Attention`` whose core is Sparsifiner's sparse MHSA (paper eq. 1-6).

    ``x [B, N, C]`` -> ``split_heads`` -> :func:`methods.sparse_attention.sparsifiner_attention` ->
    ``merge_heads`` -> ``[B, N, C]``. Attributes set by :func:`apply_sparsifiner`:

    * ``predictor`` (:class:`ConnectivityPredictor`, a child module), ``attn_keep_rate``,
      ``cls_full_row``, ``impl`` (sparse attention implementation);
    * switches set by the LightningModule: ``phase1_dense`` (full attention while training, phase 1),
      ``collect_scores`` (keep the connectivity scores with their graph for eq. 10),
      ``self_target`` (also keep the dense attention as the distillation target when there is no
      teacher), ``need_cls_attn`` (EViT), ``record`` (dense maps for visualisation), ``keep_idx`` (keep the
      mask's key indices, for the mask recall), ``official_pruning`` (after token pruning, the official
      code's budget ``min(ceil(keep * N0), N - 1)`` and its CLS-row softmax over the pruned, zeroed keys),
      ``track_stats`` (count the zero coefficients each evaluation forward, for the sparsity report; off while
      timed; training forwards never count: the report reads evaluation forwards, and the count costs ~4 % of a
      training step on ``mini197``);
    * ``token_state``: dict shared with :class:`SparsifEViTBlock` (``"positions"``), or ``None``.

    After each forward, ``last`` holds ``n`` (tokens), ``budget``, ``coef_sparsity`` (fraction of
    ``A_down`` entries set to 0, a 0-d tensor; evaluation only, not while ``track_stats`` is off), ``positions``, and when asked ``scores``,
    ``dense_target``, ``cls_attn``, ``idx`` (``[B, H, Nq, B]``) and ``records``.
    """

    predictor: ConnectivityPredictor
    attn_keep_rate: float = 1.0
    cls_full_row: bool = True
    impl: str | None = None
    phase1_dense: bool = False
    collect_scores: bool = False
    self_target: bool = False
    need_cls_attn: bool = False
    record: bool = False
    keep_idx: bool = False
    token_state: dict | None = None
    official_pruning: bool = False
    track_stats: bool = True

    @contextmanager
    def timing(self) -> Iterator[None]:
        """While timed (:func:`bench_suite.measure.timing_mode`), the forward does not count the zero coefficients
        (``track_stats``: a statistic for the sparsity report, about 1.5 % of an eval forward on ``deit_t384``)."""
        before, self.track_stats = self.track_stats, False
        try:
            yield
        finally:
            self.track_stats = before

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``.

        Raises:
            NotImplementedError: for an attention mask or causal attention.
        """
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Sparsifiner attention takes no attention mask / causal attention")
        q, k, v = split_heads(self, x)  # [B, H, N, d]
        positions = None
        if self.token_state is not None and x.shape[1] != self.predictor.num_tokens:
            positions = self.token_state.get("positions")
        dense = self.training and self.phase1_dense
        budget, zero_keys = None, 0
        n0 = self.predictor.num_tokens
        if self.official_pruning and x.shape[1] < n0:
            budget = min(attention_budget(self.attn_keep_rate, n0), x.shape[1] - 1)
            zero_keys = n0 - x.shape[1]
        res = sparsifiner_attention(q, k, v, self.predictor, self.attn_keep_rate, self.cls_full_row, self.impl,
                                    dense=dense, positions=positions, need_predictor=self.collect_scores,
                                    need_cls_attn=self.need_cls_attn, record=self.record,
                                    need_scores=self.collect_scores, budget=budget, cls_zero_keys=zero_keys)
        last: dict[str, Any] = {"n": x.shape[1], "budget": res.budget, "positions": positions}
        if res.pred is not None and self.track_stats and not self.training:  # off while timed and while training
            coef = res.pred.coef.detach()
            last["coef_sparsity"] = 1.0 - torch.count_nonzero(coef).float() / max(coef.numel(), 1)
        if res.pred is not None and self.collect_scores:
            last["scores"] = res.pred.scores
        if self.collect_scores and self.self_target:
            last["dense_target"] = (res.dense_probs if res.dense_probs is not None
                                    else attention_probs(self, q, k)).detach()
        if res.cls_attn is not None:
            last["cls_attn"] = res.cls_attn
        if self.keep_idx and res.idx is not None:
            last["idx"] = res.idx
        if self.record:
            last["records"] = {k_: t.detach() for k_, t in res.records.items()}
        self.last = last
        return merge_heads(self, res.out)


def _check_vit(model: nn.Module, cls_full_row: bool) -> None:
    for i, blk in enumerate(model.blocks):
        check_timm_block(blk, i)
        if getattr(blk.attn, "gate", None) is not None:
            raise NotImplementedError("gated timm attention is not supported by Sparsifiner")
        if blk.attn.attn_drop.p > 0:
            raise ValueError(f"block {i}: attention dropout {blk.attn.attn_drop.p} is not supported by the "
                             f"sparse attention; build the backbone with attn_drop_rate=0")
    if cls_full_row and getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError("cls_full_row needs a ViT with exactly one prefix (CLS) token")


def apply_sparsifiner(model: nn.Module, keep_rate: float, n_down: int | None = None, tau: float = TAU,
                      w_up_threshold: float = 1e-2, cls_full_row: bool = True, shared_heads: bool = True,
                      reduce_c_factor: int = 1, coef_topk: int | None = COEF_TOPK, impl: str | None = None) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place into Sparsifiner (weights untouched, predictors added).

    Every block's attention becomes :class:`SparsifinerAttention` with its own
    :class:`ConnectivityPredictor` (``blocks.<i>.attn.predictor``), sized for ``N =``
    :func:`bench_suite.backbones.num_tokens` tokens.

    Args:
        model: timm ``VisionTransformer``.
        keep_rate: attention keep rate in (0, 1]; ``B = ceil(keep_rate * N)``.
        n_down: low rank (default :func:`methods.sparse_attention.default_n_down`).
        tau, w_up_threshold, shared_heads, reduce_c_factor, coef_topk: see :class:`ConnectivityPredictor`.
        cls_full_row: keep the CLS query row dense (official code).
        impl: sparse attention implementation (``None``: the module default).

    Returns:
        ``model``.

    Raises:
        ValueError: for a keep rate outside (0, 1], an unknown implementation, attention dropout, or
            invalid predictor settings.
        TypeError: if a block is not a timm ``Block`` with a timm ``Attention``.
    """
    keep_rate = check_keep_rate(keep_rate)
    get_sparse_attention_impl(impl)
    _check_vit(model, cls_full_row)
    n = num_tokens(model)
    n_down = default_n_down(n) if n_down is None else int(n_down)
    for blk in model.blocks:
        attn = blk.attn
        pred = ConnectivityPredictor(n, attn.head_dim, attn.num_heads, n_down, tau, w_up_threshold,
                                     shared_heads, reduce_c_factor, coef_topk)
        pred.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        swap_class(attn, SparsifinerAttention, predictor=pred, attn_keep_rate=keep_rate,
                   cls_full_row=cls_full_row, impl=impl, phase1_dense=False, collect_scores=False,
                   self_target=False, need_cls_attn=False, record=False, keep_idx=False, token_state=None,
                   official_pruning=False, last={})
    return model


def emulate_coef_density(model: torch.nn.Module, images: torch.Tensor, density: float,
                         passes: int = 2) -> list[float] | None:
    """Make a randomly initialised Sparsifiner predict coefficients as dense as a trained one, for timing.

    With random weights the low-rank attention ``A_down`` (paper eq. 1) is nearly uniform (each entry about
    ``1 / n_down``), so the paper's threshold ``tau = 0.05`` (eq. 2) zeroes every coefficient: the
    connectivity scores are all 0 and the top-B selection degenerates, which is not what a trained model
    costs (paper: about 87% of the coefficients are zero, i.e. a density of 0.13). This sets each
    :class:`methods.sparse_attention.ConnectivityPredictor`'s ``tau`` to the ``1 - density`` quantile of its
    ``A_down`` on ``images`` (``passes`` rounds, since a layer's input depends on the earlier layers' masks),
    so that the fraction of nonzero coefficients is ``density``. A predictor with the official top-k
    coefficients (``coef_topk``, the default) is switched to the paper's ``tau`` threshold for this: top-k
    has the density ``k / n_down`` whatever the weights, so it needs no emulation, and asking for another
    density means the paper's regime. Only the threshold changes; the computation is the method's.
    Returns the thresholds set, or None if the model has no predictor.
    """
    preds = [m for m in model.modules() if isinstance(m, ConnectivityPredictor)]
    if not preds:
        return None
    was_training = model.training
    model.eval()
    allowed = [p.allow_fused for p in preds]
    for p in preds:  # the hook reads A_down, which the fused coefficient kernel does not return
        p.allow_fused = False
    try:
        for _ in range(passes):
            seen: dict[int, torch.Tensor] = {}
            hooks = [p.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out.a_down.flatten()))
                     for i, p in enumerate(preds)]
            try:
                with torch.inference_mode():
                    model(images)
            finally:
                for h in hooks:
                    h.remove()
            for i, p in enumerate(preds):
                values = seen[i]
                sample = values[:: max(1, values.numel() // 1_000_000)].float()
                p.tau = float(torch.quantile(sample, 1.0 - density))
                p.coef_topk = None
    finally:
        model.train(was_training)
        for p, allow in zip(preds, allowed):
            p.allow_fused = allow
    return [p.tau for p in preds]


# --------------------------------------------------------------------------- the LightningModules
@register_method("sparsifiner", keep_rates=(0.5, 0.25, 0.1),
                 description="Sparsifiner (Wei et al. CVPR 2023): learned top-B sparse attention per query")
class Sparsifiner(BenchModule):
    """Sparsifiner: instance-dependent sparse attention from a low-rank connectivity mask predictor
    (Wei et al., CVPR 2023), trained by distillation from the full-attention teacher in two phases.

    Args:
        backbone: timm ``VisionTransformer`` (patched in place).
        keep_rate: attention keep rate in (0, 1]; budget ``B = ceil(keep_rate * N)`` keys per query.
        teacher: frozen full-attention timm ViT (logits, final tokens and, through forward hooks on its
            attention modules, attention maps). Without a teacher the attention target is the backbone's
            own dense attention (the official "attention self-distillation").
        n_down: predictor low rank (default ``round(32 N / 197)``, at least 8).
        tau: coefficient threshold (eq. 2) with ``coef_topk=None``.
        w_up_threshold: ``W_up`` magnitude threshold.
        cls_full_row: keep the CLS query row dense.
        shared_heads: one ``W_down``/``W_up`` per layer (True) or per head.
        reduce_c_factor: official-code channel reduction of q/k in the predictor (1: paper).
        coef_topk: keep the ``coef_topk`` largest basis coefficients per row (eq. 2; default 8, the official
            experiments' ``BASIS_COEF.USE_TOPK``/``TOPK``). ``None``: the paper's threshold ``tau`` instead.
            Why the official one is the default: the paper's numbers come from the official code, and on
            ``mini197`` (``n_down = 32``) ``tau = 0.05`` keeps 3.3 of 32 coefficients per row, a mask recall of
            0.487 at keep 0.25 and 1.28 points below the teacher; top-8 gives 0.605 and 0.33 (README).
            At ``n_down <= 8`` (``mini``) top-8 keeps every coefficient, as the official code would.
        phase1_epochs: epochs of phase 1 added before the fine-tuning protocol's epochs (default 1; the
            official recipe 5 before 45). The runner trains ``train_epochs(epochs) = epochs + phase1_epochs``
            (0 stays 0). Measured on ``mini197`` (keep 0.25): 40 phase-1 steps give a mask recall of 0.49, 80
            steps (one epoch of 10k images) 0.52; carving phase 1 out of a 1-epoch fine-tune also halves
            phase 2. A Trainer of at most ``phase1_epochs`` epochs (a user's own) falls back to
            ``phase1_frac``. 0: phase 1 is carved out of the fine-tuning epochs (``phase1_frac``).
        phase1_frac: with ``phase1_epochs=0``, fraction of the training steps in phase 1 (default 0.1, the
            official 5 of 50 epochs).
        phase1_min_steps: phase 1 lasts at least this many steps, but at most half of the training
            (default 40): the official phase 1 runs thousands of steps; a 1-epoch CPU fine-tune of 79 steps
            would give it 8, too few for the predictor to learn anything (measured on ``mini197``, see the
            README). Irrelevant at ImageNet scale, where ``phase1_frac`` gives far more.
        phase1_steps: phase-1 length in optimiser steps (overrides ``phase1_frac`` and ``phase1_min_steps``).
        phase1_full_attention: full attention (and no token pruning) in the phase-1 training forward.
        threshold_coef_in_phase1, threshold_w_up_in_phase1: apply eq. 2's coefficient threshold / the
            ``W_up`` threshold in the phase-1 *training* forward (default False, as the official code:
            every coefficient and every ``W_up`` entry gets a gradient; True is the suite's earlier
            behaviour). Evaluation always thresholds.
        attn_loss_reduction: normalisation of eq. 10 per layer, averaged over the layers:
            ``"image_sum"`` (default) the squared error summed over each image's heads, predicted query
            rows and keys, averaged over the batch: independent of the batch size, and at DeiT-S's
            ``H (N - 1) N = 231,672`` terms per image its gradients sit far above AdamW's eps (1e-8);
            the official ``sum / layers x 0.01`` equals it x ``0.01 x per-GPU batch`` (x1.68 at the
            official batch 168), and AdamW is invariant to that constant factor (apart from eps).
            ``"sum"``: the official reduction (summed over the batch too; set ``attn_distill_phase1=0.01``
            for the official weight). ``"mean"``: the mean squared error (the suite's earlier choice;
            ``H (N - 1) N`` times smaller per image, its gradients reach eps on small batches).
        train_predictor_phase2: keep training the predictor in phase 2 (paper "jointly") instead of
            freezing it (official).
        attn_distill_phase1, attn_distill_phase2: weight of eq. 10 in each phase (paper 1.0 / 0.0).
        predictor_lr: peak learning rate of the predictor's parameter groups, absolute (not scaled by the global
            batch; None: ``lr``, scaled as it is). Default 1e-2.
            It compensates for the number of phase-1 steps, not for the loss scale: with the per-image-sum
            loss no predictor gradient entry is below AdamW's eps (measured on ``mini197``: 0.0 %, against 19 %
            with the mean MSE on ``mini``), and AdamW's steps do not depend on the loss scale. The official
            phase 1 runs 5 ImageNet epochs (thousands of steps) at 3e-4; a 1-epoch CPU fine-tune gives it 39
            (``phase1_min_steps``). Measured on ``mini197`` (a 1-epoch teacher, keep 0.25, 40 phase-1 steps of
            batch 64): at 1e-2 the attention distillation loss fell to 0.40 of its start and the mask recall
            rose from 0.26 (random) to 0.44; at 3e-2 to 0.58 and 0.31.
        attention_impl: sparse attention implementation (:data:`bench_suite.kernels.SPARSE_ATTENTION_IMPLS`):
            ``"auto"`` (default) the fused C++ kernels (forward and backward, training and evaluation) on CPU
            float tensors when they can be built, FlexAttention on CUDA (compiled, forward and backward, no
            gathered key/value copies), else the PyTorch gather path; ``"cpp"`` the kernels or an error;
            ``"flex"`` FlexAttention; ``"torch"`` the PyTorch reference. All give the same results up to float
            rounding (tests; FlexAttention's CUDA backward is not testable on the CPU); the kernels are 5-15x
            faster on the CPU.
        distill_logits, distill_tokens: phase-2 weights of eq. 9 and eq. 8 (paper 0.5 / 0.5); phase 1
            uses 0 / 0 and no cross-entropy.
        **kwargs: other :class:`methods.base.BenchModule` settings (lr, weight_decay = 0.05, ...).

    Raises:
        ValueError: for invalid keep rates, phase settings or predictor settings, or a ``tau`` other than 0.05
            with ``coef_topk`` set (it would have no effect).
    """

    display_name = "Sparsifiner"
    # The official recipe (experiments/sparsifiner_default_config.yaml; global batch 8 x 168 = 1344): phase 1
    # ("attn_recon") 5 epochs at 3e-4, phase 2 ("cls_distill") 45 epochs peaking at 8e-5 down to 2e-6, 3 warm-up
    # epochs, AdamW wd 0.05. Here: lr / min_lr are DeiT-base values (x 512 / 1344, scaled back by lr_batch),
    # predictor_lr absolute; one warm-up + cosine over the 50 epochs (the official code restarts it per phase).
    paper_recipe = {"epochs": 45, "phase1_epochs": 5, "lr": 8e-5 * 512 / 1344, "min_lr": 2e-6 * 512 / 1344,
                    "predictor_lr": 3e-4, "weight_decay": 0.05, "warmup_frac": 3 / 50}
    plot_color, plot_marker = "#de8f05", "s"
    # phase 1 freezes the backbone, phase 2 the predictor: DDP must look for unused parameters
    ddp_find_unused_parameters = True
    reported_metrics = (
        Metric("coef_sparsity", "fraction", column="coef_sparsity_pct", header="Coef. sparsity (%, paper 87)", scale=100.0,
               description="basis coefficients A_down set to 0 (outside the top-k, or <= tau); paper ~87%"),
        Metric("w_up_sparsity", "fraction", column="w_up_sparsity_pct", header="W_up sparsity (%, paper 90)", scale=100.0,
               description="sparse basis W_up entries that are 0; paper ~90%"),
        Metric("mask_density", "fraction", description="nnz(M) / N^2 of the connectivity mask, CLS row included"),
        Metric("attention_budget", "keys per query row", description="mean attention budget B over layers"),
        Metric("n_down", "rank", description="rank of the low-rank connectivity predictor"),
        Metric("mask_recall", "fraction", column="mask_recall_pct", header="Mask recall (%)", scale=100.0,
               description="teacher's top-B keys per query kept by the connectivity mask (random: ~keep rate)"),
        Metric("attn_distill_start", "loss", description="eq. 10 on the probe images before phase 1"),
        Metric("attn_distill_end", "loss", description="eq. 10 on the probe images after phase 1"),
    )

    def __init__(self, backbone: nn.Module, keep_rate: float = 0.25, teacher: nn.Module | None = None,
                 n_down: int | None = None, tau: float = TAU, w_up_threshold: float = 1e-2,
                 cls_full_row: bool = True, shared_heads: bool = True, reduce_c_factor: int = 1,
                 coef_topk: int | None = COEF_TOPK, phase1_epochs: int = 1, phase1_frac: float = 0.1,
                 phase1_min_steps: int = 40, phase1_steps: int | None = None,
                 phase1_full_attention: bool = True, threshold_coef_in_phase1: bool = False,
                 threshold_w_up_in_phase1: bool = False, attn_loss_reduction: str = "image_sum",
                 train_predictor_phase2: bool = False, attn_distill_phase1: float = 1.0,
                 attn_distill_phase2: float = 0.0, predictor_lr: float | None = 1e-2,
                 attention_impl: str = "auto", distill_logits: float = 0.5, distill_tokens: float = 0.5,
                 **kwargs: Any) -> None:
        if not 0.0 <= phase1_frac <= 1.0:
            raise ValueError(f"phase1_frac must lie in [0, 1], got {phase1_frac}")
        if phase1_min_steps < 0:
            raise ValueError(f"phase1_min_steps must be >= 0, got {phase1_min_steps}")
        if phase1_epochs < 0:
            raise ValueError(f"phase1_epochs must be >= 0, got {phase1_epochs}")
        if phase1_steps is not None and phase1_steps < 0:
            raise ValueError(f"phase1_steps must be >= 0, got {phase1_steps}")
        if attn_distill_phase1 <= 0 and (phase1_frac > 0 or phase1_steps or phase1_epochs):
            raise ValueError("phase 1 trains the predictor with the attention loss only: attn_distill_phase1 "
                             "must be > 0 (or set phase1_frac=0)")
        if attn_distill_phase2 < 0:
            raise ValueError(f"attn_distill_phase2 must be >= 0, got {attn_distill_phase2}")
        if coef_topk is not None and tau != TAU:
            raise ValueError(f"tau={tau} has no effect with coef_topk={coef_topk} (the official top-k coefficients, "
                             f"the default); pass coef_topk=None as well for the paper's threshold")
        if attn_loss_reduction not in ATTN_LOSS_REDUCTIONS:
            raise ValueError(f"attn_loss_reduction must be one of {ATTN_LOSS_REDUCTIONS}, got {attn_loss_reduction!r}")
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, distill_logits=distill_logits,
                         distill_tokens=distill_tokens, **kwargs)
        self.phase = 2  # inference behaviour until training starts
        self._applied_phase: int | None = None
        self._phase1_steps = 0
        self._probe: torch.Tensor | None = None  # phase-1 probe images (the first phase-1 batch)
        self.phase1_record: dict[str, float] = {}  # attention distillation loss at the start / end of phase 1
        self.recall_metric = MeanMetric()  # measured while testing (teacher's top-B keys kept by the mask)
        self.recall_value: float | None = None

    # ---------------------------------------------------------------- adapter
    def _predictor_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(n_down=hp.n_down, tau=hp.tau, w_up_threshold=hp.w_up_threshold, cls_full_row=hp.cls_full_row,
                    shared_heads=hp.shared_heads, reduce_c_factor=hp.reduce_c_factor, coef_topk=hp.coef_topk,
                    impl=hp.attention_impl)

    def adapt(self, model: nn.Module) -> None:
        apply_sparsifiner(model, self.keep_rate, **self._predictor_kwargs())

    def _attns(self) -> list[SparsifinerAttention]:
        return attentions_of(self.model)

    # ---------------------------------------------------------------- phases
    def _attn_weight(self, phase: int | None = None) -> float:
        phase = self.phase if phase is None else phase
        return float(self.hparams.attn_distill_phase1 if phase == 1 else self.hparams.attn_distill_phase2)

    def set_phase(self, phase: int) -> None:
        """Switch to training phase 1 (predictor only, attention distillation) or 2 (backbone).

        Freezes/unfreezes parameters, prunes ``W_up`` in place on entering phase 2, and sets the
        attention modules' switches. Called by :meth:`on_train_batch_start`; public for tests.

        Raises:
            ValueError: for a phase other than 1 or 2.
        """
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        hp = self.hparams
        self.phase = phase
        p1 = phase == 1
        for name, p in self.model.named_parameters():
            is_pred = ".predictor." in name
            p.requires_grad_(is_pred if p1 else (not is_pred or hp.train_predictor_phase2))
        collect = self._attn_weight(phase) > 0
        for attn in self._attns():
            attn.phase1_dense = p1 and hp.phase1_full_attention
            attn.collect_scores = collect
            attn.self_target = collect and self.teacher is None
            attn.predictor.threshold_coef = (not p1) or hp.threshold_coef_in_phase1
            attn.predictor.threshold_w_up = (not p1) or hp.threshold_w_up_in_phase1
            if not p1:
                attn.predictor.prune_()
        self._applied_phase = phase

    def train_epochs(self, epochs: int) -> int:
        """``epochs + phase1_epochs`` (phase 1 before the fine-tuning protocol's epochs, as the official 5 + 45);
        ``epochs`` when ``phase1_steps`` is set or ``epochs`` is 0."""
        hp = self.hparams
        if epochs <= 0 or hp.phase1_steps is not None:
            return int(epochs)
        return int(epochs) + int(hp.get("phase1_epochs", 0))

    def shared_prefix(self) -> tuple[int, tuple[str, ...]] | None:
        """Phase 1 trains the predictor on the full-attention forward with a loss that never looks at the
        budget: its ``phase1_epochs`` are the same at every keep rate, so the runner trains them once and
        every other keep rate resumes phase 2 from there (``None`` when phase 1 is sized in steps or fractions,
        or runs the sparse forward). With an absolute ``predictor_lr`` phase 1 does not depend on ``lr_batch``
        either (the frozen backbone's learning rate is unused; the schedule's shape does not depend on the
        batch, and every run re-applies its own peaks when it resumes). Nor, when phase 1 trains on the dense
        coefficients and the unthresholded basis (the defaults, as the official code), on the thresholds that
        apply only afterwards: ``tau`` and ``coef_topk`` (eq. 2), ``w_up_threshold`` (``W_up`` is pruned on
        entering phase 2)."""
        hp = self.hparams
        if hp.phase1_steps is not None or not hp.get("phase1_epochs") or not hp.phase1_full_attention:
            return None
        free = ["keep_rate"] + (["lr_batch"] if hp.predictor_lr else [])
        free += [] if hp.threshold_coef_in_phase1 else ["tau", "coef_topk"]
        free += [] if hp.threshold_w_up_in_phase1 else ["w_up_threshold"]
        return int(hp.phase1_epochs), tuple(free)

    def phase1_length(self) -> int:
        """Phase-1 length in optimiser steps: ``phase1_steps``; else the first ``phase1_epochs`` epochs' steps when
        the Trainer runs more epochs than that; else ``max(ceil(phase1_frac * total), min(phase1_min_steps,
        total // 2))`` (0 when ``phase1_frac`` is 0)."""
        hp = self.hparams
        if hp.phase1_steps is not None:
            return int(hp.phase1_steps)
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0.0
        if not math.isfinite(total):
            raise ValueError("the number of training steps is unknown: set phase1_steps instead of phase1_frac")
        p1_epochs = int(hp.get("phase1_epochs", 0))
        max_epochs = getattr(self.trainer, "max_epochs", None) if self._trainer is not None else None
        if p1_epochs and max_epochs is not None and max_epochs > p1_epochs and total > 0:
            return int(round(total * p1_epochs / max_epochs))
        if total <= 0 or hp.phase1_frac <= 0:
            return 0
        return max(int(math.ceil(hp.phase1_frac * total)), min(int(hp.get("phase1_min_steps", 0)), int(total) // 2))

    def on_train_start(self) -> None:
        """Fix the phase-1 length. Freezing toggles ``requires_grad`` during the fit, so multi-process DDP
        needs ``find_unused_parameters=True`` (strategy ``"ddp_find_unused_parameters_true"``).

        Raises:
            ValueError: under DDP without ``find_unused_parameters``.
        """
        strategy = self.trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if self.trainer.world_size > 1 and ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters"):
            raise ValueError("Sparsifiner freezes the backbone (phase 1) and the predictor (phase 2): use the "
                             "strategy 'ddp_find_unused_parameters_true'")
        super().on_train_start()
        self._phase1_steps = self.phase1_length()
        self._applied_phase = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Apply the phase of this step; at the start and the end of phase 1, measure the attention
        distillation loss on the probe images (the first phase-1 batch's first :data:`PROBE_IMAGES`)."""
        phase = 1 if self.global_step < self._phase1_steps else 2
        if phase != self._applied_phase:
            if phase == 2:
                self._record_phase1_end()
            self.set_phase(phase)
        if phase == 1 and self._probe is None and "attn_distill_start" not in self.phase1_record:
            self._probe = batch[0][:PROBE_IMAGES].detach().clone()
            self.phase1_record["attn_distill_start"] = self.probe_attention_distillation(self._probe)
        for m in self.model.modules():  # a frozen backbone keeps its BatchNorm statistics too
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(phase != 1)

    def _record_phase1_end(self) -> None:
        if self._probe is not None and "attn_distill_end" not in self.phase1_record:
            self.phase1_record["attn_distill_end"] = self.probe_attention_distillation(self._probe)
        self._probe = None

    def on_train_end(self) -> None:
        if self._applied_phase == 1:  # the whole fit was phase 1
            self._record_phase1_end()
        for attn in self._attns():  # drop the graphs kept for the loss, keep the statistics
            attn.last.pop("scores", None)
            attn.last.pop("dense_target", None)

    # ---------------------------------------------------------------- checkpoints, testing
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also keep the phase-1 record and, while phase 1 runs, its probe images (a resumed run measures
        the end of phase 1 on the same images)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["sparsifiner_phase1"] = {"record": dict(self.phase1_record), "probe": self._probe}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("sparsifiner_phase1") or {}
        self.phase1_record = dict(saved.get("record") or {})
        self._probe = saved.get("probe")

    def on_test_epoch_start(self) -> None:
        self.recall_metric.reset()
        self._recall_images = 0

    def on_test_epoch_end(self) -> None:
        """The mask recall over all processes (every rank calls this; ``compute`` synchronises)."""
        if self.recall_metric.update_count:
            self.recall_value = float(self.recall_metric.compute())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Top-1 as every method; on the first :data:`MASK_RECALL_IMAGES` test images also the mask recall
        (with a teacher)."""
        super().test_step(batch, batch_idx)
        if self.teacher is not None and getattr(self, "_recall_images", 0) < MASK_RECALL_IMAGES:
            self.update_mask_recall(batch[0])
            self._recall_images = getattr(self, "_recall_images", 0) + len(batch[0])

    # ---------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """The base class's AdamW groups (weight decay 0.05 on ``W_up``: paper eq. 11) over all parameters,
        the predictors in their own groups (``predictor_lr``). The phase's freezing is re-applied at the
        next batch."""
        self.model.requires_grad_(True)
        groups = super().param_groups()
        pred_ids = {id(p) for n, p in self.model.named_parameters() if ".predictor." in n}
        out = []
        for g in groups:
            rest = [p for p in g["params"] if id(p) not in pred_ids]
            pred = [p for p in g["params"] if id(p) in pred_ids]
            if rest:
                out.append({**g, "params": rest})
            if pred:
                # predictor_lr is absolute (not scaled by the global batch, see lr_batch)
                extra = {"lr": self.hparams.predictor_lr, "lr_scaled": False} if self.hparams.predictor_lr else {}
                out.append({**g, "params": pred, **extra})
        self._applied_phase = None
        return out

    # ---------------------------------------------------------------- teacher and losses
    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor, attention: bool | None = None) -> ForwardOutput | None:
        """Teacher logits and tokens; plus ``attn``, its attention probabilities ``[B, H, N, N]`` per layer,
        when the current phase distils attention or ``attention`` is True (forward hooks on its attention
        modules recompute them from their input with :func:`methods.adapter.split_heads`/``attention_probs``)."""
        if self.teacher is None:
            return None
        if not (self._attn_weight() > 0 if attention is None else attention):
            return super().forward_teacher(x)
        maps: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            q, k, _ = split_heads(module, args[0])
            maps.append(attention_probs(module, q, k))

        handles = [a.register_forward_hook(hook) for a in attentions_of(self.teacher)]
        try:
            out = super().forward_teacher(x)
        finally:
            for h in handles:
                h.remove()
        out["attn"] = maps
        return out

    @staticmethod
    def _target_rows(attn: SparsifinerAttention, teacher_map: torch.Tensor | None) -> torch.Tensor:
        """The attention target of ``attn``'s predicted query rows, ``[B, H, Nq, N_l]``: the teacher's map
        of that layer mapped to the student's tokens by their positions (rows averaged, columns summed over
        a fused token's positions), or the layer's own dense attention without a teacher; without the CLS
        row when it is full."""
        last = attn.last
        if teacher_map is not None:
            target = teacher_map
            pos = last.get("positions")
            if pos is not None:
                target = map_attention_to_tokens(target, pos)
        else:
            target = last["dense_target"]
        return target[:, :, 1:] if attn.cls_full_row else target

    def attention_distillation(self, teacher_out: ForwardOutput | None) -> torch.Tensor:
        """Eq. 10 averaged over layers: the squared error of ``A~_down W_up`` against the teacher's attention
        on the predicted query rows (all but the CLS row when it is full), normalised per
        ``attn_loss_reduction`` (see the class docstring). A 0-d tensor.

        Raises:
            RuntimeError: if the last forward did not keep the connectivity scores.
        """
        losses = []
        teacher_maps = None if teacher_out is None else teacher_out.get("attn")
        reduction = self.hparams.get("attn_loss_reduction", "mean")
        for i, attn in enumerate(self._attns()):
            if "scores" not in attn.last:
                raise RuntimeError("the last forward kept no connectivity scores (collect_scores is off)")
            scores = attn.last["scores"]
            target = self._target_rows(attn, None if teacher_maps is None else teacher_maps[i])
            if reduction == "mean":
                losses.append(F.mse_loss(scores, target))
            else:
                total = F.mse_loss(scores, target, reduction="sum")
                losses.append(total / scores.shape[0] if reduction == "image_sum" else total)
        return torch.stack(losses).mean()

    # ---------------------------------------------------------------- predictor quality
    @torch.no_grad()
    def probe_attention_distillation(self, images: torch.Tensor) -> float:
        """Eq. 10 (unweighted, ``attn_loss_reduction``) of the phase-1 forward on ``images``, deterministic:
        the attention modules and predictors in their training semantics (dense forward, no thresholds
        when phase 1 trains without them), everything else (stochastic depth, BatchNorm) in eval mode.
        Measured at the start and the end of phase 1 (``attn_distill_start`` / ``attn_distill_end``)."""
        hp = self.hparams
        modes = [(m, m.training) for m in self.modules()]
        switches = ("collect_scores", "self_target", "phase1_dense")
        saved = [(a, {k: getattr(a, k) for k in switches},
                  (a.predictor.threshold_coef, a.predictor.threshold_w_up)) for a in self._attns()]
        try:
            self.model.eval()
            for a in self._attns():  # phase 1's training semantics, whatever phase the module is in
                a.train()
                a.collect_scores, a.self_target = True, self.teacher is None
                a.phase1_dense = hp.phase1_full_attention
                a.predictor.threshold_coef = hp.get("threshold_coef_in_phase1", True)
                a.predictor.threshold_w_up = hp.threshold_w_up_in_phase1
            teacher_out = self.forward_teacher(images, attention=True)
            self.forward_train(images)
            return float(self.attention_distillation(teacher_out))
        finally:
            for m, training in modes:
                m.training = training
            for a, values, (tc, tw) in saved:
                for k, v in values.items():
                    setattr(a, k, v)
                a.predictor.threshold_coef, a.predictor.threshold_w_up = tc, tw
                a.last.pop("scores", None)
                a.last.pop("dense_target", None)

    @torch.no_grad()
    def update_mask_recall(self, images: torch.Tensor) -> None:
        """Forward ``images`` (eval) and add the mask recall of every layer's predicted rows against the
        teacher's top-``B`` keys (:func:`methods.sparse_attention.mask_recall`) to :attr:`recall_metric`.
        Needs a teacher; layers whose mask is not computed (keep rate 1.0 keeps every key) count as 1.0."""
        if self.teacher is None:
            return
        attns = self._attns()
        try:
            for a in attns:
                a.keep_idx = True
            self.model(images)
            teacher_maps = self.forward_teacher(images, attention=True)["attn"]
            for attn, tmap in zip(attns, teacher_maps):
                idx = attn.last.get("idx")
                target = self._target_rows(attn, tmap)
                if idx is None:
                    self.recall_metric.update(torch.ones(target.shape[:-1], device=target.device))
                else:
                    self.recall_metric.update(mask_recall(idx, target))
        finally:
            for a in attns:
                a.keep_idx = False
                a.last.pop("idx", None)

    def _token_distillation(self, out: ForwardOutput, teacher_out: ForwardOutput) -> torch.Tensor | None:
        """Eq. 8 when token pruning changed the token count: MSE over the patch tokens that keep one original
        position (the kept ones; the CLS token too with ``token_distill_cls``), against the teacher's tokens
        at those positions."""
        state = getattr(self.model.blocks[0].attn, "token_state", None)
        pos = None if state is None else state.get("positions")
        if pos is None or pos.shape[1] != out.tokens.shape[1]:
            return None
        one_hot = pos.amax(-1) >= 1.0 - 1e-6  # [B, N]
        one_hot[:, : self.token_distill_start()] = False  # patch tokens only (official), unless token_distill_cls
        src = pos.argmax(-1)  # [B, N]
        t = torch.gather(teacher_out.tokens, 1, src.unsqueeze(-1).expand(-1, -1, teacher_out.tokens.shape[-1]))
        return F.mse_loss(out.tokens[one_hot], t[one_hot])

    def losses(self, out: ForwardOutput, teacher_out: ForwardOutput | None,
               batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Phase 1: ``{"attn_distill"}`` only (eq. 10 x ``attn_distill_phase1``). Phase 2: the base class's
        CE + 0.5 KL + 0.5 token MSE (eq. 7-9), plus eq. 10 x ``attn_distill_phase2`` if > 0."""
        if self.phase == 1:
            return {"attn_distill": self._attn_weight(1) * self.attention_distillation(teacher_out)}
        terms = super().losses(out, teacher_out, batch)
        hp = self.hparams
        if teacher_out is not None and hp.distill_tokens > 0 and "token_mse" not in terms:
            mse = self._token_distillation(out, teacher_out)
            if mse is not None:
                terms["token_mse"] = hp.distill_tokens * mse
        if self._attn_weight(2) > 0:
            terms["attn_distill"] = self._attn_weight(2) * self.attention_distillation(teacher_out)
        return terms

    # ---------------------------------------------------------------- reporting
    def sparsity_report(self) -> dict[str, float]:
        """Measured on the batch of the last forward, averaged over layers (fractions in [0, 1]):

        * ``coef_sparsity``: fraction of the basis coefficients ``A_down`` set to 0 (outside the top-k or ``<= tau``; paper ~87%);
        * ``w_up_sparsity``: fraction of ``W_up`` entries with ``|w| < 1e-2`` (paper ~90%);
        * ``mask_density``: ``nnz(M) / N_l^2`` of the connectivity mask (CLS row included);
        * ``attention_budget``: mean ``B`` over layers; ``n_down``;
        * ``mask_recall`` (after testing with a teacher): per predicted query row, the fraction of the
          teacher's top-``B`` keys the mask keeps, averaged over the rows, heads and layers of the first
          :data:`MASK_RECALL_IMAGES` test images (a random mask: about ``B / N``);
        * ``attn_distill_start`` / ``attn_distill_end`` (after a phase 1): eq. 10 on the probe images
          before the first and after the last phase-1 step.

        Empty before the first forward; ``coef_sparsity`` only after an evaluation forward outside
        :func:`bench_suite.measure.timing_mode` (see ``track_stats``).
        """
        attns = self._attns()
        if not attns or not all("n" in a.last for a in attns):
            return {}
        dens = []
        for a in attns:
            n, b = a.last["n"], a.last["budget"]
            nnz = (n + (n - 1) * b) if a.cls_full_row else n * b
            dens.append(nnz / (n * n))
        counted = all("coef_sparsity" in a.last for a in attns)  # evaluation forwards outside timing_mode
        return {
            **({"coef_sparsity": float(torch.stack([a.last["coef_sparsity"] for a in attns]).mean())} if counted else {}),
            "w_up_sparsity": float(sum(a.predictor.w_up_sparsity() for a in attns) / len(attns)),
            "mask_density": float(sum(dens) / len(dens)),
            "attention_budget": float(sum(a.last["budget"] for a in attns) / len(attns)),
            "n_down": float(attns[0].predictor.n_down),
            **{k: float(v) for k, v in self.phase1_record.items()},
            **({"mask_recall": self.recall_value} if self.recall_value is not None else {}),
        }

    # ---------------------------------------------------------------- figures and speed
    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Per layer (see :meth:`BenchModule.attention_maps`): ``mask`` (bool connectivity mask ``M``, eq. 3),
        ``sparse`` (eq. 4, zeros outside the mask) and ``full`` (dense ``softmax(q k^T / sqrt(d))`` of the same
        layer), all ``[B, H, N_l, N_l]``, with ``positions``, ``n`` and ``budget`` (``B``)."""
        attns = self._attns()
        was_training = self.training
        self.eval()
        try:
            for a in attns:
                a.record = True
            self(images)
        finally:
            for a in attns:
                a.record = False
            self.train(was_training)
        out = []
        for a in attns:
            rec = a.last["records"]
            out.append({"mask": rec["mask"], "sparse": rec["sparse_probs"], "full": rec["full_probs"],
                        "positions": a.last.get("positions"), "budget": a.last["budget"], "n": a.last["n"]})
        return out

    def prepare_train_timing(self) -> dict[str, Any]:
        """``speed --train`` times phase 2 (the backbone trains with the frozen predictor on the sparse attention;
        every epoch but the first ``phase1_epochs``): :meth:`set_phase` (2). Returns ``{"train_phase": 2}``."""
        self.set_phase(2)
        return {"train_phase": 2}

    def prepare_timing(self, images: torch.Tensor, coef_density: float | None = None, **_: Any) -> dict[str, Any]:
        """With ``coef_density`` (``speed --coef-density``), make the random predictors as sparse as a trained
        one (:func:`emulate_coef_density`); returns ``{"coef_density_emulated", "tau_emulated"}`` or ``{}``."""
        if coef_density is None:
            return {}
        taus = emulate_coef_density(self, images, coef_density)
        return {"coef_density_emulated": coef_density, "tau_emulated": [round(t, 8) for t in taus or []]}

    @classmethod
    def core_candidates(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_rate: float, impl: str,
                        seed: int, coef_density: float | None = None, **_: Any) -> dict[str, Any]:
        """``speed --core``: the whole attention core (predictor, top-B, sparse attention, dense CLS row;
        ``sparsifiner_core``) with a randomly initialised predictor (the default top-8 coefficients, or ``tau``
        set for ``coef_density`` as :func:`emulate_coef_density` does), and the connectivity top-B alone (eq. 3 on that predictor's
        coefficients; ``connectivity_topk``: ``torch`` = dense scores + ``torch.topk``, ``cpp`` = the fused
        kernel)."""
        from bench_suite.kernels import connectivity_topk

        _, heads, n, d = q.shape
        torch.manual_seed(seed)
        pred = ConnectivityPredictor(n, d, heads, default_n_down(n), coef_topk=COEF_TOPK).eval()
        if coef_density is not None:  # the paper's tau at that density (as emulate_coef_density)
            pred.coef_topk = None
            with torch.inference_mode():
                a_down = pred(q[:, :, 1:], k).a_down.flatten()
            pred.tau = float(torch.quantile(a_down[:: max(1, a_down.numel() // 1_000_000)], 1.0 - coef_density))
        with torch.inference_mode():
            out = pred(q[:, :, 1:], k)
        budget = attention_budget(keep_rate, n)
        topk_impl = "cpp" if impl == "cpp" else "torch"
        return {"sparsifiner_core": lambda: sparsifiner_attention(q, k, v, pred, keep_rate, impl=impl).out,
                "connectivity_topk": lambda: connectivity_topk(out.coef, out.w_up, budget, impl=topk_impl)}
