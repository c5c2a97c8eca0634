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
"""
from __future__ import annotations

import copy
import math
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bench_suite.backbones import get_profile, num_tokens
from bench_suite.registry import MethodSpec, parse_methods
from bench_suite.training import NonFiniteLossError, TrainSettings, fit_and_test
from bench_suite.versions import versions
from datamodules import create_datamodule

__all__ = ["RUN_DEFAULTS", "RunOptions", "run_benchmark", "resolve_plan", "run_from_cli", "make_datamodule", "train_settings",
           "parse_keep_rates"]

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
    "latency_ms_p90": "ms", "peak_mib": "MiB", "train_seconds": "s",
}


def _user_error(msg: str) -> Exception:
    from bench_suite.cli import UserError

    return UserError(msg)


def profile_defaults(profile: str) -> dict[str, Any]:
    get_profile(profile)
    return dict(RUN_DEFAULTS.get(profile, PAPER_DEFAULTS))


def make_datamodule(cfg: Any, train_subset: int | None = None, batch_size: int | None = None):
    """The datamodule for ``cfg.data`` at the profile's resolution and channels."""
    p = get_profile(cfg.profile)
    defaults = profile_defaults(cfg.profile)
    return create_datamodule(cfg.data, data_dir=cfg.data_dir, img_size=p.img_size, in_chans=p.in_chans,
                             batch_size=batch_size or defaults["batch_size"], train_subset=train_subset,
                             num_workers=cfg.num_workers, split_seed=0)


def train_settings(cfg: Any, epochs: int) -> TrainSettings:
    return TrainSettings(epochs=epochs, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                         accelerator=cfg.accelerator, progress=not cfg.no_progress)


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
            raise _user_error(f"keep rate {part.strip()!r} is not a number") from None
        if not 0.0 < r <= 1.0 or math.isnan(r):
            raise _user_error(f"keep rate {r:g} is outside (0, 1]")
        rates.append(r)
    return rates


def _check_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise _user_error(f"output folder {output} is not writable: {e.strerror or e}") from None


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
            raise _user_error(f"--epochs must be >= 0, got {self.epochs}")


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
            raise _user_error(f"plan entries are (method, keep_rate[, overrides]), got {entry!r}")
        method, rate = entry[0], float(entry[1])
        overrides = dict(entry[2] or {}) if len(entry) == 3 else {}
        spec = method if isinstance(method, MethodSpec) else get_method(str(method))
        if not 0.0 < rate <= 1.0:
            raise _user_error(f"plan entry {spec.name}: keep rate {rate:g} is outside (0, 1]")
        settings = set(spec.defaults()) - {"keep_rate"}
        unknown = sorted(set(overrides) - settings)
        if unknown:
            raise _user_error(f"plan entry {spec.name}: {', '.join(unknown)} is not a setting of the method "
                              f"(settings: {', '.join(k for k in spec.defaults() if k != 'keep_rate')})")
        ident = (spec.name, rate, canonical_json(overrides))
        if ident not in seen:
            seen.add(ident)
            out.append((spec, rate, overrides))
    return out


