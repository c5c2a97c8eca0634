"""The benchmark sweep of ``run``: teacher, fine-tuning, evaluation, FLOPs, speed, one row per configuration.

Its parts live beside it: :mod:`bench_suite.plan` (options, the plan of configurations, validation),
:mod:`bench_suite.distributed` (DDP processes), :mod:`bench_suite.locks` (who trains what),
:mod:`bench_suite.teacher` (the teacher), :mod:`bench_suite.training` (one fit, resumable) and
:mod:`bench_suite.report` (tables and plots afterwards). It names no method: what a method measures
(its declared metrics and units) and needs (its DDP strategy) comes through the registry.

The protocol, for each (method, keep rate):

1. the full-attention teacher of the profile/dataset/seed is resolved (``--teacher``, cache, shipped,
   or trained) and its test top-1 is measured (stored as the ``teacher`` row);
2. the method's LightningModule is built on a copy of the teacher's backbone (the initialisation of
   every method, as the paper fine-tunes from a pretrained ViT) with the teacher for distillation;
3. it is fine-tuned for the same number of epochs on the same training images as every other
   method (``--epochs``, ``--train-subset``), resuming from its last checkpoint if interrupted; a method
   whose official recipe adds a stage before that fine-tuning (e.g. a predictor-only phase) trains
   the epochs its ``train_epochs(epochs)`` returns, recorded in the row (``train_steps``);
4. test top-1 on the held-out test set, MHSA FLOPs on real test images (fvcore, measured; plus the
   paper's convention where it differs), eval latency/throughput and peak memory are measured;
5. one row goes into the results store; a configuration already stored is skipped (``--force``
   re-runs it). Finally the Pareto table and plot are rewritten from the store.

Nothing lost, nothing silent: all input is validated before anything is trained or written (one-line
errors); a killed sweep started again re-runs only unfinished configurations, resuming from their own
checkpoints (:mod:`bench_suite.training`); a row is written whole, once per configuration key; sweeps
sharing a results folder never train one configuration at the same time (:class:`ConfigLock`); a NaN
loss fails only its configuration (a ``failed`` row, exit status 1). Under DDP every process runs the
sweep, rank 0 decides, locks and writes (``--devices``/``--num-nodes``/``--strategy ddp``, srun).
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch

from bench_suite import signals
from bench_suite.checkpoints import run_dir as checkpoint_run_dir
from bench_suite.distributed import (broadcast, ddp_strategy_for, die_with_launcher, is_rank_zero_process,
                                     processes_external, start_processes)
from bench_suite.errors import UserError
from bench_suite.flops import count_flops
from bench_suite.locks import ConfigLock
from bench_suite.measure import EVAL_TIMING, measure_latency, peak_memory_mib
from bench_suite.options import parse_hparams, parse_keep_rates
from bench_suite.backbones import get_profile
from bench_suite.plan import (RunOptions, check_output, make_datamodule, recipe_epochs, recipe_settings, resolve_plan,
                              setup_data, train_config, train_settings, validate_plan)
from bench_suite.registry import MethodSpec, declared_metrics, default_methods, parse_methods, reference_method
from bench_suite.store import STORE_FILENAME, ResultsStore, config_key
from bench_suite.teacher import load_given_teacher, resolve_teacher_locked
from bench_suite.training import NonFiniteLossError, TrainSettings, fit_and_test, install_shared_prefix
from bench_suite.versions import versions

__all__ = ["UNITS", "run_benchmark", "measure_module", "row_units"]

FLOPS_IMAGES = 8       # real test images the FLOPs are counted on (per-image average)
SPEED_BATCH = EVAL_TIMING["batch"]  # batch size of the latency measurement
# Units of the metrics the runner measures for every row. MHSA FLOPs follow the paper: 1 MAC = 1 FLOP, only
# Q K^T and A V (plus whatever a method computes inside its attention module instead), per image; latency is
# per batch. Methods declare the units of their own metrics (``reported_metrics``, see bench_suite.registry).
UNITS = {
    "top1": "%", "val_top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs",
    "mhsa_proj_mflops": "MFLOPs", "total_gflops": "GFLOPs", "img_per_s": "img/s", "latency_ms_median": "ms",
    "latency_ms_p90": "ms", "peak_mib": "MiB", "train_seconds": "s", "train_steps": "optimiser steps",
    "resumed_from_step": "optimiser steps", "shared_prefix_epochs": "epochs",
    "lr_peak": "learning rate", "global_batch": "images per optimiser step",
}


def row_units(metrics: dict[str, Any], method: str | None = None) -> dict[str, str]:
    """The units of a row's metrics: the runner's own (:data:`UNITS`) and those ``method`` declares."""
    known = {**UNITS, **{m.name: m.unit for m in declared_metrics([method] if method else []).values()}}
    return {k: known[k] for k in metrics if k in known}


def _teacher_top1(teacher: torch.nn.Module, dm, run_dir: Path, settings: TrainSettings) -> float:
    module = reference_method().factory(copy.deepcopy(teacher), distill_logits=0.0)
    metrics = fit_and_test(module, dm, run_dir, TrainSettings(**{**settings.__dict__, "epochs": 0}))
    return 100.0 * metrics["test/top1"]


def measure_module(module, dm, n_flops: int = FLOPS_IMAGES, speed_batch: int = SPEED_BATCH) -> dict[str, Any]:
    """FLOPs (on real test images), latency/throughput and peak memory of a trained module's model."""
    model = module.model.cpu().eval()
    images, _ = dm.sample_batch(n_flops, "test")
    report = count_flops(model, images)
    out: dict[str, Any] = {
        "mhsa_mflops": report.mhsa_mflops,
        "mhsa_proj_mflops": report.mhsa_proj_mflops,
        "total_gflops": report.total_gflops,
        "mhsa_mflops_paper": None,
    }
    paper = module.paper_mhsa_flops()
    if paper is not None:
        out["mhsa_mflops_paper"] = paper / 1e6
    batch, _ = dm.sample_batch(speed_batch, "test")
    out.update({k: v for k, v in measure_latency(model, batch, warmup=EVAL_TIMING["warmup"],
                                                 repeats=EVAL_TIMING["repeats"]).items()
                if k in ("latency_ms_median", "latency_ms_p90", "img_per_s")})
    out["peak_mib"] = peak_memory_mib(model, batch)
    out.update({k: float(v) for k, v in module.sparsity_report().items()})
    return out


