"""The LightningModule every method shares.

The typed ``__init__`` is the config (Lightning saves it with ``save_hyperparameters``); the backbone
and the teacher are passed in, never built inside. Subclasses patch the backbone in :meth:`adapt`
and add their own loss terms in :meth:`extra_losses`.

Objective (Sparsifiner paper eq. 7-9, and the distillation used by EViT/DynamicViT fine-tuning)::

    L = CE(y_pred, y) + distill_logits * KL(y_teacher || y_pred) + distill_tokens * MSE(x, x_teacher)
        + (method terms)

with the KL divergence *of the student from the teacher*, ``KL(p_teacher || p_student) = sum p_teacher
(log p_teacher - log p_student)``, computed as every official repository does (DeiT, DynamicViT, EViT,
Sparsifiner): ``F.kl_div(log_softmax(student/T), log_softmax(teacher/T), log_target=True) * T^2``, averaged
over the batch (the paper's eq. 9 writes ``KL(y || y_teach)``; the code's argument order is what runs).
The token MSE (eq. 8) compares the final patch tokens ``x[:, 1:]`` as the official Sparsifiner code does
(``token_distill_cls=True`` includes the CLS token).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from bench_suite.backbones import backbone_from_spec, backbone_spec
from methods.adapter import attention_inputs, attention_probs, split_heads

__all__ = ["BenchModule", "ForwardOutput", "check_keep_rate", "BACKBONE_KEY"]

BACKBONE_KEY = "bench_suite_backbone"
"""Checkpoint entry with the backbone's architecture (see :meth:`BenchModule.load_from_checkpoint`)."""


def check_keep_rate(keep_rate: float) -> float:
    """Validate a keep rate.

    Raises:
        ValueError: if ``keep_rate`` is not a number in (0, 1].
    """
    if not isinstance(keep_rate, (int, float)) or not 0.0 < float(keep_rate) <= 1.0 or math.isnan(keep_rate):
        raise ValueError(f"keep rate must lie in (0, 1], got {keep_rate!r}")
    return float(keep_rate)


class ForwardOutput(dict):
    """What a forward pass exposes to the losses: ``logits [B, K]``, ``tokens [B, N, C]`` (after the final
    norm) and any method-specific entries (attention maps, policies, ...)."""

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]

    @property
    def tokens(self) -> torch.Tensor:
        return self["tokens"]


