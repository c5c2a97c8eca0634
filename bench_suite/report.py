"""Pareto tables and plots (top-1 against compute) from the results store.

For each (profile, dataset) in ``<output>/results.sqlite``, :func:`write_report` writes
``pareto_<profile>_<dataset>.{md,csv,png,pdf}``: a Markdown table for a paper (units in the headers, a
caption), the same table as full-precision CSV, and a scatter plot of top-1 (%) against MHSA FLOPs (or
another x axis) with the Pareto frontier. Every number comes from the store, i.e. was measured on the
runs recorded there; ``mhsa_mflops_paper`` is this run's configuration counted with the paper's FLOP
rule (QK^T and AV products only, one multiply-accumulate = one FLOP), never a number copied from the
paper.

Pareto frontier (accuracy against cost): a configuration is on it when no other configuration has
``x <= x_i`` and ``top1 >= top1_i`` with at least one strict inequality; for ``img_per_s`` (higher is
better) the x comparison is reversed. Rows with a missing x or top-1 are never on it.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from bench_suite.errors import ReportError
from bench_suite.store import STORE_FILENAME, ResultsStore

__all__ = [
    "ReportError",
    "X_AXES",
    "TABLE_COLUMNS",
    "KNOWN_METHODS",
    "pareto_front",
    "pareto_table",
    "write_table",
    "format_table",
    "method_palette",
    "pareto_figure",
    "plot_pareto",
    "write_report",
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
    "img_per_s": "Throughput (img/s)",
    "latency_ms": "Latency (ms/batch)",
    "peak_mib": "Peak mem. (MiB)",
    "coef_sparsity_pct": "Coef. sparsity (%)",  # Sparsifiner: basis coefficients A_down set to 0 (paper ~87%)
    "w_up_sparsity_pct": "W_up sparsity (%)",  # Sparsifiner: sparse basis W_up entries that are 0 (paper ~90%)
    "pareto": "Pareto",
}
# Table column -> (store metric, factor): fractions stored in [0, 1] shown as percentages.
PERCENT_COLUMNS = {"coef_sparsity_pct": ("coef_sparsity", 100.0), "w_up_sparsity_pct": ("w_up_sparsity", 100.0)}
# Store metric -> unit the report expects (checked against the units recorded with each row).
EXPECTED_UNITS = {"top1": "%", "mhsa_mflops": "MFLOPs", "mhsa_mflops_paper": "MFLOPs", "total_gflops": "GFLOPs",
                  "img_per_s": "img/s", "latency_ms_median": "ms", "peak_mib": "MiB"}
# Store metric -> table column where the names differ.
METRIC_ALIASES = {"latency_ms": "latency_ms_median"}

# Built-in methods have fixed colours and markers in every plot; others follow in sorted order.
KNOWN_METHODS = ("full", "sparsifiner", "evit", "dynamicvit", "linformer", "sparsif_evit")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")


def _check_x(x: str) -> Axis:
    if x not in X_AXES:
        raise ReportError(f"unknown x axis {x!r}; allowed: {', '.join(X_AXES)}")
    return X_AXES[x]


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
    e.g. ``linformer (proj_init=pool)``."""
    overrides = config.get("overrides") if isinstance(config, dict) else None
    if not overrides:
        return str(method)
    return f"{method} (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"