def _base_row(spec_name: str, keep_rate: float, opts: RunOptions, config: dict[str, Any], key: str) -> dict[str, Any]:
    return {"key": key, "method": spec_name, "keep_rate": keep_rate, "profile": opts.profile.name,
            "dataset": config["data"]["dataset"], "seed": config["seed"], "config": config, "units": {},
            "versions": versions(), "git": versions()["git"]}


def run_benchmark(cfg: Any, log=print, plan: Any = None, skip_infeasible: bool = False) -> list[dict[str, Any]]:
    """Run every (method, keep rate) configuration of ``cfg`` not yet in the store.

    Args:
        cfg: the ``run`` options.
        log: progress printer (only rank 0 of a multi-process run prints).
        plan: run exactly these configurations instead of ``cfg.methods`` x keep rates: entries
            ``(method, keep_rate)`` or ``(method, keep_rate, overrides)`` (see :func:`resolve_plan`). The
            overrides go to the method's factory and into the configuration key (``config["hparams"]``).
        skip_infeasible: leave out (saying so) the plan's configurations whose keep rate keeps fewer than
            one of the profile's tokens, instead of refusing the run (``--table N``: the paper's keep rates
            were chosen for 197 tokens; on a smaller profile the smallest ones do not exist).

    Everything is validated first (methods, keep rates against the profile's token count, every
    configuration's module, profile, processes, data, a given teacher, output folder, results store);
    nothing is trained or written before. Then, per configuration: skipped if its row is in the store
    (unless ``--force``), skipped for now if another process holds its lock (trained by that process;
    this sweep comes back to it at the end and waits), else trained (resuming from its checkpoint),
    measured and stored as one row (``status`` ``ok`` or ``failed``). Multi-process (DDP) runs start
    their processes here; every rank runs the sweep, rank 0 decides, locks and writes.

    Returns:
        The rows written in this invocation (on rank 0; other ranks get ``[]``).

    Raises:
        UserError, UnknownMethodError, UnknownProfileError, DataError, TeacherError, StoreCorruptError:
            for bad input, before anything is trained or written.
    """
    if plan is None:
        specs: list[MethodSpec] = parse_methods(cfg.methods) if cfg.methods else default_methods()
        rates_override = parse_keep_rates(cfg.keep_rates)
        # a method without a keep rate (full attention: grid (1.0,)) runs once, at 1.0, whatever --keep-rates says
        plan = [(spec, r) for spec in specs
                for r in (spec.keep_rates if spec.keep_rates == (1.0,) else (rates_override or spec.keep_rates))]
    profile = get_profile(cfg.profile)
    plan = resolve_plan(plan, profile)
    extra = parse_hparams(getattr(cfg, "hparams", None), [spec.name for spec, _, _ in plan])
    if extra:  # the user's settings win over a plan's (e.g. --table N with --hparams)
        plan = resolve_plan([(spec, r, ov | extra.get(spec.name, {})) for spec, r, ov in plan], profile)

    # ---------------------------------------------------------------- 1. validate (nothing trained or written)
    opts = RunOptions(cfg)
    settings = train_settings(cfg, opts.epochs)
    fabric, world = start_processes(settings)
    if world > 1:
        die_with_launcher()
        if not is_rank_zero_process():
            log = _quiet  # a process that is not rank 0: rank 0 says everything
        if settings.strategy == "auto":
            settings = replace(settings, strategy="ddp")
    if opts.batch_size % world:
        raise UserError(f"--batch-size {opts.batch_size} is not divisible by the {world} processes (the global "
                          f"batch is split evenly across them); choose a multiple of {world}")
    plan = validate_plan(plan, opts.profile, skip_infeasible=skip_infeasible, log=log)
    dm = make_datamodule(cfg, train_subset=opts.train_subset, batch_size=opts.batch_size)
    setup_data(cfg, dm)
    given = None if cfg.teacher is None else load_given_teacher(
        cfg.teacher, opts.profile.name, dm, opts.seed, opts.output, settings, log)
    store_path = opts.output / STORE_FILENAME
    # an existing store is opened first: StoreCorruptError for a damaged/foreign file, which stays untouched
    store = ResultsStore(store_path) if store_path.exists() else None
    check_output(opts.output)
    if store is None:  # (not `store or ...`: an empty store has len 0)
        store = ResultsStore(store_path)
    data = dm.describe()

    # ---------------------------------------------------------------- 2. teacher, 3. processes
    teacher, tinfo = given or resolve_teacher_locked(opts.profile.name, dm, opts.seed, opts.output, settings,
                                                     external=processes_external(world), log=log)
    dm.batch_size = opts.batch_size
    rank = 0
    if fabric is not None:
        fabric.launch()  # starts the other local processes (they re-run this command) or joins srun's
        rank = fabric.global_rank
    say = log if rank == 0 else _quiet
    say(f"bench_suite: {len(plan)} configuration(s) on profile {opts.profile.name}, data {data['dataset']}, "
        f"{opts.epochs} epoch(s) on {opts.train_subset or 'all'} training images, "
        + (f"seed {opts.seed}" if opts.seeds == [opts.seed] else
           f"seeds {','.join(map(str, opts.seeds))} (teacher of seed {opts.seed})")
        + (f", {world} processes ({settings.strategy})" if world > 1 else ""))
    say(f"teacher: {tinfo['source']} {tinfo['path']} (sha256 {tinfo['sha256'][:12]})")
    if "resized" in data:
        say(f"data: {data['dataset']} images resized {data['resized']} for profile {opts.profile.name}")

    # ---------------------------------------------------------------- 4. the sweep
    jobs: list[_Job] = []
    base = {"profile": opts.profile.name, "data": data, "data_files": dm.fingerprint(), "seed": opts.seed,
            "teacher": tinfo["sha256"]}
    if settings.extra:  # --precision, --accumulate-grad-batches, --gradient-clip-val away from their defaults
        base["trainer"] = dict(settings.extra)
    if tinfo.get("provenance"):  # timm weights or a timm-format file: name and tag, or file and sha256
        base["teacher_provenance"] = tinfo["provenance"]
    teacher_cfg = {"kind": "teacher-eval", **base}
    jobs.append(_Job("teacher", "teacher", 1.0, {}, teacher_cfg, config_key(teacher_cfg)))
    runs = [(seed, entry) for seed in opts.seeds for entry in plan]  # seed-major: a full sweep per seed, in order
    for i, (seed, (spec, rate, overrides)) in enumerate(runs, 1):
        config = train_config(spec, rate, overrides, {**base, "seed": seed}, profile=opts.profile,
                              epochs=recipe_epochs(spec, opts.profile, opts.epochs, cfg.epochs is not None))
        tag = (f"[{i}/{len(runs)}] {spec.name} keep {rate:g}" + "".join(f", {k}={v!r}" for k, v in overrides.items())
               + (f", seed {seed}" if len(opts.seeds) > 1 else ""))
        jobs.append(_Job(tag, spec, rate, overrides, config, config_key(config)))

    sweep = _Sweep(cfg, opts, settings, store, dm, teacher, rank, world, say)
    try:
        deferred = [job for job in jobs if not sweep.run(job, wait=False)]
        for job in deferred:
            sweep.run(job, wait=True)
    except (KeyboardInterrupt, SystemExit) as e:  # a signal (Lightning turns it into sys.exit(1) inside a fit)
        if isinstance(e, SystemExit) and signals.received() is None:
            raise
        raise signals.Interrupted(f"{len(sweep.written)} of {len(jobs)} configuration(s) written by this run "
                                  f"({sweep.skipped} already in the store)") from None
    if sweep.failures:
        say(f"{sweep.failures} configuration(s) failed; their rows have status 'failed' and the error; "
            f"re-running the same command retries them")
    if rank == 0:  # rank 0 alone times every finished row, after the other ranks are done training
        _speed_pass(opts, dm, teacher, bool(sweep.written), say)
    return sweep.written