class BenchModule(pl.LightningModule):
    """Base LightningModule of every method.

    Args:
        backbone: a timm ``VisionTransformer`` (see :mod:`bench_suite.backbones`); it is patched in
            place by :meth:`adapt`.
        keep_rate: the method's keep rate in (0, 1] (token keep rate or attention keep rate; 1.0 is
            the no-op setting and must reproduce full attention).
        teacher: frozen full-attention model for distillation (``None`` disables distillation).
        lr: base peak learning rate of AdamW, for a global batch of ``lr_batch`` images: the peak used is
            ``lr x global_batch / lr_batch`` (DeiT's linear scaling rule, Touvron et al. 2021, which the
            paper's recipe follows; global batch = per-process batch x processes x accumulated batches).
            5e-4 is DeiT's base value; at the CPU profiles' batch of 128 the peak is 1.25e-4.
        lr_batch: the global batch ``lr`` is given for (images, default 512 as DeiT); ``None``: ``lr`` is
            the peak itself, whatever the batch. The peak and the global batch are reported with every row
            (``lr_peak``, ``global_batch``).
        min_lr: final learning rate of the cosine schedule, for ``lr_batch`` images: scaled with ``lr`` (the
            whole schedule scales, so that its shape does not depend on the batch).
        weight_decay: AdamW weight decay (not applied to norms, biases, tokens, position embeddings).
        warmup_frac: fraction of the training steps with linear warm-up.
        label_smoothing: label smoothing of the cross-entropy.
        distill_logits: weight of the logit distillation ``KL(p_teacher || p_student)`` (paper eq. 9; see
            the module docstring for the direction).
        distill_tokens: weight of the token distillation MSE of the final patch tokens (paper eq. 8).
        token_distill_cls: include the CLS token in the token distillation (the official code: patch
            tokens only, False).
        distill_temperature: softmax temperature of the logit distillation.

    Raises:
        ValueError: for a keep rate outside (0, 1].
    """

    def __init__(
        self,
        backbone: nn.Module,
        keep_rate: float = 1.0,
        teacher: nn.Module | None = None,
        lr: float = 5e-4,
        lr_batch: int | None = 512,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        warmup_frac: float = 0.05,
        label_smoothing: float = 0.0,
        distill_logits: float = 0.5,
        distill_tokens: float = 0.0,
        distill_temperature: float = 1.0,
        token_distill_cls: bool = False,
    ) -> None:
        super().__init__()
        check_keep_rate(keep_rate)
        if lr_batch is not None and lr_batch <= 0:
            raise ValueError(f"lr_batch must be a positive number of images or None, got {lr_batch}")
        self.save_hyperparameters(ignore=["backbone", "teacher"])
        self.keep_rate = float(keep_rate)
        self.model = backbone
        self.adapt(self.model)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        num_classes = int(getattr(backbone, "num_classes", 0)) or 10
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")

    # ---------------------------------------------------------------- method hooks
    @classmethod
    def noop_settings(cls) -> dict[str, Any]:
        """Hyperparameters at which the method must reproduce full attention (keep rate 1.0; methods
        with a second rate, such as Sparsif-EViT's token keep rate, add it here)."""
        return {"keep_rate": 1.0}

    def adapt(self, model: nn.Module) -> None:
        """Patch the backbone in place for this method (no-op for full attention)."""

    def shared_prefix(self) -> tuple[int, tuple[str, ...]] | None:
        """``(epochs, hparams)``: the first ``epochs`` training epochs do not depend on the hyperparameters
        named (e.g. a predictor-only phase that never looks at the keep rate), so every configuration that
        differs from another only in those starts from the same state after them. The runner trains that
        prefix once per group and resumes the others from its checkpoint
        (:func:`bench_suite.training.install_shared_prefix`). ``None`` (default): nothing is shared."""
        return None

    def train_epochs(self, epochs: int) -> int:
        """Epochs this method trains for a fine-tuning protocol of ``epochs`` (the runner's ``--epochs``):
        ``epochs`` for every method that fine-tunes in one phase; a method whose official recipe adds a
        stage before the common fine-tuning (e.g. a predictor-only phase) returns more, and says so in
        its docstring. ``0`` (evaluate only) stays ``0``."""
        return int(epochs)

    def extra_losses(self, out: ForwardOutput, teacher_out: ForwardOutput | None,
                     batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Method-specific loss terms, already weighted, keyed by a short name (logged as ``train/<name>``)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups over the trainable parameters (timm's no-weight-decay rule)."""
        no_wd = getattr(self.model, "no_weight_decay", lambda: set())()
        groups = param_groups_weight_decay(self.model, self.hparams.weight_decay, no_weight_decay_list=no_wd)
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        return [g for g in groups if g["params"]]

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> logits ``[B, K]``."""
        return self.model(x)

    def forward_train(self, x: torch.Tensor) -> ForwardOutput:
        """Student forward for the losses: logits and final tokens (plus method entries)."""
        tokens = self.model.forward_features(x)
        return ForwardOutput(logits=self.model.forward_head(tokens), tokens=tokens)

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> ForwardOutput | None:
        """Teacher forward (no gradients); ``None`` without a teacher."""
        if self.teacher is None:
            return None
        self.teacher.eval()
        tokens = self.teacher.forward_features(x)
        return ForwardOutput(logits=self.teacher.forward_head(tokens), tokens=tokens)

    # ---------------------------------------------------------------- losses
    def losses(self, out: ForwardOutput, teacher_out: ForwardOutput | None,
               batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All weighted loss terms; their sum is the training loss. Labels ``[B]`` (class indices) train with
        cross-entropy at ``label_smoothing``; soft targets ``[B, K]`` (mixup/cutmix batches, e.g.
        :class:`datamodules.imagefolder.ImageFolderDataModule`) with timm's ``SoftTargetCrossEntropy``."""
        hp = self.hparams
        _, y = batch
        if y.ndim == 2:  # soft targets [B, K] (mixup/cutmix, label smoothing already in them): timm's soft-target CE
            terms = {"ce": SoftTargetCrossEntropy()(out.logits, y.to(out.logits.dtype))}
        else:
            terms = {"ce": F.cross_entropy(out.logits, y, label_smoothing=hp.label_smoothing)}
        if teacher_out is not None and hp.distill_logits > 0:
            t = hp.distill_temperature
            kl = F.kl_div(F.log_softmax(out.logits / t, -1), F.log_softmax(teacher_out.logits / t, -1),
                          reduction="batchmean", log_target=True) * t * t
            terms["kl"] = hp.distill_logits * kl
        if teacher_out is not None and hp.distill_tokens > 0 and out.tokens.shape == teacher_out.tokens.shape:
            first = self.token_distill_start()
            terms["token_mse"] = hp.distill_tokens * F.mse_loss(out.tokens[:, first:], teacher_out.tokens[:, first:])
        terms.update(self.extra_losses(out, teacher_out, batch))
        return terms

    def token_distill_start(self) -> int:
        """Index of the first token the token distillation compares: 0 with ``token_distill_cls``, else the
        backbone's number of prefix (CLS) tokens, so that only patch tokens are compared (official code)."""
        if self.hparams.get("token_distill_cls", False):
            return 0
        return int(getattr(self.model, "num_prefix_tokens", 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        terms = self.losses(self.forward_train(x), self.forward_teacher(x), batch)
        loss = torch.stack(list(terms.values())).sum()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_top1.update(self(x), y)
        self.log("val/top1", self.val_top1, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(x))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_top1.update(self(x), y)
        self.log("test/top1", self.test_top1, on_epoch=True, on_step=False, batch_size=len(x))

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold the student only (the frozen teacher is cached separately, by its hash) and the
        backbone's architecture (:func:`bench_suite.backbones.backbone_spec`), so that
        ``Method.load_from_checkpoint(path)`` rebuilds it."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint[BACKBONE_KEY] = backbone_spec(self.model)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> "BenchModule":
        """Lightning's ``load_from_checkpoint``; without ``backbone=`` the backbone is rebuilt from the
        architecture the checkpoint stores (random weights, then the checkpoint's), and ``teacher`` defaults
        to ``None``: ``EViT.load_from_checkpoint("last.ckpt")`` just works.

        Raises:
            ValueError: for a checkpoint that does not say its backbone (made before bench_suite stored it):
                pass ``backbone=`` then.
        """
        if kwargs.get("backbone") is None:
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            spec = ckpt.get(BACKBONE_KEY) if isinstance(ckpt, dict) else None
            if spec is None:
                raise ValueError(f"{checkpoint_path} does not record its backbone; pass backbone=")
            kwargs["backbone"] = backbone_from_spec(spec)
        kwargs.setdefault("teacher", None)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming with a teacher: fill the teacher entries from the teacher given to ``__init__``."""
        if self.teacher is not None:
            state = checkpoint["state_dict"]
            for k, v in self.teacher.state_dict().items():
                state.setdefault(f"teacher.{k}", v)

    # ---------------------------------------------------------------- optimisation
    def global_batch(self) -> int | None:
        """Images per optimiser step over all processes: the training loader's batch (per process) x world size
        x accumulated batches, read from the attached Trainer (its training loader once the fit has set it
        up, else the datamodule's ``batch_size`` taken as per process); ``None`` without them."""
        trainer = self._trainer
        if trainer is None:
            return None
        loader = getattr(trainer, "train_dataloader", None)
        size = getattr(loader, "batch_size", None)
        if size is None:
            size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if size is None:
            return None
        return int(size) * int(trainer.world_size) * int(trainer.accumulate_grad_batches)

    def lr_scale(self) -> float:
        """The factor of DeiT's linear scaling rule, ``global_batch / lr_batch`` (1.0 with ``lr_batch=None`` or
        no Trainer)."""
        lr_batch = self.hparams.get("lr_batch")
        batch = self.global_batch()
        return 1.0 if lr_batch is None or batch is None else batch / float(lr_batch)

    def configure_optimizers(self) -> Any:
        """AdamW over :meth:`param_groups` with a linear warm-up and a cosine decay per step to ``min_lr``.
        Each group's peak learning rate is its own ``lr`` (default ``hparams.lr``) x :meth:`lr_scale`, except
        groups that set ``"lr_scaled": False`` (an absolute learning rate). The peaks are kept in
        ``self.peak_lrs`` (one per group) and re-applied when training starts (see :meth:`on_train_start`)."""
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scale = self.lr_scale()  # after the line above: the fit's training loader is set up by then
        groups = []
        for g in self.param_groups():
            g = dict(g)
            lr = float(g.get("lr", hp.lr))
            g["lr"] = lr * scale if g.pop("lr_scaled", True) else lr
            groups.append(g)
        self.peak_lrs = [g["lr"] for g in groups]
        self.lr_peak = hp.lr * scale  # the backbone's peak and the batch it is for, reported with the row
        self.lr_global_batch = self.global_batch()
        opt = torch.optim.AdamW(groups, lr=self.lr_peak)
        warmup = int(hp.warmup_frac * total)
        floor = hp.min_lr / hp.lr if hp.lr > 0 else 0.0  # scaled with the peak: the same schedule shape

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """Re-apply this run's peak learning rates to a restored optimiser and scheduler: a run resumed from
        a checkpoint another configuration saved (a shared prefix, :meth:`shared_prefix`, e.g. one that differs
        only in the backbone's learning rate while the backbone was frozen) trains on with its own
        schedule. A run resumed from its own checkpoint is unchanged (the same peaks)."""
        peaks = getattr(self, "peak_lrs", None)
        if not peaks or self._trainer is None or not self.trainer.optimizers:
            return
        opt = self.trainer.optimizers[0]
        configs = self.trainer.lr_scheduler_configs
        if len(opt.param_groups) != len(peaks):
            return
        sched = configs[0].scheduler if configs else None
        for i, (group, peak) in enumerate(zip(opt.param_groups, peaks)):
            group["initial_lr"] = peak
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                sched.base_lrs[i] = peak
                group["lr"] = peak * sched.lr_lambdas[i](sched.last_epoch)

    # ---------------------------------------------------------------- reporting
    def token_pruning_stages(self) -> tuple[int, ...] | None:
        """Block indices where this method prunes tokens (EViT, DynamicViT); ``None`` for methods
        that keep every token. Used for the paper's FLOP convention."""
        return None

    def paper_mhsa_flops(self) -> float | None:
        """MHSA FLOPs per image (1 MAC = 1 FLOP) under the paper's hand-counting convention for the
        token-pruning rows (:func:`bench_suite.flops.token_pruning_paper_flops` on this backbone's
        geometry and :meth:`token_pruning_stages`); ``None`` where the measured count is the only count
        (methods that keep every token, and keep rate 1.0)."""
        stages = self.token_pruning_stages()
        if stages is None or self.keep_rate >= 1.0:
            return None
        from bench_suite.backbones import num_tokens
        from bench_suite.flops import token_pruning_paper_flops

        return float(token_pruning_paper_flops(len(self.model.blocks), num_tokens(self.model),
                                               int(self.model.embed_dim), self.keep_rate, stages))

    def sparsity_report(self) -> dict[str, float]:
        """Method-specific measured statistics to store with a result (e.g. sparsity ratios); declare their
        units and table columns in the class attribute ``reported_metrics`` (:class:`bench_suite.registry.Metric`)."""
        return {}

    # ---------------------------------------------------------------- hooks for the figures and the speed benchmark
    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Attention maps of one eval-mode forward on ``images [B, C, H, W]``, per layer: named maps
        ``[B, H, N_l, N_l]`` (query rows by key columns) plus ``positions`` (original token index of each
        token, ``[B, N_l, N0]`` soft one-hot, or ``None`` when no token was pruned or merged) and ``n``
        (``N_l``). This default gives ``"full"``, the dense ``softmax(q k^T / sqrt(d))`` of each block's own
        queries and keys; methods add or replace maps (e.g. a connectivity mask, sparse or low-rank
        attention). Used by ``visualize`` and the paper's figures."""
        out = []
        for blk, x in zip(self.model.blocks, attention_inputs(self.model, images)):
            q, k, _ = split_heads(blk.attn, x)
            out.append({"full": attention_probs(blk.attn, q, k), "positions": None, "n": int(x.shape[1])})
        return out

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Context in which the forward skips bookkeeping that is not part of the method (statistics kept only
        for :meth:`sparsity_report`, e.g. counting zero coefficients), entered by ``speed`` and by the Pareto
        table's timing pass around the timed calls so that they time the method alone. Outputs are unchanged;
        the default skips nothing."""
        yield

    def prepare_train_timing(self) -> dict[str, Any]:
        """Called by ``speed --train`` before a training step is timed (outside a Trainer): put the module in the
        state of its main training phase, the one most of its optimiser steps run in. Returns what it set,
        recorded in the row's configuration (``{}``, the default: nothing to set)."""
        return {}

    def prepare_timing(self, images: torch.Tensor, **settings: Any) -> dict[str, Any]:
        """Called by ``speed`` on a model with random weights before it is timed: a method whose cost depends
        on trained values (e.g. the density of learned sparse coefficients) may emulate them here from the
        ``settings`` it knows (``coef_density``, ...) and ignores the others. Returns what it set, recorded
        in the row's configuration (``{}``: nothing)."""
        return {}

    @classmethod
    def core_candidates(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_rate: float, impl: str,
                        seed: int, **settings: Any) -> dict[str, Any]:
        """Callables that ``speed --core`` times beside dense attention on ``q, k, v [B, H, N, d]``: name ->
        zero-argument callable (the method's attention core at ``keep_rate`` with implementation ``impl``,
        and any part of it worth timing alone). ``{}`` (the default): nothing beyond the whole model."""
        return {}
