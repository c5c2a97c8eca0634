"""The benchmark runner: teacher, fine-tuning, evaluation, FLOPs, speed, results store, tables.

The protocol, for each (method, keep rate):

1. the full-attention teacher of the profile/dataset/seed is resolved (``--teacher``, cache, shipped,
   or trained) and its test top-1 is measured (stored as the ``teacher`` row);
2. the method's LightningModule is built on a copy of the teacher's backbone (the initialisation of
   every method, as the paper fine-tunes from a pretrained ViT) with the teacher for distillation;
3. it is fine-tuned for the same number of epochs on the same training images as every other
   method (``--epochs``, ``--train-subset``), resuming from its last checkpoint if interrupted;
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
import fcntl
import json
import math
import os
import socket
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bench_suite.errors import UserError
from bench_suite.backbones import get_profile, num_tokens
from bench_suite.registry import MethodSpec, parse_methods
from bench_suite.training import NonFiniteLossError, TrainSettings, fit_and_test
from bench_suite.versions import versions
from datamodules import create_datamodule

__all__ = ["RUN_DEFAULTS", "RunOptions", "run_benchmark", "resolve_plan", "run_from_cli", "make_datamodule", "train_settings",
           "parse_keep_rates", "validate_plan", "setup_data", "ConfigLock", "ddp_strategy_for", "DDP_FIND_UNUSED"]

# Per-profile defaults of the fine-tuning protocol (the run's --epochs/--train-subset override them).
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mini": {"epochs": 1, "train_subset": 10000, "batch_size": 128},
    "tiny": {"epochs": 1, "train_subset": 512, "batch_size": 64},
}
PAPER_DEFAULTS = {"epochs": 30, "train_subset": None, "batch_size": 64}
FLOPS_IMAGES = 8       # real test images the FLOPs are counted on (per-image average)
SPEED_BATCH = 64       # batch size of the latency measurement
# Units of the stored metrics. MHSA FLOPs follow the paper: 1 MAC = 1 FLOP, only Q K^T and A V (plus
# whatever a method computes inside its attention module instead), per image; latency is per batch.
UNITS = {
    "top1": "%", "val_top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs",
    "mhsa_proj_mflops": "MFLOPs", "total_gflops": "GFLOPs", "img_per_s": "img/s", "latency_ms_median": "ms",
    "latency_ms_p90": "ms", "peak_mib": "MiB", "train_seconds": "s", "train_steps": "optimiser steps",
    "resumed_from_step": "optimiser steps",
    # measured by the methods (sparsity_report)
    "coef_sparsity": "fraction", "w_up_sparsity": "fraction", "mask_density": "fraction",
    "attention_budget": "keys per query row", "n_down": "rank", "k": "tokens", "k_over_n": "fraction",
    "tokens_in": "tokens", "token_keep_frac": "fraction", "mean_token_ratio": "fraction",
}



def profile_defaults(profile: str) -> dict[str, Any]:
    get_profile(profile)
    return dict(RUN_DEFAULTS.get(profile, PAPER_DEFAULTS))


def make_datamodule(cfg: Any, train_subset: int | None = None, batch_size: int | None = None):
    """The datamodule for ``cfg.data`` at the profile's resolution and channels."""
    p = get_profile(cfg.profile)
    defaults = profile_defaults(cfg.profile)
    return create_datamodule(cfg.data, data_dir=cfg.data_dir, img_size=p.img_size, in_chans=p.in_chans,
                             batch_size=batch_size or defaults["batch_size"], train_subset=train_subset,
                             num_workers=cfg.num_workers, split_seed=0,
                             augment=not getattr(cfg, "no_augment", False))


def train_settings(cfg: Any, epochs: int) -> TrainSettings:
    every = getattr(cfg, "checkpoint_every", None)
    return TrainSettings(epochs=epochs, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         accelerator=cfg.accelerator, progress=not cfg.no_progress, seed=int(cfg.seed),
                         checkpoint_every_n_steps=TrainSettings.checkpoint_every_n_steps if every is None
                         else (int(every) or None))


def parse_keep_rates(text: str | None) -> list[float] | None:
    """Parse ``--keep-rates 0.7,0.5``.

    Raises:
        UserError: for a value that is not a number in (0, 1].
    """
    if text is None or str(text).strip() == "":
        return None
    rates = []
    for part in str(text).split(","):
        try:
            r = float(part)
        except ValueError:
            raise UserError(f"keep rate {part.strip()!r} is not a number") from None
        if not 0.0 < r <= 1.0 or math.isnan(r):
            raise UserError(f"keep rate {r:g} is outside (0, 1]")
        rates.append(r)
    return rates


