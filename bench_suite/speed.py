"""Wall-clock speed on the CPU: ``python -m bench_suite speed``.

Three benchmarks, all timed with :mod:`bench_suite.measure` (eval mode, ``torch.inference_mode``, a fixed
and recorded number of intra-op threads, ``--warmup`` untimed runs, then ``--repeats`` timed rounds in
which the candidates run *interleaved*, so that load from other processes hits them alike):

* **models** (default): every registered method (``--methods``) at its keep rates (``--keep-rates``) on a
  profile (``--profile``), built as ``spec.factory(create_backbone(profile, num_classes=10), keep_rate=r)``
  with **random weights** (timing only; the rows say ``weights: random``) on a batch of random images.
  Methods with a sparse attention implementation (a factory argument ``attention_impl``) run once per
  ``--impl``. Metrics: latency per batch (median, p90, min; ms), throughput (img/s), peak tensor memory of
  one forward (MiB), the latency relative to the dense reference method measured in the same rounds (the median
  of the per-round ratios with a 95 % confidence interval, :func:`bench_suite.measure.paired_ratio`), and the
  method's :meth:`sparsity_report`. A method whose cost depends on trained values prepares itself in
  :meth:`~methods.base.BenchModule.prepare_timing` (``--coef-density 0.13`` emulates the paper's density of
  learned sparse coefficients). ``--hparams '{"<method>": {"<setting>": value}}'`` (the same format as
  ``run``) passes settings to a method.
  Over a grid of ``--batch-size``, ``--threads`` and ``--precision`` values, and on the store's trained
  checkpoints with ``--weights store``: :mod:`bench_suite.speed_grid` (``speed_grid.{csv,md,png,pdf}``).
* **core** (``--core``): one MHSA core (after the QKV projection, before the output projection) at ``N``
  tokens, ``H`` heads of dim ``d`` (default: the profile's), batch ``--batch-size``: dense
  ``F.scaled_dot_product_attention`` against the sparse attention kernel (``cpp``) and the gather
  implementation (``torch``) with random distinct key indices per query, and against each method's own core
  candidates (:meth:`~methods.base.BenchModule.core_candidates`) per ``--impl``.
* **kernel** (``--kernel``): the sparse attention kernel against dense SDPA on a grid
  (:mod:`bench_suite.kernel_bench`; ``--train``: forward + backward too); writes ``kernel.csv``.
* **training steps** (``--train`` without ``--kernel``): one optimiser step (forward, teacher, losses, backward,
  AdamW) of every method as the suite trains it, in its main training phase, interleaved
  (:mod:`bench_suite.speed_train`); ms per step and the ratio to the reference method's step.

Model, core and training-step rows go to the results store ``<output>/results.sqlite`` (``config["kind"] =
"speed"``, ``config["scope"]`` ``"model"``, ``"core"`` or ``"train_step"``, dataset ``"synthetic"``) and to ``<output>/speed.csv``
(this invocation's rows). ``--build`` compiles the C++ kernel (or finds it cached) and exits.
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from bench_suite.backbones import create_backbone, get_profile, keep_count, num_tokens
from bench_suite.errors import UserError
from bench_suite.kernel_bench import (DEFAULT_KERNEL_KEEP_RATES, KERNEL_COLUMNS,
                                      KERNEL_TRAIN_COLUMNS, kernel_benchmark, random_key_indices, random_qkv,
                                      spot_check, write_kernel_csv)
from bench_suite.kernels import build_info, load_kernel, sparse_attention
from bench_suite.measure import measure_callables, peak_memory_callable_mib
from bench_suite.options import canonical_settings, parse_hparams, parse_list
from bench_suite.plan import check_output
from bench_suite.registry import method_specs, parse_methods
from bench_suite.speed_models import (DATASET, UNITS, SpeedOptions, _base_config, _load_avg,  # noqa: F401
                                      _row, _threads, model_benchmark, peak_probe)
from bench_suite.store import ResultsStore
from bench_suite.versions import versions

__all__ = [
    "SPEED_COLUMNS",
    "UNITS",
    "HEAD_PRESETS",
    "SpeedOptions",
    "core_benchmark",
    "write_speed_csv",
    "run_speed",
    "run_command",
]

HEAD_PRESETS = {"deit_t": (3, 64), "deit_s": (6, 64)}
"""(heads, head dim) of DeiT-T and DeiT-S; the kernel grid uses DeiT-T's unless told otherwise."""

