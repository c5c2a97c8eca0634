"""The signal policy (:mod:`bench_suite.signals`): a sweep stopped by SIGTERM or SIGINT exits 143 / 130 with
one line that says what was finished and how to resume, writes no partial row, and the same command again
resumes exactly; a Ctrl-C while the packages are still importing stops cleanly too."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import have_fashion_mnist
from tests.test_resume import rows_by_method, run_cli, stopped_at_step_four, tiny_teacher  # noqa: F401  (session fixture)

needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")

SIGNAL_WRAPPER = textwrap.dedent("""
    # Run the bench_suite CLI and send this very process a signal at one training step of one method, once:
    # a deterministic stop in the middle of a real sweep, delivered as the user's kill or Ctrl-C would be.
    import os, signal, sys
    import pytorch_lightning as pl
    import bench_suite.training as training
    sig, method, step = getattr(signal, sys.argv[1]), sys.argv[2], int(sys.argv[3])

    class _Signal(pl.Callback):
        sent = False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if type(pl_module).__name__ == method and trainer.global_step == step and not _Signal.sent:
                _Signal.sent = True
                print(f"{sig.name} at global step {step}", flush=True)
                os.kill(os.getpid(), sig)

    _make = training.make_trainer
    training.make_trainer = lambda run_dir, settings, callbacks=None: _make(run_dir, settings, [*(callbacks or []), _Signal()])
    from bench_suite.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def _args(teacher: Path) -> list[str]:
    # 512 images, batch 32: 16 steps; a checkpoint every 2 steps; no augmentation, so a resumed run must end
    # exactly where an uninterrupted one does
    return ["run", "--profile", "tiny", "--methods", "full,evit", "--keep-rates", "0.5", "--train-subset", "512",
            "--batch-size", "32", "--epochs", "1", "--checkpoint-every", "2", "--no-augment", "--accelerator", "cpu",
            "--teacher", str(teacher), "--no-progress", "--val-size", "500"]  # validation: 500 held-out images


def _stopped(proc: subprocess.CompletedProcess, name: str, code: int) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"{name} at global step 5" in proc.stdout
    assert "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"bench_suite: stopped by {name} (exit status {code}); 2 of 3 configuration(s) written")
    assert "run the same command again" in last


@pytest.mark.slow
@needs_data
def test_sigterm_mid_training_exits_143_and_resumes_exactly(tmp_path, tiny_teacher):
    args = _args(tiny_teacher)
    out = tmp_path / "stopped"
    stopped = run_cli(["SIGTERM", "EViT", "5", *args, "--output", str(out)], tmp_path, SIGNAL_WRAPPER)
    _stopped(stopped, "SIGTERM", 143)
    evit_dir = stopped_at_step_four(out, stopped.stdout)

    again = run_cli([*args, "--output", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {evit_dir / 'checkpoints' / 'last.ckpt'} (epoch 0, global step 4)" in again.stdout
    _, by = rows_by_method(out)
    evit = by[("evit", 0.5)]
    assert evit.resumed_from_step == 4 and evit.train_steps == 16

    reference = run_cli([*args, "--output", str(tmp_path / "reference")], tmp_path)  # never stopped
    assert reference.returncode == 0, reference.stderr[-3000:]
    _, ref = rows_by_method(tmp_path / "reference")
    assert ref[("evit", 0.5)].key == evit.key and ref[("evit", 0.5)].top1 == evit.top1


@pytest.mark.slow
@needs_data
def test_sigint_mid_training_exits_130_and_resumes(tmp_path, tiny_teacher):
    args = _args(tiny_teacher)
    out = tmp_path / "stopped"
    _stopped(run_cli(["SIGINT", "EViT", "5", *args, "--output", str(out)], tmp_path, SIGNAL_WRAPPER), "SIGINT", 130)
    again = run_cli([*args, "--output", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _, by = rows_by_method(out)
    assert by[("evit", 0.5)].resumed_from_step == 4 and by[("evit", 0.5)].train_steps == 16


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_importing_stops_cleanly(tmp_path, sig, code):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench_suite", "list"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.8)  # bench_suite.signals is installed first; torch, timm and Lightning are still importing
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert f"bench_suite: stopped by {signal.Signals(sig).name} (exit status {code})" in err


def test_deferred_handler_records_a_signal_without_raising():
    """While the heavy packages import, a signal is only recorded (raising inside a half-initialised C
    extension's import can abort the interpreter); the raising handler comes after."""
    from bench_suite import signals as sigs

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sigs.reset()
        sigs.install(defer=True)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode: nothing may be raised
        time.sleep(0.05)
        assert sigs.received() == signal.SIGTERM and sigs.exit_code() == 143
        sigs.reset()
        sigs.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        assert sigs.received() == signal.SIGTERM
    finally:
        sigs.reset()
        for s, h in saved.items():
            signal.signal(s, h)
