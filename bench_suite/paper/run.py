"""The whole ``tables`` command: counts, top-1 from the store, the four tables, figures and the report page."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bench_suite.backbones import get_profile
from bench_suite.errors import DataError
from bench_suite.paper.counts import CountJob, FlopCount, fast_impl, flops_images
from bench_suite.paper.data import (
    DATA_FILE,
    TABLES,
    SuiteConfig,
    check_tables,
    load_paper_results,
)
from bench_suite.paper.figures import make_figures
from bench_suite.paper.page import write_report_page
from bench_suite.paper.tables import (
    TableResult,
    build_proxy_table,
    build_table,
    suite_top1,
    write_paper_table,
    write_proxy_table,
)
from bench_suite.plan import check_data_dir, check_output
from bench_suite.store import STORE_FILENAME, ResultsStore
from bench_suite.versions import versions
from datamodules import DATAMODULES

__all__ = ["TablesRun", "make_tables"]


# --------------------------------------------------------------------------- the whole command
@dataclass
class TablesRun:
    """Everything one ``tables`` call produced (for the report page)."""

    tables: dict[int, TableResult]
    config: dict[str, Any]
    flops: dict[tuple[str, SuiteConfig], FlopCount]
    figures: list[Any] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    proxy: dict[int, TableResult] = field(default_factory=dict)  # tables of a proxy profile's results


def make_tables(output: str | Path = "results", tables: int | Iterable[int] | None = None,
                profile: str = "mini", data: str = "fashion_mnist", data_dir: str | None = None,
                figures: bool = True, report: bool | None = None, data_file: str | Path = DATA_FILE,
                command: str | None = None, workers: int | None = None,
                log: Callable[[str], None] = print) -> TablesRun:
    """Regenerate the paper's tables (all, or ``tables``) into ``<output>/tables/``.

    Args:
        output: the results folder (its ``results.sqlite`` provides the suite's top-1; files go to
            ``<output>/tables/`` and the report page to ``<output>/report.html`` / ``report.md``).
        tables: table number(s) 1-4; None for all.
        profile, data: the dataset whose stored top-1 the tables show, each row from its own backbone profile
            (``deit_s``, ``lvvit_s``, ``deit_t384``; ``run --table N --profile <it>`` produces them); a
            ``profile`` that is no paper backbone (a proxy such as ``mini``) gets tables of its own results,
            ``table<N>_proxy_<profile>_<data>.*``.
        data_dir: the dataset's folder (also the source of the image the FLOPs are counted on).
        figures: also draw Figures 3-7 (:mod:`bench_suite.paper.figures`).
        report: write the report page (default: when all four tables are generated).
        data_file: the paper-results data file.
        command: the command line, recorded on the report page.
        workers: processes for the paper-scale counts (default :func:`default_workers`).
        log: progress printer.

    Returns:
        :class:`TablesRun` (tables, FLOP counts, figures, written paths, wall time).

    Raises:
        UserError: for a table outside 1-4, or no readable test image.
        UnknownProfileError: for an unknown ``profile``.
        DataFileError: for a malformed data file.
        bench_suite.store.StoreCorruptError: for an unreadable results store.
    """
    start = time.perf_counter()
    numbers = check_tables(tables)
    get_profile(profile)
    if data not in DATAMODULES:
        raise DataError(f"unknown dataset {data!r}; known datasets: {', '.join(DATAMODULES)}")
    check_data_dir(data_dir)
    db = Path(output) / STORE_FILENAME
    if db.exists():  # a corrupt store is refused now, not after minutes of counting
        ResultsStore(db, create=False).close()
    check_output(Path(output) / "tables")
    paper = load_paper_results(data_file)
    paper = paper[paper["table"].isin(numbers)]
    out_dir = Path(output) / "tables"
    items = [(b, c) for b, c in zip(paper["backbone"], paper["config"])]
    images, image_source = flops_images([b for b, _ in items], data, data_dir)
    job = CountJob(items, images, workers, log)
    try:
        log(f"bench_suite tables: counting {len(job.todo)} configuration(s) at paper scale"
            + (f" in {job.workers} processes" if job.workers > 1 else ""))
        top1 = {}
        for backbone in dict.fromkeys(paper["backbone"]):  # each row's top-1 from its own backbone only
            mine = paper[paper["backbone"] == backbone]["config"]
            top1.update({(backbone, c): v for c, v in suite_top1(output, backbone, data, mine).items()})
        proxy_top1 = suite_top1(output, profile, data, paper["config"]) if profile not in set(paper["backbone"]) \
            else None
        figs = []
        if figures:  # drawn here while the worker processes count
            figs = make_figures(output, paper_results=load_paper_results(data_file), profile=profile, dataset=data,
                                data_dir=data_dir, out_dir=out_dir, log=log)
        flops = job.result()
    finally:
        job.close()
    results: dict[int, TableResult] = {}
    paths: list[Path] = []
    for n in numbers:
        res = build_table(n, paper, flops, top1, profile, data, image_source, output, data_dir)
        paths += write_paper_table(res, out_dir, profile, data)
        results[n] = res
    proxy: dict[int, TableResult] = {}
    if proxy_top1 is not None:
        for n in numbers:
            proxy[n] = build_proxy_table(n, paper, proxy_top1, profile, data, output, data_dir)
            paths += write_proxy_table(proxy[n], out_dir, profile, data)
    run = TablesRun(results, {"output": str(output), "tables": list(numbers), "profile": profile, "dataset": data,
                              "data_dir": data_dir, "image_source": image_source, "data_file": str(data_file),
                              "command": command or f"make_tables(tables={list(numbers)})", "versions": versions(),
                              "sparse_attention_impl": fast_impl() or "torch", "proxy_tables": sorted(proxy)},
                    flops, proxy=proxy, paths=paths)
    run.figures = figs
    run.paths += [p for fig in figs for p in fig.paths]
    run.seconds = time.perf_counter() - start
    run.config["seconds"] = round(run.seconds, 1)
    if report if report is not None else len(numbers) == len(TABLES):
        run.paths += write_report_page(output, run)
    return run