def parse_hparams(text: str | None, methods: Any) -> dict[str, dict[str, Any]]:
    """Parse ``--hparams '{"sparsifiner": {"tau": 0.2}, "linformer": {"proj_init": "pool"}}'``: a JSON object
    from method name to that method's settings (see ``list``). The settings go to the method's factory and
    into the configuration key, so a changed setting is a new configuration (a new row).

    Args:
        text: the JSON text (None or empty: no settings).
        methods: the names of the methods of this run.

    Raises:
        UserError: for invalid JSON, a method that is not in this run, or settings that are not an object.
            (A setting the method does not take is refused by :func:`resolve_plan`.)
    """
    if text is None or str(text).strip() == "":
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--hparams is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(obj, dict):
        raise UserError('--hparams must be a JSON object {"<method>": {"<setting>": value}}')
    names = sorted(set(methods))
    out: dict[str, dict[str, Any]] = {}
    for name, settings in obj.items():
        if name not in names:
            raise UserError(f"--hparams names method {name!r}, which is not in this run ({', '.join(names)})")
        if not isinstance(settings, dict):
            raise UserError(f'--hparams["{name}"] must be an object of settings, got {settings!r}')
        out[name] = dict(settings)
    return out


def _check_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write_test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {output} is not writable: {e.strerror or e}") from None


class RunOptions:
    """Resolved options of one ``run`` invocation (see :func:`run_benchmark`)."""

    def __init__(self, cfg: Any) -> None:
        defaults = profile_defaults(cfg.profile)
        self.cfg = cfg
        self.profile = get_profile(cfg.profile)
        self.epochs = defaults["epochs"] if cfg.epochs is None else int(cfg.epochs)
        subset = defaults["train_subset"] if cfg.train_subset is None else int(cfg.train_subset)
        self.train_subset = subset or None
        self.batch_size = cfg.batch_size or defaults["batch_size"]
        self.output = Path(cfg.output)
        self.seed = int(cfg.seed)
        if self.epochs < 0:
            raise UserError(f"--epochs must be >= 0, got {self.epochs}")


def _teacher_top1(teacher: torch.nn.Module, dm, run_dir: Path, settings: TrainSettings) -> float:
    from methods.full import FullAttention

    module = FullAttention(copy.deepcopy(teacher), distill_logits=0.0)
    metrics = fit_and_test(module, dm, run_dir, TrainSettings(**{**settings.__dict__, "epochs": 0}))
    return 100.0 * metrics["test/top1"]


def measure_module(module, dm, n_flops: int = FLOPS_IMAGES, speed_batch: int = SPEED_BATCH) -> dict[str, Any]:
    """FLOPs (on real test images), latency/throughput and peak memory of a trained module's model."""
    from bench_suite.flops import count_flops
    from bench_suite.measure import measure_latency, peak_memory_mib

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
    out.update({k: v for k, v in measure_latency(model, batch, warmup=2, repeats=5).items()
                if k in ("latency_ms_median", "latency_ms_p90", "img_per_s")})
    out["peak_mib"] = peak_memory_mib(model, batch)
    out.update({k: float(v) for k, v in module.sparsity_report().items()})
    return out


def _base_row(spec_name: str, keep_rate: float, opts: RunOptions, config: dict[str, Any], key: str) -> dict[str, Any]:
    return {"key": key, "method": spec_name, "keep_rate": keep_rate, "profile": opts.profile.name,
            "dataset": config["data"]["dataset"], "seed": opts.seed, "config": config, "units": UNITS,
            "versions": versions(), "git": versions()["git"]}


