"""Wall-clock speed on the CPU: ``python -m bench_suite speed``.

Three benchmarks, all timed with :mod:`bench_suite.measure` (eval mode, ``torch.inference_mode``, a fixed
and recorded number of intra-op threads, ``--warmup`` untimed runs, then ``--repeats`` timed rounds in
which the candidates run *interleaved*, so that load from other processes hits them alike):

* **models** (default): every registered method (``--methods``) at its keep rates (``--keep-rates``) on a
  profile (``--profile``), built as ``spec.factory(create_backbone(profile, num_classes=10), keep_rate=r)``
  with **random weights** (timing only; the rows say ``weights: random``) on a batch of random images.
  Methods with a sparse attention implementation (a factory argument ``attention_impl``, e.g. Sparsifiner)
  run once per ``--impl``. Metrics: latency per batch (median, p90, min; ms), throughput (img/s), peak
  tensor memory of one forward (MiB), the latency relative to ``full`` measured in the same run, and the
  method's :meth:`sparsity_report` (with random weights, e.g. Sparsifiner's coefficient sparsity is not
  a trained model's: ``--coef-density 0.13`` emulates the paper's, see :func:`emulate_coef_density`).
  ``--hparams '{"coef_topk": 8}'`` passes extra settings to the methods that take them.
* **core** (``--core``): one MHSA core (after the QKV projection, before the output projection) at ``N``
  tokens, ``H`` heads of dim ``d`` (default: the profile's), batch ``--batch-size``: dense
  ``F.scaled_dot_product_attention`` against the sparse attention kernel (``cpp``) and the gather
  implementation (``torch``) with random distinct key indices per query, against Sparsifiner's
  whole core (connectivity predictor, top-B, sparse attention, dense CLS row) per ``--impl``, and
  against the connectivity top-B alone (eq. 3 on that predictor's coefficients: ``torch`` = dense scores
  + ``torch.topk``, ``cpp`` = the fused kernel).
* **kernel** (``--kernel``): the sparse attention kernel against dense SDPA on the grid
  ``N in --kernel-n`` x ``keep rate in --keep-rates`` (default 197, 577, 2305 x 0.25, 0.1, 0.05), heads and
  head dim of DeiT-T (3 x 64) unless ``--heads``/``--head-dim`` say otherwise (``--train``: forward +
  backward too, against dense SDPA and the PyTorch gather path); writes ``kernel.csv`` with
  :data:`KERNEL_COLUMNS` (``speedup = dense_ms / sparse_ms``, ``flop_ratio`` = dense attention MACs /
  sparse MACs = ``N / B``).

Model and core rows go to the results store ``<output>/results.sqlite`` (``config["kind"] = "speed"``,
``config["scope"]`` ``"model"`` or ``"core"``, dataset ``"synthetic"``) and to ``<output>/speed.csv``
(this invocation's rows). ``--build`` compiles the C++ kernel (or finds it cached) and exits.

Key indices in the core and kernel benchmarks are uniformly random and distinct per query row: the
worst case for memory locality (a trained Sparsifiner's masks are more local).
"""
from __future__ import annotations

import csv
import inspect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from bench_suite.errors import UserError
from bench_suite.backbones import create_backbone, get_profile, keep_count, num_tokens

__all__ = [
    "KERNEL_COLUMNS",
    "SPEED_COLUMNS",
    "UNITS",
    "HEAD_PRESETS",
    "DEFAULT_KERNEL_N",
    "DEFAULT_KERNEL_KEEP_RATES",
    "SpeedOptions",
    "random_key_indices",
    "kernel_benchmark",
    "core_benchmark",
    "model_benchmark",
    "write_kernel_csv",
    "write_speed_csv",
    "emulate_coef_density",
    "run_speed",
    "run_from_cli",
]

KERNEL_COLUMNS = ("n", "heads", "head_dim", "batch", "keep_rate", "dense_ms", "sparse_ms", "speedup", "flop_ratio")
"""Columns of ``kernel.csv`` (times: median ms per call over ``--repeats`` interleaved rounds)."""

