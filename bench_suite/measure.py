"""Wall-clock measurements of a model in evaluation: latency, throughput, peak memory.

Protocol: ``model.eval()`` under ``torch.inference_mode``, a fixed number of intra-op threads
(recorded), ``warmup`` untimed runs, then ``repeats`` timed runs of one batch; latency is reported as
the median and 90th percentile in ms per batch, throughput as batch size / median latency in img/s.
Peak memory is the peak of tensor memory allocated during one forward (MiB): on CUDA from
``torch.cuda.max_memory_allocated``; on the CPU from the PyTorch profiler's allocation events
(cumulative sum of allocations and frees, maximum over time), so it counts the forward's tensors only.

Comparisons on a shared machine: :func:`measure_callables` and :func:`measure_models` time several
candidates *interleaved* (round ``r`` runs every candidate once, in an order that rotates from round to
round), so a burst of load from other processes hits all candidates alike and their ratios stay
meaningful even when the absolute times drift. Calls much shorter than the timer's resolution are
timed in loops of ``inner`` calls (chosen from the warm-up so that one sample lasts about
``min_sample_ms``) and reported per call.

The ratio of two candidates' latencies comes from the rounds, paired: :func:`paired_ratio` takes the ratio within
each round (both timed moments apart, under the same load) and reports the median of those ratios with a
distribution-free 95 % confidence interval (order statistics of the binomial sign test), so that a reader sees
whether 0.88x and 0.80x differ beyond the run-to-run noise.

Python's garbage collector is off during timed calls (collected before them), as :mod:`timeit` does: a
collection of the whole heap otherwise lands in whichever sample crosses its allocation threshold (4-5 % of
the samples of a ``perf`` profile of ``deit_t384`` forwards here). The allocator a process times under is
:mod:`bench_suite.allocator`'s (the commands keep freed memory; rows record it).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["measure_latency", "measure_callables", "measure_models", "peak_memory_mib",
           "peak_memory_callable_mib", "fixed_threads", "summarize_times", "timing_mode", "gc_paused", "paired_ratio"]

EVAL_TIMING = {"batch": 64, "warmup": 2, "repeats": 5}
"""How ``run`` times each trained model for the Pareto table: one eval forward of a batch of 64 test images,
the median of 5 timed runs after 2 untimed ones, at torch's thread count."""
MIB = 1024.0 * 1024.0


@contextmanager
def fixed_threads(num_threads: int | None) -> Iterator[int]:
    """Run with ``torch.set_num_threads(num_threads)`` (None keeps the current count); yields the count."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect garbage, then keep Python's cyclic garbage collector off inside (as :mod:`timeit` does); restores
    its previous state."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def timing_mode(modules: Any) -> Iterator[None]:
    """Enter the ``timing()`` context of every module, and of every submodule, that has one
    (:meth:`methods.base.BenchModule.timing`, or a layer's own, e.g. a sparse attention layer's: the forward skips
    bookkeeping that is not part of the method, such as statistics for a sparsity report), so that what is timed
    is the method alone; modules without one (a plain timm teacher) are left as they are."""
    with ExitStack() as stack:
        for m in modules:
            for sub in (m.modules() if isinstance(m, nn.Module) else [m]):
                enter = getattr(sub, "timing", None)
                if callable(enter):
                    stack.enter_context(enter())
        yield


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's C-level log lines (they go to file descriptor 2)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, images: torch.Tensor, warmup: int = 3, repeats: int = 10,
                    num_threads: int | None = None) -> dict[str, float]:
    """Eval latency of ``model`` on one batch ``images [B, C, H, W]``.

    Returns:
        ``{"latency_ms_median", "latency_ms_p90" (ms per batch), "img_per_s", "batch_size",
        "threads", "repeats"}``.

    Raises:
        ValueError: if ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    was_training = model.training
    model.eval()
    device = images.device
    times = []
    with fixed_threads(num_threads) as threads, torch.inference_mode(), timing_mode([model]):
        for _ in range(warmup):
            model(images)
        _sync(device)
        with gc_paused():
            for _ in range(repeats):
                start = time.perf_counter()
                model(images)
                _sync(device)
                times.append((time.perf_counter() - start) * 1000.0)
    model.train(was_training)
    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"latency_ms_median": median, "latency_ms_p90": p90, "img_per_s": len(images) / (median / 1000.0),
            "batch_size": float(len(images)), "threads": float(threads), "repeats": float(repeats)}


def summarize_times(times_ms: list[float]) -> dict[str, float]:
    """Median, 90th percentile (nearest rank) and minimum of a list of times (ms).

    Raises:
        ValueError: for an empty list.
    """
    if not times_ms:
        raise ValueError("no times to summarize")
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "min_ms": ordered[0]}


def _median_ci_ranks(n: int, level: float) -> tuple[int, int] | None:
    """1-based ranks ``(k, n + 1 - k)`` of the order statistics bounding a distribution-free confidence interval of
    the median of ``n`` samples at ``level`` (the largest ``k`` with ``2 * P(Binomial(n, 1/2) < k) <= 1 - level``);
    None when ``n`` is too small for that level (fewer than 6 samples at 95 %)."""
    k, tail = 0, 0.0
    while k < n:
        tail_next = tail + math.comb(n, k) / 2.0**n  # P(X <= k)
        if 2.0 * tail_next > 1.0 - level:
            break
        tail, k = tail_next, k + 1
    return None if k == 0 else (k, n + 1 - k)