def _speed_pass(opts: RunOptions, dm: Any, teacher: torch.nn.Module, wrote: bool, say: Callable[[str], None]) -> None:
    """The table's speed columns from one interleaved timing pass (:func:`bench_suite.speed_pass.timing_pass`),
    when this run wrote rows or the table's rows do not share one pass yet."""
    from bench_suite.speed_pass import timing_pass

    dataset = dm.describe()["dataset"]
    with ResultsStore(opts.output / STORE_FILENAME) as store:
        rows = store.rows(profile=opts.profile.name, dataset=dataset, status="ok")
    shared = "speed_pass" in rows.columns and rows["speed_pass"].notna().all() and rows["speed_pass"].nunique() == 1
    if rows.empty or (shared and not wrote):
        return
    batch, _ = dm.sample_batch(SPEED_BATCH, "test")
    timing_pass(opts.output, opts.profile.name, dataset, batch, teacher=teacher, log=say)


def _quiet(msg: str) -> None:
    """The printer of ranks other than 0."""


class _Job:
    """One row of the sweep: the teacher evaluation or one (method, keep rate, overrides) configuration."""

    def __init__(self, tag: str, spec: Any, rate: float, overrides: dict[str, Any], config: dict[str, Any],
                 key: str) -> None:
        self.tag, self.spec, self.rate, self.overrides, self.config, self.key = tag, spec, rate, overrides, config, key

    @property
    def is_teacher(self) -> bool:
        return self.spec == "teacher"

    @property
    def method(self) -> str:
        return "teacher" if self.is_teacher else self.spec.name