def resolve_plan(plan: Any) -> list[tuple[MethodSpec, float, dict[str, Any]]]:
    """Normalise plan entries ``(method, keep_rate)`` or ``(method, keep_rate, overrides)`` into
    ``(spec, keep_rate, overrides)``; ``method`` is a name or a :class:`MethodSpec`, ``overrides`` a dict of
    hyperparameters for the method's factory (e.g. Sparsif-EViT ``token_keep_rate``). Repeats are dropped.

    Raises:
        UnknownMethodError: for an unknown method name.
        UserError: for a keep rate outside (0, 1] or an override the method's factory does not take.
    """
    from bench_suite.registry import get_method
    from bench_suite.store import canonical_json

    out, seen = [], set()
    for entry in plan:
        if len(entry) not in (2, 3):
            raise UserError(f"plan entries are (method, keep_rate[, overrides]), got {entry!r}")
        method, rate = entry[0], float(entry[1])
        overrides = dict(entry[2] or {}) if len(entry) == 3 else {}
        spec = method if isinstance(method, MethodSpec) else get_method(str(method))
        if not 0.0 < rate <= 1.0:
            raise UserError(f"plan entry {spec.name}: keep rate {rate:g} is outside (0, 1]")
        settings = set(spec.defaults()) - {"keep_rate"}
        unknown = sorted(set(overrides) - settings)
        if unknown:
            raise UserError(f"plan entry {spec.name}: {', '.join(unknown)} is not a setting of the method "
                              f"(settings: {', '.join(k for k in spec.defaults() if k != 'keep_rate')})")
        ident = (spec.name, rate, canonical_json(overrides))
        if ident not in seen:
            seen.add(ident)
            out.append((spec, rate, overrides))
    return out


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
    from bench_suite.store import STORE_FILENAME, ResultsStore, config_key

    if plan is None:
        specs: list[MethodSpec] = parse_methods(cfg.methods)
        rates_override = parse_keep_rates(cfg.keep_rates)
        # a method without a keep rate (full attention: grid (1.0,)) runs once, at 1.0, whatever --keep-rates says
        plan = [(spec, r) for spec in specs
                for r in (spec.keep_rates if spec.keep_rates == (1.0,) else (rates_override or spec.keep_rates))]
    plan = resolve_plan(plan)
    extra = parse_hparams(getattr(cfg, "hparams", None), [spec.name for spec, _, _ in plan])
    if extra:  # the user's settings win over a plan's (e.g. --table N with --hparams)
        plan = resolve_plan([(spec, r, ov | extra.get(spec.name, {})) for spec, r, ov in plan])

    # ---------------------------------------------------------------- 1. validate (nothing trained or written)
    opts = RunOptions(cfg)
    settings = train_settings(cfg, opts.epochs)
    fabric, world = _processes(settings)
    if world > 1:
        _die_with_launcher()
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))) != "0":
            log = _quiet  # a process that is not rank 0: rank 0 says everything
        if settings.strategy == "auto":
            settings = replace(settings, strategy="ddp")
    if opts.batch_size % world:
        raise UserError(f"--batch-size {opts.batch_size} is not divisible by the {world} processes (the global "
                          f"batch is split evenly across them); choose a multiple of {world}")
    plan = validate_plan(plan, opts.profile, skip_infeasible=skip_infeasible, log=log)
    dm = make_datamodule(cfg, train_subset=opts.train_subset, batch_size=opts.batch_size)
    setup_data(cfg, dm)
    given = _given_teacher(cfg, opts, dm, settings, log) if cfg.teacher is not None else None
    store_path = opts.output / STORE_FILENAME
    if store_path.exists():
        ResultsStore(store_path).close()  # StoreCorruptError for a damaged/foreign file, which stays untouched
    _check_output(opts.output)
    store = ResultsStore(store_path)
    data = dm.describe()

    # ---------------------------------------------------------------- 2. teacher, 3. processes
    teacher, tinfo = given or _resolve_teacher_locked(opts, dm, settings, external=_processes_external(world),
                                                      log=log)
    dm.batch_size = opts.batch_size
    rank = 0
    if fabric is not None:
        fabric.launch()  # starts the other local processes (they re-run this command) or joins srun's
        rank = fabric.global_rank
    say = log if rank == 0 else _quiet
    say(f"bench_suite: {len(plan)} configuration(s) on profile {opts.profile.name}, data {data['dataset']}, "
        f"{opts.epochs} epoch(s) on {opts.train_subset or 'all'} training images, seed {opts.seed}"
        + (f", {world} processes ({settings.strategy})" if world > 1 else ""))
    say(f"teacher: {tinfo['source']} {tinfo['path']} (sha256 {tinfo['sha256'][:12]})")

    # ---------------------------------------------------------------- 4. the sweep
    jobs: list[_Job] = []
    teacher_cfg = {"kind": "teacher-eval", "profile": opts.profile.name, "data": data, "teacher": tinfo["sha256"],
                   "seed": opts.seed}
    jobs.append(_Job("teacher", "teacher", 1.0, {}, teacher_cfg, config_key(teacher_cfg)))
    for i, (spec, rate, overrides) in enumerate(plan, 1):
        config = {
            "kind": "train", "method": spec.name, "keep_rate": rate, "profile": opts.profile.name, "data": data,
            "seed": opts.seed, "epochs": opts.epochs, "hparams": spec.defaults() | overrides | {"keep_rate": rate},
            "teacher": tinfo["sha256"],
        }
        if overrides:  # the settings that differ from the method's defaults label the row in tables and plots
            config["overrides"] = dict(overrides)
        tag = f"[{i}/{len(plan)}] {spec.name} keep {rate:g}" + "".join(f", {k}={v!r}" for k, v in overrides.items())
        jobs.append(_Job(tag, spec, rate, overrides, config, config_key(config)))

    sweep = _Sweep(cfg, opts, settings, store, dm, teacher, rank, world, say)
    deferred = [job for job in jobs if not sweep.run(job, wait=False)]
    for job in deferred:
        sweep.run(job, wait=True)
    if sweep.failures:
        say(f"{sweep.failures} configuration(s) failed; their rows have status 'failed' and the error; "
            f"re-running the same command retries them")
    return sweep.written


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
        from bench_suite.training import _broadcast

        lock = ConfigLock(self.opts.output / "locks" / f"{job.key}.lock")
        told = False
        while True:
            state = _broadcast(self._claim(job, lock) if self.rank == 0 else None)
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
        run_dir = opts.output / "runs" / key
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
            row.update(status="ok", error=None, metrics=metrics)
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

    def _train(self, job: _Job, run_dir: Path) -> dict[str, Any]:
        pl.seed_everything(self.opts.seed, workers=True, verbose=False)
        backbone = copy.deepcopy(self.teacher).train().requires_grad_(True)  # the teacher itself stays frozen
        module = job.spec.factory(backbone, keep_rate=job.rate, teacher=self.teacher, **job.overrides)
        settings = replace(self.settings, strategy=ddp_strategy_for(job.spec.name, module, self.settings.strategy))
        metrics = fit_and_test(module, self.dm, run_dir, settings, run_key=job.key, fresh=self.force, log=self.say)
        out: dict[str, Any] = {
            "top1": 100.0 * metrics["test/top1"],
            "val_top1": 100.0 * metrics["val/top1"] if "val/top1" in metrics else None,
            "train_steps": int(metrics["global_step"]), "resumed_from_step": int(metrics["resumed_step"]),
        }
        if self.rank == 0:
            out.update(measure_module(module, self.dm))
        return out


