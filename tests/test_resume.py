"""Resumable sweeps: atomic checkpoints, only a configuration's own checkpoint is resumed, --force starts
from scratch, the training order continues mid-epoch, a real sweep killed with SIGKILL and started
again re-runs only what was unfinished (from its checkpoint, to the same result), and the same command
gives the same top-1 and FLOPs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from bench_suite.store import ResultsStore
from bench_suite.training import (STAMP_KEY, AtomicCheckpointIO, ResumableSampler, TrainSettings, fit_and_test,
                                  inspect_checkpoint)
from tests.conftest import FASHION_DIR, have_fashion_mnist

needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- shared helpers

def quick_teacher(base: Path) -> Path:
    """A tiny-profile teacher made in seconds: full attention trained for two epochs on 16384 real
    Fashion-MNIST images (about 64% top-1), exported as the runner's slim teacher checkpoint
    (``--teacher PATH``). Made once
    per test session under ``base`` (a file lock makes concurrent callers wait) and shared by the test
    files that drive the runner."""
    from bench_suite.backbones import create_backbone
    from bench_suite.locks import ConfigLock
    from bench_suite.teacher import export_checkpoint
    from datamodules import create_datamodule
    from methods.full import FullAttention

    folder = base / "quick_tiny_teacher"
    out = folder / "teacher.ckpt"
    with ConfigLock(base / "quick_tiny_teacher.lock"):
        if not out.is_file():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            pl.seed_everything(0, verbose=False)
            dm = create_datamodule("fashion_mnist", data_dir=FASHION_DIR, batch_size=128, train_subset=16384)
            module = FullAttention(create_backbone("tiny", num_classes=10), lr=3e-3, distill_logits=0.0)
            fit_and_test(module, dm, folder / "run",
                         TrainSettings(epochs=2, accelerator="cpu", progress=False, checkpoint_every_n_steps=None))
            export_checkpoint(folder / "run" / "checkpoints" / "last.ckpt", out, {"profile": "tiny", "num_classes": 10})
            torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    if not have_fashion_mnist():
        pytest.skip("apt-get install dataset-fashion-mnist")
    return quick_teacher(tmp_path_factory.getbasetemp())


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread, and a busy 2-core machine punishes two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run_cli(args: list[str], cwd: Path, wrapper: str | None = None, timeout: int = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m bench_suite <args>`` (or a wrapper script running the CLI) as a subprocess, on one
    intra-op thread per process (tiny models; CI's 2 cores)."""
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else ["-m", "bench_suite"]), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # its own session, so that a timeout ends the DDP processes it started too
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(args[:1])} timed out after {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def rows_by_method(out: Path):
    rows = ResultsStore(out / "results.sqlite").rows()
    return rows, {(r.method, r.keep_rate): r for _, r in rows.iterrows()}


def stopped_at_step_four(out: Path, stdout: str) -> Path:
    """After a full,evit sweep stopped at EViT's step 5 (checkpoint every 2 steps): the store holds only the
    finished rows (nothing partial) and EViT's checkpoint holds step 4; returns EViT's run folder."""
    rows, by = rows_by_method(out)
    assert set(by) == {("teacher", 1.0), ("full", 1.0)} and (rows.status == "ok").all()  # nothing partial
    evit_dir = Path(re.search(r"\[2/2\] evit keep 0\.5: fine-tuning \((.+)\)", stdout).group(1))
    assert torch.load(evit_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    return evit_dir


# ----------------------------------------------------------------------------------------- units

def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def torn_save(obj, f, *a, **k):  # write half a checkpoint, then die (as a kill mid-write would)
        real_save({"state_dict": {"w": torch.zeros(1000)}}, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="mid-write"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_resumable_sampler_continues_the_epoch_and_shards_like_one_process():
    data = list(range(20))
    one = ResumableSampler(data, batch_size=4, seed=3)
    one.set_epoch(2)
    order = list(one)
    assert sorted(order) == data and order != data  # a seeded permutation per epoch
    # two processes with half the batch each see, per step, exactly the images of one process's batch
    shards = [ResumableSampler(data, batch_size=2, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    a, b = (list(s) for s in shards)
    for step in range(5):
        assert sorted(a[2 * step: 2 * step + 2] + b[2 * step: 2 * step + 2]) == sorted(order[4 * step: 4 * step + 4])
    # position after 3 batches of epoch 2 -> a new sampler continues with the remaining images of that epoch
    one.batches_done = 3
    again = ResumableSampler(data, batch_size=4, seed=3)
    again.load_state_dict(one.state_dict())
    assert again.epoch == 2 and list(again) == order[12:]
    assert list(again) == order  # only the first iteration skips
    one.epoch_finished()  # an epoch-end position starts the next epoch
    nxt = ResumableSampler(data, batch_size=4, seed=3)
    nxt.load_state_dict(one.state_dict())
    assert nxt.epoch == 3 and sorted(nxt) == data
    other = ResumableSampler(data, batch_size=8, seed=3)  # another batch size: the position does not apply
    other.load_state_dict({**one.state_dict(), "batches_done": 1})
    assert other.epoch == 0


def _synthetic_module_and_data(tmp_path, lr=1e-3):
    from bench_suite.backbones import create_backbone
    from datamodules.fashion_mnist import FashionMNISTDataModule, synthetic_idx_dir
    from methods.full import FullAttention

    data = synthetic_idx_dir(tmp_path / "idx", n_train=96, n_test=16)
    dm = FashionMNISTDataModule(data_dir=str(data), batch_size=16, val_size=16, download=False)
    pl.seed_everything(0, verbose=False)
    return FullAttention(create_backbone("tiny", num_classes=10), lr=lr), dm


def test_only_the_configurations_own_checkpoint_is_resumed_and_force_starts_from_scratch(tmp_path, one_thread):
    settings = TrainSettings(epochs=1, accelerator="cpu", progress=False, checkpoint_every_n_steps=2)
    run = tmp_path / "run"
    logs: list[str] = []
    module, dm = _synthetic_module_and_data(tmp_path)
    first = fit_and_test(module, dm, run, settings, run_key="A", log=logs.append)
    last = run / "checkpoints" / "last.ckpt"
    info, reason = inspect_checkpoint(last, "A", dict(module.hparams))
    assert reason is None and info["global_step"] == first["global_step"] == 5 and info["key"] == "A"
    assert torch.load(last, weights_only=False)[STAMP_KEY]["key"] == "A"

    # same configuration: resumed (training already finished, so nothing is trained again)
    module, dm = _synthetic_module_and_data(tmp_path)
    again = fit_and_test(module, dm, run, settings, run_key="A", log=logs.append)
    assert again["resumed_step"] == 5 and again["global_step"] == 5 and any("resuming from" in m for m in logs)

    # another configuration key, then other hyperparameters under the same key: never resumed, kept aside
    for key, lr, why in (("B", 1e-3, "made for configuration 'A'"), ("B", 5e-3, "other hyperparameters (lr)")):
        module, dm = _synthetic_module_and_data(tmp_path, lr=lr)
        logs.clear()
        out = fit_and_test(module, dm, run, settings, run_key=key, log=logs.append)
        assert out["resumed_step"] == 0 and out["global_step"] == 5
        assert any(why in m and "training from scratch" in m for m in logs), logs
        assert inspect_checkpoint(last, key, dict(module.hparams))[0] is not None  # the new run's own now

    # an unreadable checkpoint is set aside too
    last.write_bytes(b"not a checkpoint")
    module, dm = _synthetic_module_and_data(tmp_path, lr=5e-3)
    logs.clear()
    assert fit_and_test(module, dm, run, settings, run_key="B", log=logs.append)["resumed_step"] == 0
    assert any("unreadable" in m for m in logs)
    assert len(list((run / "rejected").iterdir())) == 3

    # --force (fresh=True): the finished checkpoint is discarded, training starts from step 0
    module, dm = _synthetic_module_and_data(tmp_path, lr=5e-3)
    logs.clear()
    forced = fit_and_test(module, dm, run, settings, run_key="B", fresh=True, log=logs.append)
    assert forced["resumed_step"] == 0 and forced["global_step"] == 5 and any("--force" in m for m in logs)


# ----------------------------------------------------------------------------------------- real sweeps

KILL_WRAPPER = textwrap.dedent("""
    # Run the bench_suite CLI and SIGKILL this very process at one training step of one method, once
    # (a marker file remembers it): a deterministic kill in the middle of a real sweep.
    import os, signal, sys
    from pathlib import Path
    import pytorch_lightning as pl
    import bench_suite.training as training
    marker, method, step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    class _Kill(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if type(pl_module).__name__ == method and trainer.global_step == step and not marker.exists():
                marker.write_text("killed")
                print(f"SIGKILL at global step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    _make = training.make_trainer
    training.make_trainer = lambda run_dir, settings, callbacks=None: _make(run_dir, settings, [*(callbacks or []), _Kill()])
    from bench_suite.cli import main
    sys.exit(main(sys.argv[4:]))
""")


@pytest.mark.slow
@needs_data
def test_sweep_killed_mid_training_resumes_only_the_unfinished_configuration(tmp_path, tiny_teacher):
    # 512 images, batch 32: 16 steps; a checkpoint every 2 steps; EViT is killed after step 5 (its
    # checkpoint holds step 4). No augmentation and no random method, so the resumed run must end exactly
    # where an uninterrupted one does.
    args = ["run", "--profile", "tiny", "--methods", "full,evit", "--keep-rates", "0.5", "--train-subset", "512",
            "--batch-size", "32", "--epochs", "1", "--checkpoint-every", "2", "--no-augment", "--accelerator", "cpu",
            "--teacher", str(tiny_teacher), "--no-progress", "--val-size", "500"]
    out = tmp_path / "killed"
    killed = run_cli([str(tmp_path / "marker"), "EViT", "5", *args, "--output", str(out)], tmp_path, KILL_WRAPPER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "SIGKILL at global step 5" in killed.stdout
    evit_dir = stopped_at_step_four(out, killed.stdout)

    again = run_cli([*args, "--output", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: already in the store" in again.stdout
    assert "[1/2] full keep 1: already in the store" in again.stdout
    assert f"resuming from {evit_dir / 'checkpoints' / 'last.ckpt'} (epoch 0, global step 4)" in again.stdout
    assert again.stdout.count("fine-tuning (") == 1
    rows, by = rows_by_method(out)
    assert len(rows) == 3 and rows.key.is_unique and (rows.status == "ok").all()
    evit = by[("evit", 0.5)]
    assert evit.resumed_from_step == 4 and evit.train_steps == 16

    # the same command, never interrupted: the same rows (top-1 and FLOPs), the resumed one included
    ref = tmp_path / "reference"
    clean = run_cli([*args, "--output", str(ref)], tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    _, ref_by = rows_by_method(ref)
    for method in (("full", 1.0), ("evit", 0.5)):
        assert ref_by[method].key == by[method].key
        assert ref_by[method].top1 == by[method].top1, method
        assert ref_by[method].mhsa_mflops == by[method].mhsa_mflops
    assert ref_by[("evit", 0.5)].resumed_from_step == 0


@pytest.mark.slow
@needs_data
def test_same_command_same_seed_same_top1_and_flops(tmp_path, tiny_teacher):
    results = []
    for name in ("a", "b"):
        args = ["run", "--profile", "tiny", "--methods", "evit", "--keep-rates", "0.5", "--train-subset", "128",
                "--seed", "3", "--accelerator", "cpu", "--teacher", str(tiny_teacher), "--no-progress",
                "--val-size", "500", "--output", str(tmp_path / name)]  # default augmentation (random crops and flips)
        done = run_cli(args, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(rows_by_method(tmp_path / name)[1][("evit", 0.5)])
    a, b = results
    assert a.key == b.key and a.top1 == b.top1 and a.val_top1 == b.val_top1
    assert a.mhsa_mflops == b.mhsa_mflops and a.total_gflops == b.total_gflops and a.train_steps == b.train_steps == 2
