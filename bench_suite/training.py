"""Lightning plumbing shared by the teacher and every method run: one Trainer recipe, resumable, multi-process.

What :func:`fit_and_test` guarantees:

* **Resumable.** ``<run_dir>/checkpoints/last.ckpt`` is written every ``checkpoint_every_n_steps``
  optimiser steps and at the end of every epoch, atomically (temporary file in the same folder,
  ``fsync``, ``os.replace``: a kill at any moment leaves the previous checkpoint or the new one, never a
  torn file). A later call with the same ``run_dir`` resumes from it, mid-epoch included: the training
  order is a seeded permutation per epoch (:class:`ResumableSampler`) whose position is saved in the
  checkpoint, so the resumed epoch sees exactly the images the interrupted one had not seen yet.
* **Only its own checkpoint.** Every checkpoint is stamped with the run's configuration key and the
  module's hyperparameters; a checkpoint that is unreadable, stamped for another configuration or
  holding other hyperparameters is never resumed: it is moved to ``<run_dir>/rejected/`` (kept for
  inspection) and training starts from scratch, saying so. ``fresh=True`` (the CLI's ``--force``)
  discards the checkpoints and starts from scratch.
* **Fails loudly.** A NaN or infinite training loss stops the run with :class:`NonFiniteLossError`
  (under DDP the decision is reduced across ranks, so every rank stops at the same step).
* **Deterministic** on the CPU (``Trainer(deterministic=True)``, seeded order): the same seed gives the
  same weights and metrics.
* **Multi-process.** Under DDP (``devices``/``num_nodes``/``strategy``), the global batch stays the
  dataset's batch size: each of the ``W`` processes loads ``batch / W`` images per step from its own
  shard of the same permutation, so one optimiser step sees the same images as in one process.
"""
from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from bench_suite.compiling import CompileModel
from bench_suite.distributed import broadcast, world_info
from bench_suite.logs import make_loggers, progress_callback

__all__ = ["TrainSettings", "make_trainer", "fit_and_test", "NonFiniteLossError", "AtomicCheckpointIO",
           "ResumableSampler", "inspect_checkpoint", "STAMP_KEY"]

STAMP_KEY = "bench_suite_run"  # checkpoint entry naming the configuration the checkpoint belongs to


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------- callbacks

class _FiniteLoss(Callback):
    """Stops training with :class:`NonFiniteLossError` as soon as the loss is NaN or infinite on any rank
    (checked before the step's checkpoint is written, so no checkpoint holds the diverged state)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            everywhere = trainer.strategy.reduce_boolean_decision(finite, all=True)
        else:
            everywhere = finite
        if not everywhere:
            value = f"{loss.item()}" if not finite else "non-finite on another rank"
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                f"lower the learning rate or check the method's losses")


class _RunStamp(Callback):
    """Stamps every checkpoint with the run's configuration key, and keeps the training sampler's
    position up to date before the checkpoint callbacks (which Lightning runs last) save it."""

    def __init__(self, run_key: str | None, sampler: "ResumableSampler | None") -> None:
        self.run_key = run_key
        self.sampler = sampler

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.sampler is not None:
            self.sampler.batches_done = batch_idx + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is not None:
            self.sampler.epoch_finished()  # the epoch-end checkpoint resumes at the next epoch's start

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[STAMP_KEY] = {"key": self.run_key, "format": 1}


# ----------------------------------------------------------------------------------------- checkpoints

class _EpochEndCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch, and nothing else.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last`` at an epoch end only together with a
    top-k file; this one keeps a single file. Being a ``ModelCheckpoint``, it runs where Lightning runs
    checkpoint callbacks: after the module's own epoch-end hook and the other callbacks.
    """

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=False, every_n_epochs=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            trainer.save_checkpoint(Path(self.dirpath) / "last.ckpt")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint I/O, made atomic and durable on local file systems.

    The checkpoint is written to a temporary file next to its destination, flushed and ``fsync``-ed,
    then renamed over the destination with ``os.replace`` (atomic on POSIX). A process killed at any
    moment leaves either the previous complete file or the new complete file, plus at most a stray
    ``.<name>.tmp-<pid>`` that the next save of that process replaces.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


