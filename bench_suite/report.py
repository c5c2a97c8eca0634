"""``python -m bench_suite report``: the Pareto table (Markdown, CSV) and plot (PNG, PDF) of every
(profile, dataset) group in the results store ``<output>/results.sqlite``: ``pareto_<profile>_<dataset>.*``,
and the iso-FLOP table ``isoflop_<profile>_<dataset>.{md,csv}`` (:mod:`bench_suite.isoflop`)."""
from __future__ import annotations

import re
from pathlib import Path

from bench_suite.errors import ReportError
from bench_suite.isoflop import write_iso_flop_table
from bench_suite.pareto import check_x, method_label, pareto_table, write_table
from bench_suite.plan import check_output
from bench_suite.plots import method_palette, plot_pareto
from bench_suite.store import STORE_FILENAME, ResultsStore
from datamodules import DATAMODULES

__all__ = ["ACCURACY_KINDS", "plot_title", "write_report"]


def plot_title(profile: str, dataset: str) -> str:
    """``Profile mini on Fashion-MNIST``: the dataset by the name its datamodule declares."""
    data = getattr(DATAMODULES.get(dataset), "display_name", "") or dataset
    return f"Profile {profile} on {data}"


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
    check_x(x)
    out = Path(output)
    db = out / STORE_FILENAME
    if not db.is_file():
        raise ReportError(f"no results store at {db}; run 'python -m bench_suite run --output {out}' first")
    with ResultsStore(db, create=False) as store:
        rows = store.rows(profile=profile, dataset=dataset)
    rows = rows[rows["config"].map(_is_accuracy_row)] if len(rows) else rows
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        which = ", ".join(f"{k}={v}" for k, v in (("profile", profile), ("dataset", dataset)) if v) or "any"
        raise ReportError(f"no finished results in {db} ({which}): {len(rows)} row(s), none with status 'ok'")
    labels = {method_label(m, c): m for m, c in zip(ok["method"], ok["config"])}
    palette = method_palette(labels)
    check_output(out)
    paths: list[Path] = []
    for (prof, data), group in rows.groupby(["profile", "dataset"], sort=True):
        if not (group["status"] == "ok").any():
            continue
        table = pareto_table(group, x)
        stem = f"pareto_{_safe(prof)}_{_safe(data)}" + ("" if x == "mhsa_mflops" else f"_{x}")
        paths += write_table(table, out, stem)
        paths += plot_pareto(table, x, out, stem, title=plot_title(prof, data), palette=palette)
        if x == "mhsa_mflops":
            try:
                paths += write_iso_flop_table(table, out, f"isoflop_{_safe(prof)}_{_safe(data)}")
            except ReportError:  # no dense reference row: no budgets to compare at
                pass
    return paths
