"""Whole-model eval timing of ``python -m bench_suite speed`` (the default benchmark; the grid around it is
:mod:`bench_suite.speed_grid`): every method at its keep rates and implementations, random weights (or the
store's trained checkpoints, ``--weights store``), timed interleaved in one cell (batch, threads, precision).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from bench_suite.backbones import create_backbone, get_profile
from bench_suite.kernel_bench import DEFAULT_KERNEL_N
from bench_suite.kernels import load_kernel
from bench_suite.measure import fixed_threads, measure_models, paired_ratio, peak_memory_mib
from bench_suite.options import canonical_settings
from bench_suite.registry import declared_metrics, get_method, method_specs, parse_methods, reference_method
from bench_suite.store import config_key
from bench_suite.versions import versions

__all__ = ["DATASET", "UNITS", "SpeedOptions", "model_benchmark", "peak_probe"]

DATASET = "synthetic"  # the store's dataset field: random images, no data set is read

UNITS = {
    "latency_ms_median": "ms", "latency_ms_p90": "ms", "latency_ms_min": "ms", "img_per_s": "img/s",
    "peak_mib": "MiB", "latency_ratio_to_full": "x", "latency_ratio_to_dense": "x", "speedup_vs_dense": "x",
    "flop_ratio": "x", "budget": "keys", "attention_macs": "MACs", "load_avg_1min": "runnable tasks",
    "latency_ratio_ci95_low": "x", "latency_ratio_ci95_high": "x",
}
"""Units of the speed metrics; a method's own metrics (its ``sparsity_report``) carry the units it declares."""


