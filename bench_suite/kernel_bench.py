"""The sparse attention kernel against dense SDPA on a grid: ``python -m bench_suite speed --kernel``.

For every ``N`` and keep rate ``r``: ``q, k, v [batch, heads, N, head_dim]`` (float32, random normal),
budget ``B = ceil(r N)`` uniformly random distinct keys per query (the worst case for memory locality);
the kernel (through the one dispatcher, :func:`bench_suite.kernels.sparse_attention`) and dense SDPA run
interleaved (:func:`bench_suite.measure.measure_callables`). ``kernel.csv`` has :data:`KERNEL_COLUMNS`
(``speedup = dense_ms / sparse_ms``, ``flop_ratio`` = dense attention MACs / sparse MACs = ``N / B``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from bench_suite.backbones import keep_count
from bench_suite.kernels import load_kernel, sparse_attention
from bench_suite.measure import measure_callables

__all__ = ["KERNEL_COLUMNS", "KERNEL_TRAIN_COLUMNS", "DEFAULT_KERNEL_N", "DEFAULT_KERNEL_KEEP_RATES",
           "random_key_indices", "random_qkv", "spot_check", "kernel_benchmark", "write_kernel_csv"]

KERNEL_COLUMNS = ("n", "heads", "head_dim", "batch", "keep_rate", "dense_ms", "sparse_ms", "speedup", "flop_ratio")
"""Columns of ``kernel.csv`` (times: median ms per call over ``--repeats`` interleaved rounds)."""

KERNEL_TRAIN_COLUMNS = ("dense_train_ms", "sparse_train_ms", "gather_train_ms", "train_speedup",
                        "train_speedup_vs_gather")
"""Extra ``kernel.csv`` columns of ``--kernel --train``: forward + backward (gradients of q, k, v) of dense SDPA,
the C++ kernels and the PyTorch gather path; speedups of the kernels over dense and over gather."""

DEFAULT_KERNEL_N = (197, 577, 2305)
DEFAULT_KERNEL_KEEP_RATES = (0.25, 0.1, 0.05)


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


def random_qkv(batch: int, heads: int, n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, heads, n, d, generator=generator) for _ in range(3))


def spot_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuse to time a kernel that disagrees with the PyTorch reference on the first query rows."""
    rows = slice(0, min(8, q.shape[2]))
    with torch.inference_mode():
        a = sparse_attention(q[:, :, rows], k, v, idx[:, :, rows], impl="cpp")
        r = sparse_attention(q[:, :, rows], k, v, idx[:, :, rows], impl="torch")
    if not torch.allclose(a, r, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the sparse attention kernel disagrees with the reference (max abs error "
                           f"{(a - r).abs().max().item():.3g}); not timing it")


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
    load_kernel()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in ns:
        q, k, v = random_qkv(batch, heads, n, head_dim, gen)
        for r in keep_rates:
            budget = keep_count(float(r), n)
            idx = random_key_indices(batch, heads, n, n, budget, gen)
            spot_check(q, k, v, idx)
            res = measure_callables({"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                                     "sparse": lambda: sparse_attention(q, k, v, idx, impl="cpp")},
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
                         "sparse": lambda q_, k_, v_: sparse_attention(q_, k_, v_, idx, impl="cpp"),
                         "gather": lambda q_, k_, v_: sparse_attention(q_, k_, v_, idx, impl="torch")}
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
