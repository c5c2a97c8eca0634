"""Bad input, training faults and concurrent sweeps: clear one-line errors with exit status 2 and nothing
written, a NaN/inf loss fails only its configuration (failed row, the sweep goes on, exit status 1), and
two sweeps writing to one results folder at once both finish with every row present exactly once."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_suite.cli import main
from bench_suite.store import ResultsStore
from tests.conftest import FASHION_DIR, have_fashion_mnist
from tests.test_resume import one_thread, rows_by_method, run_cli, tiny_teacher  # noqa: F401  (fixtures)

needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")


def _run(args: list[str], out: Path, capsys) -> tuple[int, str]:
    code = main(["run", "--profile", "tiny", "--train-subset", "64", "--accelerator", "cpu", "--no-progress",
                 "--output", str(out), *args])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bench_suite: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, needles", [
    (["--methods", "full,nosuchmethod"], ["unknown method 'nosuchmethod'", "known methods:", "evit"]),
    (["--methods", "evit", "--keep-rates", "0"], ["keep rate 0 is outside (0, 1]"]),
    (["--methods", "evit", "--keep-rates", "1.5"], ["keep rate 1.5 is outside (0, 1]"]),
    (["--methods", "evit", "--keep-rates", "0.5,abc"], ["keep rate 'abc' is not a number"]),
    (["--methods", "evit", "--keep-rates", "nan"], ["outside (0, 1]"]),
    (["--methods", "linformer", "--keep-rates", "1e-9"], ["keeps 1.7e-08 of the 17 tokens", "1/17"]),
    (["--methods", "evit", "--profile", "huge"], ["unknown profile 'huge'", "tiny"]),
    (["--methods", "evit", "--strategy", "ddp_spawn"], ["--strategy: invalid choice: 'ddp_spawn'"]),
    (["--methods", "evit", "--devices", "2", "--strategy", "ddp", "--batch-size", "33"],
     ["--batch-size 33 is not divisible by the 2 processes"]),
    (["--methods", "evit", "--epochs", "-1"], ["--epochs must be a whole number >= 0, got '-1'"]),
    (["--methods", "evit", "--bogus-option", "1"], ["unrecognized arguments: --bogus-option"]),
    (["--methods", "evit", "--hparams", "{evit: 1"], ["--hparams is not valid JSON"]),
    (["--methods", "evit", "--hparams", '{"linformer": {"k": 4}}'], ["names method 'linformer'", "not in this run"]),
    (["--methods", "evit", "--hparams", '{"evit": 3}'], ['--hparams["evit"] must be an object']),
    (["--methods", "evit", "--hparams", '{"evit": {"tau": 0.2}}'], ["tau is not a setting of the method"]),
])
def test_bad_arguments_one_line_exit_2_nothing_written(tmp_path, capsys, args, needles):
    out = tmp_path / "results"
    code, err = _run(args, out, capsys)
    _one_line_error(code, err, *needles)
    assert not out.exists()


def test_table_plans_leave_out_keep_rates_the_profile_cannot_have():
    from bench_suite.backbones import get_profile
    from bench_suite.errors import UserError
    from bench_suite.plan import resolve_plan, validate_plan

    plan = resolve_plan([("sparsifiner", 0.05), ("sparsifiner", 0.5), ("evit", 0.01)])  # as the paper's Table 2
    said: list[str] = []
    kept = validate_plan(plan, get_profile("tiny"), skip_infeasible=True, log=said.append)
    assert [(s.name, r) for s, r, _ in kept] == [("sparsifiner", 0.5)]
    assert said == ["sparsifiner: keep rate 0.05 keeps 0.85 of the 17 tokens of profile 'tiny', fewer than one: left out",
                    "evit: keep rate 0.01 keeps 0.17 of the 17 tokens of profile 'tiny', fewer than one: left out"]
    with pytest.raises(UserError, match="smallest keep rate here is 1/17"):
        validate_plan(plan, get_profile("tiny"))
    assert len(validate_plan(plan, get_profile("deit_s"))) == 3  # 0.01 x 197 tokens: 1.97


@pytest.mark.parametrize("text, needle", [
    ("methods: [full\nkeep_rates: 0.5\n", "Problems parsing config"),       # YAML syntax error
    ("methos: full\n", "does not accept option 'methos'"),                  # misspelt key
    ('{"methods": "full", "epochs": "three"}', '--epochs must be a whole number'),     # wrong type (JSON)
    ("- full\n- evit\n", "config"),                                          # not a mapping
])
def test_malformed_config_file(tmp_path, capsys, text, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    code, err = _run(["--config", str(cfg)], tmp_path / "results", capsys)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "results").exists()
    code, err = _run(["--config", str(tmp_path / "missing.yaml")], tmp_path / "results", capsys)
    _one_line_error(code, err, "does not exist")


def _copy_fashion(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in Path(FASHION_DIR).iterdir():
        if f.name.endswith("-ubyte.gz"):
            shutil.copy(f, dest / f.name)
    return dest


@needs_data
def test_bad_data_folders(tmp_path, capsys):
    out = tmp_path / "results"
    base = ["--methods", "evit", "--keep-rates", "0.5"]
    code, err = _run([*base, "--data-dir", str(tmp_path / "nowhere")], out, capsys)
    _one_line_error(code, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, err = _run([*base, "--data-dir", str(tmp_path / "empty")], out, capsys)
    _one_line_error(code, err, "is empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    code, err = _run([*base, "--data-dir", str(tmp_path / "other")], out, capsys)
    _one_line_error(code, err, "holds no fashion_mnist files")  # never silently another copy
    corrupt = _copy_fashion(tmp_path / "corrupt")
    labels = corrupt / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:5000]))  # truncated
    code, err = _run([*base, "--data-dir", str(corrupt)], out, capsys)
    _one_line_error(code, err, "t10k-labels-idx1-ubyte.gz", "truncated")
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    code, err = _run([*base, "--data-dir", str(corrupt)], out, capsys)
    _one_line_error(code, err, "train-images-idx3-ubyte.gz")
    assert not out.exists()


@needs_data
def test_hparams_reach_the_method_and_make_a_new_configuration(tmp_path, capsys, tiny_teacher, one_thread):
    out = tmp_path / "results"
    base = ["--methods", "linformer,full", "--keep-rates", "0.5", "--epochs", "0", "--teacher", str(tiny_teacher)]
    code, _ = _run(base, out, capsys)
    assert code == 0
    code, _ = _run([*base, "--hparams", '{"linformer": {"k": 3, "share_kv": true}}'], out, capsys)
    assert code == 0
    rows = ResultsStore(out / "results.sqlite").rows()
    lin = rows[rows.method == "linformer"]
    assert len(lin) == 2 and len(rows[rows.method == "full"]) == 1  # full's configuration is unchanged: kept
    hps = {(r["config"]["hparams"]["k"], r["config"]["hparams"]["share_kv"]) for _, r in lin.iterrows()}
    assert hps == {(None, False), (3, True)}
    assert sorted(str(c.get("overrides")) for c in lin["config"]) == ["None", "{'k': 3, 'share_kv': True}"]
    table = (out / "pareto_tiny_fashion_mnist.md").read_text()
    assert "linformer (k=3, share_kv=True)" in table
    k_measured = sorted(lin["k"].tolist())
    assert k_measured == [3.0, 9.0]  # k = 3 as asked; default ceil(0.5 * 17) = 9


@needs_data
def test_bad_teacher_output_and_store(tmp_path, capsys, tiny_teacher, one_thread):
    from bench_suite.backbones import create_backbone

    out = tmp_path / "results"
    base = ["--methods", "evit", "--keep-rates", "0.5"]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(300))
    code, err = _run([*base, "--teacher", str(garbage)], out, capsys)
    _one_line_error(code, err, "teacher checkpoint", "unreadable")
    mini = tmp_path / "mini.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in create_backbone("mini").state_dict().items()}}, mini)
    code, err = _run([*base, "--teacher", str(mini)], out, capsys)
    _one_line_error(code, err, "does not fit profile 'tiny'")
    code, err = _run([*base, "--teacher", str(tmp_path / "none.ckpt")], out, capsys)
    _one_line_error(code, err, "does not exist")
    assert not out.exists()

    # an output folder that cannot be written (a path through a regular file: fails for root too)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run([*base, "--teacher", str(tiny_teacher)], blocker / "results", capsys)
    _one_line_error(code, err, "is not writable")

    # a corrupt results store: said so, left exactly as it was, nothing else written
    out.mkdir()
    store = out / "results.sqlite"
    junk = b"this is not a database" * 100
    store.write_bytes(junk)
    code, err = _run([*base, "--teacher", str(tiny_teacher)], out, capsys)
    _one_line_error(code, err, "results store", "left untouched")
    assert store.read_bytes() == junk and sorted(p.name for p in out.iterdir()) == ["results.sqlite"]


@needs_data
def test_cli_subprocess_prints_no_traceback(tmp_path):
    bad = run_cli(["run", "--methods", "nosuch", "--profile", "tiny", "--output", str(tmp_path / "r")], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "unknown method 'nosuch'" in bad.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------- training faults

@pytest.mark.slow
@needs_data
def test_nonfinite_loss_fails_only_its_configuration(tmp_path, capsys, tiny_teacher, registry_snapshot, one_thread):
    from bench_suite.registry import register_method
    from bench_suite.runner import run_benchmark
    from methods.full import FullAttention

    @register_method("nan_after_two_steps", keep_rates=(1.0,), description="test: loss becomes NaN at step 2")
    class NaNAfterTwoSteps(FullAttention):
        def extra_losses(self, out, teacher_out, batch):
            bad = float("nan") if self.global_step >= 2 else 0.0
            return {"fault": out.logits.sum() * bad}

    out = tmp_path / "results"
    code = main(["run", "--profile", "tiny", "--methods", "nan_after_two_steps,full", "--train-subset", "128",
                 "--batch-size", "32", "--checkpoint-every", "1", "--accelerator", "cpu", "--no-progress",
                 "--teacher", str(tiny_teacher), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err[-2000:]  # some configuration failed: not silent
    assert "1 configuration(s) failed" in captured.err
    rows, by = rows_by_method(out)
    bad = by[("nan_after_two_steps", 1.0)]
    assert bad.status == "failed" and "training loss became nan at epoch 0, step 3" in bad.error
    assert by[("full", 1.0)].status == "ok" and by[("teacher", 1.0)].status == "ok"  # the sweep went on
    assert "nan_after_two_steps keep 1: FAILED: training loss became nan" in captured.out
    # the last checkpoint of the failed run is the step before the fault, with finite weights
    ckpt = torch.load(Path(bad.config["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())

    # a huge learning rate (a per-configuration override) diverges: failed row, clear message
    class Cfg:  # the options of the run above
        profile, data, data_dir, seed, output, devices, num_nodes = "tiny", "fashion_mnist", None, 0, str(out), 1, 1
        strategy, accelerator, num_workers, no_progress, epochs, train_subset = "auto", "cpu", 0, True, 1, 128
        batch_size, teacher, force, methods, keep_rates, checkpoint_every = 32, str(tiny_teacher), False, "full", None, 1

    written = run_benchmark(Cfg, log=lambda m: None, plan=[("full", 1.0, {"lr": 1e12})])
    assert [(r["method"], r["status"]) for r in written] == [("full", "failed")]
    assert "training loss became" in written[0]["error"] and "lower the learning rate" in written[0]["error"]
    rows = ResultsStore(out / "results.sqlite").rows()
    assert len(rows) == 4 and rows.key.is_unique


# ----------------------------------------------------------------------------------------- concurrency

@pytest.mark.slow
@needs_data
def test_two_sweeps_share_one_results_folder(tmp_path, tiny_teacher):
    out = tmp_path / "results"
    args = ["run", "--profile", "tiny", "--methods", "full,evit", "--keep-rates", "0.5,0.3", "--train-subset", "128",
            "--accelerator", "cpu", "--no-progress", "--teacher", str(tiny_teacher), "--val-size", "500",
            "--output", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bench_suite", *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    rows = ResultsStore(out / "results.sqlite").rows()  # readable, complete, no duplicates
    assert sorted(zip(rows.method, rows.keep_rate)) == [("evit", 0.3), ("evit", 0.5), ("full", 1.0), ("teacher", 1.0)]
    assert rows.key.is_unique and (rows.status == "ok").all()
    logs = outputs[0][0] + outputs[1][0]
    for tag in ("[1/3] full keep 1", "[2/3] evit keep 0.5", "[3/3] evit keep 0.3"):
        assert logs.count(f"{tag}: fine-tuning (") == 1, logs  # trained once, by one of the two
    assert logs.count("teacher top-1 (measured now)") == 1
    for stdout, _ in outputs:  # each sweep accounts for every configuration
        for tag in ("[1/3] full keep 1", "[2/3] evit keep 0.5", "[3/3] evit keep 0.3"):
            assert any(f"{tag}: {what}" in stdout for what in
                       ("fine-tuning (", "already in the store", "finished by another process")), stdout
    assert (out / "pareto_tiny_fashion_mnist.csv").is_file()


@needs_data
def test_seeds_train_each_configuration_once_per_seed_from_one_teacher(tmp_path, capsys, tiny_teacher, one_thread):
    out = tmp_path / "results"
    base = ["--methods", "evit", "--keep-rates", "0.5", "--epochs", "1", "--teacher", str(tiny_teacher)]
    code, _ = _run([*base, "--seeds", "0,1"], out, capsys)
    assert code == 0
    rows = ResultsStore(out / "results.sqlite").rows()
    ev = rows[rows.method == "evit"]
    assert sorted(ev.seed.tolist()) == [0, 1] and ev.key.nunique() == 2
    assert len({c["teacher"] for c in ev["config"]}) == 1  # the same teacher for every seed
    assert ev.top1.nunique() == 2  # the seed reached the fine-tune (weights init of nothing, data order)
    assert len(rows[rows.method == "teacher"]) == 1
    code, _ = _run([*base, "--seeds", "1,0"], out, capsys)  # resumable: nothing new to train
    assert code == 0 and len(ResultsStore(out / "results.sqlite").rows()) == len(rows)
    code, err = _run([*base, "--seeds", "0,0"], out, capsys)
    _one_line_error(code, err, "repeats a seed")


@needs_data
def test_training_free_method_is_evaluated_without_fine_tuning(tmp_path, capsys, tiny_teacher, one_thread):
    out = tmp_path / "results"
    code, _ = _run(["--methods", "tome_offshelf", "--keep-rates", "0.5", "--epochs", "1", "--teacher",
                    str(tiny_teacher)], out, capsys)
    assert code == 0
    rows = ResultsStore(out / "results.sqlite").rows()
    row = rows[rows.method == "tome_offshelf"].iloc[0]
    assert row["config"]["epochs"] == 0 and row["train_steps"] == 0  # applied to the teacher, evaluated only
