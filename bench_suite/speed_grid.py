"""The speed grid of ``python -m bench_suite speed``: whole-model eval latency over batch sizes, thread counts
and precisions, on random weights or on the trained checkpoints of a results store.

``speed --batch-size 1,8,64,max --threads 1,all --precision fp32,bf16 [--weights store]`` runs the model
benchmark (:func:`bench_suite.speed_models.model_benchmark`: every method and keep rate timed *interleaved*) once per
cell of the grid and writes, next to the store rows and ``speed.csv``:

* ``speed_grid.{csv,md}``: one line per (method, keep rate, implementation, batch, threads, precision) with the
  median and p90 latency (ms per batch), the throughput (img/s) and the latency relative to full attention's in
  the same cell (``x``);
* ``speed_grid.png`` / ``.pdf``: latency against keep rate per method, one panel per batch size and thread count
  (line style: precision);
* ``speed_top1_latency.png`` / ``.pdf``, when the store holds trained rows of the profile: the top-1 of each
  trained (method, keep rate) against its latency in each cell (seeds averaged).

``max`` is the largest power-of-two batch (at most ``--max-batch``) whose predicted peak eval memory, for the
most memory-hungry model of the run, stays within ``--memory-budget`` MiB (default: half the memory available
now). The prediction is linear in the batch, fitted on measured peaks at batches 1 and 2
(:func:`largest_fitting_batch`); the resolved value is printed and stored in every row (``batch_rule``).

``all`` threads is the number of CPUs this process may use. ``bf16`` runs the forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``; it is refused where the CPU reports no bf16 instructions
(:func:`cpu_has_bf16`). The C++ kernels compute in float32: under bf16 the sparse attention kernel runs on float32
copies of the bfloat16 q/k/v, its output cast back (as in ``bf16-mixed`` training); the fused inference path, which
needs float32 inputs, gives way to the unfused one.

``--weights store`` times, for every (method, keep rate) that has one, the newest trained checkpoint of the
profile in ``<output>/results.sqlite`` (a real predictor's sparsity: thresholded coefficients and ``W_up``, not
``--coef-density``'s emulation); the others keep random weights; every row says which (``weights``, and the
checkpoint's configuration key). Inputs stay random images of the profile's size.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from bench_suite.errors import UserError

__all__ = ["PRECISIONS", "GRID_COLUMNS", "parse_batches", "parse_threads", "parse_precisions", "cpu_has_bf16",
           "largest_fitting_batch", "grid_frame", "write_grid", "plot_grid", "plot_top1_latency",
           "trained_top1"]

PRECISIONS = ("fp32", "bf16")
"""``speed --precision`` values: float32, or bfloat16 autocast."""

GRID_COLUMNS = ("method", "keep_rate", "attention_impl", "batch_size", "threads", "precision", "weights",
                "latency_ms_median", "latency_ms_p90", "img_per_s", "latency_ratio_to_full", "latency_ratio_ci95_low",
                "latency_ratio_ci95_high")
"""Columns of ``speed_grid.csv`` (units: ms per batch, img/s, x full attention's latency in the same cell: the
median of the per-round ratios and its 95 % confidence interval, :func:`bench_suite.measure.paired_ratio`)."""

DEFAULT_MAX_BATCH = 1024


def _parse_axis(text: str | int, option: str, word: str, resolve: Callable[[], int | str]) -> list[int | str]:
    """A comma list of positive integers and ``word`` (resolved by ``resolve``), distinct, in the given order.

    Raises:
        UserError: for a value that is neither a positive integer nor ``word``.
    """
    out: list[int | str] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if part == word:
            value: int | str = resolve()
        else:
            try:
                value = int(part)
            except ValueError:
                raise UserError(f"{option} takes positive integers and '{word}', got {part!r}") from None
            if value < 1:
                raise UserError(f"{option} must be at least 1, got {value}")
        if value not in out:
            out.append(value)
    return out


def parse_batches(text: str | int) -> list[int | str]:
    """``--batch-size 1,8,64,max`` -> ``[1, 8, 64, "max"]`` (distinct, in the given order).

    Raises:
        UserError: for a value that is neither a positive integer nor ``max``.
    """
    return _parse_axis(text, "--batch-size", "max", lambda: "max")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_threads(text: str | int | None) -> list[int | None]:
    """``--threads 1,all`` -> ``[1, <usable CPUs>]``; ``None`` -> ``[None]`` (torch's current count).

    Raises:
        UserError: for a value that is neither a positive integer nor ``all``.
    """
    if text is None:
        return [None]
    return list(_parse_axis(text, "--threads", "all", usable_cpus))  # type: ignore[arg-type]


def cpu_has_bf16() -> bool:
    """Whether this CPU reports bfloat16 instructions (``avx512_bf16``, ``amx_bf16`` or Arm's ``bf16`` in
    ``/proc/cpuinfo``). Where it does not, bf16 matrix products are emulated and their timing says nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def parse_precisions(text: str | None) -> list[str]:
    """``--precision fp32,bf16`` -> ``["fp32", "bf16"]``.

    Raises:
        UserError: for an unknown precision, or bf16 on a CPU without bf16 instructions.
    """
    out = []
    for part in str("fp32" if text is None else text).split(","):
        part = part.strip().lower()
        if part not in PRECISIONS:
            raise UserError(f"--precision takes {', '.join(PRECISIONS)}, got {part!r}")
        if part == "bf16" and not cpu_has_bf16():
            raise UserError("--precision bf16: this CPU reports no bf16 instructions (avx512_bf16, amx_bf16)")
        if part not in out:
            out.append(part)
    return out


def largest_fitting_batch(peak_mib: Callable[[int], float], budget_mib: float,
                          cap: int = DEFAULT_MAX_BATCH) -> tuple[int, str]:
    """The largest power-of-two batch ``<= cap`` whose predicted peak memory fits ``budget_mib``.

    The peak is predicted linearly from measurements at batches 1 and 2 (``peak(b) = p1 + (b - 1) (p2 - p1)``):
    activations grow with the batch, the rest does not.

    Args:
        peak_mib: batch -> measured peak eval memory (MiB) of the most memory-hungry model.
        budget_mib: memory allowed (MiB).
        cap: the largest batch considered.

    Returns:
        ``(batch, rule)``: the batch and a one-line account of how it was chosen.

    Raises:
        UserError: if not even batch 1 fits.
    """
    p1, p2 = float(peak_mib(1)), float(peak_mib(2))
    if p1 > budget_mib:
        raise UserError(f"--batch-size max: one image already needs {p1:.0f} MiB, over the {budget_mib:.0f} MiB "
                        f"budget (--memory-budget)")
    slope = max(p2 - p1, 1e-9)
    batch = 1
    while batch * 2 <= cap and p1 + (batch * 2 - 1) * slope <= budget_mib:
        batch *= 2
    rule = (f"max: largest power of two <= {cap} whose predicted peak ({p1:.1f} + (b - 1) x {slope:.2f} MiB) fits "
            f"{budget_mib:.0f} MiB")
    return batch, rule


def grid_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Store rows of a grid -> one line per cell and configuration, :data:`GRID_COLUMNS`."""
    lines = []
    for row in rows:
        c, m = row["config"], row["metrics"]
        lines.append({"method": row["method"], "keep_rate": float(row["keep_rate"]),
                      "attention_impl": c.get("attention_impl"), "batch_size": int(c["batch_size"]),
                      "threads": int(c["threads"]), "precision": c.get("precision", "fp32"),
                      "weights": c.get("weights", "random"), "latency_ms_median": m.get("latency_ms_median"),
                      "latency_ms_p90": m.get("latency_ms_p90"), "img_per_s": m.get("img_per_s"),
                      **{k: m.get(k) for k in GRID_COLUMNS[-3:]}})
    frame = pd.DataFrame(lines, columns=list(GRID_COLUMNS))
    return frame.sort_values(["precision", "threads", "batch_size", "method", "keep_rate"], kind="stable") \
        .reset_index(drop=True)


def write_grid(frame: pd.DataFrame, out_dir: Path, hardware: str) -> list[Path]:
    """Write ``speed_grid.csv`` (full precision) and ``speed_grid.md`` (a caption with the hardware and units)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "speed_grid.csv", out_dir / "speed_grid.md"
    frame.to_csv(csv_path, index=False)
    ci = [f"{lo:.3f}-{hi:.3f}" if pd.notna(lo) and pd.notna(hi) else None
          for lo, hi in zip(frame["latency_ratio_ci95_low"], frame["latency_ratio_ci95_high"])]
    shown = frame.drop(columns=["latency_ratio_ci95_low", "latency_ratio_ci95_high"]).assign(
        attention_impl=frame["attention_impl"].fillna("–"), ci=ci).rename(columns={
            "keep_rate": "keep rate", "attention_impl": "impl", "batch_size": "batch",
            "latency_ms_median": "latency (ms/batch)", "latency_ms_p90": "p90 (ms)", "img_per_s": "img/s",
            "latency_ratio_to_full": "x full", "ci": "x full 95% CI"})
    body = shown.to_markdown(index=False, floatfmt=".4g", missingval="–")
    caption = (f"Table: eval latency of every method over batch size, threads and precision, measured by this run "
               f"on {hardware}; models of one cell timed interleaved (rotating order); 'x full' = latency relative "
               f"to full attention in the same cell, the median of the per-round ratios, with its distribution-free "
               f"95% confidence interval; weights 'random' or a trained checkpoint ('store').")
    md_path.write_text(body + "\n\n" + caption + "\n", encoding="utf-8")
    return [csv_path, md_path]


def _facet_label(batch: int, threads: int) -> str:
    return f"batch {batch}, {threads} thread{'s' if threads != 1 else ''}"


def _panels(cells: Sequence[Any], methods: Sequence[str], draw: Callable[[Any, Any, Any], None], out_dir: Path,
            stem: str) -> list[Path]:
    """One panel per cell (3 per row), ``draw(ax, cell, palette)`` fills it; one legend below; writes
    ``<stem>.png`` and ``<stem>.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from bench_suite.plots import method_palette

    cols = min(len(cells), 3)
    rows = math.ceil(len(cells) / cols)
    palette = method_palette(sorted(set(methods)))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, cell in zip(axes.flat, cells):
            draw(ax, cell, palette)
        for ax in list(axes.flat)[len(cells):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
        for path in paths:
            fig.savefig(path, dpi=160, bbox_inches="tight")
        plt.close(fig)
    return paths


def plot_grid(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``speed_grid.{png,pdf}``: latency (ms/batch, log scale) against keep rate, one line per method (dashed:
    bf16), one panel per batch size and thread count. Methods without a keep rate (full attention) are a
    horizontal line."""
    from matplotlib.ticker import FormatStrFormatter

    data = frame.dropna(subset=["latency_ms_median"]).copy()
    if data.empty:
        return []
    data["label"] = [m if not isinstance(i, str) or not i else f"{m} ({i})"
                     for m, i in zip(data["method"], data["attention_impl"])]

    def draw(ax: Any, cell: tuple[int, int], palette: dict[str, Any]) -> None:
        b, t = cell
        part_of = data[(data["batch_size"] == b) & (data["threads"] == t)]
        for (label, method, precision), part in part_of.groupby(["label", "method", "precision"], sort=True):
            style = "--" if precision == "bf16" else "-"
            name = label + (" bf16" if precision == "bf16" else "")
            if part["keep_rate"].nunique() == 1 and float(part["keep_rate"].iloc[0]) == 1.0:
                ax.axhline(float(part["latency_ms_median"].iloc[0]), color=palette[method], ls=style, lw=1.2,
                           label=name)
                continue
            part = part.sort_values("keep_rate")
            ax.plot(part["keep_rate"], part["latency_ms_median"], style, marker="o", ms=4, color=palette[method],
                    label=name)
        ax.set_title(_facet_label(b, t))
        ax.set_xlabel("keep rate")
        ax.set_ylabel("latency (ms/batch)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))

    cells = sorted({(int(b), int(t)) for b, t in zip(data["batch_size"], data["threads"])})
    return _panels(cells, list(data["method"]), draw, out_dir, "speed_grid")


def trained_top1(store_rows: pd.DataFrame, profile: str) -> pd.DataFrame:
    """Top-1 (%) of the trained rows of ``profile``: ``method, keep_rate, top1, n`` (mean over seeds and
    settings of each (method, keep rate); speed rows, the teacher and failed rows left out)."""
    if store_rows.empty or "top1" not in store_rows.columns:
        return pd.DataFrame(columns=["method", "keep_rate", "top1", "n"])
    rows = store_rows[(store_rows["profile"] == profile) & (store_rows["status"] == "ok")
                      & (store_rows["dataset"] != "synthetic") & (store_rows["method"] != "teacher")
                      & store_rows["top1"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["method", "keep_rate", "top1", "n"])
    out = rows.groupby(["method", "keep_rate"], as_index=False).agg(top1=("top1", "mean"), n=("top1", "size"))
    return out


def plot_top1_latency(frame: pd.DataFrame, top1: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``speed_top1_latency.{png,pdf}``: top-1 (%) of each trained (method, keep rate) against its latency in
    every cell of the grid (one panel per batch size, thread count and precision). Nothing when no timed
    configuration has a trained row."""
    merged = frame.merge(top1, on=["method", "keep_rate"], how="inner").dropna(subset=["latency_ms_median"])
    if merged.empty:
        return []

    def draw(ax: Any, cell: tuple[int, int, str], palette: dict[str, Any]) -> None:
        b, t, p = cell
        part_of = merged[(merged["batch_size"] == b) & (merged["threads"] == t) & (merged["precision"] == p)]
        for method, part in part_of.groupby("method", sort=True):
            part = part.sort_values("latency_ms_median")
            ax.plot(part["latency_ms_median"], part["top1"], marker="o", ms=4, color=palette[method], label=method)
        ax.set_title(_facet_label(b, t) + ("" if p == "fp32" else f", {p}"))
        ax.set_xlabel("latency (ms/batch)")
        ax.set_ylabel("top-1 (%)")

    cells = sorted({(int(b), int(t), str(p)) for b, t, p in
                    zip(merged["batch_size"], merged["threads"], merged["precision"])})
    return _panels(cells, list(merged["method"]), draw, out_dir, "speed_top1_latency")


def run_grid(opts: Any, batches: Sequence[int | str], threads: Sequence[int | None], precisions: Sequence[str],
             bench: Callable[[Any], list[dict[str, Any]]], peak_probe: Callable[[Any, int], float] | None,
             budget_mib: float | None, max_batch: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One model benchmark per cell of the grid (``bench(opts_of_the_cell)`` -> store rows).

    Args:
        opts: the invocation's :class:`bench_suite.speed.SpeedOptions` (the cell's batch, threads and precision
            replace its own).
        batches, threads, precisions: the grid's axes (parsed).
        bench: runs the model benchmark of one cell.
        peak_probe: ``(opts, batch) -> MiB``, the largest peak eval memory of the run's models (for ``max``).
        budget_mib: memory budget of ``max`` (MiB).
        max_batch: the largest batch ``max`` considers.
        log: progress printer.
    """
    resolved: dict[str, tuple[int, str]] = {}
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        for t in threads:
            for b in batches:
                rule = None
                if b == "max":
                    if precision not in resolved:
                        if peak_probe is None or budget_mib is None:
                            raise UserError("--batch-size max needs a memory budget (--memory-budget MiB)")
                        probe = replace(opts, precision=precision, threads=t)
                        resolved[precision] = largest_fitting_batch(lambda n: peak_probe(probe, n), budget_mib,
                                                                    max_batch)
                        log(f"--batch-size max ({precision}): {resolved[precision][0]} ({resolved[precision][1]})")
                    b, rule = resolved[precision]
                cell = replace(opts, batch_size=int(b), threads=t, precision=precision, batch_rule=rule)
                rows += bench(cell)
    return rows
