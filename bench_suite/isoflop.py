"""The iso-FLOP table: each method's top-1 at common MHSA budgets, read off its own measured curve.

For every method (label) of a Pareto table, its configurations are sorted by measured MHSA FLOPs and top-1 is
interpolated linearly between the two measured points that bracket the budget ``b * F_full`` (``F_full``: the
dense reference's measured MHSA FLOPs, the teacher's or the reference method's row). Outside a method's
measured range the cell stays empty: nothing is extrapolated. A measured point at exactly the budget is
taken as it is.

Uncertainty: with several seeds a point carries its mean, standard deviation ``s`` and ``n``; the
interpolated mean ``(1 - w) y_a + w y_b`` has the standard error ``sqrt((1 - w)^2 s_a^2 / n_a + w^2 s_b^2 / n_b)``
(the points are independent fine-tunes). The best method at a budget is the one with the highest
interpolated top-1; it is marked "within noise" of the runner-up when the normal-approximation 95% interval
of their difference (``+- 1.96 sqrt(se_1^2 + se_2^2)``) contains 0 (with one seed there is no uncertainty
estimate and the best is the highest value).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench_suite.errors import ReportError
from bench_suite.registry import method_specs

__all__ = ["ISO_BUDGETS", "interpolate_at", "iso_flop_table", "write_iso_flop_table"]

ISO_BUDGETS = (0.25, 0.5, 0.75)
"""Common MHSA budgets, as fractions of full attention's measured MHSA FLOPs."""


def interpolate_at(xs: Sequence[float], ys: Sequence[float], ses: Sequence[float], x: float) -> tuple[float, float]:
    """Top-1 and its standard error at ``x`` on the piecewise-linear curve through ``(xs, ys)`` (any order).

    Returns ``(nan, nan)`` when ``x`` lies outside ``[min(xs), max(xs)]`` (never extrapolated). Points at the
    same ``x`` are averaged first (their standard errors combined as a mean of independent values).
    """
    df = pd.DataFrame({"x": np.asarray(xs, float), "y": np.asarray(ys, float), "se": np.asarray(ses, float)})
    df = df[np.isfinite(df.x) & np.isfinite(df.y)]
    if df.empty:
        return float("nan"), float("nan")
    g = df.groupby("x", sort=True)
    pts = pd.DataFrame({"y": g.y.mean(),
                        "se": g.se.apply(lambda s: math.sqrt((s ** 2).sum(min_count=len(s))) / len(s))})
    px = pts.index.to_numpy(float)
    if x < px[0] - 1e-12 or x > px[-1] + 1e-12:
        return float("nan"), float("nan")
    j = int(np.searchsorted(px, x, side="left"))
    if j < len(px) and abs(px[j] - x) <= 1e-12:
        return float(pts.y.iloc[j]), float(pts.se.iloc[j])
    a, b = j - 1, j
    w = (x - px[a]) / (px[b] - px[a])
    y = (1 - w) * pts.y.iloc[a] + w * pts.y.iloc[b]
    se = math.sqrt(((1 - w) * pts.se.iloc[a]) ** 2 + (w * pts.se.iloc[b]) ** 2)
    return float(y), float(se)


def _full_flops(table: pd.DataFrame) -> float:
    reference = [s.name for s in method_specs() if s.reference]
    for name in ("teacher", *reference):
        v = table.loc[table["method"].astype(str) == name, "mhsa_mflops"].dropna()
        if len(v):
            return float(v.mean())
    raise ReportError("the iso-FLOP table needs the dense reference's MHSA FLOPs (a teacher or full-attention row)")


