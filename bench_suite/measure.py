"""Wall-clock measurements of a model in evaluation: latency, throughput, peak memory.

Protocol: ``model.eval()`` under ``torch.inference_mode``, a fixed number of intra-op threads
(recorded), ``warmup`` untimed runs, then ``repeats`` timed runs of one batch; latency is reported as
the median and 90th percentile in ms per batch, throughput as batch size / median latency in img/s.
Peak memory is the peak of tensor memory allocated during one forward (MiB): on CUDA from
``torch.cuda.max_memory_allocated``; on the CPU from the PyTorch profiler's allocation events
(cumulative sum of allocations and frees, maximum over time), so it counts the forward's tensors only.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["LatencyResult", "measure_latency", "peak_memory_mib", "fixed_threads"]

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
    with fixed_threads(num_threads) as threads, torch.inference_mode():
        for _ in range(warmup):
            model(images)
        _sync(device)
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


def peak_memory_mib(model: nn.Module, images: torch.Tensor) -> float:
    """Peak tensor memory allocated during one eval forward of ``images`` (MiB), excluding the
    weights and the input that exist before the call."""
    was_training = model.training
    model.eval()
    try:
        if images.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(images.device)
            base = torch.cuda.memory_allocated(images.device)
            with torch.inference_mode():
                model(images)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(images.device) - base) / MIB
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), torch.inference_mode(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(images)
        # self_cpu_memory_usage: allocations of an op itself (not its children); frees are "[memory]" events
        deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                        if e.self_cpu_memory_usage)
        current = peak = 0
        for _, delta in deltas:
            current += delta
            peak = max(peak, current)
        return peak / MIB
    finally:
        model.train(was_training)
