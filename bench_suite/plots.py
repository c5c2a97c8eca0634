"""The Pareto plot: top-1 (%) against compute, one curve per method, reference lines, the frontier.

Colours and markers are declared by the methods (``plot_color``, ``plot_marker``; see
:mod:`bench_suite.registry`) so they are the same in every plot; other methods and variants follow from
seaborn's colour-blind palette. Plots use matplotlib's object API with the Agg canvas (no pyplot, no global
backend change).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from bench_suite.errors import ReportError
from bench_suite.pareto import (
    Y_COLUMN,
    Y_LABEL,
    check_x,
    display_label,
    pareto_front,
    pareto_table,
)
from bench_suite.registry import get_method, list_methods, method_specs

__all__ = ["LAYOUTS", "REFERENCE_ROWS", "method_palette", "pareto_figure", "plot_pareto"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")


def _declared_style(name: str) -> tuple[str | None, str | None]:
    return get_method(name).plot_style if name in list_methods() else (None, None)


def method_palette(methods: Sequence[str] | Mapping[str, str]) -> dict[str, tuple[float, float, float]]:
    """Colour per method (or per label of a method run with non-default settings): a registered method's
    declared ``plot_color``; the others (and labels of variants) the colours of seaborn's colour-blind
    palette that no registered method declares, in sorted order, then husl. ``methods`` may map labels to their
    method. The palette holds every registered method that declares a colour too. Pass every method of a
    report so that all its plots agree."""
    import seaborn as sns
    from matplotlib.colors import to_hex, to_rgb

    declared = {m: _declared_style(m)[0] for m in sorted(set(methods) | set(list_methods()))}
    declared = {m: c for m, c in declared.items() if c}
    taken = {to_hex(c) for c in (_declared_style(m)[0] for m in list_methods()) if c}  # all registered ones
    free = [c for c in sns.color_palette("colorblind", 10) if to_hex(c) not in taken]
    others = [m for m in sorted(set(methods)) if m not in declared]
    free += sns.color_palette("husl", max(len(others) - len(free), 0))
    out = {m: tuple(to_rgb(c)) for m, c in declared.items()}
    out.update({m: tuple(free[i]) for i, m in enumerate(others)})
    base = [to_hex(c) for c in sns.color_palette("colorblind", 10)]
    rank = {m: base.index(to_hex(c)) if to_hex(c) in base else len(base) for m, c in declared.items()}
    # legend order: declared methods in the order of their colours in the palette, then the others by name
    return {m: out[m] for m in sorted(out, key=lambda m: (m not in declared, rank.get(m, 0), m))}


def _method_markers(methods: Sequence[str], palette: Mapping[str, Any]) -> dict[str, str]:
    order = [m for m in palette if _declared_style(m)[1] is None]
    taken = {_declared_style(m)[1] for m in list_methods()}
    free = [mk for mk in _MARKERS if mk not in taken] or list(_MARKERS)
    return {m: _declared_style(m)[1] or free[(order.index(m) if m in order else 0) % len(free)] for m in methods}


REFERENCE_ROWS = ("teacher",)
"""Rows drawn as horizontal reference lines, not as methods: the teacher, and the dense reference method
(``reference = True``, fine-tuned like the others)."""

LAYOUTS = {"column": (3.5, 3.3), "wide": (7.0, 3.3)}
"""Figure sizes in inches: one column of a two-column paper (legend below) and the full text width (legend
at the right)."""


def _aggregate(pts: pd.DataFrame, x: str) -> pd.DataFrame:
    """One point per (method, keep rate): mean x, mean top-1, its standard deviation and n (several seeds);
    a table already aggregated over seeds (``top1_sd``, ``n``: :func:`bench_suite.pareto.aggregate_seeds`)
    passes through."""
    if "n" in pts.columns and "top1_sd" in pts.columns:
        return pts.rename(columns={"top1_sd": "sd"}).fillna({"sd": 0.0})
    g = pts.groupby(["method", "keep_rate"], sort=False)
    out = g.agg(x=(x, "mean"), y=(Y_COLUMN, "mean"), sd=(Y_COLUMN, "std"), n=(Y_COLUMN, "size")).reset_index()
    return out.rename(columns={"x": x, "y": Y_COLUMN}).fillna({"sd": 0.0})


def pareto_figure(df: pd.DataFrame, x: str = "mhsa_mflops", title: str | None = None,
                  palette: Mapping[str, Any] | None = None, layout: str = "column"):
    """The Pareto plot as a matplotlib ``Figure`` (Agg canvas): top-1 (%) against ``x``, one curve per method
    through its keep rates (markers at the measured points, labelled with their keep rates, error bars of one
    standard deviation where several seeds were run), the teacher and the dense reference method as
    horizontal reference lines, and the Pareto frontier of the methods as a dashed step line with its points
    ringed.

    Args:
        df: store rows or a :func:`pareto_table` of one (profile, dataset) group.
        x: one of :data:`X_AXES`.
        title: axes title.
        palette: method label -> colour; default :func:`method_palette` of the methods present.
        layout: ``"column"`` (3.5 in wide, legend below) or ``"wide"`` (7 in, legend at the right).

    Raises:
        ReportError (a ValueError): for an unknown ``x`` (allowed ones listed) or layout, or see
            :func:`pareto_table`.
    """
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    axis = check_x(x)
    if layout not in LAYOUTS:
        raise ReportError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    table = df if "pareto" in df.columns and x in df.columns and "status" not in df.columns \
        else pareto_table(df, x)
    pts = table[table[x].notna() & table[Y_COLUMN].notna()].copy()
    pts["method"] = pts["method"].astype(str)
    reference = next((s.name for s in method_specs() if s.reference), None)
    is_ref = pts["method"].isin([*REFERENCE_ROWS, *([reference] if reference else [])])
    refs, pts = pts[is_ref], _aggregate(pts[~is_ref], x)
    methods = sorted(pts["method"].unique())
    palette = dict(palette) if palette is not None else method_palette(methods)
    missing = [m for m in methods if m not in palette]
    if missing:
        raise ReportError(f"palette has no colour for method(s) {missing}")
    order = [m for m in palette if m in methods]
    markers = _method_markers(order, palette)
    front = pareto_front(pts, x, Y_COLUMN, axis.lower_is_better)

    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=LAYOUTS[layout], layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        handles, labels = [], []
        for m in order:
            curve = pts[pts["method"] == m].sort_values(x)
            colour = palette[m]
            line = ax.errorbar(curve[x], curve[Y_COLUMN], yerr=curve["sd"].where(curve["n"] > 1, 0.0), color=colour,
                               marker=markers[m], markersize=5, markeredgecolor="white", markeredgewidth=0.6,
                               linewidth=1.2, capsize=2, elinewidth=0.8, zorder=3)
            handles.append(line.lines[0])
            labels.append(display_label(m) + (f" (n={int(curve['n'].max())})" if curve["n"].max() > 1 else ""))
        ref_styles = {"teacher": ("0.35", ":"), reference: ("0.15", "-.")}
        for name, group in refs.groupby("method", sort=False):
            colour, style = ref_styles.get(name, ("0.5", ":"))
            top1 = float(group[Y_COLUMN].mean())
            ax.axhline(top1, color=colour, linestyle=style, linewidth=1.0, zorder=1)
            handles.append(Line2D([], [], color=colour, linestyle=style))
            what = "teacher" if name == "teacher" else f"{display_label(name)} (dense reference)"
            labels.append(f"{what}: {top1:.2f}%")
        if not pts.empty:
            fp = pts[front].sort_values(x)
            ax.step(fp[x], fp[Y_COLUMN], where="post" if axis.lower_is_better else "pre", color="0.3",
                    linestyle="--", linewidth=0.9, zorder=2)
            ax.scatter(fp[x], fp[Y_COLUMN], s=110, facecolors="none", edgecolors="0.15", linewidths=0.9, zorder=4)
            handles.append(Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="none",
                                  markeredgecolor="0.15", markersize=7))
            labels.append("Pareto frontier")
        else:
            ax.text(0.5, 0.5, f"no method has both {x} and top-1", ha="center", va="center", transform=ax.transAxes)
        legend = dict(fontsize=6.5, title="labels at points: keep rate", title_fontsize=6.5, frameon=False)
        if layout == "column":  # below the axes: the figure keeps one column's width
            ncols = 2 if max(map(len, labels), default=0) <= 30 else 1  # long labels: one per line, never cut
            fig.legend(handles, labels, loc="outside lower center", ncols=ncols, **legend)
        else:
            fig.legend(handles, labels, loc="outside right upper", **legend)
        ax.margins(x=0.1, y=0.12)  # room for the keep-rate labels and frontier rings
        ax.set_xlabel(axis.label)
        ax.set_ylabel(Y_LABEL)
        if title:
            ax.set_title(title, fontsize=8)
        if not pts.empty:  # last: the layout (legend, labels, title) must be final to place them
            _label_points(fig, ax, pts, x, palette)
    return fig


# Candidate keep-rate label places around a marker, tried in order: (x offset, y offset in points, alignment),
# first close to the marker, then farther out.
_LABEL_PLACES = tuple((sx * d, dy * d / 4 + (-3 if dy < 0 else 0), "left" if sx > 0 else "right")
                      for d in (4, 9, 15) for sx, dy in ((1, 3), (1, -10), (-1, 3), (-1, -10)))
_ABOVE_BELOW = ((0, 7, "center"), (0, -14, "center"), (0, 13, "center"), (0, -20, "center"))


def _label_points(fig: Any, ax: Any, pts: pd.DataFrame, x: str, palette: Mapping[str, Any]) -> None:
    """Label every point with its keep rate beside its marker: the first candidate place whose box overlaps
    no marker, no label placed before and leaves the axes; else the place with the fewest overlaps. Works in
    display units after a layout pass, so it holds in the saved figure (tested on the label boxes)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # fixes the layout and axis limits, so data -> display positions are final
    renderer = fig.canvas.get_renderer()
    half = 3.5 * fig.dpi / 72.0  # a marker's half width in pixels (markersize 5)
    frame = ax.get_window_extent(renderer)
    xy = ax.transData.transform(pts[[x, Y_COLUMN]].to_numpy(dtype=float))
    obstacles = [Bbox([[px - half, py - half], [px + half, py + half]]) for px, py in xy]
    for _, r in pts.sort_values([x, Y_COLUMN], kind="stable").iterrows():
        best = None
        for dx, dy, ha in (*_LABEL_PLACES, *_ABOVE_BELOW):
            far = abs(dx) > 5 or abs(dy) > 11  # away from its marker: a thin leader line says whose label it is
            ann = ax.annotate(f"{r['keep_rate']:g}", (r[x], r[Y_COLUMN]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, fontsize=6, color=palette[r["method"]], zorder=5,
                              arrowprops=dict(arrowstyle="-", color=palette[r["method"]], lw=0.4, shrinkA=0,
                                              shrinkB=2) if far else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the label's text, not its leader line
            hits = sum(box.overlaps(o) for o in obstacles) + (0 if frame.contains(box.x0, box.y0)
                                                             and frame.contains(box.x1, box.y1) else 1)
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
    """Save :func:`pareto_figure` in both layouts: ``<out_dir>/<stem>.png`` / ``.pdf`` (one column) and
    ``<stem>_wide.png`` / ``.pdf`` (text width); PNG at 300 dpi. Returns the four paths.

    Raises:
        ReportError (a ValueError): for an unknown ``x`` (allowed ones listed), or see :func:`pareto_table`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for layout, suffix in (("column", ""), ("wide", "_wide")):
        fig = pareto_figure(df, x=x, title=title, palette=palette, layout=layout)
        png, pdf = out / f"{stem}{suffix}.png", out / f"{stem}{suffix}.pdf"
        fig.savefig(png, dpi=300, metadata={"Software": None})
        fig.savefig(pdf, metadata={"CreationDate": None, "Creator": None, "Producer": None})
        paths += [png, pdf]
    return paths
