"""The example plugin package (examples/topk_attention) adds a method through the ``bench_suite.methods``
entry point with no change to the suite: installed with pip (into a folder on PYTHONPATH, so the test
environment of the other tests stays as it was), it is listed, passes the registry-wide checks, and runs
through the runner from the command line."""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import have_fashion_mnist
from tests.test_resume import ROOT, rows_by_method, run_cli, tiny_teacher  # noqa: F401  (session fixture)

EXAMPLE = ROOT / "examples" / "topk_attention"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """``pip install --no-deps --no-build-isolation`` of the example into a fresh folder (built from a copy,
    so the source tree stays clean)."""
    base = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(EXAMPLE, base / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = base / "site"
    # --no-build-isolation builds with this environment's setuptools (no network); without one, pip fetches it
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
                           "--disable-pip-version-check", "--no-input", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (site / "bench_topk" / "method.py").is_file()
    assert list(site.glob("bench_topk_attention-*.dist-info/entry_points.txt"))
    return site


def _env_cli(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return run_cli(args, cwd, env={"PYTHONPATH": path})


def test_plugin_registers_through_the_entry_point(plugin_site, registry_snapshot, monkeypatch):
    from bench_suite.backbones import create_backbone
    from bench_suite.flops import count_flops

    monkeypatch.syspath_prepend(str(plugin_site))
    for name in [m for m in sys.modules if m.split(".")[0] == "bench_topk"]:
        monkeypatch.delitem(sys.modules, name)  # a fresh import registers the method
    registry_snapshot.load_plugins(force=True)
    spec = registry_snapshot.get_method("topk_attention")
    assert spec.source.startswith("plugin topk_attention") and spec.keep_rates == (0.5, 0.25, 0.1)

    torch.manual_seed(0)
    full = create_backbone("tiny", num_classes=10).eval()
    x = torch.randn(3, 1, 28, 28)
    same = spec.factory(copy.deepcopy(full), keep_rate=1.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), full(x), atol=1e-5, rtol=1e-5)  # B = N is full attention
    n, c, depth = 17, 32, 4
    for rate in (1.0, 0.5, 0.1):  # Q K^T (N^2 C) + sparse A V (N B C) per block, MACs per image
        b = math.ceil(rate * n - 1e-9)
        module = spec.factory(copy.deepcopy(full), keep_rate=rate).eval()
        assert count_flops(module.model, x).mhsa_mflops == pytest.approx(depth * (n * n * c + n * b * c) / 1e6)
    with pytest.raises(ValueError, match="keep rate"):
        spec.factory(copy.deepcopy(full), keep_rate=0.0)


@pytest.mark.slow
@pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")
def test_plugin_runs_through_the_runner(plugin_site, tmp_path, tiny_teacher):
    listed = _env_cli(["list"], tmp_path, plugin_site)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "topk_attention" in listed.stdout and "plugin topk_attention (bench_topk.method)" in listed.stdout

    out = tmp_path / "results"
    run = _env_cli(["run", "--methods", "topk_attention", "--keep-rates", "0.5", "--profile", "tiny",
                    "--train-subset", "128", "--accelerator", "cpu", "--no-progress", "--teacher", str(tiny_teacher),
                    "--output", str(out)], tmp_path, plugin_site)
    assert run.returncode == 0, run.stderr[-3000:]
    rows, by = rows_by_method(out)
    row = by[("topk_attention", 0.5)]
    assert row.status == "ok" and 10.0 < row.top1 <= 100.0 and row.train_steps == 2
    assert row.mhsa_mflops == pytest.approx(4 * (17 * 17 * 32 + 17 * 9 * 32) / 1e6)
    assert row.attn_density == pytest.approx(9 / 17)
    assert "topk_attention" in (out / "pareto_tiny_fashion_mnist.csv").read_text()
