"""Lightning plumbing shared by the teacher and every method run: one Trainer recipe, resumable."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

__all__ = ["TrainSettings", "make_trainer", "fit_and_test", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class _FiniteLoss(Callback):
    """Stops training with :class:`NonFiniteLossError` as soon as the loss is NaN or infinite."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step}")


@dataclass
class TrainSettings:
    """How a configuration is trained.

    Attributes:
        epochs: passes over the training split (0: evaluate only).
        devices: Lightning ``devices`` (``"auto"``, an int or a list).
        num_nodes: Lightning ``num_nodes``.
        strategy: Lightning ``strategy`` (``"auto"``, ``"ddp"``, ...).
        accelerator: Lightning ``accelerator``.
        progress: show progress bars.
        limit_train_batches: Lightning's limit (fraction or count), for quick runs.
        checkpoint_every_n_steps: also save ``last.ckpt`` every this many steps (mid-epoch resume).
    """

    epochs: int = 1
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    progress: bool = True
    limit_train_batches: float | int = 1.0
    checkpoint_every_n_steps: int | None = 50
    extra: dict[str, Any] = field(default_factory=dict)


def make_trainer(run_dir: str | Path, settings: TrainSettings) -> pl.Trainer:
    """A Trainer writing CSV logs and a resumable ``checkpoints/last.ckpt`` under ``run_dir``."""
    run_dir = Path(run_dir)
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=settings.checkpoint_every_n_steps)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`isinstance.*LeafSpec.*")
    return pl.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        max_epochs=settings.epochs,
        limit_train_batches=settings.limit_train_batches,
        callbacks=[ckpt, _FiniteLoss()],
        logger=CSVLogger(str(run_dir), name="logs", version=""),
        enable_progress_bar=settings.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=str(run_dir),
        **settings.extra,
    )


def fit_and_test(module: pl.LightningModule, datamodule: pl.LightningDataModule, run_dir: str | Path,
                 settings: TrainSettings) -> dict[str, float]:
    """Train ``module`` (resuming from ``run_dir/checkpoints/last.ckpt`` if it exists), then test it.

    Returns:
        Logged metrics after testing, e.g. ``{"test/top1": 0.91, "val/top1": 0.90}`` (fractions).

    Raises:
        NonFiniteLossError: if the loss becomes NaN or infinite.
    """
    trainer = make_trainer(run_dir, settings)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if settings.epochs > 0:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("train")}
    tested = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(f"non-finite evaluation metrics {metrics}")
    return metrics