KERNEL_TRAIN_COLUMNS = ("dense_train_ms", "sparse_train_ms", "gather_train_ms", "train_speedup",
                        "train_speedup_vs_gather")
"""Extra ``kernel.csv`` columns of ``--kernel --train``: forward + backward (gradients of q, k, v) of dense SDPA,
the C++ kernels and the PyTorch gather path; speedups of the kernels over dense and over gather."""

HEAD_PRESETS = {"deit_t": (3, 64), "deit_s": (6, 64)}
"""(heads, head dim) of DeiT-T and DeiT-S; the kernel grid uses DeiT-T's unless told otherwise."""

DEFAULT_KERNEL_N = (197, 577, 2305)
DEFAULT_KERNEL_KEEP_RATES = (0.25, 0.1, 0.05)
DATASET = "synthetic"  # the store's dataset field: random images, no data set is read

UNITS = {
    "latency_ms_median": "ms", "latency_ms_p90": "ms", "latency_ms_min": "ms", "img_per_s": "img/s",
    "peak_mib": "MiB", "latency_ratio_to_full": "x", "latency_ratio_to_dense": "x", "speedup_vs_dense": "x",
    "flop_ratio": "x", "budget": "keys", "attention_macs": "MACs", "load_avg_1min": "runnable tasks",
    "coef_sparsity": "fraction", "w_up_sparsity": "fraction", "mask_density": "fraction",
    "attention_budget": "keys", "n_down": "rank",
}

SPEED_COLUMNS = ("scope", "method", "attention_impl", "keep_rate", "profile", "n", "heads", "head_dim",
                 "batch_size", "threads", "latency_ms_median", "latency_ms_p90", "img_per_s", "peak_mib",
                 "latency_ratio_to_full", "latency_ratio_to_dense", "key")
"""Columns of ``speed.csv`` (one line per store row written by the invocation)."""


@dataclass
class SpeedOptions:
    """Resolved options of one ``speed`` invocation (see the module docstring).

    Attributes:
        profile: backbone profile name. methods: method names (None: all registered). keep_rates: override
        of the keep rates (None: each method's grid; the core/kernel defaults). batch_size: images (or
        sequences) per batch. threads: intra-op threads (None: torch's current count). repeats, warmup:
        timed rounds and untimed runs. output: results folder. seed: seed of weights, images and indices.
        impls: sparse attention implementations to run (``cpp``, ``torch``). memory: measure peak memory.
        n, heads, head_dim: core sizes (None: the profile's); heads/head_dim also set the kernel grid.
        kernel_n: token counts of the kernel grid.
        hparams: extra factory arguments for the methods that accept them (e.g. ``{"coef_topk": 8}``).
        coef_density: emulate a trained Sparsifiner's coefficient density (see :func:`emulate_coef_density`).
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


def random_key_indices(batch: int, heads: int, n_q: int, n_k: int, budget: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random key indices, distinct within each query row: int64 ``[batch, heads, n_q, budget]``
    (the top-``budget`` of random scores, drawn one ``[n_q, n_k]`` block at a time to bound memory).

    Raises:
        ValueError: if ``budget`` is not in ``[1, n_k]``.
    """
    if not 1 <= budget <= n_k:
        raise ValueError(f"budget must lie in [1, {n_k}], got {budget}")
    out = torch.empty(batch, heads, n_q, budget, dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            out[b, h] = torch.rand(n_q, n_k, generator=generator).topk(budget, dim=-1, sorted=False).indices
    return out


def _qkv(batch: int, heads: int, n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, heads, n, d, generator=generator) for _ in range(3))