def run_benchmark(cfg: Any, log=print, plan: Any = None) -> list[dict[str, Any]]:
    """Run every (method, keep rate) configuration of ``cfg`` not yet in the store.

    Args:
        cfg: the ``run`` options.
        log: progress printer.
        plan: run exactly these configurations instead of ``cfg.methods`` x keep rates: entries
            ``(method, keep_rate)`` or ``(method, keep_rate, overrides)`` (see :func:`resolve_plan`). The
            overrides go to the method's factory and into the configuration key (``config["hparams"]``).

    Returns:
        The rows written in this invocation.

    Raises:
        UserError, UnknownMethodError, UnknownProfileError, DataError, TeacherError, StoreCorruptError:
            for bad input, before anything is trained or written.
    """
    from bench_suite.store import ResultsStore, config_key
    from bench_suite.teacher import resolve_teacher

    if plan is None:
        specs: list[MethodSpec] = parse_methods(cfg.methods)
        rates_override = parse_keep_rates(cfg.keep_rates)
        # a method without a keep rate (full attention: grid (1.0,)) runs once, at 1.0, whatever --keep-rates says
        plan = [(spec, r) for spec in specs
                for r in (spec.keep_rates if spec.keep_rates == (1.0,) else (rates_override or spec.keep_rates))]
    plan = resolve_plan(plan)
    opts = RunOptions(cfg)
    _check_output(opts.output)
    store = ResultsStore(opts.output / "results.sqlite")
    dm = make_datamodule(cfg, train_subset=opts.train_subset, batch_size=opts.batch_size)
    dm.setup()
    settings = train_settings(cfg, opts.epochs)
    data = dm.describe()

    log(f"bench_suite: {len(plan)} configuration(s) on profile {opts.profile.name}, data {data['dataset']}, "
        f"{opts.epochs} epoch(s) on {opts.train_subset or 'all'} training images, seed {opts.seed}")
    teacher, tinfo = resolve_teacher(opts.profile.name, dm, opts.seed, opts.output, settings,
                                     teacher_path=cfg.teacher, log=log)
    log(f"teacher: {tinfo['source']} {tinfo['path']} (sha256 {tinfo['sha256'][:12]})")
    written: list[dict[str, Any]] = []

    teacher_cfg = {"kind": "teacher-eval", "profile": opts.profile.name, "data": data, "teacher": tinfo["sha256"],
                   "seed": opts.seed}
    tkey = config_key(teacher_cfg)
    if cfg.force or not store.has(tkey):
        top1 = _teacher_top1(teacher, dm, opts.output / "runs" / tkey, settings)
        row = {**_base_row("teacher", 1.0, opts, teacher_cfg, tkey), "status": "ok", "error": None,
               "metrics": {"top1": top1, **measure_module(_TeacherModule(teacher), dm)}}
        store.put(row)
        written.append(row)
        log(f"teacher top-1 (measured now): {top1:.2f}%")

    failures = 0
    for i, (spec, rate, overrides) in enumerate(plan, 1):
        config = {
            "kind": "train", "method": spec.name, "keep_rate": rate, "profile": opts.profile.name, "data": data,
            "seed": opts.seed, "epochs": opts.epochs, "hparams": spec.defaults() | overrides | {"keep_rate": rate},
            "teacher": tinfo["sha256"],
        }
        key = config_key(config)
        tag = f"[{i}/{len(plan)}] {spec.name} keep {rate:g}" + "".join(f", {k}={v!r}" for k, v in overrides.items())
        if store.has(key) and not cfg.force:
            log(f"{tag}: already in the store ({key}), skipped")
            continue
        run_dir = opts.output / "runs" / key
        log(f"{tag}: fine-tuning ({run_dir})")
        row = _base_row(spec.name, rate, opts, {**config, "run_dir": str(run_dir)}, key)
        start = time.perf_counter()
        try:
            pl.seed_everything(opts.seed, workers=True, verbose=False)
            backbone = copy.deepcopy(teacher).train().requires_grad_(True)  # the teacher itself stays frozen
            module = spec.factory(backbone, keep_rate=rate, teacher=teacher, **overrides)
            metrics = fit_and_test(module, dm, run_dir, settings)
            train_seconds = time.perf_counter() - start
            measured = measure_module(module, dm)
            row.update(status="ok", error=None, metrics={
                "top1": 100.0 * metrics["test/top1"],
                "val_top1": 100.0 * metrics["val/top1"] if "val/top1" in metrics else None,
                "train_seconds": train_seconds, **measured})
            log(f"{tag}: top-1 {row['metrics']['top1']:.2f}%, MHSA {measured['mhsa_mflops']:.3f} MFLOPs")
        except NonFiniteLossError as e:
            failures += 1
            row.update(status="failed", error=str(e), metrics={})
            log(f"{tag}: FAILED: {e}")
        except Exception as e:  # noqa: BLE001 - one configuration's bug must not lose the others
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            failures += 1
            row.update(status="failed", error=f"{type(e).__name__}: {e}", metrics={})
            log(f"{tag}: FAILED with an unexpected error:\n{traceback.format_exc()}")
        store.put(row)
        written.append(row)
    if failures:
        log(f"{failures} configuration(s) failed; their rows have status 'failed' and the error")
    return written


class _TeacherModule:
    """Minimal module view of the teacher for :func:`measure_module` (no paper convention, no sparsity)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def paper_mhsa_flops(self) -> None:
        return None

    def sparsity_report(self) -> dict[str, float]:
        return {}


def run_from_cli(cfg: Any) -> None:
    """``python -m bench_suite run``: run the sweep (``--table N``: exactly the configurations of the paper's
    table N, :func:`bench_suite.tables.run_plan`), then write and print the Pareto table and plot."""
    from bench_suite.report import pareto_table, summary_text, write_report
    from bench_suite.store import ResultsStore

    plan = None
    if getattr(cfg, "table", None) is not None:
        from bench_suite.tables import run_plan

        plan = run_plan(cfg.table)
    run_benchmark(cfg, plan=plan)
    paths = write_report(cfg.output, x=cfg.x, profile=cfg.profile, dataset=cfg.data)
    store = ResultsStore(Path(cfg.output) / "results.sqlite")
    table = pareto_table(store.rows(profile=cfg.profile, dataset=cfg.data), x=cfg.x)
    print()
    print(summary_text(table))
    print()
    for p in paths:
        print(f"wrote {p}")