def paired_ratio(numerator_ms: list[float], denominator_ms: list[float], level: float = 0.95) -> dict[str, Any]:
    """Median and confidence interval of the per-round ratios ``numerator_ms[r] / denominator_ms[r]`` of two
    candidates timed in the same rounds (:func:`measure_callables`'s ``samples_ms``).

    Returns:
        ``{"ratio": median ratio (x), "ci_low", "ci_high": the interval's bounds (x; None below 6 rounds at 95 %),
        "rounds": n, "level": level}``; the interval covers the median of the ratio's distribution with
        probability at least ``level`` for independent rounds (the sign test's order-statistic interval for a
        median).

    Raises:
        ValueError: for lists of different or zero length, or a non-positive denominator.
    """
    if len(numerator_ms) != len(denominator_ms) or not numerator_ms:
        raise ValueError(f"paired samples need equal, non-zero counts, got {len(numerator_ms)} and "
                         f"{len(denominator_ms)}")
    if min(denominator_ms) <= 0:
        raise ValueError("denominator times must be positive")
    ratios = sorted(a / b for a, b in zip(numerator_ms, denominator_ms))
    ranks = _median_ci_ranks(len(ratios), level)
    low, high = (None, None) if ranks is None else (ratios[ranks[0] - 1], ratios[ranks[1] - 1])
    return {"ratio": statistics.median(ratios), "ci_low": low, "ci_high": high, "rounds": len(ratios), "level": level}


def measure_callables(fns: dict[str, Callable[[], Any]], warmup: int = 3, repeats: int = 10,
                      num_threads: int | None = None, min_sample_ms: float = 0.0,
                      device: torch.device | str = "cpu", grad: bool = False) -> dict[str, dict[str, Any]]:
    """Time several zero-argument callables interleaved, under ``torch.inference_mode`` (with ``grad``: with
    autograd on, for training steps).

    Every callable runs ``warmup`` untimed calls; then ``repeats`` rounds, each timing every callable once
    (one sample = ``inner`` back-to-back calls, divided by ``inner``), the order rotating by one position per
    round. ``inner`` is 1 unless ``min_sample_ms`` > 0, then the smallest count whose estimated duration
    (from the last warm-up call: the first one pays for allocation and caches, and estimating from it gave the
    first callable fewer calls per sample than the others) reaches ``min_sample_ms``.

    Returns:
        ``{name: {"median_ms", "p90_ms", "min_ms" (ms per call), "inner", "repeats", "threads", "samples_ms"
        (the rounds' times in round order, ms per call: pair them with :func:`paired_ratio`)}}``.

    Raises:
        ValueError: if ``repeats < 1`` or ``fns`` is empty.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not fns:
        raise ValueError("nothing to time")
    dev = torch.device(device)
    names = list(fns)
    inner = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    with fixed_threads(num_threads) as threads, (torch.enable_grad() if grad else torch.inference_mode()):
        for name in names:
            last = 0.0
            for _ in range(max(1, warmup)):
                start = time.perf_counter()
                fns[name]()
                _sync(dev)
                last = (time.perf_counter() - start) * 1000.0
            inner[name] = 1 if min_sample_ms <= 0 else max(1, int(math.ceil(min_sample_ms / max(last, 1e-3))))
        with gc_paused():
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    fn, count = fns[name], inner[name]
                    start = time.perf_counter()
                    for _ in range(count):
                        fn()
                    _sync(dev)
                    times[name].append((time.perf_counter() - start) * 1000.0 / count)
    return {n: {**summarize_times(times[n]), "inner": float(inner[n]), "repeats": float(repeats),
                "threads": float(threads), "samples_ms": times[n]} for n in names}


def measure_models(models: dict[str, nn.Module], images: torch.Tensor, warmup: int = 3, repeats: int = 10,
                   num_threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Eval latency of several models on one batch, interleaved (see :func:`measure_callables`).

    Returns:
        ``{name: {"latency_ms_median", "latency_ms_p90", "latency_ms_min" (ms per batch), "img_per_s",
        "batch_size", "threads", "repeats", "samples_ms"}}``, the keys of :func:`measure_latency` plus the minimum
        and the rounds' times (see :func:`measure_callables`).

    Raises:
        ValueError: if ``repeats < 1`` or ``models`` is empty.
    """
    modes = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with timing_mode(models.values()):
            res = measure_callables({n: (lambda m=m: m(images)) for n, m in models.items()}, warmup=warmup,
                                    repeats=repeats, num_threads=num_threads, device=images.device)
    finally:
        for n, m in models.items():
            m.train(modes[n])
    return {n: {"latency_ms_median": r["median_ms"], "latency_ms_p90": r["p90_ms"], "latency_ms_min": r["min_ms"],
                "img_per_s": len(images) / (r["median_ms"] / 1000.0), "batch_size": float(len(images)),
                "threads": r["threads"], "repeats": r["repeats"], "samples_ms": r["samples_ms"]}
            for n, r in res.items()}


def peak_memory_callable_mib(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak tensor memory allocated during one call of ``fn`` under ``torch.inference_mode`` (MiB),
    excluding what exists before the call (same method as :func:`peak_memory_mib`). Memory that a C++
    operator allocates through PyTorch's allocator (its output) is counted; its private scratch is not."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / MIB
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), torch.inference_mode(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak / MIB


def peak_memory_mib(model: nn.Module, images: torch.Tensor) -> float:
    """Peak tensor memory allocated during one eval forward of ``images`` (MiB), excluding the
    weights and the input that exist before the call (see :func:`peak_memory_callable_mib`)."""
    was_training = model.training
    model.eval()
    try:
        return peak_memory_callable_mib(lambda: model(images), images.device)
    finally:
        model.train(was_training)