SPEED_COLUMNS = ("scope", "method", "attention_impl", "keep_rate", "profile", "n", "heads", "head_dim",
                 "batch_size", "threads", "latency_ms_median", "latency_ms_p90", "img_per_s", "peak_mib",
                 "latency_ratio_to_full", "latency_ratio_ci95_low", "latency_ratio_ci95_high", "latency_ratio_to_dense",
                 "key")
"""Columns of ``speed.csv`` (one line per store row written by the invocation)."""


def _fmt_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    from tabulate import tabulate

    body = [[r.get(c) for c in columns] for r in rows]
    return tabulate(body, headers=list(columns), floatfmt=".4g", missingval="")


# --------------------------------------------------------------------------- MHSA core
def core_benchmark(opts: SpeedOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One MHSA core, dense SDPA against sparse attention (kernel, gather) and each method's core candidates.

    Sizes: ``opts.n``/``heads``/``head_dim`` or the profile's (tokens of the backbone, its heads and head
    dim). Keep rates: ``opts.keep_rates`` or 0.25, 0.1, 0.05. Returns store rows (``scope: core``); the
    dense row has keep rate 1.0. ``latency_ratio_to_dense`` = candidate median / dense median.
    """
    n, heads, head_dim = opts.n, opts.heads, opts.head_dim
    if None in (n, heads, head_dim):
        torch.manual_seed(opts.seed)
        bb = create_backbone(opts.profile)
        attn = bb.blocks[0].attn
        n = n or num_tokens(bb)
        heads = heads or attn.num_heads
        head_dim = head_dim or attn.head_dim
        del bb
    rates = opts.keep_rates or list(DEFAULT_KERNEL_KEEP_RATES)
    threads = _threads(opts)
    if "cpp" in opts.impls:
        load_kernel()
    specs = parse_methods(opts.methods) if opts.methods else method_specs()
    settings = {"coef_density": opts.coef_density} if opts.coef_density is not None else {}
    gen = torch.Generator().manual_seed(opts.seed)
    q, k, v = random_qkv(opts.batch_size, heads, n, head_dim, gen)
    scale = head_dim ** -0.5
    fns: dict[str, Callable[[], Any]] = {"dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    meta: dict[str, dict[str, Any]] = {"dense_sdpa": {"method": "dense_sdpa", "keep_rate": 1.0,
                                                      "attention_impl": None, "budget": n}}
    keep: list[Any] = []
    for r in rates:
        budget = keep_count(float(r), n)
        idx = random_key_indices(opts.batch_size, heads, n, n, budget, gen)
        keep.append(idx)
        if "cpp" in opts.impls:
            spot_check(q, k, v, idx)
            fns[f"sparse_cpp@{r:g}"] = lambda idx=idx: sparse_attention(q, k, v, idx, scale, impl="cpp")
            meta[f"sparse_cpp@{r:g}"] = {"method": "sparse_attention", "keep_rate": float(r),
                                         "attention_impl": "cpp", "budget": budget}
        if "torch" in opts.impls:
            fns[f"sparse_torch@{r:g}"] = lambda idx=idx: sparse_attention(q, k, v, idx, scale, impl="torch")
            meta[f"sparse_torch@{r:g}"] = {"method": "sparse_attention", "keep_rate": float(r),
                                           "attention_impl": "torch", "budget": budget}
        for impl in opts.impls:  # each method's own core candidates (BenchModule.core_candidates)
            for spec in specs:
                hook = getattr(spec.factory, "core_candidates", None)
                for name, fn in (hook(q, k, v, float(r), impl, opts.seed, **settings) if hook else {}).items():
                    fns[f"{name}_{impl}@{r:g}"] = fn
                    meta[f"{name}_{impl}@{r:g}"] = {"method": name, "keep_rate": float(r), "attention_impl": impl,
                                                    "budget": budget, "emulated": bool(settings)}
    log(f"MHSA core: N={n}, {heads} heads x {head_dim}, batch {opts.batch_size}, {threads} thread(s), "
        f"{len(fns)} candidates, {opts.repeats} interleaved rounds")
    load = _load_avg()
    res = measure_callables(fns, warmup=opts.warmup, repeats=opts.repeats, num_threads=threads, min_sample_ms=20.0)
    dense_ms = res["dense_sdpa"]["median_ms"]
    rows = []
    for name, r in res.items():
        m = meta[name]
        config = {**_base_config(opts, "core", threads), "method": m["method"], "keep_rate": m["keep_rate"],
                  "attention_impl": m["attention_impl"], "n": n, "heads": heads, "head_dim": head_dim,
                  "indices": "uniform random, distinct per query"}
        if m.get("emulated"):
            config["coef_density_emulated"] = opts.coef_density
        metrics = {"latency_ms_median": r["median_ms"], "latency_ms_p90": r["p90_ms"], "latency_ms_min": r["min_ms"],
                   "latency_ratio_to_dense": r["median_ms"] / dense_ms, "speedup_vs_dense": dense_ms / r["median_ms"],
                   "budget": m["budget"], "flop_ratio": n / m["budget"],
                   "attention_macs": 2 * opts.batch_size * heads * n * m["budget"] * head_dim,
                   "load_avg_1min": load}
        if opts.memory:
            with torch.inference_mode():
                metrics["peak_mib"] = peak_memory_callable_mib(fns[name])
        rows.append(_row(opts, config, metrics))
        log(f"  {name:<22} {r['median_ms']:9.3f} ms (p90 {r['p90_ms']:.3f}), {dense_ms / r['median_ms']:6.2f}x dense")
    return rows


# --------------------------------------------------------------------------- outputs
def write_speed_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``speed.csv``: one line per store row, :data:`SPEED_COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(SPEED_COLUMNS))
        w.writeheader()
        for row in rows:
            c, m = row["config"], row["metrics"]
            w.writerow({"scope": c["scope"], "method": row["method"], "attention_impl": c.get("attention_impl"),
                        "keep_rate": row["keep_rate"], "profile": row["profile"], "n": c.get("n"),
                        "heads": c.get("heads"), "head_dim": c.get("head_dim"), "batch_size": c["batch_size"],
                        "threads": c["threads"], "latency_ms_median": m.get("latency_ms_median"),
                        "latency_ms_p90": m.get("latency_ms_p90"), "img_per_s": m.get("img_per_s"),
                        "peak_mib": m.get("peak_mib"), "latency_ratio_to_full": m.get("latency_ratio_to_full"),
                        "latency_ratio_ci95_low": m.get("latency_ratio_ci95_low"),
                        "latency_ratio_ci95_high": m.get("latency_ratio_ci95_high"),
                        "latency_ratio_to_dense": m.get("latency_ratio_to_dense"), "key": row["key"]})
    return path


def run_speed(opts: SpeedOptions, core: bool = False, kernel: bool = False,
              log: Callable[[str], None] = print, train: bool = False) -> dict[str, Any]:
    """Run the chosen benchmarks (models unless ``core``/``kernel``), write the store, ``speed.csv`` and
    ``kernel.csv``; returns ``{"rows": [...store rows], "kernel": [...kernel rows], "paths": [...]}``."""
    opts.output.mkdir(parents=True, exist_ok=True)
    load, cpus = _load_avg(), os.cpu_count() or 1
    log(f"bench_suite speed: load average {load} (1 min), {_threads(opts)} thread(s) of {cpus} CPUs")
    if load is not None and load + _threads(opts) > cpus + 0.5:
        log(f"warning: the machine is busy (load {load:.1f} on {cpus} CPUs): absolute times are noisy, and "
            f"multi-threaded ops wait for descheduled threads; compare the paired ratios and their 95% CIs, or use "
            f"--threads 1")
    out: dict[str, Any] = {"rows": [], "kernel": [], "paths": []}
    if kernel:
        heads, head_dim = opts.heads or HEAD_PRESETS["deit_t"][0], opts.head_dim or HEAD_PRESETS["deit_t"][1]
        log(f"sparse attention kernel vs dense SDPA: {heads} heads x head dim {head_dim} "
            f"({'DeiT-T' if (heads, head_dim) == HEAD_PRESETS['deit_t'] else 'custom'}), batch {opts.batch_size}")
        out["kernel"] = kernel_benchmark(opts.kernel_n, opts.keep_rates or DEFAULT_KERNEL_KEEP_RATES, heads, head_dim,
                                         opts.batch_size, _threads(opts), opts.warmup, opts.repeats, opts.seed, log,
                                         train=train)
        out["paths"].append(write_kernel_csv(out["kernel"], opts.output / "kernel.csv"))
        log(_fmt_table(out["kernel"], KERNEL_COLUMNS + (KERNEL_TRAIN_COLUMNS if train else ())))
    if core:
        out["rows"] += core_benchmark(opts, log)
    if train and not kernel:
        from bench_suite.speed_train import train_step_benchmark

        out["rows"] += train_step_benchmark(opts, log)
    elif not core and not kernel:
        from bench_suite import speed_grid as grid

        budget = opts.memory_budget_mib
        if budget is None:
            free = available_memory_bytes()
            budget = None if free is None else free / 2 / (1024 * 1024)
        out["rows"] += grid.run_grid(opts, opts.batch_sizes or (opts.batch_size,),
                                     opts.thread_counts or (opts.threads,), opts.precisions or (opts.precision,),
                                     lambda cell: model_benchmark(cell, log), peak_probe, budget, opts.max_batch, log)
        frame = grid.grid_frame(out["rows"])
        ver = versions()
        hardware = f"{ver.get('cpu') or 'unknown CPU'} ({ver.get('cpus')} CPUs; {ver['allocator']})"
        out["paths"] += grid.write_grid(frame, opts.output, hardware)
        out["paths"] += grid.plot_grid(frame, opts.output)
        db = opts.output / "results.sqlite"
        if db.is_file():
            with ResultsStore(db, create=False) as store:
                top1 = grid.trained_top1(store.rows(), opts.profile)
            out["paths"] += grid.plot_top1_latency(frame, top1, opts.output)
    if out["rows"]:
        with ResultsStore(opts.output / "results.sqlite") as store:
            for row in out["rows"]:
                store.put(row)
        out["paths"].append(write_speed_csv(out["rows"], opts.output / "speed.csv"))
        out["paths"].append(opts.output / "results.sqlite")
    log(f"load average at the end: {_load_avg()}")
    for p in out["paths"]:
        log(f"wrote {p}")
    return out


def available_memory_bytes() -> int | None:
    """Memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``; ``None`` if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def core_memory_bytes(n: int, heads: int, head_dim: int, batch: int, keep_rates: Sequence[float]) -> int:
    """Bytes the core/kernel benchmark holds at ``N = n`` (float32 ``q, k, v`` and the dense output, the int64
    key indices of every keep rate, and one ``[N, N]`` block of random scores drawn to pick them)."""
    tensors = 4 * batch * heads * n * head_dim * 4
    indices = sum(8 * batch * heads * n * keep_count(float(r), n) for r in keep_rates)
    return tensors + indices + 4 * n * n


