"""Tests of ``python -m bench_suite speed`` and the interleaved timing helpers (no timed assertions)."""
from __future__ import annotations

import csv
import gc
import math
import time
from pathlib import Path

import pytest
import torch

from bench_suite.allocator import allocator_description
from bench_suite.cli import main
from bench_suite.kernels import KernelBuildError, load_kernel
from bench_suite.measure import measure_callables, measure_latency, measure_models, paired_ratio, summarize_times
from bench_suite.speed_models import ratio_metrics
from bench_suite.kernel_bench import KERNEL_COLUMNS, random_key_indices
from bench_suite.speed import SPEED_COLUMNS
from bench_suite.store import ResultsStore, config_key

TINY = ["--batch-size", "2", "--repeats", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def kernel() -> None:
    try:
        load_kernel()
    except KernelBuildError as e:  # pragma: no cover
        pytest.skip(f"kernel cannot be built here: {e}")


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ----------------------------------------------------------------- helpers
def test_random_key_indices_are_distinct_and_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    idx = random_key_indices(2, 3, 11, 13, 5, g)
    assert idx.shape == (2, 3, 11, 5) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 13
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within every row
    with pytest.raises(ValueError, match="budget"):
        random_key_indices(1, 1, 3, 4, 5)


def test_measure_callables_interleaves_and_counts_calls() -> None:
    calls: list[str] = []
    res = measure_callables({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=4)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up, then rounds
    timed = calls[4:]
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order rotates from round to round
    for r in res.values():
        assert r["repeats"] == 4 and r["inner"] == 1 and r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    with pytest.raises(ValueError):
        measure_callables({}, repeats=1)
    with pytest.raises(ValueError):
        measure_callables({"a": lambda: None}, repeats=0)


def test_measure_callables_loops_short_calls() -> None:
    n = {"x": 0}

    def f() -> None:
        n["x"] += 1

    res = measure_callables({"f": f}, warmup=1, repeats=3, min_sample_ms=1.0)
    inner = int(res["f"]["inner"])
    assert inner > 1 and n["x"] == 1 + 3 * inner


def test_measure_callables_calibrates_samples_on_a_warm_call() -> None:
    """The first call of a model pays for allocations and caches; a sample's call count comes from the last
    warm-up call, or the first model of a pass would get fewer calls per sample than the others."""
    n = {"x": 0}

    def f() -> None:
        n["x"] += 1
        if n["x"] == 1:
            time.sleep(0.03)  # a cold first call, 30 ms, three times the sample length

    res = measure_callables({"f": f}, warmup=2, repeats=2, min_sample_ms=10.0)
    assert res["f"]["inner"] > 1 and n["x"] == 2 + 2 * int(res["f"]["inner"])


def test_garbage_collector_is_off_in_timed_calls_only() -> None:
    """As timeit: a collection of the whole heap would land in whichever sample crosses its threshold."""
    seen: list[bool] = []
    measure_callables({"a": lambda: seen.append(gc.isenabled())}, warmup=1, repeats=3)
    assert seen == [True, False, False, False] and gc.isenabled()
    model = torch.nn.Linear(2, 2)
    model.register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    measure_latency(model, torch.randn(1, 2), warmup=1, repeats=2)
    assert seen[4:] == [True, False, False] and gc.isenabled()


def test_summarize_times_nearest_rank() -> None:
    s = summarize_times([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert s == {"median_ms": 6.0, "p90_ms": 10.0, "min_ms": 1.0}


def test_measure_models_restores_training_mode() -> None:
    m = torch.nn.Linear(4, 2).train()
    res = measure_models({"lin": m}, torch.randn(3, 4), warmup=1, repeats=2, num_threads=1)
    assert m.training
    r = res["lin"]
    assert r["batch_size"] == 3 and r["threads"] == 1
    assert math.isclose(r["img_per_s"], 3 / (r["latency_ms_median"] / 1000))


# ----------------------------------------------------------------- the command
def test_kernel_grid_writes_kernel_csv(tmp_path: Path, kernel: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--kernel", "--kernel-n", "20,33", "--keep-rates", "0.25,0.1", *TINY,
                 "--output", str(tmp_path)]) == 0
    header, rows = _csv(tmp_path / "kernel.csv")
    assert header == list(KERNEL_COLUMNS)
    assert [(int(r["n"]), float(r["keep_rate"])) for r in rows] == [(20, 0.25), (20, 0.1), (33, 0.25), (33, 0.1)]
    for r in rows:
        n, rate = int(r["n"]), float(r["keep_rate"])
        assert (int(r["heads"]), int(r["head_dim"]), int(r["batch"])) == (3, 64, 2)  # DeiT-T heads by default
        dense, sparse = float(r["dense_ms"]), float(r["sparse_ms"])
        assert dense > 0 and sparse > 0
        assert math.isclose(float(r["speedup"]), dense / sparse, rel_tol=1e-9)
        assert math.isclose(float(r["flop_ratio"]), n / math.ceil(rate * n), rel_tol=1e-9)
    out = capsys.readouterr().out
    assert "3 heads x head dim 64 (DeiT-T)" in out and "load average" in out
    assert not (tmp_path / "results.sqlite").exists()  # the kernel grid goes to kernel.csv only


def test_kernel_grid_train_times_forward_and_backward(tmp_path: Path, kernel: None) -> None:
    from bench_suite.kernel_bench import KERNEL_TRAIN_COLUMNS

    assert main(["speed", "--kernel", "--train", "--kernel-n", "24", "--keep-rates", "0.25", *TINY,
                 "--output", str(tmp_path)]) == 0
    header, rows = _csv(tmp_path / "kernel.csv")
    assert header == [*KERNEL_COLUMNS, *KERNEL_TRAIN_COLUMNS] and len(rows) == 1
    r = rows[0]
    dense, sparse, gather = (float(r[f"{c}_train_ms"]) for c in ("dense", "sparse", "gather"))
    assert min(dense, sparse, gather) > 0
    assert math.isclose(float(r["train_speedup"]), dense / sparse, rel_tol=1e-9)
    assert math.isclose(float(r["train_speedup_vs_gather"]), gather / sparse, rel_tol=1e-9)


def test_core_rows_in_store_and_speed_csv(tmp_path: Path, kernel: None) -> None:
    assert main(["speed", "--core", "--profile", "tiny", "--keep-rates", "0.5", "--impl", "cpp,torch", *TINY,
                 "--output", str(tmp_path)]) == 0
    with ResultsStore(tmp_path) as store:
        df = store.rows()
    assert len(df) == 7  # dense; sparse cpp/torch; sparsifiner core cpp/torch; connectivity top-B cpp/torch
    assert {(m, c["attention_impl"]) for m, c in zip(df["method"], df["config"])} == {
        ("dense_sdpa", None), ("sparse_attention", "cpp"), ("sparse_attention", "torch"),
        ("sparsifiner_core", "cpp"), ("sparsifiner_core", "torch"), ("connectivity_topk", "cpp"),
        ("connectivity_topk", "torch")}
    for _, row in df.iterrows():
        c = row["config"]
        assert c["kind"] == "speed" and c["scope"] == "core" and c["weights"] == "random"
        assert (c["n"], c["heads"], c["head_dim"], c["threads"]) == (17, 2, 16, 1)  # tiny: 17 tokens, 2 x 16
        assert row["key"] == config_key(c) and row["dataset"] == "synthetic" and row["status"] == "ok"
        assert row["units"]["latency_ms_median"] == "ms" and row["units"]["peak_mib"] == "MiB"
        assert row["budget"] == (17 if row["method"] == "dense_sdpa" else math.ceil(0.5 * 17))
        assert math.isclose(row["speedup_vs_dense"] * row["latency_ratio_to_dense"], 1.0, rel_tol=1e-9)
        assert row["peak_mib"] >= 0
    dense = df[df["method"] == "dense_sdpa"].iloc[0]
    assert dense["keep_rate"] == 1.0 and dense["latency_ratio_to_dense"] == 1.0
    header, lines = _csv(tmp_path / "speed.csv")
    assert header == list(SPEED_COLUMNS)
    assert sorted(r["key"] for r in lines) == sorted(df["key"])


def test_model_rows_in_store(tmp_path: Path, kernel: None) -> None:
    args = ["speed", "--profile", "tiny", "--methods", "full,evit,sparsifiner", "--keep-rates", "0.5",
            "--impl", "cpp", *TINY, "--output", str(tmp_path)]
    assert main(args) == 0
    with ResultsStore(tmp_path) as store:
        df = store.rows()
    assert sorted(zip(df["method"], df["keep_rate"])) == [("evit", 0.5), ("full", 1.0), ("sparsifiner", 0.5)]
    for _, row in df.iterrows():
        c = row["config"]
        assert c["kind"] == "speed" and c["scope"] == "model" and c["weights"] == "random"
        assert c["profile"] == "tiny" and c["batch_size"] == 2 and c["threads"] == 1 and c["repeats"] == 2
        assert c["attention_impl"] == ("cpp" if row["method"] == "sparsifiner" else None)
        assert row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
        assert math.isclose(row["img_per_s"], 2 / (row["latency_ms_median"] / 1000), rel_tol=1e-9)
        assert row["units"]["img_per_s"] == "img/s"
        assert row["versions"]["allocator"] == allocator_description()  # the command's default: retain
    full = df[df["method"] == "full"].iloc[0]
    assert full["latency_ratio_to_full"] == 1.0
    sp = df[df["method"] == "sparsifiner"].iloc[0]
    assert sp["attention_budget"] == math.ceil(0.5 * 17)  # the method's own sparsity report is stored
    # re-running the same configuration replaces its rows (same keys)
    assert main(args) == 0
    with ResultsStore(tmp_path) as store:
        assert len(store) == 3


@pytest.mark.parametrize("extra,message", [
    (["--keep-rates", "1.5"], "keep-rates"),
    (["--impl", "cuda"], "--impl"),
    (["--methods", "nope"], "unknown method"),
    (["--profile", "nope"], "unknown profile"),
    (["--repeats", "0"], "repeats"),
])
def test_user_errors_exit_2(tmp_path: Path, extra: list[str], message: str,
                            capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--profile", "tiny", *extra, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_suite: error:") and message in err


def test_build_flag(kernel: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--build"]) == 0
    assert "sparse attention kernel ready" in capsys.readouterr().out


def test_coef_density_emulation_and_hparams(tmp_path: Path, kernel: None) -> None:
    """Random weights give no nonzero coefficient at tau = 0.05; the emulation sets tau per layer so that
    the measured coefficient density is the one asked for, and --hparams reaches the factory."""
    assert main(["speed", "--profile", "tiny", "--methods", "sparsifiner", "--keep-rates", "0.5", "--impl", "cpp",
                 "--coef-density", "0.25", "--hparams", '{"sparsifiner": {"n_down": 8}}', *TINY, "--output", str(tmp_path)]) == 0
    with ResultsStore(tmp_path) as store:
        row = store.rows().iloc[0]
    c = row["config"]
    assert c["coef_density_emulated"] == 0.25 and len(c["tau_emulated"]) == 4  # one threshold per block
    assert c["hparams"]["n_down"] == 8 and c["hparams"]["attention_impl"] == "cpp"
    assert abs((1 - row["coef_sparsity"]) - 0.25) < 0.05  # measured on the benchmark images


def test_hparams_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--profile", "tiny", "--methods", "full", "--hparams", '{"full": {"n_down": 8}}',
                 "--output", str(tmp_path)]) == 2
    assert "full: n_down is not a setting of the method" in capsys.readouterr().err
    assert main(["speed", "--profile", "tiny", "--methods", "full", "--hparams", '{"n_down": 8}',
                 "--output", str(tmp_path)]) == 2  # the format of run: method name first
    assert "names method 'n_down', which is not in this run" in capsys.readouterr().err
    assert main(["speed", "--profile", "tiny", "--hparams", "[1]", "--output", str(tmp_path)]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_train_step_rows(tmp_path: Path, kernel: None) -> None:
    """``speed --train`` (whole models): one interleaved training step per method, rows with scope train_step, the
    reference's ratio 1, Sparsifiner timed in phase 2 with its sparse kernels; the weights move (a real step)."""
    from bench_suite.speed_models import SpeedOptions
    from bench_suite.speed_train import train_step_benchmark

    args = ["speed", "--train", "--profile", "tiny", "--methods", "full,sparsifiner", "--keep-rates", "0.5",
            "--impl", "cpp", *TINY, "--output", str(tmp_path)]
    assert main(args) == 0
    with ResultsStore(tmp_path) as store:
        df = store.rows()
    assert sorted(zip(df["method"], df["keep_rate"])) == [("full", 1.0), ("sparsifiner", 0.5)]
    for _, row in df.iterrows():
        c = row["config"]
        assert c["kind"] == "speed" and c["scope"] == "train_step" and c["batch_size"] == 2
        assert row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
        assert math.isclose(row["img_per_s"], 2 / (row["latency_ms_median"] / 1000), rel_tol=1e-9)
    assert df[df["method"] == "full"].iloc[0]["latency_ratio_to_full"] == 1.0
    sp = df[df["method"] == "sparsifiner"].iloc[0]
    assert sp["config"]["train_phase"] == 2 and sp["config"]["attention_impl"] == "cpp"
    assert "scope" in (tmp_path / "speed.csv").read_text().splitlines()[0]

    # the timed callables are real optimiser steps: the student's weights change, the teacher's do not
    import bench_suite.speed_train as st

    seen = {}
    real = st._step_fn

    def spy(module, images, labels):
        seen[id(module)] = (module, [p.detach().clone() for p in module.model.parameters() if p.requires_grad],
                            [p.detach().clone() for p in module.teacher.parameters()])
        return real(module, images, labels)

    st._step_fn = spy
    try:
        train_step_benchmark(SpeedOptions(profile="tiny", methods=["sparsifiner"], keep_rates=[0.5], batch_size=2,
                                          threads=1, repeats=1, warmup=1, output=tmp_path, impls=("cpp",)),
                             log=lambda _: None)
    finally:
        st._step_fn = real
    (module, before, teacher_before), = seen.values()
    after = [p.detach() for p in module.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.equal(a, b.detach()) for a, b in zip(teacher_before, module.teacher.parameters()))
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if ".predictor." in n)  # phase 2


def test_train_flag_refuses_core(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--train", "--core", "--profile", "tiny", "--output", str(tmp_path)]) == 2
    assert "--core is eval only" in capsys.readouterr().err


def test_paired_ratio_median_and_sign_test_interval() -> None:
    """Per-round ratios; the 95 % interval of the median of 15 is the 4th to the 12th ratio (coverage
    1 - 2 P(Binomial(15, 1/2) <= 3) = 0.965); below 6 rounds no 95 % interval exists."""
    den = [10.0 + i for i in range(15)]
    ratios = [0.70 + 0.02 * i for i in (3, 14, 0, 7, 9, 1, 12, 4, 6, 13, 2, 10, 5, 8, 11)]
    res = paired_ratio([r * d for r, d in zip(ratios, den)], den)
    assert math.isclose(res["ratio"], 0.84) and res["rounds"] == 15
    assert math.isclose(res["ci_low"], 0.76) and math.isclose(res["ci_high"], 0.92)
    assert 1 - 2 * sum(math.comb(15, k) for k in range(4)) / 2**15 >= 0.95 > \
        1 - 2 * sum(math.comb(15, k) for k in range(5)) / 2**15  # the widest k that keeps 95 %
    few = paired_ratio([1.0] * 5, [2.0] * 5)
    assert few["ratio"] == 0.5 and few["ci_low"] is None and few["ci_high"] is None
    six = paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0] * 6)
    assert (six["ci_low"], six["ci_high"]) == (1.0, 6.0)  # 1 - 2/64 = 0.969
    with pytest.raises(ValueError, match="equal"):
        paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        paired_ratio([1.0], [0.0])


def test_ratios_pair_the_rounds_not_the_medians() -> None:
    """Load rises from round 3 on; in round 3 it hits the reference's sample but not the candidate's. The paired
    ratio stays 0.8 (one round's ratio moves); the ratio of the medians would say 8 / 30 = 0.27."""
    full, candidate = [10.0, 10.0, 30.0, 30.0, 30.0], [8.0, 8.0, 8.0, 24.0, 24.0]
    assert math.isclose(ratio_metrics(candidate, full)["latency_ratio_to_full"], 0.8)
    assert ratio_metrics([1.0], None) == {"latency_ratio_to_full": None, "latency_ratio_ci95_low": None,
                                          "latency_ratio_ci95_high": None}
