"""What a training run shows and keeps: Lightning's loggers under ``<run_dir>/logs`` (``--logger``), the
progress display (a bar on a terminal, plain lines in a log file or pipe), and Lightning's per-Trainer
informational lines kept quiet in sweeps."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

__all__ = ["LOGGERS", "make_loggers", "LineProgress", "progress_callback", "LIGHTNING_INFO_LOGGERS",
           "quiet_lightning_info"]


LOGGERS = ("csv", "tensorboard")
"""Loggers ``--logger`` can choose (both Lightning's: ``CSVLogger``, ``TensorBoardLogger``)."""


def make_loggers(run_dir: Path, names: tuple[str, ...]) -> list[Any]:
    """Lightning loggers writing under ``<run_dir>/logs`` (``metrics.csv``; TensorBoard event files).

    Raises:
        ValueError: for a name that is not in :data:`LOGGERS`.
    """
    out: list[Any] = []
    for name in names:
        if name == "csv":
            out.append(CSVLogger(str(run_dir), name="logs", version=""))
        elif name == "tensorboard":
            out.append(TensorBoardLogger(str(run_dir), name="logs", version="", default_hp_metric=False))
        else:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    return out


class LineProgress(ProgressBar):
    """Progress as plain lines, for output that is not a terminal (a log file, a pipe, a SLURM job): about
    ten lines per epoch (``epoch 0: 40/79 steps (51%), 12.3 s, train/loss 0.41``), none of a bar's
    carriage-return frames."""

    def __init__(self, lines_per_epoch: int = 10) -> None:
        super().__init__()
        self.lines_per_epoch = lines_per_epoch
        self._enabled = True
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = trainer.num_training_batches
        every = max(1, math.ceil(total / self.lines_per_epoch)) if math.isfinite(total) else 50
        step = batch_idx + 1
        if not self._enabled or trainer.global_rank != 0 or (step % every and step != total):
            return
        loss = trainer.callback_metrics.get("train/loss")
        share = f" ({100 * step / total:.0f}%)" if math.isfinite(total) else ""
        print(f"epoch {trainer.current_epoch}: {step}/{total} steps{share}, {time.perf_counter() - self._start:.1f} s"
              + ("" if loss is None else f", train/loss {float(loss):.4f}"), flush=True)


def progress_callback(progress: bool) -> list[Callback]:
    """The progress display: Lightning's bar on a terminal, :class:`LineProgress` otherwise, none if off."""
    if not progress:
        return []
    return [] if sys.stdout.isatty() else [LineProgress()]


LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                          "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                          # "`weights_only` was not set, defaulting to `False`." at every checkpoint save
                          "pytorch_lightning.trainer.connectors.checkpoint_connector",
                          "lightning.pytorch.trainer.connectors.checkpoint_connector")


def quiet_lightning_info() -> None:
    """Hide Lightning's per-Trainer informational lines (accelerator availability, tips, "fit stopped", ...),
    which a sweep would print once per configuration; its warnings and errors stay visible. The command
    line calls this; library users keep Lightning's defaults."""
    import logging

    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