def pareto_table(df: pd.DataFrame, x: str = "mhsa_mflops") -> pd.DataFrame:
    """The Pareto table of one (profile, dataset) group.

    Keeps rows with status ``ok`` only and, per configuration key, the latest row (by ``created``).
    Rows run with non-default settings are labelled by :func:`method_label`. Columns: ``method, keep_rate, [seed], mhsa_mflops, mhsa_mflops_paper, total_gflops, top1, img_per_s,
    latency_ms, peak_mib, pareto`` (``latency_ms`` is the stored ``latency_ms_median``; ``seed`` only
    when several seeds are present; a metric absent from the rows is NaN; ``pareto`` is "yes"/"no" on
    the frontier of ``x`` against top-1), sorted by ``x`` (NaN last), then method and keep rate.
    ``table.attrs`` holds ``profile``, ``dataset``, ``x``, ``git`` (revisions of the rows), ``n_failed``.

    Args:
        df: rows as returned by :meth:`bench_suite.store.ResultsStore.rows` (or any frame with the
            table's columns and ``top1``).
        x: the cost axis of the frontier; one of :data:`X_AXES`.

    Raises:
        ReportError (a ValueError): for an unknown ``x``, no ``ok`` rows, rows of several (profile, dataset) groups, or
            a metric recorded in a unit the report does not expect (e.g. top-1 as a fraction).
    """
    axis = _check_x(x)
    rows = df.copy()
    for col, metric in METRIC_ALIASES.items():
        if col not in rows.columns and metric in rows.columns:
            rows[col] = rows[metric]
    for col, (metric, factor) in PERCENT_COLUMNS.items():
        if col not in rows.columns and metric in rows.columns:
            rows[col] = pd.to_numeric(rows[metric], errors="coerce") * factor
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
    _check_units(rows)
    if "method" not in rows.columns or Y_COLUMN not in rows.columns:
        raise ReportError("the rows need 'method' and 'top1' columns")
    if "config" in rows.columns:  # rows run with non-default settings (--hparams, table plans) say so
        rows = rows.assign(method=[method_label(m, c) for m, c in zip(rows["method"], rows["config"])])
    columns = [c for c in TABLE_COLUMNS if c != "pareto"]
    if "seed" not in rows.columns or rows["seed"].nunique() <= 1:
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
    table = table.sort_values([x, "method", "keep_rate"], ascending=[axis.lower_is_better, True, True],
                              na_position="last", kind="stable").reset_index(drop=True)
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
    for missing."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        s = table[col]
        if col == "keep_rate":
            out[col] = [f"{v:g}" if pd.notna(v) else "–" for v in s]
        elif col == "top1":
            out[col] = [f"{v:.2f}" if pd.notna(v) else "–" for v in s]
        elif col in PERCENT_COLUMNS:
            out[col] = [f"{v:.1f}" if pd.notna(v) else "–" for v in s]
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
    return "; ".join(parts) + "."


