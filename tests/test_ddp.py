"""Multi-process training: a tiny sweep under Lightning DDP with 2 CPU processes (gloo) gives the
single-process result (same global batch, same images per step, metrics synced across ranks), rank 0
alone writes rows and tables, and each method gets the DDP strategy it needs."""
from __future__ import annotations

import pytest
import torch

from bench_suite.checkpoints import run_dir
from bench_suite.distributed import ddp_strategy_for
from bench_suite.registry import get_method
from tests.conftest import have_fashion_mnist
from tests.test_resume import rows_by_method, run_cli, tiny_teacher  # noqa: F401  (session fixture)


class _Plain:
    pass


class _Declares:
    ddp_find_unused_parameters = True


def test_ddp_strategy_per_method():
    # the methods that freeze parts between phases declare it on their class
    assert get_method("sparsifiner").ddp_find_unused_parameters and get_method("sparsif_evit").ddp_find_unused_parameters
    assert not get_method("evit").ddp_find_unused_parameters
    assert ddp_strategy_for(get_method("sparsifiner").factory, "ddp") == "ddp_find_unused_parameters_true"
    assert ddp_strategy_for(get_method("evit").factory, "ddp") == "ddp"
    assert ddp_strategy_for(_Plain(), "ddp") == "ddp"
    assert ddp_strategy_for(_Declares(), "ddp") == "ddp_find_unused_parameters_true"
    assert ddp_strategy_for(_Declares(), "auto") == "auto"  # only --strategy ddp is mapped


@pytest.mark.slow
@pytest.mark.skipif(not have_fashion_mnist(), reason="apt-get install dataset-fashion-mnist")
def test_two_process_ddp_equals_one_process(tmp_path, tiny_teacher):
    # 256 images, global batch 32: 8 optimiser steps in both runs (16 images per process per step under
    # DDP). No augmentation, so both runs see exactly the same images per step; Sparsifiner needs
    # find_unused_parameters (mapped from --strategy ddp), full attention does not.
    args = ["run", "--profile", "tiny", "--methods", "full,sparsifiner", "--keep-rates", "0.5", "--train-subset",
            "256", "--batch-size", "32", "--no-augment", "--accelerator", "cpu", "--teacher", str(tiny_teacher),
            "--no-progress", "--val-size", "500"]
    one = run_cli([*args, "--output", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*args, "--output", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (ddp)" in two.stdout
    out = two.stdout + two.stderr
    assert "GLOBAL_RANK: 1" in out and "MEMBER: 2/2" in out  # really two processes
    assert two.stdout.count("[2/2] sparsifiner keep 0.5: fine-tuning (") == 1  # rank 1 prints nothing

    teacher_weights = {k[len("model."):]: v for k, v in torch.load(tiny_teacher, weights_only=True)["state_dict"].items()}
    rows1, by1 = rows_by_method(tmp_path / "one")
    rows2, by2 = rows_by_method(tmp_path / "two")
    assert len(rows2) == len(rows1) == 3 and rows2.key.is_unique and (rows2.status == "ok").all()  # rank 0 wrote
    for method in (("teacher", 1.0), ("full", 1.0), ("sparsifiner", 0.5)):
        a, b = by1[method], by2[method]
        assert a.key == b.key  # the same configuration, whatever the number of processes
        assert b.config["processes"] == 2 and a.config["processes"] == 1
        assert abs(a.top1 - b.top1) <= 0.05, (method, a.top1, b.top1)  # 10k test images synced across ranks
        assert a.mhsa_mflops == pytest.approx(b.mhsa_mflops, rel=1e-6)
        if method[0] != "teacher":
            # the global batch was kept (Sparsifiner: its phase-1 epoch before the fine-tuning epoch)
            assert a.train_steps == b.train_steps == (16 if method[0] == "sparsifiner" else 8)
            assert a.global_batch == b.global_batch == 32 and a.lr_peak == b.lr_peak  # DeiT's scaling, one batch
            # the same training trajectory: the two runs' weights differ by well under 2% of how far training
            # moved them from the teacher (AdamW turns summation-order noise in near-zero gradients into
            # lr-sized steps on a few entries, so entry-wise equality is not expected)
            one_w, two_w = (torch.load(run_dir(tmp_path / d, a.method, a.keep_rate, a.key) / "checkpoints" / "last.ckpt",
                                       weights_only=False)["state_dict"] for d in ("one", "two"))
            start = {f"model.{k}": v for k, v in teacher_weights.items()}
            shared = [k for k in one_w if k in start]
            moved = torch.cat([(one_w[k] - start[k]).flatten() for k in shared]).norm()
            apart = torch.cat([(one_w[k] - two_w[k]).flatten() for k in one_w]).norm()
            assert moved > 1e-3 and apart < 0.02 * moved, (method, float(apart), float(moved))
    assert (tmp_path / "two" / "pareto_tiny_fashion_mnist.csv").is_file()
    # rank 0 timed every row in one interleaved pass after training (the store stays readable: see
    # test_store's lock test for what once made a two-process run's store read back malformed)
    assert rows2.speed_pass.notna().all() and rows2.speed_pass.nunique() == 1
