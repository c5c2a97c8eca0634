"""The Pareto plot: top-1 (%) against compute, one colour and marker per method, the frontier.

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
from bench_suite.pareto import Y_COLUMN, Y_LABEL, check_x, pareto_front, pareto_table
from bench_suite.registry import get_method, list_methods

__all__ = ["method_palette", "pareto_figure", "plot_pareto"]

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

    axis = check_x(x)
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
