"""The Pareto table (top-1 against compute) of one (profile, dataset) group of store rows, and its Markdown
and CSV files (:mod:`bench_suite.plots` draws it; :mod:`bench_suite.report` writes both for a store).

The table has the runner's columns and the columns the methods of its rows declare
(``reported_metrics``, :class:`bench_suite.registry.Metric`), with their units in the headers. Every number
comes from the store, i.e. was measured on the runs recorded there; ``mhsa_mflops_paper`` is this run's configuration counted with the paper's FLOP
rule (QK^T and AV products only, one multiply-accumulate = one FLOP), never a number copied from the
paper.

Pareto frontier (accuracy against cost): a configuration is on it when no other configuration has
``x <= x_i`` and ``top1 >= top1_i`` with at least one strict inequality; for ``img_per_s`` (higher is
better) the x comparison is reversed. Rows with a missing x or top-1 are never on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from bench_suite.errors import ReportError
from bench_suite.latex import latex_table
from bench_suite.measure import EVAL_TIMING
from bench_suite.registry import Metric, declared_metrics, get_method, list_methods

__all__ = [
    "ReportError",
    "X_AXES",
    "TABLE_COLUMNS",
    "Axis",
    "check_x",
    "method_columns",
    "pareto_front",
    "pareto_table",
    "write_table",
    "format_table",
    "method_label",
    "display_label",
    "COMPACT_COLUMNS",
    "summary_text",
]


@dataclass(frozen=True)
class Axis:
    """A compute/speed axis: table column, axis label with unit, and its direction."""

    column: str
    label: str
    lower_is_better: bool = True


X_AXES: dict[str, Axis] = {
    "mhsa_mflops": Axis("mhsa_mflops", "MHSA FLOPs (MFLOPs)"),
    "mhsa_mflops_paper": Axis("mhsa_mflops_paper", "MHSA FLOPs, paper's counting rule (MFLOPs)"),
    "total_gflops": Axis("total_gflops", "Total FLOPs (GFLOPs)"),
    "latency_ms": Axis("latency_ms", "Latency, median (ms per batch of 64)"),
    "img_per_s": Axis("img_per_s", "Throughput (img/s)", lower_is_better=False),
}
Y_COLUMN, Y_LABEL = "top1", "Top-1 accuracy (%)"

# Table column -> Markdown header (with unit). Order is the table's column order.
TABLE_COLUMNS: dict[str, str] = {
    "method": "Method",
    "keep_rate": "Keep rate",
    "seed": "Seed",  # only present when the rows hold several seeds
    "mhsa_mflops": "MHSA (MFLOPs)",
    "mhsa_mflops_paper": "MHSA, paper rule (MFLOPs)",
    "total_gflops": "Total (GFLOPs)",
    "top1": "Top-1 (%)",
    "top1_sd": "Top-1 s.d.",  # only with several seeds: the sample standard deviation over seeds
    "n": "n",  # ... and the number of seeds
    "img_per_s": "Throughput (img/s)",
    "latency_ms": "Latency (ms/batch)",
    "peak_mib": "Peak mem. (MiB)",
    # here: the columns the methods of the rows declare (Metric.column, see bench_suite.registry)
    "pareto": "Pareto",
}
# Store metric -> unit the report expects (checked against the units recorded with each row).
EXPECTED_UNITS = {"top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs", "total_gflops": "GFLOPs",
                  "img_per_s": "img/s", "latency_ms_median": "ms", "peak_mib": "MiB"}
# Store metric -> table column where the names differ.
METRIC_ALIASES = {"latency_ms": "latency_ms_median"}



def check_x(x: str) -> Axis:
    if x not in X_AXES:
        raise ReportError(f"unknown x axis {x!r}; allowed: {', '.join(X_AXES)}")
    return X_AXES[x]


# --------------------------------------------------------------------------- seeds
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (above 30: 1.96 + 2.4 / df, within 0.3%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``df`` rounded down, at least 1)."""
    d = max(1, int(math.floor(df)))
    return _T975[d - 1] if d <= len(_T975) else 1.96 + 2.4 / d


