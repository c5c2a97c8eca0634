"""One interleaved timing pass over every row of a Pareto table, so that its speed columns compare.

A row's latency and throughput measured right after its own training depend on that moment's load (another
process, a busy disk, the machine's thermal state): in one sweep the teacher and ``full`` attention, the same
architecture, showed 501 and 417 img/s. At the end of a sweep :func:`timing_pass` loads every finished model of
the table's profile and dataset (the teacher, and each row's trained checkpoint; a method that is only applied
to the teacher is rebuilt from it) and times them all *interleaved* with
:func:`bench_suite.measure.measure_callables`: round ``r`` runs every model once on the same batch, in an order
that rotates each round, in the same process and thread count, so that load hits all rows alike. The median and
p90 latency (ms per batch) and throughput (img/s) of the pass replace the rows' values, and every row gets the
pass's identity (``speed_pass``, the UTC time it ran as ``YYYYMMDDhhmmss``) and size (``speed_pass_rows``): a
table whose rows share one pass says so; one whose rows do not says they are not comparable
(:func:`bench_suite.pareto.summary_caption`).
"""
from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from bench_suite.checkpoints import checkpoint_path, load_trained
from bench_suite.measure import EVAL_TIMING, measure_callables, timing_mode
from bench_suite.registry import get_method
from bench_suite.store import STORE_FILENAME, ResultsStore

__all__ = ["PASS_UNITS", "timing_pass", "MIN_SAMPLE_MS"]

PASS_UNITS = {"latency_ms_median": "ms", "latency_ms_p90": "ms", "img_per_s": "img/s",
              "speed_pass": "UTC time (YYYYMMDDhhmmss)", "speed_pass_rows": "rows"}
MIN_SAMPLE_MS = 50.0
"""A timed sample repeats a fast model's forward until it lasts this long (fewer timer and scheduler effects)."""


def _models(rows: Any, output: Path, profile: str, teacher: torch.nn.Module | None,
            log: Callable[[str], None]) -> dict[str, torch.nn.Module]:
    """Row key -> the eval-mode model it measured (teacher; trained checkpoint; a training-free method applied to
    the teacher with the row's settings). Rows whose model cannot be rebuilt are left out, with a line."""
    out: dict[str, torch.nn.Module] = {}
    for _, r in rows.iterrows():
        key, method = str(r["key"]), str(r["method"])
        try:
            if method == "teacher":
                if teacher is not None:
                    out[key] = copy.deepcopy(teacher).eval()
                continue
            spec = get_method(method)
            path = checkpoint_path(output, key, method, float(r["keep_rate"]))
            if path.is_file():
                out[key] = load_trained(method, path, profile).model.eval()
            elif not spec.fine_tunes and teacher is not None:
                settings = {k: v for k, v in ((r["config"] or {}).get("hparams") or {}).items() if k != "keep_rate"}
                module = spec.factory(copy.deepcopy(teacher), keep_rate=float(r["keep_rate"]), teacher=None,
                                      **settings)
                out[key] = module.model.eval()
        except Exception as e:  # noqa: BLE001 - a row that cannot be rebuilt keeps its own timing, said once
            log(f"speed pass: {method} keep {float(r['keep_rate']):g} ({key}) left out: {str(e).splitlines()[0]}")
    return out


def timing_pass(output: str | Path, profile: str, dataset: str, batch: torch.Tensor,
                teacher: torch.nn.Module | None = None, warmup: int = EVAL_TIMING["warmup"],
                repeats: int = EVAL_TIMING["repeats"], min_sample_ms: float = MIN_SAMPLE_MS,
                log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Time every finished row of ``profile`` / ``dataset`` in ``<output>/results.sqlite`` in one interleaved pass
    and write the results into the rows.

    Args:
        output: the results folder (store and run checkpoints).
        profile, dataset: the table's rows.
        batch: the eval batch ``[B, C, H, W]`` every model runs (the runner's: ``EVAL_TIMING["batch"]`` test images).
        teacher: the teacher model (the ``teacher`` row, and the base of training-free methods).
        warmup, repeats: untimed calls per model, then timed rounds (each model once per round, rotating order).
        min_sample_ms: see :data:`MIN_SAMPLE_MS`.
        log: progress printer.

    Returns:
        Row key -> ``{"latency_ms_median", "latency_ms_p90", "img_per_s", "speed_pass", "speed_pass_rows"}``
        (also written into the store); ``{}`` when the store has no such rows.

    Raises:
        bench_suite.errors.StoreCorruptError: for an unreadable store.
    """
    output = Path(output)
    db = output / STORE_FILENAME
    if not db.is_file():
        return {}
    with ResultsStore(db, create=False) as store:
        rows = store.rows(profile=profile, dataset=dataset, status="ok")
    if rows.empty:
        return {}
    models = _models(rows, output, profile, teacher, log)
    if not models:
        return {}
    stamp = int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))
    log(f"speed pass: {len(models)} row(s) of {profile} / {dataset} timed interleaved, batch {len(batch)}, "
        f"{repeats} rounds after {warmup} warm-up call(s)")
    fns = {key: (lambda m=m: m(batch)) for key, m in models.items()}
    with timing_mode(models.values()):
        timed = measure_callables(fns, warmup=warmup, repeats=repeats, min_sample_ms=min_sample_ms)
    out = {}
    for key, t in timed.items():
        out[key] = {"latency_ms_median": t["median_ms"], "latency_ms_p90": t["p90_ms"],
                    "img_per_s": 1000.0 * len(batch) / t["median_ms"], "speed_pass": stamp,
                    "speed_pass_rows": len(timed)}
    with ResultsStore(db) as store:
        for key, metrics in out.items():
            store.update_metrics(key, metrics, PASS_UNITS)
    return out