# --------------------------------------------------------------------------- validation

def setup_data(cfg: Any, dm) -> None:
    """Load the data now (before anything is trained or written) and check it is what the user named.

    Raises:
        UserError: if ``--data-dir`` is missing, not a folder, empty, or (Fashion-MNIST) holds no data
            while another copy would silently be used instead.
        DataError: for corrupt or incomplete files (from the datamodule).
    """
    if cfg.data_dir is not None:
        d = Path(cfg.data_dir)
        if not d.exists():
            raise UserError(f"data folder {d} does not exist")
        if not d.is_dir():
            raise UserError(f"data folder {d} is not a folder")
        if not any(d.iterdir()):
            raise UserError(f"data folder {d} is empty")
    dm.setup()
    paths = getattr(dm, "paths", None)
    if cfg.data_dir is not None and isinstance(paths, dict):
        root = Path(cfg.data_dir).resolve()
        outside = [str(p) for p in paths.values() if not Path(p).resolve().is_relative_to(root)]
        if outside:
            raise UserError(f"data folder {cfg.data_dir} holds no {cfg.data} files (it would fall back to "
                              f"{Path(outside[0]).parent}); fix --data-dir or leave it out")


def validate_plan(plan: list[tuple[MethodSpec, float, dict[str, Any]]], profile, num_classes: int = 10,
                  skip_infeasible: bool = False, log=print) -> list[tuple[MethodSpec, float, dict[str, Any]]]:
    """Check every configuration before anything is trained: its keep rate leaves at least one token of
    the profile's ``N`` (``keep_rate * N >= 1``: the budget rule ``ceil(rho N)`` must not round a
    vanishing budget up to a whole token, which would store a row under a keep rate it did not have),
    and its module can be built (the method's own checks run on a fresh backbone of the profile).

    Args:
        skip_infeasible: drop configurations that keep fewer than one token (logging each) instead of
            raising.

    Returns:
        The plan (without the dropped configurations).

    Raises:
        UserError: naming the configuration and what is wrong.
    """
    from bench_suite.backbones import create_backbone

    reference = create_backbone(profile, num_classes=num_classes)
    n = num_tokens(reference)
    kept = []
    for spec, rate, overrides in plan:
        if rate * n < 1.0:
            why = (f"{spec.name}: keep rate {rate:g} keeps {rate * n:.3g} of the {n} tokens of profile "
                   f"{profile.name!r}, fewer than one")
            if skip_infeasible:
                log(f"{why}: left out")
                continue
            raise UserError(f"{why}; the smallest keep rate here is 1/{n} = {1 / n:.4g}")
        kept.append((spec, rate, overrides))
        try:
            spec.factory(copy.deepcopy(reference), keep_rate=rate, teacher=None, **overrides)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"{spec.name} at keep rate {rate:g}"
                              + "".join(f", {k}={v!r}" for k, v in overrides.items())
                              + f" cannot be built on profile {profile.name!r}: {str(e).splitlines()[0]}") from None
    if not kept:
        raise UserError(f"no configuration of the plan fits profile {profile.name!r} ({n} tokens)")
    return kept