def write_table(table: pd.DataFrame, out_dir: str | Path, stem: str, caption: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<stem>.md`` (paper-ready pipe table, units in headers, caption line) and
    ``<out_dir>/<stem>.csv`` (the same columns under their machine names, full precision).

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
    headers = [TABLE_COLUMNS.get(c, c) for c in text.columns]
    align = ["left" if c in ("method", "pareto") else "right" for c in text.columns]
    body = tabulate(text.values.tolist(), headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True)
    md_path.write_text(f"{body}\n\n{caption or _caption(table, show_paper)}\n", encoding="utf-8")
    return [md_path, csv_path]


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
    body = tabulate(text.values.tolist(), headers=[TABLE_COLUMNS.get(c, c) for c in text.columns],
                    tablefmt="simple", disable_numparse=True,
                    colalign=["left" if c in ("method", "pareto") else "right" for c in text.columns])
    return f"{head}\n{body}"


# --------------------------------------------------------------------------- plot

def method_palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Colour per method: the built-in methods (:data:`KNOWN_METHODS`) always get the same colours of
    seaborn's colour-blind palette; other methods follow in sorted order. Pass every method of a report
    so that all its plots agree."""
    import seaborn as sns

    others = sorted(set(methods) - set(KNOWN_METHODS))
    names = [*KNOWN_METHODS, *others]
    base = sns.color_palette("colorblind", 10)
    colours = base + sns.color_palette("husl", max(len(names) - len(base), 0))
    return {m: tuple(colours[i]) for i, m in enumerate(names) if m in set(methods) | set(KNOWN_METHODS)}


def _method_markers(methods: Sequence[str], palette: Mapping[str, Any]) -> dict[str, str]:
    order = list(palette)
    return {m: _MARKERS[(order.index(m) if m in order else 0) % len(_MARKERS)] for m in methods}


def pareto_figure(df: pd.DataFrame, x: str = "mhsa_mflops", title: str | None = None,
                  palette: Mapping[str, Any] | None = None):
    """The Pareto scatter as a matplotlib ``Figure`` (Agg canvas): top-1 (%) against ``x``, one colour
    and marker per method, each point labelled with its keep rate, the frontier as a dashed step line
    with its points ringed.

    Args:
        df: store rows or a :func:`pareto_table` of one (profile, dataset) group.
        x: one of :data:`X_AXES`.
        title: axes title.
        palette: method -> colour; default :func:`method_palette` of the methods present.

    Raises:
        ReportError (a ValueError): for an unknown ``x`` (allowed ones listed), or see :func:`pareto_table`.
    """
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    axis = _check_x(x)
    table = df if "pareto" in df.columns and x in df.columns and "status" not in df.columns \
        else pareto_table(df, x)
    pts = table[table[x].notna() & table[Y_COLUMN].notna()].copy()
    pts["method"] = pts["method"].astype(str)
    methods = sorted(pts["method"].unique())
    palette = dict(palette) if palette is not None else method_palette(methods)
    missing = [m for m in methods if m not in palette]
    if missing:
        raise ReportError(f"palette has no colour for method(s) {missing}")
    hue_order = [m for m in palette if m in methods]
    front = pareto_front(pts, x, Y_COLUMN, axis.lower_is_better)

    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(6.6, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if pts.empty:
            ax.text(0.5, 0.5, f"no configuration has both {x} and top-1", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            sns.scatterplot(data=pts, x=x, y=Y_COLUMN, hue="method", hue_order=hue_order,
                            palette={m: palette[m] for m in hue_order}, style="method", style_order=hue_order,
                            markers=_method_markers(hue_order, palette), s=55, edgecolor="white",
                            linewidth=0.6, zorder=3, ax=ax)
            fp = pts[front].sort_values(x)
            ax.step(fp[x], fp[Y_COLUMN], where="post" if axis.lower_is_better else "pre", color="0.3",
                    linestyle="--", linewidth=1.0, zorder=2)
            ax.scatter(fp[x], fp[Y_COLUMN], s=150, facecolors="none", edgecolors="0.15", linewidths=1.0,
                       zorder=4)
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="none",
                                  markeredgecolor="0.15", markersize=8))
            labels.append("Pareto frontier")
            # outside the axes, right: never on top of a point, however many methods and variants
            ax.legend(handles, labels, title="method (labels: keep rate)", fontsize=7, title_fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=True)
        ax.margins(x=0.08, y=0.1)  # room for the keep-rate labels and frontier rings
        ax.set_xlabel(axis.label)
        ax.set_ylabel(Y_LABEL)
        if title:
            ax.set_title(title)
        if not pts.empty:  # last: the layout (legend, labels, title) must be final to place them
            _label_points(fig, ax, pts, x, palette)
    return fig


# Candidate keep-rate label places around a marker, tried in order: (x offset, y offset in points, alignment).
_LABEL_PLACES = ((5, 3, "left"), (5, -10, "left"), (-5, 3, "right"), (-5, -10, "right"))


def _label_points(fig: Any, ax: Any, pts: pd.DataFrame, x: str, palette: Mapping[str, Any]) -> None:
    """Label every point with its keep rate, beside its marker: the first of :data:`_LABEL_PLACES` whose box
    overlaps no marker and no label placed before (points in order of cost, then top-1), else the place with
    the fewest overlaps. Works in display units after a layout pass, so it holds in the saved figure."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # fixes the layout and axis limits, so data -> display positions are final
    renderer = fig.canvas.get_renderer()
    half = 4.0 * fig.dpi / 72.0  # a marker's half width in pixels (s = 55 pt^2)
    xy = ax.transData.transform(pts[[x, Y_COLUMN]].to_numpy(dtype=float))
    obstacles = [Bbox([[px - half, py - half], [px + half, py + half]]) for px, py in xy]
    for _, r in pts.sort_values([x, Y_COLUMN], kind="stable").iterrows():
        best = None
        for dx, dy, ha in _LABEL_PLACES:
            ann = ax.annotate(f"{r['keep_rate']:g}", (r[x], r[Y_COLUMN]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, fontsize=7, color=palette[r["method"]], zorder=5)
            box = ann.get_window_extent(renderer)
            hits = sum(box.overlaps(o) for o in obstacles)
            if best is None or hits < best[0]:
                if best is not None:
                    best[1].remove()
                best = (hits, ann, box)
            else:
                ann.remove()
            if hits == 0:
                break
        obstacles.append(best[2])


def plot_pareto(df: pd.DataFrame, x: str = "mhsa_mflops", out_dir: str | Path = ".", stem: str = "pareto",
                title: str | None = None, palette: Mapping[str, Any] | None = None) -> list[Path]:
    """Save :func:`pareto_figure` as ``<out_dir>/<stem>.png`` (dpi 200) and ``.pdf``; returns both paths.

    Raises:
        ReportError (a ValueError): for an unknown ``x`` (allowed ones listed), or see :func:`pareto_table`.
    """
    fig = pareto_figure(df, x=x, title=title, palette=palette)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
    fig.savefig(png, dpi=200, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "Creator": None, "Producer": None})
    return [png, pdf]


# --------------------------------------------------------------------------- report

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "unnamed"


ACCURACY_KINDS = ("train", "teacher-eval")


def _is_accuracy_row(config: object) -> bool:
    """Rows of trained/evaluated models (not ``speed`` benchmark rows, which have no top-1)."""
    return not isinstance(config, dict) or config.get("kind", "train") in ACCURACY_KINDS


def write_report(output: str | Path, x: str = "mhsa_mflops", profile: str | None = None,
                 dataset: str | None = None) -> list[Path]:
    """Write the Pareto table (md, csv) and plot (png, pdf) of every (profile, dataset) in the store.

    Files: ``<output>/pareto_<profile>_<dataset>.{md,csv,png,pdf}`` (with ``_<x>`` appended to the stem
    when ``x`` is not ``mhsa_mflops``). All plots of one call share one method palette.

    Args:
        output: the results folder holding ``results.sqlite``.
        x: cost axis, one of :data:`X_AXES`.
        profile, dataset: only rows of this profile / dataset (None: all).

    Returns:
        The written paths, four per group.

    Raises:
        ReportError (a ValueError): for an unknown ``x``, a missing store, or no finished (``ok``) rows to report.
        bench_suite.store.StoreCorruptError: if the store is not readable.
    """
    _check_x(x)
    out = Path(output)
    db = out / STORE_FILENAME
    if not db.is_file():
        raise ReportError(f"no results store at {db}; run 'python -m bench_suite run --output {out}' first")
    with ResultsStore(db) as store:
        rows = store.rows(profile=profile, dataset=dataset)
    rows = rows[rows["config"].map(_is_accuracy_row)] if len(rows) else rows
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        which = ", ".join(f"{k}={v}" for k, v in (("profile", profile), ("dataset", dataset)) if v) or "any"
        raise ReportError(f"no finished results in {db} ({which}): {len(rows)} row(s), none with status 'ok'")
    palette = method_palette(sorted({method_label(m, c) for m, c in zip(ok["method"], ok["config"])}))
    paths: list[Path] = []
    for (prof, data), group in rows.groupby(["profile", "dataset"], sort=True):
        if not (group["status"] == "ok").any():
            continue
        table = pareto_table(group, x)
        stem = f"pareto_{_safe(prof)}_{_safe(data)}" + ("" if x == "mhsa_mflops" else f"_{x}")
        paths += write_table(table, out, stem)
        paths += plot_pareto(table, x, out, stem, title=f"{prof} on {data}", palette=palette)
    return paths