def iso_flop_table(table: pd.DataFrame, budgets: Sequence[float] = ISO_BUDGETS) -> pd.DataFrame:
    """The iso-FLOP table of one Pareto table (:func:`bench_suite.pareto.pareto_table`, one seed or aggregated).

    Returns one row per method (label; the teacher and the dense reference left out) with, per budget ``b``,
    ``top1@<b>`` (interpolated top-1, %) and ``se@<b>`` (its standard error, NaN with one seed), and a last
    row ``best`` naming the best method at each budget (``"<method> (within noise)"`` when the runner-up is
    within noise). ``attrs``: ``full_mflops``, ``budgets``.

    Raises:
        ReportError: without a dense reference row to define the budgets.
    """
    full = _full_flops(table)
    reference = {s.name for s in method_specs() if s.reference} | {"teacher"}
    rows = table[~table["method"].astype(str).isin(reference)]
    out = []
    for method, g in rows.groupby(rows["method"].astype(str), sort=True):
        sd = g["top1_sd"].to_numpy(float) if "top1_sd" in g.columns else np.full(len(g), np.nan)
        n = g["n"].to_numpy(float) if "n" in g.columns else np.ones(len(g))
        se = np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan)
        rec: dict[str, object] = {"method": method}
        for b in budgets:
            y, e = interpolate_at(g["mhsa_mflops"], g["top1"], se, b * full)
            rec[f"top1@{b:g}"], rec[f"se@{b:g}"] = y, e
        out.append(rec)
    res = pd.DataFrame(out, columns=["method"] + [f"{k}@{b:g}" for b in budgets for k in ("top1", "se")])
    best: dict[str, object] = {"method": "best"}
    for b in budgets:
        col, ecol = f"top1@{b:g}", f"se@{b:g}"
        cand = res[res[col].notna()].sort_values(col, ascending=False)
        if cand.empty:
            best[col], best[ecol] = None, None
            continue
        first = cand.iloc[0]
        label = str(first["method"])
        if len(cand) > 1:
            second = cand.iloc[1]
            se = math.sqrt(float(first[ecol]) ** 2 + float(second[ecol]) ** 2) \
                if pd.notna(first[ecol]) and pd.notna(second[ecol]) else float("nan")
            if math.isfinite(se) and first[col] - second[col] <= 1.96 * se:
                label += f" (within noise of {second['method']})"
        best[col], best[ecol] = label, None
    res = pd.concat([res, pd.DataFrame([best])], ignore_index=True)
    res.attrs = {"full_mflops": full, "budgets": tuple(budgets)}
    return res


def write_iso_flop_table(table: pd.DataFrame, out_dir: str | Path, stem: str,
                         budgets: Sequence[float] = ISO_BUDGETS) -> list[Path]:
    """Write ``<stem>.md`` (top-1 +- standard error per budget, the best method per budget, a caption) and
    ``<stem>.csv`` (the numbers of the method rows). Returns the paths; nothing when no method's range covers any budget."""
    from tabulate import tabulate

    iso = iso_flop_table(table, budgets)
    methods = iso[iso["method"] != "best"]
    if methods[[f"top1@{b:g}" for b in budgets]].isna().all().all():
        return []
    out = Path(out_dir)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    methods.to_csv(csv_path, index=False)  # the numbers; the best method per budget is in the Markdown
    full = iso.attrs["full_mflops"]
    headers = ["Method"] + [f"Top-1 (%) at {b:.0%} MHSA ({b * full:.4g} MFLOPs)" for b in budgets]
    body = []
    for _, rec in iso.iterrows():
        cells = [rec["method"]]
        for b in budgets:
            y, e = rec[f"top1@{b:g}"], rec[f"se@{b:g}"]
            if rec["method"] == "best":
                cells.append(y if isinstance(y, str) else "–")
            elif y is None or pd.isna(y):
                cells.append("–")
            else:
                cells.append(f"{float(y):.2f}" + (f" ± {float(e):.2f}" if e is not None and pd.notna(e) else ""))
        body.append(cells)
    text = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)
    caption = (f"Table: top-1 of each method interpolated linearly along its own measured curve at "
               f"{', '.join(f'{b:.0%}' for b in budgets)} of full attention's measured MHSA FLOPs "
               f"({full:.4g} MFLOPs); '–' where the budget is outside the method's measured range (never "
               f"extrapolated); ± the standard error over seeds (none with one seed); 'within noise' when the "
               f"best and the runner-up differ by less than 1.96 combined standard errors.")
    md_path.write_text(f"{text}\n\n{caption}\n", encoding="utf-8")
    return [md_path, csv_path]