class _Sweep:
    """Runs the jobs of one sweep: claims (store + lock, decided by rank 0 and broadcast), trains, measures,
    writes (rank 0), and never leaves a partial or duplicate row: a row is written in one transaction,
    after training and measurement, under the configuration's key, while holding its lock."""

    POLL_SECONDS = 2.0

    def __init__(self, cfg: Any, opts: "RunOptions", settings: TrainSettings, store, dm, teacher, rank: int,
                 world: int, say) -> None:
        from datetime import datetime, timezone

        self.cfg, self.opts, self.settings, self.store, self.dm, self.teacher = cfg, opts, settings, store, dm, teacher
        self.rank, self.world, self.say = rank, world, say
        self.force = bool(cfg.force)
        self.started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        self.written: list[dict[str, Any]] = []
        self.failures = 0
        self.skipped = 0

    # ---------------------------------------------------------------- claiming
    def _finished(self, key: str) -> bool:
        """An ``ok`` row exists (with ``--force``: one written after this sweep started, by another process)."""
        row = self.store.get(key)
        if row is None or row["status"] != "ok":
            return False
        return not self.force or row["created"] >= self.started

    def _claim(self, job: _Job, lock: "ConfigLock") -> str:
        """Rank 0: ``"done"``, ``"busy"`` (another process holds the lock) or ``"run"`` (lock taken)."""
        if self._finished(job.key):
            return "done"
        if not lock.try_acquire():
            return "busy"
        if self._finished(job.key):  # finished by another process between the check and the lock
            lock.release()
            return "done"
        return "run"

    def run(self, job: _Job, wait: bool) -> bool:
        """Run ``job`` unless it is done; returns False if it was left for later (another process holds it)."""
        lock = ConfigLock(self.opts.output / "locks" / f"{job.key}.lock")
        told = False
        while True:
            state = broadcast(self._claim(job, lock) if self.rank == 0 else None)
            if state != "busy":
                break
            doing = "evaluat" if job.is_teacher else "train"
            if not wait:
                self.say(f"{job.tag}: being {doing}ed by another process ({lock.holder()}); coming back to it later")
                return False
            if not told:
                self.say(f"{job.tag}: waiting for the other process {doing}ing it ({lock.holder()})")
                told = True
            time.sleep(self.POLL_SECONDS)
        if state == "done":
            how = "finished by another process" if told or wait else "already in the store"
            self.skipped += 1
            self.say(f"{job.tag}: {how} ({job.key}), skipped")
            return True
        try:
            self._execute(job)
        finally:
            lock.release()
        return True

    # ---------------------------------------------------------------- training
    def _execute(self, job: _Job) -> None:
        opts, key = self.opts, job.key
        run_dir = checkpoint_run_dir(opts.output, job.method, job.rate, key)
        config = {**job.config, "run_dir": str(run_dir), "processes": self.world}
        row = _base_row(job.method, job.rate, opts, config, key)
        start = time.perf_counter()
        if not job.is_teacher:
            self.say(f"{job.tag}: fine-tuning ({run_dir})")
        try:
            metrics = self._teacher_eval(run_dir) if job.is_teacher else self._train(job, run_dir)
            if not job.is_teacher:
                metrics["train_seconds"] = time.perf_counter() - start
            if self.rank == 0 and job.is_teacher:
                self.say(f"teacher top-1 (measured now): {metrics['top1']:.2f}%")
            elif self.rank == 0:
                self.say(f"{job.tag}: top-1 {metrics['top1']:.2f}%, MHSA {metrics['mhsa_mflops']:.3f} MFLOPs"
                         + (f" (resumed from step {metrics['resumed_from_step']})" if metrics["resumed_from_step"]
                            else ""))
            row.update(status="ok", error=None, metrics=metrics, units=row_units(metrics, job.method))
        except NonFiniteLossError as e:
            self.failures += 1
            row.update(status="failed", error=str(e), metrics={})
            self.say(f"{job.tag}: FAILED: {e}")
        except Exception as e:  # noqa: BLE001 - one configuration's bug must not lose the others
            self.failures += 1
            row.update(status="failed", error=f"{type(e).__name__}: {e}", metrics={})
            self.say(f"{job.tag}: FAILED with an unexpected error:\n{traceback.format_exc()}")
            if self.world > 1:  # the other ranks may be stuck in a collective: stop the sweep, loudly
                self._put(row)
                raise
        self._put(row)

    def _put(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            self.store.put(row)
            self.written.append(row)

    def _teacher_eval(self, run_dir: Path) -> dict[str, Any]:
        top1 = _teacher_top1(self.teacher, self.dm, run_dir, self.settings)
        if self.rank != 0:
            return {"top1": top1}
        return {"top1": top1, **measure_module(_TeacherModule(self.teacher), self.dm)}

    def _shared_prefix(self, job: _Job, module: Any, epochs: int) -> tuple[Path, int] | None:
        """``(file, epochs)`` of the job's shared prefix (:meth:`methods.base.BenchModule.shared_prefix`): keyed
        by its configuration without the hyperparameters the prefix does not depend on, under
        ``<output>/prefixes/``; ``None`` when the method shares nothing or trains no further than it."""
        declared = module.shared_prefix()
        if not declared or epochs <= declared[0]:
            return None
        n, free = declared
        config = copy.deepcopy(job.config)
        for name in free:
            config.get("hparams", {}).pop(name, None)
            config.get("overrides", {}).pop(name, None)
            config.pop(name, None)
        if "overrides" in config and not config["overrides"]:  # only free settings were overridden
            del config["overrides"]
        config["shared_prefix_epochs"] = int(n)
        config["train_epochs"] = int(epochs)  # the learning-rate schedule spans the whole run
        return self.opts.output / "prefixes" / f"{job.spec.name}-{config_key(config)}.ckpt", int(n)

    def _train(self, job: _Job, run_dir: Path) -> dict[str, Any]:
        seed = int(job.config["seed"])  # the fine-tuning seed (--seeds), not the teacher's
        pl.seed_everything(seed, workers=True, verbose=False)
        backbone = copy.deepcopy(self.teacher).train().requires_grad_(True)  # the teacher itself stays frozen
        settings_ = recipe_settings(job.spec, self.opts.profile) | job.overrides  # the paper recipe, then the user's
        module = job.spec.factory(backbone, keep_rate=job.rate, teacher=self.teacher, **settings_)
        settings = replace(self.settings, seed=seed, epochs=module.train_epochs(int(job.config["epochs"])),
                           strategy=ddp_strategy_for(module, self.settings.strategy))
        prefix = self._shared_prefix(job, module, settings.epochs)
        shared = False
        if prefix is not None and self.rank == 0 and not self.force:
            shared = install_shared_prefix(prefix[0], run_dir, job.key, dict(module.hparams))
            if shared:
                self.say(f"{job.tag}: its first {prefix[1]} epoch(s) do not depend on "
                         f"{', '.join(module.shared_prefix()[1])}: resuming from the shared {prefix[0]}")
        metrics = fit_and_test(module, self.dm, run_dir, settings, run_key=job.key, fresh=self.force, log=self.say,
                               save_prefix=prefix)
        out: dict[str, Any] = {
            "top1": 100.0 * metrics["test/top1"],
            "val_top1": 100.0 * metrics["val/top1"] if "val/top1" in metrics else None,
            "train_steps": int(metrics["global_step"]), "resumed_from_step": int(metrics["resumed_step"]),
        }
        if getattr(module, "lr_peak", None) is not None:  # DeiT's scaling rule, resolved (methods.base)
            out["lr_peak"] = float(module.lr_peak)
            out["global_batch"] = module.lr_global_batch
        if prefix is not None:  # epochs taken from the shared prefix (0: this run trained them, and saved them)
            out["shared_prefix_epochs"] = prefix[1] if shared else 0
        if self.rank == 0:
            out.update(measure_module(module, self.dm))
        return out


class _TeacherModule:
    """Minimal module view of the teacher for :func:`measure_module` (no paper convention, no sparsity)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def paper_mhsa_flops(self) -> None:
        return None

    def sparsity_report(self) -> dict[str, float]:
        return {}