def check_memory(opts: SpeedOptions, core: bool, kernel: bool) -> None:
    """Refuse, before allocating, a core or kernel benchmark whose tensors would not fit in the available
    memory (with a margin of 20%).

    Raises:
        UserError: naming the size, the estimate and what is available.
    """
    free = available_memory_bytes()
    if free is None or not (core or kernel):
        return
    rates = opts.keep_rates or list(DEFAULT_KERNEL_KEEP_RATES)
    sizes = []
    if kernel:
        heads, head_dim = opts.heads or HEAD_PRESETS["deit_t"][0], opts.head_dim or HEAD_PRESETS["deit_t"][1]
        sizes += [("--kernel-n", n, heads, head_dim) for n in opts.kernel_n]
    if core and opts.n is not None:
        sizes.append(("--n", opts.n, opts.heads or HEAD_PRESETS["deit_s"][0], opts.head_dim or 64))  # at most DeiT-S heads
    for option, n, heads, head_dim in sizes:
        need = core_memory_bytes(n, heads, head_dim, opts.batch_size, rates)
        if need > 0.8 * free:
            raise UserError(f"{option} {n} needs about {need / 2**30:.1f} GiB ({heads} heads x {head_dim}, batch "
                            f"{opts.batch_size}), more than the {free / 2**30:.1f} GiB available; choose a smaller "
                            f"N, batch or fewer keep rates")