def welch_interval(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> tuple[float, float]:
    """95% confidence interval of ``mean1 - mean2`` by Welch's t (unequal variances, Welch-Satterthwaite
    degrees of freedom). Needs ``n1, n2 >= 2``; otherwise the interval is ``(nan, nan)``."""
    if n1 < 2 or n2 < 2:
        return float("nan"), float("nan")
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return m1 - m2, m1 - m2
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    half = t975(df) * se
    return m1 - m2 - half, m1 - m2 + half


def aggregate_seeds(table: pd.DataFrame, x: str, lower_x_is_better: bool = True) -> pd.DataFrame:
    """One row per configuration (method label, keep rate) of a table that holds several seeds: every numeric
    column averaged over the seeds, ``top1_sd`` the sample standard deviation of top-1 (``ddof=1``; 0 for one
    seed), ``n`` the number of seeds; then ``pareto`` on the means: ``"yes"`` on the frontier, ``"noise"``
    off it but not significantly dominated: for every configuration that dominates it on the means, the 95%
    Welch interval of the top-1 difference (:func:`welch_interval`) contains 0 (configurations with fewer
    than 2 seeds cannot be tested and count as significant), ``"no"`` otherwise."""
    numeric = [c for c in table.columns if c not in ("method", "keep_rate", "seed", "pareto")]
    g = table.groupby(["method", "keep_rate"], sort=False)
    out = g[numeric].mean().reset_index()
    out["top1_sd"] = g[Y_COLUMN].std(ddof=1).fillna(0.0).to_numpy()
    out["n"] = g[Y_COLUMN].size().to_numpy().astype(float)
    front = pareto_front(out, x, Y_COLUMN, lower_x_is_better).to_numpy()
    labels = []
    xs, ys = out[x].to_numpy(dtype=float), out[Y_COLUMN].to_numpy(dtype=float)
    sds, ns = out["top1_sd"].to_numpy(dtype=float), out["n"].to_numpy(dtype=int)
    for i in range(len(out)):
        if front[i]:
            labels.append("yes")
            continue
        better_x = (xs <= xs[i]) if lower_x_is_better else (xs >= xs[i])
        dominating = [j for j in range(len(out)) if j != i and better_x[j] and ys[j] >= ys[i]
                      and (xs[j] != xs[i] or ys[j] != ys[i])]
        within = bool(dominating) and all(welch_interval(ys[j], sds[j], ns[j], ys[i], sds[i], ns[i])[0] <= 0
                                          for j in dominating)
        labels.append("noise" if within else "no")
    out["pareto"] = labels
    out.attrs = dict(table.attrs)
    return out


# --------------------------------------------------------------------------- frontier

def pareto_front(df: pd.DataFrame, x: str = "mhsa_mflops", y: str = Y_COLUMN,
                 lower_x_is_better: bool | None = None) -> pd.Series:
    """Which rows lie on the Pareto frontier of (low ``x``, high ``y``).

    Row i is on the frontier iff no row j has ``x_j <= x_i`` and ``y_j >= y_i`` with one of the two
    strict. Identical points do not dominate each other (both stay on the frontier). Rows with NaN in
    ``x`` or ``y`` are never on it and never dominate.

    Args:
        df: the rows; must hold columns ``x`` and ``y``.
        x: cost column; for ``img_per_s`` higher is better and the x comparison is reversed.
        y: accuracy column (higher is better).
        lower_x_is_better: override the direction of ``x`` (default: from :data:`X_AXES`, else True).

    Returns:
        Boolean Series named ``pareto``, aligned with ``df.index``.

    Raises:
        ReportError (a ValueError): if ``x`` or ``y`` is not a column of ``df`` (the allowed x axes are listed).
    """
    for col in (x, y):
        if col not in df.columns:
            raise ReportError(f"column {col!r} is not in the rows; allowed x axes: {', '.join(X_AXES)}")
    if lower_x_is_better is None:
        lower_x_is_better = X_AXES[x].lower_is_better if x in X_AXES else True
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    if not lower_x_is_better:
        xs = -xs
    valid = np.isfinite(xs) & np.isfinite(ys)
    # dominated[i] = any_j valid_j & x_j <= x_i & y_j >= y_i & (x_j < x_i | y_j > y_i)
    with np.errstate(invalid="ignore"):
        le = xs[None, :] <= xs[:, None]
        ge = ys[None, :] >= ys[:, None]
        strict = (xs[None, :] < xs[:, None]) | (ys[None, :] > ys[:, None])
    dominated = (le & ge & strict & valid[None, :]).any(axis=1)
    return pd.Series(valid & ~dominated, index=df.index, name="pareto")


# --------------------------------------------------------------------------- table

def _check_units(df: pd.DataFrame) -> None:
    if "units" not in df.columns:
        return
    for units, key in zip(df["units"], df.get("key", pd.Series([None] * len(df)))):
        if not isinstance(units, Mapping):
            continue
        for metric, expected in EXPECTED_UNITS.items():
            got = units.get(metric)
            if got is not None and got != expected:
                raise ReportError(f"row {key}: metric {metric!r} is recorded in {got!r}, the report expects "
                                 f"{expected!r}")


def method_label(method: str, config: Any) -> str:
    """The method's name as tables and plots show it: ``method`` plus the settings it was run with that
    differ from the method's defaults (``config["overrides"]``, from ``run --hparams`` or a table plan),
    e.g. ``<method> (proj_init=pool)``."""
    overrides = config.get("overrides") if isinstance(config, dict) else None
    if not overrides:
        return str(method)
    return f"{method} (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"


def method_columns(methods: Sequence[str]) -> dict[str, Metric]:
    """Pareto-table column -> :class:`bench_suite.registry.Metric` for the columns the given methods declare
    (``Metric.column``), in declaration order."""
    return {m.column: m for m in declared_metrics(sorted(set(methods))).values() if m.column}


def pareto_table(df: pd.DataFrame, x: str = "mhsa_mflops") -> pd.DataFrame:
    """The Pareto table of one (profile, dataset) group.

    Keeps rows with status ``ok`` only and, per configuration key, the latest row (by ``created``).
    Rows run with non-default settings are labelled by :func:`method_label`. Columns: ``method, keep_rate,
    mhsa_mflops, mhsa_mflops_paper, total_gflops, top1, img_per_s, latency_ms, peak_mib, pareto`` (``latency_ms``
    is the stored ``latency_ms_median``; a metric absent from the rows is NaN; ``pareto`` is "yes"/"no" on
    the frontier of ``x`` against top-1), sorted by ``x`` (NaN last), then method and keep rate. When the rows
    hold several seeds, one row per configuration with the means over the seeds, ``top1_sd`` and ``n`` after
    ``top1``, and ``pareto`` on the means with ``"noise"`` for a configuration whose dominance is not
    significant (:func:`aggregate_seeds`: 95% Welch intervals).
    ``table.attrs`` holds ``profile``, ``dataset``, ``x``, ``git`` (revisions of the rows), ``n_failed``.

    Args:
        df: rows as returned by :meth:`bench_suite.store.ResultsStore.rows` (or any frame with the
            table's columns and ``top1``).
        x: the cost axis of the frontier; one of :data:`X_AXES`.

    Raises:
        ReportError (a ValueError): for an unknown ``x``, no ``ok`` rows, rows of several (profile, dataset) groups, or
            a metric recorded in a unit the report does not expect (e.g. top-1 as a fraction).
    """
    axis = check_x(x)
    rows = df.copy()
    for col, metric in METRIC_ALIASES.items():
        if col not in rows.columns and metric in rows.columns:
            rows[col] = rows[metric]
    declared = method_columns(rows["method"].astype(str).unique()) if "method" in rows.columns else {}
    for col, metric in declared.items():
        if col not in rows.columns and metric.name in rows.columns:
            rows[col] = pd.to_numeric(rows[metric.name], errors="coerce") * metric.scale
    if "key" in rows.columns:
        order = ["created"] if "created" in rows.columns else []
        rows = rows.sort_values(order, kind="stable") if order else rows
        rows = rows.drop_duplicates("key", keep="last")
    n_failed = 0
    if "status" in rows.columns:
        n_failed = int((rows["status"] != "ok").sum())
        rows = rows[rows["status"] == "ok"]
    if rows.empty:
        raise ReportError("no results with status 'ok' to tabulate"
                         + (f" ({n_failed} failed configuration(s))" if n_failed else ""))
    attrs: dict[str, Any] = {"x": x, "n_failed": n_failed}
    for col in ("profile", "dataset"):
        values = sorted(rows[col].dropna().unique()) if col in rows.columns else []
        attrs[col] = values[0] if len(values) == 1 else None
    if "profile" in rows.columns and "dataset" in rows.columns:
        groups = sorted(set(zip(rows["profile"], rows["dataset"])))
        if len(groups) > 1:
            raise ReportError(f"rows span several (profile, dataset) groups {groups}; a Pareto table compares "
                             f"one group - filter the rows first (write_report does this per group)")
    attrs["git"] = ", ".join(sorted(rows["git"].dropna().unique())) if "git" in rows.columns else None
    attrs["hardware"] = "; ".join(sorted({f"{v.get('cpu')} ({v.get('threads')} threads of {v.get('cpus')} CPUs"
                                          + (f", {v['gpu']}" if v.get("gpu") else "")
                                          + (f"; {v['allocator']}" if v.get("allocator") else "") + ")"
                                          for v in rows["versions"] if isinstance(v, Mapping) and v.get("cpu")})) \
        if "versions" in rows.columns else ""
    timed = rows[rows["img_per_s"].notna()] if "img_per_s" in rows.columns else rows.iloc[:0]
    passes = timed["speed_pass"] if "speed_pass" in timed.columns else pd.Series([float("nan")] * len(timed))
    # one interleaved timing pass over all timed rows (bench_suite.speed_pass): their speeds compare
    attrs["speed_pass"] = int(passes.iloc[0]) if len(timed) and passes.notna().all() and passes.nunique() == 1 else None
    _check_units(rows)
    if "method" not in rows.columns or Y_COLUMN not in rows.columns:
        raise ReportError("the rows need 'method' and 'top1' columns")
    if "config" in rows.columns:  # rows run with non-default settings (--hparams, table plans) say so
        rows = rows.assign(method=[method_label(m, c) for m, c in zip(rows["method"], rows["config"])])
    columns = [c for c in TABLE_COLUMNS if c not in ("pareto", "top1_sd", "n")] + list(declared)
    several_seeds = "seed" in rows.columns and rows["seed"].nunique() > 1
    if not several_seeds:
        columns.remove("seed")
    table = pd.DataFrame(index=rows.index)
    for col in columns:
        if col in rows.columns:
            table[col] = rows[col]
        else:
            table[col] = np.nan
    for col in columns:
        if col not in ("method", "seed"):
            table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
    table["pareto"] = np.where(pareto_front(table, x, Y_COLUMN, axis.lower_is_better), "yes", "no")
    if several_seeds:  # one row per configuration: means over seeds, top1_sd and n, the frontier on the means
        table = aggregate_seeds(table, x, axis.lower_is_better)
        order = []
        for c in columns:
            if c != "seed":
                order += [c, "top1_sd", "n"] if c == Y_COLUMN else [c]
        table = table[order + ["pareto"]]
    table = table.sort_values([x, "method", "keep_rate"], ascending=[axis.lower_is_better, True, True],
                              na_position="last", kind="stable").reset_index(drop=True)
    attrs["headers"] = {**{c: TABLE_COLUMNS[c] for c in TABLE_COLUMNS}, **{c: m.header for c, m in declared.items()}}
    attrs["decimals"] = {c: m.decimals for c, m in declared.items()}
    table.attrs = attrs
    return table


def _decimals(values: pd.Series, sig: int = 4, max_decimals: int = 6) -> int:
    """Decimals so that the column's smallest non-zero magnitude shows ``sig`` significant digits."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = np.abs(v[np.isfinite(v) & (v != 0)])
    if v.size == 0:
        return 0
    return int(min(max(sig - 1 - math.floor(math.log10(v.min())), 0), max_decimals))


# Significant digits shown at a column's smallest value (FLOPs are exact counts; speed and memory are
# noisy measurements).
_SIG_DIGITS = {"img_per_s": 3, "latency_ms": 3, "peak_mib": 3}


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as display strings: fixed decimals per column (top-1 with 2; FLOPs with 4 and speed
    and memory with 3 significant digits at the column's smallest value), keep rate as given, ``–``
    for missing and for ``top1_sd`` where ``n < 2`` (one seed measures no spread)."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        s = table[col]
        if col == "keep_rate":
            out[col] = [f"{v:g}" if pd.notna(v) else "–" for v in s]
        elif col == "top1_sd":  # one seed has no spread: shown as missing, not as 0.00
            ns = table["n"] if "n" in table.columns else pd.Series(2, index=table.index)
            out[col] = [f"{v:.2f}" if pd.notna(v) and pd.notna(m) and m >= 2 else "–" for v, m in zip(s, ns)]
        elif col == "top1":
            out[col] = [f"{v:.2f}" if pd.notna(v) else "–" for v in s]
        elif col == "n":
            out[col] = [f"{int(v)}" if pd.notna(v) else "–" for v in s]
        elif col in table.attrs.get("decimals", {}):
            d = table.attrs["decimals"][col]
            out[col] = [f"{v:.{d}f}" if pd.notna(v) else "–" for v in s]
        elif pd.api.types.is_float_dtype(s):
            d = _decimals(s, sig=_SIG_DIGITS.get(col, 4))
            out[col] = [f"{v:.{d}f}" if pd.notna(v) else "–" for v in s]
        else:
            out[col] = ["–" if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in s]
    return out


def _paper_column_differs(table: pd.DataFrame) -> bool:
    """Whether ``mhsa_mflops_paper`` has a value that differs from the measured ``mhsa_mflops``."""
    if "mhsa_mflops_paper" not in table.columns:
        return False
    paper = table["mhsa_mflops_paper"].to_numpy(dtype=float)
    measured = table["mhsa_mflops"].to_numpy(dtype=float) if "mhsa_mflops" in table.columns \
        else np.full(len(table), np.nan)
    has = np.isfinite(paper)
    return bool((has & ~np.isclose(paper, measured, rtol=1e-6, atol=0.0, equal_nan=False)).any())


def _caption(table: pd.DataFrame, show_paper: bool) -> str:
    a = table.attrs
    x = a.get("x", "mhsa_mflops")
    where = f"profile `{a.get('profile') or 'mixed'}`, dataset `{a.get('dataset') or 'mixed'}`"
    parts = [f"Table: Top-1 against {X_AXES[x].label} on {where}; {len(table)} configuration(s)"]
    if a.get("n_failed"):
        parts[-1] += f" ({a['n_failed']} failed, not shown)"
    parts.append(f"every number is measured on this run (git {a.get('git') or 'unknown'})")
    if show_paper:
        parts.append("'paper rule' counts this run's configurations with the paper's MHSA FLOP convention "
                     "(QK^T and AV only, 1 MAC = 1 FLOP), not numbers copied from the paper")
    parts.append("Pareto = no other row has lower-or-equal cost and higher-or-equal top-1"
                 + (" (throughput: higher-or-equal)" if x == "img_per_s" else ""))
    if "n" in table.columns:
        parts.append("with several seeds: means over the n seeds, s.d. the sample standard deviation; the frontier "
                     "is computed on the means, and 'noise' marks a configuration that is dominated only within "
                     "noise (the 95% Welch t interval of its top-1 difference to every configuration that "
                     "dominates it contains 0)")
    if "img_per_s" in table.columns and table["img_per_s"].notna().any():
        t = EVAL_TIMING
        if a.get("speed_pass"):
            parts.append(f"throughput and latency: one interleaved timing pass over all {len(table)} rows at the end "
                         f"of the sweep (UTC {a['speed_pass']}: every model once per round on the same batch of "
                         f"{t['batch']} test images, rotating order, median of {t['repeats']} rounds after "
                         f"{t['warmup']} untimed; one process, one thread count), on "
                         f"{a.get('hardware') or 'unrecorded hardware'}: they compare")
        else:
            parts.append(f"throughput and latency: eval of one batch of {t['batch']} test images, median of "
                         f"{t['repeats']} timed runs after {t['warmup']} untimed, on "
                         f"{a.get('hardware') or 'unrecorded hardware'}; NOT COMPARABLE between rows: they were "
                         f"timed at different moments under different load (no shared timing pass; 'run' makes one "
                         f"at the end of a sweep, 'python -m bench_suite speed' times methods interleaved)")
    return "; ".join(parts) + "."


COMPACT_COLUMNS = ("method", "keep_rate", "mhsa_mflops", "mhsa_mflops_paper", "top1", "top1_sd", "n", "pareto")
"""The columns of the LaTeX Pareto table (it must fit a page): method, keep rate, MHSA FLOPs (measured, and
the paper's rule where it differs), top-1, the methods' declared columns, Pareto. The CSV has them all."""


def write_table(table: pd.DataFrame, out_dir: str | Path, stem: str, caption: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<stem>.md`` (paper-ready pipe table, units in headers, caption line),
    ``<out_dir>/<stem>.csv`` (the same columns under their machine names, full precision) and
    ``<out_dir>/<stem>.tex`` (booktabs, the compact :data:`COMPACT_COLUMNS` and the methods' declared
    columns, display names of the methods).

    The Markdown shows the paper-rule MHSA column only where it differs from the measured one in at
    least one row, and leaves out metric columns with no value at all (the CSV keeps every column). ``caption`` overrides the caption built from ``table.attrs``. Returns both paths.
    """
    from tabulate import tabulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    table.to_csv(csv_path, index=False)
    show_paper = _paper_column_differs(table)
    drop = [c for c in table.columns if c not in ("method", "keep_rate", "top1", "pareto")
            and pd.api.types.is_float_dtype(table[c]) and table[c].isna().all()]  # never measured here
    if "mhsa_mflops_paper" in table.columns and not show_paper:
        drop.append("mhsa_mflops_paper")
    shown = table.drop(columns=list(dict.fromkeys(drop)))
    text = format_table(shown)
    headers = [_header(table, c) for c in text.columns]
    align = ["left" if c in ("method", "pareto") else "right" for c in text.columns]
    body = tabulate(text.values.tolist(), headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True)
    md_path.write_text(f"{body}\n\n{caption or _caption(table, show_paper)}\n", encoding="utf-8")
    tex_path = out / f"{stem}.tex"
    compact = [c for c in text.columns if c in COMPACT_COLUMNS or c in table.attrs.get("decimals", {})]
    tex = text[compact].copy()
    if "method" in tex.columns:
        tex["method"] = [display_label(m) for m in tex["method"]]
    tex.columns = [_header(table, c) for c in compact]
    tex_path.write_text(latex_table(tex, caption or _caption(table, show_paper), f"tab:{stem}", left=1),
                        encoding="utf-8")
    return [md_path, csv_path, tex_path]


def display_label(label: str) -> str:
    """A method label (``<method> (setting=value)``) with the method's declared display name; the teacher
    and unregistered methods keep theirs."""
    base, sep, rest = str(label).partition(" (")
    name = get_method(base).display_name if base in list_methods() else base
    return name + (sep + rest if sep else "")


def _header(table: pd.DataFrame, column: str) -> str:
    return table.attrs.get("headers", TABLE_COLUMNS).get(column, column)


def summary_text(table: pd.DataFrame) -> str:
    """A short fixed-width summary for the terminal: method, keep rate, x, top-1, speed, frontier."""
    from tabulate import tabulate

    x = table.attrs.get("x", "mhsa_mflops")
    cols = [c for c in ("method", "keep_rate", "seed", x, "top1", "img_per_s", "pareto") if c in table.columns]
    cols = list(dict.fromkeys(cols))
    sub = table[cols]
    sub = sub[[c for c in cols if c in ("method", "keep_rate", "pareto") or sub[c].notna().any()]]
    text = format_table(sub)
    a = table.attrs
    head = f"{a.get('profile') or '?'} / {a.get('dataset') or '?'}: top-1 against {X_AXES[x].label}"
    if a.get("n_failed"):
        head += f" ({a['n_failed']} failed configuration(s) not shown)"
    body = tabulate(text.values.tolist(), headers=[_header(table, c) for c in text.columns],
                    tablefmt="simple", disable_numparse=True,
                    colalign=["left" if c in ("method", "pareto") else "right" for c in text.columns])
    return f"{head}\n{body}"
