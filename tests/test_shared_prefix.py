"""A method's shared prefix (``BenchModule.shared_prefix``): Sparsifiner's phase 1 does not depend on the keep
rate, so a sweep trains it once and the other keep rates resume phase 2 from its checkpoint, with exactly the
result a run of their own would give."""
from __future__ import annotations

from pathlib import Path

import pytest

from methods.base import BenchModule
from methods.sparsifiner import Sparsifiner
from tests.conftest import tiny_vit
from tests.test_resume import rows_by_method, run_cli, tiny_teacher  # noqa: F401  (session fixture)


def _args(teacher: Path, out: Path, rates: str) -> list[str]:
    # 128 images, batch 32: 4 steps per epoch, phase 1 one epoch before the fine-tuning epoch; no augmentation,
    # so that a run resumed from the shared phase 1 must end exactly where a run of its own does
    return ["run", "--profile", "tiny", "--methods", "sparsifiner", "--keep-rates", rates, "--train-subset", "128",
            "--batch-size", "32", "--epochs", "1", "--no-augment", "--accelerator", "cpu", "--teacher", str(teacher),
            "--no-progress", "--val-size", "500", "--output", str(out)]


def test_declarations():
    assert BenchModule.shared_prefix(Sparsifiner(tiny_vit(), phase1_epochs=0)) is None
    thresholds = ("tau", "coef_topk", "w_up_threshold")  # phase 1 trains on the dense coefficients and basis
    assert Sparsifiner(tiny_vit()).shared_prefix() == (1, ("keep_rate", "lr_batch", *thresholds))
    assert Sparsifiner(tiny_vit(), predictor_lr=None).shared_prefix() == (1, ("keep_rate", *thresholds))  # lr_batch scales it
    assert Sparsifiner(tiny_vit(), threshold_coef_in_phase1=True).shared_prefix() == (
        1, ("keep_rate", "lr_batch", "w_up_threshold"))  # the coefficient threshold shapes phase 1 then
    assert Sparsifiner(tiny_vit(), threshold_w_up_in_phase1=True).shared_prefix() == (
        1, ("keep_rate", "lr_batch", "tau", "coef_topk"))
    assert Sparsifiner(tiny_vit(), phase1_steps=5).shared_prefix() is None  # sized in steps: not shared
    assert Sparsifiner(tiny_vit(), phase1_full_attention=False).shared_prefix() is None  # sparse forward: keep-dependent


@pytest.mark.slow
def test_phase1_is_trained_once_and_resumed_exactly_at_another_keep_rate_and_learning_rate(tmp_path, tiny_teacher):  # noqa: F811
    """Keep 0.5 trains phase 1 and saves it; keep 0.25 with another ``lr_batch`` and top-3 coefficients instead
    of ``tau`` (as the official top-8; phase 1 depends on none of them: the frozen backbone's learning rate is
    unused there, and it trains on the dense coefficients) resumes from it with its own phase-2 learning rate
    and thresholds, and ends exactly where a run of its own ends."""
    first_run = run_cli(_args(tiny_teacher, tmp_path / "a", "0.5"), tmp_path)
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    assert len(list((tmp_path / "a" / "prefixes").glob("sparsifiner-*.ckpt"))) == 1
    _, by = rows_by_method(tmp_path / "a")
    first = by[("sparsifiner", 0.5)]
    assert first.shared_prefix_epochs == 0 and first.resumed_from_step == 0 and first.train_steps == 8
    assert first.lr_peak == pytest.approx(5e-4 * 32 / 512) and first.global_batch == 32  # DeiT's scaling

    other_lr = '{"sparsifiner": {"lr_batch": 128, "coef_topk": 3}}'
    shared = run_cli(_args(tiny_teacher, tmp_path / "a", "0.25") + ["--hparams", other_lr], tmp_path)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "resuming from the shared" in shared.stdout
    _, by = rows_by_method(tmp_path / "a")
    second = by[("sparsifiner", 0.25)]
    assert second.shared_prefix_epochs == 1 and second.resumed_from_step == 4 and second.train_steps == 8
    assert second.attn_distill_start == first.attn_distill_start  # the same phase 1 ...
    assert second.attn_distill_end == first.attn_distill_end
    assert second.lr_peak == pytest.approx(5e-4 * 32 / 128)  # ... and this run's own phase-2 learning rate

    alone = run_cli(_args(tiny_teacher, tmp_path / "b", "0.25") + ["--hparams", other_lr], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    _, by_alone = rows_by_method(tmp_path / "b")
    own = by_alone[("sparsifiner", 0.25)]
    assert own.shared_prefix_epochs == 0 and own.resumed_from_step == 0
    assert own.key == second.key  # one configuration ...
    for metric in ("top1", "attn_distill_end", "mask_recall", "mhsa_mflops"):  # ... and one result
        assert own[metric] == pytest.approx(second[metric], rel=1e-6, abs=1e-9), metric