# --------------------------------------------------------------------------- processes (DDP)

SUPPORTED_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
# Built-in methods whose parameters are not all used in every step (Sparsifiner freezes the backbone in
# phase 1 and the predictor in phase 2): DDP must look for unused parameters. A plugin method says so with
# a class attribute ``ddp_find_unused_parameters = True``.
DDP_FIND_UNUSED = frozenset({"sparsifiner", "sparsif_evit"})


def ddp_strategy_for(method: str, module: Any, strategy: str) -> str:
    """The Lightning strategy a method needs under ``--strategy ddp``: ``ddp_find_unused_parameters_true``
    for methods with parameters unused in some steps (:data:`DDP_FIND_UNUSED`, or a module attribute
    ``ddp_find_unused_parameters``), else ``ddp``; other strategies are returned unchanged."""
    if strategy != "ddp":
        return strategy
    needs = getattr(module, "ddp_find_unused_parameters", None)
    if needs is None:
        needs = method in DDP_FIND_UNUSED
    return "ddp_find_unused_parameters_true" if needs else "ddp"


def _processes(settings: TrainSettings):
    """``(fabric, world size)``: a Lightning Fabric that starts/joins the DDP processes of a multi-process
    run (``None`` for one process).

    Raises:
        UserError: for a strategy the sweep cannot run under, or devices Lightning rejects.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    strategy = str(settings.strategy)
    if strategy not in SUPPORTED_STRATEGIES:
        raise UserError(f"--strategy {strategy} is not supported by the sweep runner; use {', '.join(SUPPORTED_STRATEGIES)}"
                          " (every process runs the sweep, as under srun)")
    try:
        fabric = Fabric(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
                        strategy="auto" if strategy == "auto" else "ddp")
    except Exception as e:  # noqa: BLE001 - Lightning's MisconfigurationException, ValueError, RuntimeError
        raise UserError(f"cannot run on --accelerator {settings.accelerator} --devices {settings.devices} "
                          f"--num-nodes {settings.num_nodes}: {str(e).splitlines()[0]}") from None
    world = int(fabric.world_size)
    if world == 1:
        return None, 1
    if not isinstance(fabric.strategy, DDPStrategy):
        raise UserError(f"{world} processes need --strategy ddp, Lightning chose {type(fabric.strategy).__name__}")
    return fabric, world


def _die_with_launcher() -> None:
    """In a process that Lightning's launcher started (``LOCAL_RANK`` > 0, not srun/torchrun): ask the
    kernel to kill it when its parent, rank 0 of the node, dies (``PR_SET_PDEATHSIG``), instead of leaving
    it waiting in a collective until the timeout."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0") or _processes_external_by_cluster():
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def _processes_external_by_cluster() -> bool:
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def _processes_external(world: int) -> bool:
    """Whether this multi-process run's processes were started by someone else (srun, torchrun, or the
    Lightning launcher of rank 0): then a missing teacher is an error rather than trained here."""
    if world == 1:
        return False
    return "LOCAL_RANK" in os.environ or _processes_external_by_cluster()


# --------------------------------------------------------------------------- locks