def _spot_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuse to time a kernel that disagrees with the PyTorch reference on the first query rows."""
    from bench_suite.kernels import sparse_attention_cpp, sparse_attention_torch

    rows = slice(0, min(8, q.shape[2]))
    with torch.inference_mode():
        a = sparse_attention_cpp(q[:, :, rows], k, v, idx[:, :, rows])
        r = sparse_attention_torch(q[:, :, rows], k, v, idx[:, :, rows])
    if not torch.allclose(a, r, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the sparse attention kernel disagrees with the reference (max abs error "
                           f"{(a - r).abs().max().item():.3g}); not timing it")


def _fmt_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    from tabulate import tabulate

    body = [[r.get(c) for c in columns] for r in rows]
    return tabulate(body, headers=list(columns), floatfmt=".4g", missingval="")


# --------------------------------------------------------------------------- kernel grid
def kernel_benchmark(ns: Sequence[int] = DEFAULT_KERNEL_N, keep_rates: Sequence[float] = DEFAULT_KERNEL_KEEP_RATES,
                     heads: int = 3, head_dim: int = 64, batch: int = 1, threads: int | None = None,
                     warmup: int = 3, repeats: int = 10, seed: int = 0,
                     log: Callable[[str], None] = print, train: bool = False) -> list[dict[str, Any]]:
    """The sparse attention kernel against dense ``F.scaled_dot_product_attention`` on a grid.

    For every ``N`` and keep rate ``r``: ``q, k, v [batch, heads, N, head_dim]`` (float32, random normal),
    budget ``B = ceil(r N)`` random distinct keys per query; both run interleaved (median of ``repeats``
    samples of at least ~20 ms each). The kernel is first spot-checked against the PyTorch reference.
    With ``train``, forward + backward (``torch.autograd.grad`` of ``q, k, v`` for a random output
    gradient) of dense SDPA, the kernels and the PyTorch gather path are timed the same way.

    Returns:
        One dict per (N, keep rate) with :data:`KERNEL_COLUMNS` plus ``budget``, ``dense_p90_ms``,
        ``sparse_p90_ms`` and ``threads`` (and :data:`KERNEL_TRAIN_COLUMNS` with ``train``).

    Raises:
        bench_suite.kernels.KernelBuildError: if the kernel cannot be built.
    """
    from bench_suite.kernels import load_kernel, sparse_attention_cpp, sparse_attention_torch
    from bench_suite.measure import measure_callables

    load_kernel()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in ns:
        q, k, v = _qkv(batch, heads, n, head_dim, gen)
        for r in keep_rates:
            budget = keep_count(float(r), n)
            idx = random_key_indices(batch, heads, n, n, budget, gen)
            _spot_check(q, k, v, idx)
            res = measure_callables({"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                                     "sparse": lambda: sparse_attention_cpp(q, k, v, idx)},
                                    warmup=warmup, repeats=repeats, num_threads=threads, min_sample_ms=20.0)
            dense, sparse = res["dense"], res["sparse"]
            row = {"n": n, "heads": heads, "head_dim": head_dim, "batch": batch, "keep_rate": float(r),
                   "dense_ms": dense["median_ms"], "sparse_ms": sparse["median_ms"],
                   "speedup": dense["median_ms"] / sparse["median_ms"], "flop_ratio": n / budget,
                   "budget": budget, "dense_p90_ms": dense["p90_ms"], "sparse_p90_ms": sparse["p90_ms"],
                   "threads": int(dense["threads"])}
            out.append(row)
            log(f"  N={n:5d} keep {r:<5g} B={budget:4d}: dense {row['dense_ms']:9.3f} ms, sparse "
                f"{row['sparse_ms']:9.3f} ms, speedup {row['speedup']:6.2f}x (FLOP ratio {row['flop_ratio']:.2f})")
            if train:
                g = torch.randn(q.shape, generator=gen)
                cands = {"dense": lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_),
                         "sparse": lambda q_, k_, v_: sparse_attention_cpp(q_, k_, v_, idx),
                         "gather": lambda q_, k_, v_: sparse_attention_torch(q_, k_, v_, idx)}
                res = measure_callables({name: _forward_backward(fn, q, k, v, g) for name, fn in cands.items()},
                                        warmup=warmup, repeats=repeats, num_threads=threads, min_sample_ms=20.0)
                row.update({f"{name}_train_ms": res[name]["median_ms"] for name in cands})
                row["train_speedup"] = row["dense_train_ms"] / row["sparse_train_ms"]
                row["train_speedup_vs_gather"] = row["gather_train_ms"] / row["sparse_train_ms"]
                log(f"  {'':5s} forward+backward: dense {row['dense_train_ms']:9.3f} ms, sparse "
                    f"{row['sparse_train_ms']:9.3f} ms, gather {row['gather_train_ms']:9.3f} ms, speedup "
                    f"{row['train_speedup']:6.2f}x over dense, {row['train_speedup_vs_gather']:6.2f}x over gather")
            del idx
    return out


def _forward_backward(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      g: torch.Tensor) -> Callable[[], None]:
    """A callable running ``fn(q, k, v)`` and the gradients of ``q, k, v`` for the output gradient ``g``
    (autograd on even inside the timer's ``inference_mode``; the inputs are normal tensors made outside it)."""
    def call() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            torch.autograd.grad(fn(*leaves), leaves, g)
    return call


def write_kernel_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``kernel.csv`` with exactly :data:`KERNEL_COLUMNS` (full precision), plus
    :data:`KERNEL_TRAIN_COLUMNS` when the rows have them (``--train``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(KERNEL_COLUMNS) + ([*KERNEL_TRAIN_COLUMNS] if rows and KERNEL_TRAIN_COLUMNS[0] in rows[0] else [])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in columns})
    return path