@dataclass
class SpeedOptions:
    """Resolved options of one ``speed`` invocation (see :mod:`bench_suite.speed`).

    Attributes:
        profile: backbone profile name. methods: method names (None: all registered). keep_rates: override
        of the keep rates (None: each method's grid; the core/kernel defaults). batch_size: images (or
        sequences) per batch. threads: intra-op threads (None: torch's current count). repeats, warmup:
        timed rounds and untimed runs. output: results folder. seed: seed of weights, images and indices.
        impls: sparse attention implementations to run (``cpp``, ``torch``). memory: measure peak memory.
        n, heads, head_dim: core sizes (None: the profile's); heads/head_dim also set the kernel grid.
        kernel_n: token counts of the kernel grid.
        hparams: method name -> extra factory arguments of that method (``--hparams``).
        coef_density: emulate trained coefficient densities (passed to each method's ``prepare_timing``).
        precision: ``"fp32"`` or ``"bf16"`` (autocast) of one timed cell. weights: ``"random"`` or ``"store"``
        (the newest trained checkpoint of each configuration in ``<output>/results.sqlite`` where one exists).
        batch_rule: how the cell's batch was chosen (``--batch-size max``), stored in its rows.
        batch_sizes, thread_counts, precisions: the model grid's axes (:mod:`bench_suite.speed_grid`; empty:
        the single ``batch_size`` / ``threads`` / ``precision``). max_batch, memory_budget_mib: the limits of
        ``--batch-size max``.
    """

    profile: str = "deit_t384"
    methods: list[str] | None = None
    keep_rates: list[float] | None = None
    batch_size: int = 8
    threads: int | None = None
    repeats: int = 10
    warmup: int = 3
    output: Path = Path("results")
    seed: int = 0
    impls: tuple[str, ...] = ("cpp",)
    memory: bool = True
    n: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    kernel_n: tuple[int, ...] = DEFAULT_KERNEL_N
    hparams: dict[str, Any] | None = None
    coef_density: float | None = None
    precision: str = "fp32"
    weights: str = "random"
    batch_rule: str | None = None
    batch_sizes: tuple[int | str, ...] = ()
    thread_counts: tuple[int | None, ...] = ()
    precisions: tuple[str, ...] = ()
    max_batch: int = 1024
    memory_budget_mib: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        for name in ("n", "heads", "head_dim"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if not self.kernel_n or any(n < 1 for n in self.kernel_n):
            raise ValueError(f"--kernel-n needs positive token counts, got {self.kernel_n}")
        if self.coef_density is not None and not 0.0 < self.coef_density < 1.0:
            raise ValueError(f"--coef-density must lie in (0, 1), got {self.coef_density}")
        if self.hparams is not None and not isinstance(self.hparams, dict):
            raise ValueError(f"--hparams must be a JSON object, got {self.hparams!r}")
        if self.precision not in ("fp32", "bf16") or self.weights not in ("random", "store"):
            raise ValueError(f"precision fp32/bf16 and weights random/store, got {self.precision}/{self.weights}")
        bad = [i for i in self.impls if i not in ("cpp", "torch")]
        if bad or not self.impls:
            raise ValueError(f"--impl takes cpp and/or torch, got {','.join(self.impls) or 'nothing'}")
        self.output = Path(self.output)


# --------------------------------------------------------------------------- helpers
def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _threads(opts: SpeedOptions) -> int:
    return int(opts.threads or torch.get_num_threads())


def ratio_metrics(samples_ms: list[float], reference_ms: list[float] | None) -> dict[str, float | None]:
    """``latency_ratio_to_full`` (the median of the per-round ratios to the reference method's time, x) and its
    95 % confidence interval ``latency_ratio_ci95_low`` / ``_high`` (:func:`bench_suite.measure.paired_ratio`);
    all None without a reference in the rounds."""
    if reference_ms is None:
        return {"latency_ratio_to_full": None, "latency_ratio_ci95_low": None, "latency_ratio_ci95_high": None}
    pr = paired_ratio(samples_ms, reference_ms)
    return {"latency_ratio_to_full": pr["ratio"], "latency_ratio_ci95_low": pr["ci_low"],
            "latency_ratio_ci95_high": pr["ci_high"]}


def ratio_text(metrics: dict[str, Any], what: str) -> str:
    """``", 0.880x full's latency (95% CI 0.851-0.912)"`` (``what``: latency) from :func:`ratio_metrics`'s keys
    ('' without a ratio)."""
    ratio, low, high = (metrics.get(k) for k in ("latency_ratio_to_full", "latency_ratio_ci95_low",
                                                  "latency_ratio_ci95_high"))
    if ratio is None:
        return ""
    return f", {ratio:.3f}x full's {what}" + ("" if low is None else f" (95% CI {low:.3f}-{high:.3f})")


# --------------------------------------------------------------------------- store rows
def _row(opts: SpeedOptions, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    ver = versions()
    known = {**UNITS, **{m.name: m.unit for m in declared_metrics([config["method"]]).values()}}
    units = {m: known[m] for m in metrics if m in known}
    return {"key": config_key(config), "status": "ok", "method": config["method"], "keep_rate": config["keep_rate"],
            "profile": opts.profile, "dataset": DATASET, "seed": opts.seed, "config": config, "metrics": metrics,
            "units": units, "versions": ver, "git": ver["git"], "error": None}


def _base_config(opts: SpeedOptions, scope: str, threads: int) -> dict[str, Any]:
    config = {"kind": "speed", "scope": scope, "profile": opts.profile, "batch_size": opts.batch_size,
              "threads": threads, "repeats": opts.repeats, "warmup": opts.warmup, "seed": opts.seed,
              "weights": "random", "inputs": "random normal", "device": "cpu", "dtype": "float32"}
    if opts.precision != "fp32":
        config.update(precision=opts.precision, dtype="bfloat16 (autocast)")
    if opts.batch_rule:
        config["batch_rule"] = opts.batch_rule
    return config




class _Autocast(torch.nn.Module):
    """A model whose forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--precision bf16``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


def _trained_checkpoint(opts: SpeedOptions, method: str, rate: float) -> tuple[str, Path] | None:
    """``(key, path)`` of the newest finished trained row of ``method`` at ``rate`` on the profile in
    ``<output>/results.sqlite`` whose checkpoint exists (speed rows have none); ``None`` without one."""
    from bench_suite.checkpoints import find_checkpoints

    found = find_checkpoints(opts.output, method, opts.profile, None, keep_rate=rate)
    return (found[0][1], found[0][2]) if found else None




class _Built:
    """The models of one timed cell: label -> module (and its autocast wrapper), the (spec, keep rate, impl)
    of each label, the extra settings, what ``prepare_timing`` set, and the trained rows' keys."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.timed: dict[str, torch.nn.Module] = {}
        self.labels: dict[str, tuple[Any, float, str | None]] = {}
        self.extras: dict[str, dict[str, Any]] = {}
        self.prepared: dict[str, Any] = {}
        self.trained: dict[str, str] = {}


def _plan(opts: SpeedOptions) -> tuple[list[tuple[Any, float, str | None]], dict[str, dict[str, Any]]]:
    """What a model benchmark times: ``(spec, keep rate, attention impl or None)`` for every method of
    ``opts.methods`` at its keep rates (``opts.keep_rates`` overrides; a dense method only at 1.0) and, where the
    method takes one, every ``opts.impls``; and the methods' checked ``--hparams``."""
    specs = parse_methods(opts.methods) if opts.methods else method_specs()
    hparams = {name: canonical_settings(name, values, get_method(name).defaults(), get_method(name).setting_types())
               for name, values in (opts.hparams or {}).items()}
    plan = []
    for spec in specs:
        rates = [1.0] if tuple(spec.keep_rates) == (1.0,) else (opts.keep_rates or list(spec.keep_rates))
        impls: list[str | None] = list(opts.impls) if spec.accepts("attention_impl") else [None]
        plan += [(spec, float(r), impl) for r in rates for impl in impls]
    return plan, hparams


def _entry(spec: Any, rate: float, impl: str | None, hparams: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The label (``method@rate[/impl]``) and the factory's extra keyword arguments (the method's ``--hparams``, and
    ``attention_impl`` where the plan names an implementation) of one entry of :func:`_plan`."""
    extra = dict(hparams.get(spec.name, {}))
    if impl is not None:
        extra["attention_impl"] = impl
    return f"{spec.name}@{rate:g}" + (f"/{impl}" if impl else ""), extra


def _build_models(opts: SpeedOptions, images: torch.Tensor) -> _Built:
    """Every method (``opts.methods``) at its keep rates and implementations, random weights (or the store's
    trained checkpoint, ``opts.weights == "store"``), in eval mode; wrapped in autocast under bf16."""
    profile = get_profile(opts.profile)
    plan, hparams = _plan(opts)
    built = _Built()
    for spec, r, impl in plan:
        torch.manual_seed(opts.seed)
        label, extra = _entry(spec, r, impl, hparams)
        found = _trained_checkpoint(opts, spec.name, r) if opts.weights == "store" else None
        if found is not None:
            from bench_suite.checkpoints import load_trained

            module = load_trained(spec.name, found[1], profile.name, overrides=extra)
            built.trained[label] = found[0]
        else:
            module = spec.factory(create_backbone(profile, num_classes=10), keep_rate=r, **extra)
            if opts.coef_density is not None:
                built.prepared[label] = module.prepare_timing(images, coef_density=opts.coef_density)
        built.models[label] = module.eval()
        built.timed[label] = _Autocast(module) if opts.precision == "bf16" else module
        built.labels[label] = (spec, r, impl)
        built.extras[label] = {k: v for k, v in extra.items() if k != "attention_impl"}
    if any(impl == "cpp" for *_, impl in plan):
        load_kernel()
    return built


def peak_probe(opts: SpeedOptions, batch: int) -> float:
    """The largest peak eval memory (MiB) among the models of ``opts`` at ``batch`` random images (random
    weights; ``--batch-size max``)."""
    profile = get_profile(opts.profile)
    images = torch.randn(batch, profile.in_chans, profile.img_size, profile.img_size,
                         generator=torch.Generator().manual_seed(opts.seed))
    built = _build_models(replace(opts, weights="random"), images)
    with fixed_threads(opts.threads), torch.inference_mode():
        return max(peak_memory_mib(m, images) for m in built.timed.values())


def model_benchmark(opts: SpeedOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Eval speed of whole models, random weights or the store's trained checkpoints (see the module
    docstring), in one cell (batch, threads, precision); returns store rows.

    Raises:
        bench_suite.registry.UnknownMethodError: for an unknown method name.
        bench_suite.backbones.UnknownProfileError: for an unknown profile.
    """
    profile = get_profile(opts.profile)
    threads = _threads(opts)
    gen = torch.Generator().manual_seed(opts.seed)
    images = torch.randn(opts.batch_size, profile.in_chans, profile.img_size, profile.img_size, generator=gen)
    built = _build_models(opts, images)
    models, timed, labels, extras, prepared, trained = (built.models, built.timed, built.labels, built.extras,
                                                        built.prepared, built.trained)
    weights = "random weights" if not trained else f"trained weights for {len(trained)} of {len(models)}"
    log(f"models on {profile.name} ({profile.img_size}px), batch {opts.batch_size}, {threads} thread(s), "
        f"{opts.precision}, {weights}: {', '.join(models)}; {opts.repeats} interleaved rounds after "
        f"{opts.warmup} warm-up")
    load = _load_avg()
    res = measure_models(timed, images, warmup=opts.warmup, repeats=opts.repeats, num_threads=threads)
    reference = reference_method().name
    full = next((res[lab]["samples_ms"] for lab, (s, *_) in labels.items() if s.name == reference), None)
    rows = []
    for label, r in res.items():
        spec, rate, impl = labels[label]
        module = models[label]
        with torch.inference_mode():
            module(images[:1])  # fills the sparsity report on one image
        config = {**_base_config(opts, "model", threads), "method": spec.name, "keep_rate": rate,
                  "attention_impl": impl, "img_size": profile.img_size,
                  "hparams": {**spec.defaults(), "keep_rate": rate, **extras[label],
                              **({"attention_impl": impl} if impl else {})}}
        config.update(prepared.get(label) or {})  # what the method's prepare_timing set (e.g. emulated thresholds)
        if label in trained:  # a trained checkpoint of the store: its configuration key
            config.update(weights="store", trained_key=trained[label])
        metrics: dict[str, Any] = {k: r[k] for k in ("latency_ms_median", "latency_ms_p90", "latency_ms_min",
                                                     "img_per_s")}
        metrics.update(ratio_metrics(r["samples_ms"], full))
        metrics["load_avg_1min"] = load
        if opts.memory:
            with torch.inference_mode():
                metrics["peak_mib"] = peak_memory_mib(timed[label], images)
        metrics.update({k: float(v) for k, v in module.sparsity_report().items()})
        rows.append(_row(opts, config, metrics))
        log(f"  {label:<28} {r['latency_ms_median']:9.2f} ms/batch (p90 {r['latency_ms_p90']:.2f}), "
            f"{r['img_per_s']:8.2f} img/s{ratio_text(metrics, 'latency')}")
    return rows
