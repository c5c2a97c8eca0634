"""End to end on real Fashion-MNIST: the runner as a user calls it (subprocess), on the tiny profile."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from bench_suite.store import ResultsStore
from tests.conftest import have_fashion_mnist

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")]


def _run(out, *extra):
    cmd = [sys.executable, "-m", "bench_suite", "run", "--profile", "tiny", "--methods", "full,evit",
           "--keep-rates", "1.0,0.5", "--train-subset", "256", "--epochs", "1", "--output", str(out),
           "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800)


def test_run_writes_rows_table_plot_and_resumes(tmp_path):
    out = tmp_path / "results"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = ResultsStore(out / "results.sqlite").rows()
    ok = rows[rows.status == "ok"]
    # full attention has no keep rate: it runs once, at 1.0, whatever --keep-rates says
    assert set(zip(ok.method, ok.keep_rate)) == {("teacher", 1.0), ("full", 1.0), ("evit", 1.0), ("evit", 0.5)}
    assert len(rows) == len(ok)
    for _, r in ok.iterrows():
        assert 10.0 < r.top1 <= 100.0 and r.mhsa_mflops > 0 and r.total_gflops > 0 and r.img_per_s > 0
        assert r.units["top1"] == "%" and r.versions["torch"] and r.git
    evit = ok.set_index(["method", "keep_rate"])
    assert evit.loc[("evit", 0.5), "mhsa_mflops"] < evit.loc[("evit", 1.0), "mhsa_mflops"]
    assert evit.loc[("evit", 0.5), "mhsa_mflops_paper"] > 0  # token pruning: paper convention reported too

    table = pd.read_csv(out / "pareto_tiny_fashion_mnist.csv")
    assert {"method", "keep_rate", "mhsa_mflops", "top1", "pareto"} <= set(table.columns)
    assert len(table) == len(ok) and table.pareto.astype(str).isin(["yes", "True", "true"]).any()
    assert (out / "pareto_tiny_fashion_mnist.md").read_text().count("|") > 10
    png = (out / "pareto_tiny_fashion_mnist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "pareto_tiny_fashion_mnist.pdf").read_bytes()[:4] == b"%PDF"

    second = _run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = [line for line in second.stdout.splitlines() if "already in the store" in line]
    assert len([line for line in skipped if line.startswith("[")]) == 3  # every configuration
    assert any(line.startswith("teacher:") for line in skipped)  # and the teacher's evaluation
    assert len(ResultsStore(out / "results.sqlite").rows()) == len(rows)