# --------------------------------------------------------------------------- store rows
def _row(opts: SpeedOptions, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    from bench_suite.store import config_key
    from bench_suite.versions import versions

    ver = versions()
    units = {m: UNITS[m] for m in metrics if m in UNITS}
    return {"key": config_key(config), "status": "ok", "method": config["method"], "keep_rate": config["keep_rate"],
            "profile": opts.profile, "dataset": DATASET, "seed": opts.seed, "config": config, "metrics": metrics,
            "units": units, "versions": ver, "git": ver["git"], "error": None}


def _base_config(opts: SpeedOptions, scope: str, threads: int) -> dict[str, Any]:
    return {"kind": "speed", "scope": scope, "profile": opts.profile, "batch_size": opts.batch_size,
            "threads": threads, "repeats": opts.repeats, "warmup": opts.warmup, "seed": opts.seed,
            "weights": "random", "inputs": "random normal", "device": "cpu", "dtype": "float32"}


# --------------------------------------------------------------------------- MHSA core
def core_benchmark(opts: SpeedOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One MHSA core, dense SDPA against sparse attention (kernel, gather) and Sparsifiner's core.

    Sizes: ``opts.n``/``heads``/``head_dim`` or the profile's (tokens of the backbone, its heads and head
    dim). Keep rates: ``opts.keep_rates`` or 0.25, 0.1, 0.05. Returns store rows (``scope: core``); the
    dense row has keep rate 1.0. ``latency_ratio_to_dense`` = candidate median / dense median.
    """
    from bench_suite.kernels import (connectivity_topk_cpp, connectivity_topk_torch, load_kernel,
                                     sparse_attention_cpp, sparse_attention_torch)
    from bench_suite.measure import measure_callables, peak_memory_callable_mib

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
        _register_cpp()
    gen = torch.Generator().manual_seed(opts.seed)
    q, k, v = _qkv(opts.batch_size, heads, n, head_dim, gen)
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
            _spot_check(q, k, v, idx)
            fns[f"sparse_cpp@{r:g}"] = lambda idx=idx: sparse_attention_cpp(q, k, v, idx, scale)
            meta[f"sparse_cpp@{r:g}"] = {"method": "sparse_attention", "keep_rate": float(r),
                                         "attention_impl": "cpp", "budget": budget}
        if "torch" in opts.impls:
            fns[f"sparse_torch@{r:g}"] = lambda idx=idx: sparse_attention_torch(q, k, v, idx, scale)
            meta[f"sparse_torch@{r:g}"] = {"method": "sparse_attention", "keep_rate": float(r),
                                           "attention_impl": "torch", "budget": budget}
        for impl in opts.impls:
            core = _sparsifiner_core(q, k, v, float(r), impl, opts.seed, opts.coef_density)
            if core is None:
                continue
            fn, coef, w_up = core
            fns[f"sparsifiner_{impl}@{r:g}"] = fn
            meta[f"sparsifiner_{impl}@{r:g}"] = {"method": "sparsifiner_core", "keep_rate": float(r),
                                                 "attention_impl": impl, "budget": budget}
            # eq. 3 alone on the same coefficients: dense scores + torch.topk, or the fused kernel
            topk_fn = connectivity_topk_cpp if impl == "cpp" else connectivity_topk_torch
            fns[f"conn_topk_{impl}@{r:g}"] = lambda f=topk_fn, c=coef, w=w_up, bk=budget: f(c, w, bk)
            meta[f"conn_topk_{impl}@{r:g}"] = {"method": "connectivity_topk", "keep_rate": float(r),
                                               "attention_impl": impl, "budget": budget}
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
        if m["method"] == "sparsifiner_core" and opts.coef_density is not None:
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


def _register_cpp() -> None:
    try:
        from bench_suite.kernels import register

        register()
    except ImportError:  # methods.sparse_attention not available: the plain kernel still works
        pass


def _sparsifiner_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_rate: float, impl: str,
                      seed: int, coef_density: float | None = None) -> tuple[Callable[[], Any], Any, Any] | None:
    """Sparsifiner's whole attention core (predictor, top-B, sparse attention, dense CLS row) with a randomly
    initialised predictor (its ``tau`` set for ``coef_density`` if given, as :func:`emulate_coef_density`),
    with the predictor's coefficients and ``W_up`` on these inputs; None if :mod:`methods.sparse_attention`
    is not available."""
    try:
        from methods.sparse_attention import ConnectivityPredictor, default_n_down, sparsifiner_attention
    except ImportError:
        return None
    _, heads, n, d = q.shape
    torch.manual_seed(seed)
    pred = ConnectivityPredictor(n, d, heads, default_n_down(n)).eval()
    if coef_density is not None:
        with torch.inference_mode():
            a_down = pred(q[:, :, 1:], k).a_down.flatten()
        pred.tau = float(torch.quantile(a_down[:: max(1, a_down.numel() // 1_000_000)], 1.0 - coef_density))
    with torch.inference_mode():
        out = pred(q[:, :, 1:], k)
    return (lambda: sparsifiner_attention(q, k, v, pred, keep_rate, impl=impl).out), out.coef, out.w_up


# --------------------------------------------------------------------------- whole models
def emulate_coef_density(model: torch.nn.Module, images: torch.Tensor, density: float,
                         passes: int = 2) -> list[float] | None:
    """Make a randomly initialised Sparsifiner predict coefficients as dense as a trained one, for timing.

    With random weights the low-rank attention ``A_down`` (paper eq. 1) is nearly uniform (each entry about
    ``1 / n_down``), so the paper's threshold ``tau = 0.05`` (eq. 2) zeroes every coefficient: the
    connectivity scores are all 0 and the top-B selection degenerates, which is not what a trained model
    costs (paper: about 87% of the coefficients are zero, i.e. a density of 0.13). This sets each
    :class:`methods.sparse_attention.ConnectivityPredictor`'s ``tau`` to the ``1 - density`` quantile of its
    ``A_down`` on ``images`` (``passes`` rounds, since a layer's input depends on the earlier layers' masks),
    so that the fraction of nonzero coefficients is ``density``. Only the threshold value changes; the
    computation is the method's. Returns the thresholds set, or None if the model has no predictor.
    """
    try:
        from methods.sparse_attention import ConnectivityPredictor
    except ImportError:
        return None
    preds = [m for m in model.modules() if isinstance(m, ConnectivityPredictor)]
    if not preds:
        return None
    was_training = model.training
    model.eval()
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
    finally:
        model.train(was_training)
    return [p.tau for p in preds]


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    targets = [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else [factory]
    for t in targets:
        params = inspect.signature(t).parameters
        if name in params:
            return True
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def model_benchmark(opts: SpeedOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Eval speed of whole models with random weights (see the module docstring); returns store rows.

    Raises:
        bench_suite.registry.UnknownMethodError: for an unknown method name.
        bench_suite.backbones.UnknownProfileError: for an unknown profile.
    """
    from bench_suite.measure import measure_models, peak_memory_mib
    from bench_suite.registry import method_specs, parse_methods

    profile = get_profile(opts.profile)
    specs = parse_methods(opts.methods) if opts.methods else method_specs()
    threads = _threads(opts)
    if "cpp" in opts.impls:
        _register_cpp()
    hparams = dict(opts.hparams or {})
    unused = [k for k in hparams if not any(_accepts(spec.factory, k) for spec in specs)]
    if unused:
        raise ValueError(f"--hparams: no chosen method takes {', '.join(unused)}")
    plan = []
    for spec in specs:
        rates = [1.0] if tuple(spec.keep_rates) == (1.0,) else (opts.keep_rates or list(spec.keep_rates))
        impls: list[str | None] = list(opts.impls) if _accepts(spec.factory, "attention_impl") else [None]
        for r in rates:
            for impl in impls:
                plan.append((spec, float(r), impl))
    gen = torch.Generator().manual_seed(opts.seed)
    images = torch.randn(opts.batch_size, profile.in_chans, profile.img_size, profile.img_size, generator=gen)
    models, labels, extras, taus = {}, {}, {}, {}
    for spec, r, impl in plan:
        torch.manual_seed(opts.seed)
        extra = {k: v for k, v in hparams.items() if _accepts(spec.factory, k)}
        if impl is not None:
            extra["attention_impl"] = impl
        module = spec.factory(create_backbone(profile, num_classes=10), keep_rate=r, **extra)
        label = f"{spec.name}@{r:g}" + (f"/{impl}" if impl else "")
        if opts.coef_density is not None:
            taus[label] = emulate_coef_density(module, images, opts.coef_density)
        models[label] = module.eval()
        labels[label] = (spec, r, impl)
        extras[label] = {k: v for k, v in extra.items() if k != "attention_impl"}
    if any(impl == "cpp" for *_, impl in plan):
        from bench_suite.kernels import load_kernel

        load_kernel()
    log(f"models on {profile.name} ({profile.img_size}px), batch {opts.batch_size}, {threads} thread(s), "
        f"random weights: {', '.join(models)}; {opts.repeats} interleaved rounds after {opts.warmup} warm-up")
    load = _load_avg()
    res = measure_models(models, images, warmup=opts.warmup, repeats=opts.repeats, num_threads=threads)
    full_ms = next((res[lab]["latency_ms_median"] for lab, (s, *_) in labels.items() if s.name == "full"), None)
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
        if taus.get(label) is not None:
            config["coef_density_emulated"] = opts.coef_density
            config["tau_emulated"] = [round(t, 8) for t in taus[label]]
        metrics: dict[str, Any] = {k: r[k] for k in ("latency_ms_median", "latency_ms_p90", "latency_ms_min",
                                                     "img_per_s")}
        metrics["latency_ratio_to_full"] = None if full_ms is None else r["latency_ms_median"] / full_ms
        metrics["load_avg_1min"] = load
        if opts.memory:
            with torch.inference_mode():
                metrics["peak_mib"] = peak_memory_mib(module, images)
        metrics.update({k: float(v) for k, v in module.sparsity_report().items()})
        rows.append(_row(opts, config, metrics))
        ratio = "" if full_ms is None else f", {r['latency_ms_median'] / full_ms:.3f}x full's latency"
        log(f"  {label:<28} {r['latency_ms_median']:9.2f} ms/batch (p90 {r['latency_ms_p90']:.2f}), "
            f"{r['img_per_s']:8.2f} img/s{ratio}")
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
                        "latency_ratio_to_dense": m.get("latency_ratio_to_dense"), "key": row["key"]})
    return path