class ConfigLock:
    """An advisory lock file (``fcntl.flock``): held by the process that trains a configuration (or makes
    a teacher), so that two sweeps sharing an output folder never train the same thing at once.

    The kernel drops the lock when the holder exits or is killed (SIGKILL included), so a crash never
    leaves a stale lock. The file holds ``host pid`` of the holder, for messages. Works on local file
    systems and on NFS (Linux emulates ``flock`` with POSIX locks there).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _took(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free; returns whether this process holds it now."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._took(fd)
        return True

    def acquire(self) -> None:
        """Take the lock, waiting as long as another process holds it."""
        if self._fd is not None:
            return
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._took(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str:
        """``host pid N`` of the holder, as written in the lock file (best effort)."""
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def __enter__(self) -> "ConfigLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _given_teacher(cfg: Any, opts: "RunOptions", dm, settings: TrainSettings, log):
    """Load ``--teacher PATH`` (nothing is written).

    Raises:
        TeacherError: if it is missing, unreadable or does not fit the profile (a weight-shape mismatch
            that torch reports as a ``RuntimeError`` becomes a one-line TeacherError too).
    """
    from bench_suite.teacher import TeacherError, resolve_teacher

    try:
        return resolve_teacher(opts.profile.name, _teacher_data(dm), opts.seed, opts.output, settings,
                               teacher_path=cfg.teacher, log=log)
    except TeacherError:
        raise
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing key" in ln]
        if not lines:
            raise
        raise TeacherError(f"teacher {cfg.teacher} does not fit profile {opts.profile.name!r}: {lines[0]}") from None


def _teacher_data(dm):
    """The run's datamodule as the teacher sees it: its own copy (the teacher sets its recipe's batch
    size on it), always with augmentation (part of the teacher's recipe, whatever ``--no-augment`` says)."""
    tdm = copy.copy(dm)
    if getattr(tdm, "augment", True) is not True:
        tdm.augment = True
        tdm._ready = False
    return tdm


def _resolve_teacher_locked(opts: "RunOptions", dm, settings: TrainSettings, external: bool, log):
    """The teacher from the cache or the shipped teachers, else trained now in this one process, while
    holding the teacher's lock (a second sweep waits for it instead of training it too)."""
    from bench_suite.teacher import resolve_teacher

    lock = ConfigLock(opts.output / "locks" / f"teacher-{opts.profile.name}-{opts.cfg.data}-seed{opts.seed}.lock")
    if not lock.try_acquire():
        log(f"waiting for another process that is making the teacher ({lock.holder()})")
        lock.acquire()
    try:
        one = replace(settings, devices=1, num_nodes=1, strategy="auto")  # the teacher is trained in one process
        return resolve_teacher(opts.profile.name, _teacher_data(dm), opts.seed, opts.output, one,
                               train_if_missing=not external, log=log)
    finally:
        lock.release()


class _TeacherModule:
    """Minimal module view of the teacher for :func:`measure_module` (no paper convention, no sparsity)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def paper_mhsa_flops(self) -> None:
        return None

    def sparsity_report(self) -> dict[str, float]:
        return {}


def run_from_cli(cfg: Any) -> int:
    """``python -m bench_suite run``: run the sweep (``--table N``: exactly the configurations of the paper's
    table N, :func:`bench_suite.tables.run_plan`), then write and print the Pareto table and plot."""
    from bench_suite.report import pareto_table, summary_text, write_report
    from bench_suite.store import ResultsStore

    plan = None
    if getattr(cfg, "table", None) is not None:
        from bench_suite.tables import run_plan

        plan = run_plan(cfg.table)
    rows = run_benchmark(cfg, plan=plan, skip_infeasible=plan is not None)
    from bench_suite.training import world_info

    if world_info()[0] != 0:
        return 0  # rank 0 writes the tables and prints the summary
    failed = sum(1 for r in rows if r["status"] != "ok")
    with ConfigLock(Path(cfg.output) / "locks" / "report.lock"):  # two sweeps of one folder: one writer at a time
        paths = write_report(cfg.output, x=cfg.x, profile=cfg.profile, dataset=cfg.data)
    store = ResultsStore(Path(cfg.output) / "results.sqlite")
    table = pareto_table(store.rows(profile=cfg.profile, dataset=cfg.data), x=cfg.x)
    print()
    print(summary_text(table))
    print()
    for p in paths:
        print(f"wrote {p}")
    if failed:
        import sys

        print(f"bench_suite: {failed} configuration(s) failed (rows with status 'failed'); re-run to retry them",
              file=sys.stderr)
        return 1
    return 0
