"""A method's shared prefix (``BenchModule.shared_prefix``): Sparsifiner's phase 1 does not depend on the keep
rate, so a sweep trains it once and the other keep rates resume phase 2 from its checkpoint, with exactly the
result a run of their own would give."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench_suite.store import ResultsStore
from methods.base import BenchModule
from methods.sparsifiner import Sparsifiner
from tests.conftest import tiny_vit
from tests.test_resume import rows_by_method, run_cli, tiny_teacher  # noqa: F401  (session fixture)


def _args(teacher: Path, out: Path, rates: str) -> list[str]:
    # 128 images, batch 32: 4 steps per epoch, phase 1 one epoch before the fine-tuning epoch; no augmentation,
    # so that a run resumed from the shared phase 1 must end exactly where a run of its own does
    return ["run", "--profile", "tiny", "--methods", "sparsifiner", "--keep-rates", rates, "--train-subset", "128",
            "--batch-size", "32", "--epochs", "1", "--no-augment", "--accelerator", "cpu", "--teacher", str(teacher),
            "--no-progress", "--output", str(out)]


def test_declarations():
    assert BenchModule.shared_prefix(Sparsifiner(tiny_vit(), phase1_epochs=0)) is None
    assert Sparsifiner(tiny_vit()).shared_prefix() == (1, ("keep_rate", "lr_batch"))
    assert Sparsifiner(tiny_vit(), predictor_lr=None).shared_prefix() == (1, ("keep_rate",))  # lr_batch scales it
    assert Sparsifiner(tiny_vit(), phase1_steps=5).shared_prefix() is None  # sized in steps: not shared
    assert Sparsifiner(tiny_vit(), phase1_full_attention=False).shared_prefix() is None  # sparse forward: keep-dependent


@pytest.mark.slow
def test_phase1_is_trained_once_per_sweep_and_resumed_exactly(tmp_path, tiny_teacher):  # noqa: F811
    """Keep 0.5 and 0.25 share phase 1; so does keep 0.25 with another ``lr_batch`` (the frozen backbone's learning
    rate is unused in phase 1): it resumes from the prefix with its own phase-2 learning rate and ends exactly
    where a run of its own ends."""
    shared = run_cli(_args(tiny_teacher, tmp_path / "a", "0.5,0.25"), tmp_path)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert len(list((tmp_path / "a" / "prefixes").glob("sparsifiner-*.ckpt"))) == 1
    assert "resuming from the shared" in shared.stdout
    _, by = rows_by_method(tmp_path / "a")
    first, second = by[("sparsifiner", 0.5)], by[("sparsifiner", 0.25)]
    assert first.shared_prefix_epochs == 0 and first.resumed_from_step == 0 and first.train_steps == 8
    assert second.shared_prefix_epochs == 1 and second.resumed_from_step == 4 and second.train_steps == 8
    assert second.attn_distill_start == first.attn_distill_start  # the same phase 1 ...
    assert second.attn_distill_end == first.attn_distill_end
    assert first.lr_peak == pytest.approx(5e-4 * 32 / 512) and first.global_batch == 32  # DeiT's scaling

    other_lr = '{"sparsifiner": {"lr_batch": 128}}'
    third = run_cli(_args(tiny_teacher, tmp_path / "a", "0.25") + ["--hparams", other_lr], tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming from the shared" in third.stdout
    rows, _ = rows_by_method(tmp_path / "a")
    resumed = rows[(rows.method == "sparsifiner") & (rows.lr_peak > first.lr_peak * 1.5)].iloc[0]
    assert resumed.shared_prefix_epochs == 1 and resumed.lr_peak == pytest.approx(5e-4 * 32 / 128)

    for out, extra, ref in (("b", [], second), ("c", ["--hparams", other_lr], resumed)):
        alone = run_cli(_args(tiny_teacher, tmp_path / out, "0.25") + extra, tmp_path)
        assert alone.returncode == 0, alone.stderr[-3000:]
        _, by_alone = rows_by_method(tmp_path / out)
        own = by_alone[("sparsifiner", 0.25)]
        assert own.shared_prefix_epochs == 0 and own.resumed_from_step == 0
        assert own.key == ref.key  # one configuration ...
        for metric in ("top1", "attn_distill_end", "mask_recall", "mhsa_mflops"):  # ... and one result
            assert own[metric] == pytest.approx(ref[metric], rel=1e-6, abs=1e-9), (out, metric)
    assert resumed.mask_recall != second.mask_recall  # phase 2 really trained at the other learning rate


def test_trainer_settings_reach_the_trainer_and_the_configuration_key(tmp_path, tiny_teacher):  # noqa: F811
    """--precision bf16-mixed, --accumulate-grad-batches and --gradient-clip-val train (the sparse kernels under
    autocast included) and enter every row's configuration (a new key); the defaults keep the old keys."""
    args = _args(tiny_teacher, tmp_path / "bf16", "0.5")[:-2] + ["--output", str(tmp_path / "bf16")]
    args[args.index("--methods") + 1] = "sparsifiner,evit"
    proc = run_cli(args + ["--precision", "bf16-mixed", "--accumulate-grad-batches", "2",
                           "--gradient-clip-val", "1.0"], tmp_path)
    rows, by = rows_by_method(tmp_path / "bf16")
    assert proc.returncode == 0, (proc.stderr[-2000:], list(rows.error.dropna())[:1])
    store = ResultsStore(tmp_path / "bf16" / "results.sqlite")
    for method, steps in (("sparsifiner", 4), ("evit", 2)):  # 4 batches per epoch, 2 per step; + phase 1
        row = by[(method, 0.5)]
        assert row.status == "ok" and row.top1 > 10.0
        assert row.train_steps == steps
        assert store.get(row.key)["config"]["trainer"] == {"precision": "bf16-mixed", "accumulate_grad_batches": 2,
                                                           "gradient_clip_val": 1.0}
    assert store.get(by[("teacher", 1.0)].key)["config"]["trainer"]["precision"] == "bf16-mixed"  # evaluated so