def run_speed(opts: SpeedOptions, core: bool = False, kernel: bool = False,
              log: Callable[[str], None] = print, train: bool = False) -> dict[str, Any]:
    """Run the chosen benchmarks (models unless ``core``/``kernel``), write the store, ``speed.csv`` and
    ``kernel.csv``; returns ``{"rows": [...store rows], "kernel": [...kernel rows], "paths": [...]}``."""
    from bench_suite.store import ResultsStore

    opts.output.mkdir(parents=True, exist_ok=True)
    load, cpus = _load_avg(), os.cpu_count() or 1
    log(f"bench_suite speed: load average {load} (1 min), {_threads(opts)} thread(s) of {cpus} CPUs")
    if load is not None and load + _threads(opts) > cpus + 0.5:
        log(f"warning: the machine is busy (load {load:.1f} on {cpus} CPUs): absolute times are noisy, and "
            f"multi-threaded ops wait for descheduled threads; compare the interleaved ratios, or use --threads 1")
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
    if not core and not kernel:
        out["rows"] += model_benchmark(opts, log)
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


def _parse_list(text: str | None, kind: Callable[[str], Any], what: str) -> list[Any] | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        return [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{what}: cannot parse {text!r}") from None


def _parse_json(text: str | None) -> dict[str, Any] | None:
    import json

    if text is None or str(text).strip() == "":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--hparams is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--hparams must be a JSON object, got {text!r}")
    return value


def run_from_cli(cfg: Any) -> dict[str, Any]:
    """``python -m bench_suite speed``: parse the subcommand's options and run; errors a user can fix become
    :class:`bench_suite.cli.UserError`."""
    from bench_suite.kernels import KernelBuildError, build_info, load_kernel

    if cfg.build:
        start = time.perf_counter()
        try:
            load_kernel(verbose=False)
        except KernelBuildError as e:
            raise UserError(str(e)) from None
        info = build_info()
        print(f"sparse attention kernel ready in {time.perf_counter() - start:.1f} s: {info['build_dir']} "
              f"(flags {' '.join(info['flags'])})")
        return {"rows": [], "kernel": [], "paths": []}
    try:
        rates = _parse_list(cfg.keep_rates, float, "--keep-rates")
        if rates is not None and any(not 0.0 < r <= 1.0 or math.isnan(r) for r in rates):
            raise ValueError(f"--keep-rates must lie in (0, 1], got {cfg.keep_rates}")
        opts = SpeedOptions(profile=cfg.profile, methods=_parse_list(cfg.methods, str, "--methods"), keep_rates=rates,
                            batch_size=cfg.batch_size, threads=cfg.threads, repeats=cfg.repeats, warmup=cfg.warmup,
                            output=Path(cfg.output), seed=cfg.seed,
                            impls=tuple(_parse_list(cfg.impl, str, "--impl") or ()), memory=not cfg.no_memory,
                            n=cfg.n, heads=cfg.heads, head_dim=cfg.head_dim,
                            kernel_n=tuple(_parse_list(cfg.kernel_n, int, "--kernel-n") or ()),
                            hparams=_parse_json(cfg.hparams), coef_density=cfg.coef_density)
        if cfg.core or not cfg.kernel:
            get_profile(opts.profile)  # UnknownProfileError (a ValueError) before anything runs
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        if getattr(cfg, "train", False) and not cfg.kernel:
            raise UserError("--train times the kernel's forward and backward: use it with --kernel")
        return run_speed(opts, core=cfg.core, kernel=cfg.kernel, train=bool(getattr(cfg, "train", False)))
    except KernelBuildError as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        if str(e).startswith("--"):  # option problems found while planning (e.g. --hparams)
            raise UserError(str(e)) from None
        raise
