"""The speed grid of ``python -m bench_suite speed`` (``bench_suite.speed_grid``): its axes, the ``max`` batch
rule against its closed form, the grid table and plots, bf16 cells, and trained checkpoints from the store.
No timed assertions: only what was timed, where it was written and with which weights."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench_suite.checkpoints import run_dir
from bench_suite.cli import main
from bench_suite.errors import UserError
from bench_suite.registry import get_method
from bench_suite.speed_grid import (GRID_COLUMNS, cpu_has_bf16, largest_fitting_batch, parse_batches,
                                    parse_precisions, parse_threads, usable_cpus)
from bench_suite.store import ResultsStore
from tests.conftest import fit_steps, random_images, tiny_vit

QUICK = ["--repeats", "1", "--warmup", "0", "--no-memory"]


def test_axes_parse_and_refuse_bad_values():
    assert parse_batches("1,8,64,max,8") == [1, 8, 64, "max"]
    assert parse_threads("1,all") == ([1, usable_cpus()] if usable_cpus() != 1 else [1])
    assert parse_threads(None) == [None]
    assert parse_precisions("fp32") == ["fp32"]
    for bad, parse in (("0", parse_batches), ("huge", parse_batches), ("-1", parse_threads), ("fp8", parse_precisions)):
        with pytest.raises(UserError):
            parse(bad)


def test_largest_fitting_batch_is_the_closed_form():
    # peak(b) = 10 + 3 b MiB: p1 = 13, slope 3; within 100 MiB: 13 + 3 (b - 1) <= 100 -> b <= 30 -> 16
    peak = lambda b: 10.0 + 3.0 * b  # noqa: E731
    assert largest_fitting_batch(peak, 100.0, cap=1024)[0] == 16
    assert largest_fitting_batch(peak, 100.0, cap=8)[0] == 8  # the cap
    assert largest_fitting_batch(peak, 13.0, cap=1024)[0] == 1  # only one image fits
    with pytest.raises(UserError, match="one image"):
        largest_fitting_batch(peak, 12.0)


def test_grid_writes_one_line_per_cell_and_configuration(tmp_path: Path):
    args = ["speed", "--profile", "tiny", "--methods", "full,evit", "--keep-rates", "0.5", "--batch-size", "1,2",
            "--threads", "1", *QUICK, "--output", str(tmp_path)]
    assert main(args) == 0
    grid = pd.read_csv(tmp_path / "speed_grid.csv")
    assert tuple(grid.columns) == GRID_COLUMNS
    assert sorted(zip(grid.method, grid.batch_size)) == [("evit", 1), ("evit", 2), ("full", 1), ("full", 2)]
    assert (grid[grid.method == "full"].latency_ratio_to_full == 1.0).all()  # the reference of its own cell
    assert (grid.threads == 1).all() and (grid.precision == "fp32").all() and (grid.weights == "random").all()
    assert (tmp_path / "speed_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ms/batch" in (tmp_path / "speed_grid.md").read_text()
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert len(store) == 4  # every cell's rows, each its own key


def test_max_batch_is_resolved_once_and_stored(tmp_path: Path, capsys: pytest.CaptureFixture):
    args = ["speed", "--profile", "tiny", "--methods", "full", "--batch-size", "max", "--max-batch", "4",
            "--threads", "1", *QUICK, "--output", str(tmp_path)]
    assert main(args) == 0
    assert "--batch-size max (fp32): 4" in capsys.readouterr().out  # tiny fits 4 images in any budget
    with ResultsStore(tmp_path / "results.sqlite") as store:
        row = store.rows().iloc[0]
    assert row.config["batch_size"] == 4 and row.config["batch_rule"].startswith("max: largest power of two <= 4")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_bf16_cells_run_under_autocast_through_the_float32_kernel(tmp_path: Path):
    args = ["speed", "--profile", "tiny", "--methods", "full,sparsifiner", "--keep-rates", "0.5", "--batch-size", "2",
            "--threads", "1", "--precision", "fp32,bf16", "--impl", "cpp", *QUICK, "--output", str(tmp_path)]
    assert main(args) == 0
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = store.rows()
    bf16 = rows[[c.get("precision") == "bf16" for c in rows.config]]
    assert len(bf16) == 2 and all(c["dtype"] == "bfloat16 (autocast)" for c in bf16.config)
    impls = {c["method"]: c["attention_impl"] for c in bf16.config}
    assert impls == {"full": None, "sparsifiner": "cpp"}  # the kernel on float32 copies of the bf16 q/k/v
    fp32 = rows[[c.get("precision") is None for c in rows.config]]
    assert {c["method"]: c["attention_impl"] for c in fp32.config} == {"full": None, "sparsifiner": "cpp"}


def test_bf16_is_refused_without_bf16_instructions(monkeypatch):
    import bench_suite.speed_grid as grid

    monkeypatch.setattr(grid, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="bf16"):
        grid.parse_precisions("fp32,bf16")


def test_core_and_kernel_take_one_batch(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["speed", "--core", "--profile", "tiny", "--batch-size", "1,2", "--output", str(tmp_path)]) == 2
    assert "whole models" in capsys.readouterr().err


def _trained_store(tmp_path: Path) -> tuple[str, torch.Tensor]:
    """A store with one trained EViT row of the tiny profile and its Lightning checkpoint where the runner
    puts it; returns the row's key and the checkpoint's head weight."""
    module = get_method("evit").factory(tiny_vit(), keep_rate=0.5)
    trainer = fit_steps(module, random_images(8), torch.randint(0, 10, (8,)), steps=1, batch_size=8)
    key = "trainedevit00001"
    path = run_dir(tmp_path, "evit", 0.5, key) / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(str(path))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.put({"key": key, "status": "ok", "method": "evit", "keep_rate": 0.5, "profile": "tiny",
                   "dataset": "fashion_mnist", "seed": 0, "git": "test", "error": None, "config": {"seed": 0},
                   "metrics": {"top1": 61.5}, "units": {"top1": "%"}, "versions": {}})
    return key, module.model.head.weight.detach().clone()


def test_store_weights_time_the_trained_checkpoint_and_plot_top1_against_latency(tmp_path: Path, monkeypatch):
    key, head = _trained_store(tmp_path)
    loaded = {}
    import bench_suite.checkpoints as ckpts

    real = ckpts.load_trained

    def spy(method, path, profile, overrides=None):
        loaded[method] = module = real(method, path, profile, overrides)
        return module

    monkeypatch.setattr(ckpts, "load_trained", spy)
    args = ["speed", "--profile", "tiny", "--methods", "full,evit", "--keep-rates", "0.5", "--batch-size", "2",
            "--threads", "1", "--weights", "store", *QUICK, "--output", str(tmp_path)]
    assert main(args) == 0
    assert set(loaded) == {"evit"}  # full attention has no trained row: random weights
    torch.testing.assert_close(loaded["evit"].model.head.weight, head)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = store.rows(dataset="synthetic")
    by = {r.method: r.config for _, r in rows.iterrows()}
    assert by["evit"]["weights"] == "store" and by["evit"]["trained_key"] == key
    assert by["full"]["weights"] == "random"
    assert math.isclose(pd.read_csv(tmp_path / "speed_grid.csv").set_index("method").loc["full", "latency_ratio_to_full"],
                        1.0)
    assert (tmp_path / "speed_top1_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