def run_command(cfg: Any) -> dict[str, Any]:
    """``python -m bench_suite speed``: check the subcommand's options, then run (:func:`run_speed`).

    Raises:
        UserError: for bad options (before anything runs), or a kernel that cannot be built.
    """
    if cfg.build:
        start = time.perf_counter()
        load_kernel(verbose=False)
        info = build_info()
        print(f"sparse attention kernel ready in {time.perf_counter() - start:.1f} s: {info['build_dir']} "
              f"(flags {' '.join(info['flags'])})")
        return {"rows": [], "kernel": [], "paths": []}
    if getattr(cfg, "train", False) and cfg.core:
        raise UserError("--train times training steps of whole models, or with --kernel the kernel's forward and "
                        "backward; --core is eval only")
    rates = parse_list(cfg.keep_rates, float, "--keep-rates")
    if rates is not None and any(not 0.0 < r <= 1.0 or math.isnan(r) for r in rates):
        raise UserError(f"--keep-rates must lie in (0, 1], got {cfg.keep_rates}")
    methods = parse_list(cfg.methods, str, "--methods")
    if methods == []:
        raise UserError(f"--methods {cfg.methods!r} names no method")
    specs = parse_methods(methods) if methods else method_specs()
    names = [s.name for s in specs]
    from bench_suite.speed_grid import parse_batches, parse_precisions, parse_threads

    batches = parse_batches(cfg.batch_size)
    thread_counts = parse_threads(cfg.threads)
    precisions = parse_precisions(getattr(cfg, "precision", "fp32"))
    models = not cfg.core and not cfg.kernel and not getattr(cfg, "train", False)
    if not models and (len(batches) > 1 or "max" in batches or len(thread_counts) > 1 or precisions != ["fp32"]
                       or getattr(cfg, "weights", "random") != "random"):
        raise UserError("--core, --kernel and --train take one --batch-size and one --threads, fp32 and random "
                        "weights; grids, --precision and --weights are for the eval timing of whole models")
    first_batch = next((b for b in batches if b != "max"), 8)
    try:
        opts = SpeedOptions(profile=cfg.profile, methods=methods, keep_rates=rates,
                            batch_size=int(first_batch), threads=thread_counts[0], repeats=cfg.repeats,
                            warmup=cfg.warmup, precision=precisions[0], weights=getattr(cfg, "weights", "random"),
                            batch_sizes=tuple(batches), thread_counts=tuple(thread_counts),
                            precisions=tuple(precisions), max_batch=int(getattr(cfg, "max_batch", 1024)),
                            memory_budget_mib=getattr(cfg, "memory_budget", None),
                            output=Path(cfg.output), seed=cfg.seed,
                            impls=tuple(parse_list(cfg.impl, str, "--impl") or ()), memory=not cfg.no_memory,
                            n=cfg.n, heads=cfg.heads, head_dim=cfg.head_dim,
                            kernel_n=tuple(parse_list(cfg.kernel_n, int, "--kernel-n") or ()),
                            hparams=parse_hparams(cfg.hparams, names), coef_density=cfg.coef_density)
    except ValueError as e:
        raise UserError(str(e)) from None
    for spec in specs:  # settings a method does not take, or of the wrong type: refused before anything runs
        canonical_settings(spec.name, opts.hparams.get(spec.name, {}), spec.defaults(), spec.setting_types())
    if cfg.core or not cfg.kernel:
        get_profile(opts.profile)  # UnknownProfileError before anything runs
    check_memory(opts, core=cfg.core, kernel=cfg.kernel)
    check_output(opts.output)
    return run_speed(opts, core=cfg.core, kernel=cfg.kernel, train=bool(getattr(cfg, "train", False)))