class _SavePrefix(Callback):
    """Copies the training state at the end of epoch ``epochs`` to ``path`` (once; atomic), the shared
    prefix other configurations resume from (see :func:`install_shared_prefix`). Placed after
    :class:`_RunStamp`, so the copy holds the finished epoch's data position."""

    def __init__(self, path: Path, epochs: int) -> None:
        self.path, self.epochs = Path(path), int(epochs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs and not self.path.exists() and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


def install_shared_prefix(prefix: str | Path, run_dir: str | Path, run_key: str | None,
                          hparams: dict[str, Any]) -> bool:
    """Start a run from a shared prefix: copy the checkpoint ``prefix`` (the state after the epochs that do not
    depend on the hyperparameters this run differs in, :meth:`methods.base.BenchModule.shared_prefix`) to
    ``run_dir/checkpoints/last.ckpt``, stamped with this run's key and hyperparameters, unless the run has a
    checkpoint of its own. Returns whether it did.

    Raises:
        OSError: if the prefix cannot be read or the copy written.
    """
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if last.exists() or not Path(prefix).is_file():
        return False
    ckpt = torch.load(prefix, map_location="cpu", weights_only=False)
    ckpt[STAMP_KEY] = {"key": run_key, "format": 1, "shared_prefix": Path(prefix).name}
    ckpt["hyper_parameters"] = dict(hparams)
    AtomicCheckpointIO().save_checkpoint(ckpt, last)
    return True


def inspect_checkpoint(path: str | Path, run_key: str | None = None,
                       hparams: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """Check that the Lightning checkpoint ``path`` can be resumed by this run.

    Args:
        path: the checkpoint file.
        run_key: the configuration key the checkpoint must be stamped with (``None``: not checked).
        hparams: the hyperparameters the checkpoint must hold (``None``: not checked).

    Returns:
        ``(info, None)`` with ``info = {"epoch", "global_step", "key"}`` when it can be resumed, else
        ``(None, reason)`` with a one-line reason (unreadable, another configuration, other
        hyperparameters, not a Lightning training checkpoint).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to read means "cannot resume"
        return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        return None, "not a Lightning training checkpoint"
    stamp = ckpt.get(STAMP_KEY) or {}
    if run_key is not None and stamp.get("key") != run_key:
        return None, f"made for configuration {stamp.get('key')!r}, not {run_key!r}"
    if hparams is not None:
        saved = dict(ckpt.get("hyper_parameters") or {})
        want = dict(hparams)
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k, "<missing>") != want.get(k, "<missing>"))
            return None, f"made with other hyperparameters ({', '.join(diff[:4])})"
    loaders = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("state_dict", {}).get("combined_loader") or [None]
    return {"epoch": int(ckpt.get("epoch", 0)), "global_step": int(ckpt.get("global_step", 0)),
            "key": stamp.get("key"), "loader_state": loaders[0]}, None


# ----------------------------------------------------------------------------------------- data order

class ResumableSampler(DistributedSampler):
    """A seeded permutation of the training set per epoch (``seed + epoch``), sharded over the ranks,
    that remembers how many batches of the current epoch were trained.

    It is torch's ``DistributedSampler`` (also with one process, so that one and ``W`` processes see the
    same images per optimiser step: rank ``r`` takes positions ``r, r + W, ...`` of the permutation),
    plus a position: :attr:`batches_done` batches of ``batch_size`` indices of epoch :attr:`epoch`.
    After :meth:`load_state_dict`, the next iteration is of the saved epoch and skips the batches
    already trained.

    :func:`fit_and_test` loads the position from the checkpoint itself, before ``Trainer.fit``: Lightning
    creates the first training iterator while estimating the number of steps for the LR schedule,
    before it restores loader states, so its own restore would come too late.
    """

    def __init__(self, dataset: Any, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.batch_size = int(batch_size)
        self.batches_done = 0
        self._finished = False
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip on the next iteration

    def epoch_finished(self) -> None:
        """Mark the current epoch as fully trained (the position becomes the next epoch's start)."""
        self.batches_done = 0
        self._finished = True

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._finished = False

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None:
            epoch, batches = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[batches * self.batch_size:]
        return iter(indices)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done", ...}``: where training resumes (the next epoch's start after an epoch)."""
        epoch = int(self.epoch) + (1 if self._finished else 0)
        return {"epoch": epoch, "batches_done": int(self.batches_done), "seed": int(self.seed),
                "num_replicas": int(self.num_replicas), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """Continue at ``state``'s position (ignored if it was made with another seed, number of processes
        or batch size: then the epoch restarts with its own permutation)."""
        if not state or state.get("seed") != self.seed or state.get("num_replicas") != self.num_replicas \
                or state.get("batch_size") != self.batch_size:
            return
        self.set_epoch(int(state["epoch"]))
        self.batches_done = int(state["batches_done"])
        self._skip = (self.epoch, self.batches_done) if self.batches_done else None


class _ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints (Lightning restores
    loaders with ``state_dict``/``load_state_dict`` before iterating them)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[union-attr]


def _training_loader(datamodule: pl.LightningDataModule, seed: int, rank: int, world: int) -> DataLoader | None:
    """The datamodule's training loader rebuilt on a :class:`ResumableSampler` with ``batch / world``
    images per process; ``None`` if it is not a map-style DataLoader (then the datamodule's own is used).

    Raises:
        ValueError: if the batch size is not divisible by the number of processes.
    """
    loader = datamodule.train_dataloader()
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    if loader.batch_size % world:
        raise ValueError(f"the batch size {loader.batch_size} is not divisible by the {world} processes: each "
                         f"process takes batch / processes images per step; choose a multiple of {world}")
    per_rank = loader.batch_size // world
    sampler = ResumableSampler(loader.dataset, per_rank, num_replicas=world, rank=rank, seed=seed)
    return _ResumableLoader(loader.dataset, batch_size=per_rank, sampler=sampler, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                            persistent_workers=loader.num_workers > 0, worker_init_fn=loader.worker_init_fn)


# ----------------------------------------------------------------------------------------- trainer

@dataclass
class TrainSettings:
    """How a configuration is trained.

    Attributes:
        epochs: passes over the training split (0: evaluate only).
        devices: Lightning ``devices`` (``"auto"``, an int or a list) per node.
        num_nodes: Lightning ``num_nodes``.
        strategy: Lightning ``strategy`` (``"auto"``, ``"ddp"``, ``"ddp_find_unused_parameters_true"``, ...).
        accelerator: Lightning ``accelerator``.
        progress: show progress (a bar on a terminal; plain lines when the output is a file or a pipe).
        loggers: Lightning loggers to write under ``<run_dir>/logs``: any of :data:`LOGGERS`.
        limit_train_batches: Lightning's limit (fraction or count), for quick runs.
        checkpoint_every_n_steps: also save ``last.ckpt`` every this many optimiser steps (mid-epoch
            resume); it is always saved at the end of every epoch. ``None``: epoch ends only.
        deterministic: Lightning's ``deterministic`` (``True``: deterministic algorithms, error where an
            op has none; ``"warn"``: warn instead; ``False``: off).
        seed: seed of the training order (``None``: the ``PL_GLOBAL_SEED`` set by ``seed_everything``, else 0).
        extra: more ``pl.Trainer`` keyword arguments, and ``compile`` (a ``torch.compile`` mode or ``"none"``,
            see :class:`bench_suite.compiling.CompileModel`).
    """

    epochs: int = 1
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    progress: bool = True
    loggers: tuple[str, ...] = ("csv",)
    limit_train_batches: float | int = 1.0
    checkpoint_every_n_steps: int | None = 50
    deterministic: bool | str = True
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_trainer(run_dir: str | Path, settings: TrainSettings, callbacks: list[Callback] | None = None) -> pl.Trainer:
    """A Trainer writing its logs (``settings.loggers``) and an atomic, resumable ``checkpoints/last.ckpt``
    under ``run_dir``; the training loss is logged every ``log_every_n_steps`` steps and, whatever the run's
    length, once per epoch (``train/loss_epoch``)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    saves: list[Callback] = [_EpochEndCheckpoint(ckpt_dir)]
    if settings.checkpoint_every_n_steps:
        saves.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, enable_version_counter=False,
                                     every_n_train_steps=int(settings.checkpoint_every_n_steps)))
    for pattern in (".*does not have many workers.*", ".*`isinstance.*LeafSpec.*", ".*exists and is not empty.*",
                    ".*dataloader is not resumable.*", ".*Consider setting `persistent_workers=True`.*",
                    ".*deterministic.*CUBLAS.*", ".*The dirpath has changed from.*",  # a shared prefix's copy
                    # the frozen teacher (a submodule for distillation) is in eval mode on purpose
                    r".*module\(s\) in eval mode at the start of training.*"):
        warnings.filterwarnings("ignore", message=pattern)
    extra = dict(settings.extra)
    compile_mode = extra.pop("compile", "none")
    compiling = [CompileModel(compile_mode)] if compile_mode not in (None, "none") else []  # run --compile
    deterministic = settings.deterministic
    if deterministic is True and settings.accelerator not in ("cpu",) and torch.cuda.is_available():
        deterministic = "warn"  # some CUDA kernels (scatter/index_put backward) have no deterministic version
    return pl.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        max_epochs=settings.epochs,
        limit_train_batches=settings.limit_train_batches,
        callbacks=[*(callbacks or []), *compiling, _FiniteLoss(), *saves, *progress_callback(settings.progress)],
        plugins=[AtomicCheckpointIO()],
        logger=make_loggers(run_dir, settings.loggers),
        enable_progress_bar=settings.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        deterministic=deterministic,
        default_root_dir=str(run_dir),
        **extra,
    )


def _print0(msg: str) -> None:
    if world_info()[0] == 0:
        print(msg, flush=True)


def _prepare_checkpoint(run_dir: Path, run_key: str | None, module: pl.LightningModule, fresh: bool,
                        log: Callable[[str], None]) -> tuple[Path | None, dict[str, Any] | None]:
    """Rank 0 decides which checkpoint (if any) to resume from; every rank gets the same answer.

    Returns:
        ``(path or None, info)``.
    """
    rank, _ = world_info()
    decision: tuple[str | None, dict[str, Any] | None] = (None, None)
    if rank == 0:
        ckpt_dir = run_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        if fresh and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
            log(f"discarded the checkpoints of {run_dir} (--force): training from scratch")
        elif last.is_file():
            info, reason = inspect_checkpoint(last, run_key, dict(module.hparams))
            if info is None:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                dest = run_dir / "rejected" / f"last-{stamp}.ckpt"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(last, dest)
                log(f"not resuming from {last}: {reason}; moved it to {dest}, training from scratch")
            else:
                decision = (str(last), info)
    path, info = broadcast(decision)
    return (Path(path) if path else None), info


def fit_and_test(module: pl.LightningModule, datamodule: pl.LightningDataModule, run_dir: str | Path,
                 settings: TrainSettings, run_key: str | None = None, fresh: bool = False,
                 log: Callable[[str], None] | None = None,
                 save_prefix: tuple[Path, int] | None = None) -> dict[str, float]:
    """Train ``module`` (resuming from ``run_dir/checkpoints/last.ckpt`` if it belongs to this run), then
    test it.

    Args:
        module: the LightningModule to train and test.
        datamodule: its data (``setup()`` is called here).
        run_dir: the run's folder (checkpoints, logs).
        settings: how to train.
        run_key: the configuration key stamped into and required of checkpoints (``None``: the
            hyperparameters alone decide whether a checkpoint can be resumed).
        fresh: discard existing checkpoints and train from scratch.
        log: where to report resuming/discarding (default: print on rank 0).
        save_prefix: ``(path, epochs)``: also save the state after ``epochs`` epochs to ``path`` (a shared
            prefix, :func:`install_shared_prefix`; once).

    Returns:
        Logged metrics after testing, e.g. ``{"test/top1": 0.91, "val/top1": 0.90}`` (fractions), plus
        ``global_step`` (optimiser steps at the end) and ``resumed_step`` (the step training resumed
        from, 0 when it started from scratch).

    Raises:
        NonFiniteLossError: if the loss becomes NaN or infinite.
        ValueError: if the batch size is not divisible by the number of processes.
    """
    log = log or _print0
    run_dir = Path(run_dir)
    datamodule.setup("fit")
    resume_from, info = (None, None)
    loader, sampler, stamp = None, None, None
    if settings.epochs > 0:
        resume_from, info = _prepare_checkpoint(run_dir, run_key, module, fresh, log)
        if resume_from is not None:
            log(f"resuming from {resume_from} (epoch {info['epoch']}, global step {info['global_step']})")
        rank, world = world_info()
        seed = settings.seed if settings.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        loader = _training_loader(datamodule, seed, rank, world)
        sampler = loader.sampler if loader is not None else None
        if loader is not None and info is not None:
            loader.load_state_dict(info.get("loader_state"))
    stamp = _RunStamp(run_key, sampler)  # type: ignore[arg-type]
    callbacks: list[Callback] = [stamp]
    if save_prefix is not None:  # every rank: saving a checkpoint synchronises them
        callbacks.append(_SavePrefix(*save_prefix))
    trainer = make_trainer(run_dir, settings, callbacks=callbacks)
    if settings.epochs > 0:
        if loader is not None:
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=datamodule.val_dataloader(),
                        ckpt_path=str(resume_from) if resume_from else None)
        else:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("train")}
    tested = trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)
    metrics.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(f"non-finite evaluation metrics {metrics}")
    metrics["global_step"] = float(trainer.global_step)
    metrics["resumed_step"] = float(info["global_step"]) if info else 0.0
    return metrics
