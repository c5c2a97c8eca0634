"""DeiT's linear learning-rate scaling (``methods.base.BenchModule``: peak = ``lr x global batch / lr_batch``), the
groups that opt out of it (Sparsifiner's absolute ``predictor_lr``), and the peaks re-applied to a restored
optimiser (a run resumed from a checkpoint another configuration saved)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench_suite.registry import get_method, list_methods
from tests.conftest import tiny_vit


def _attach(module, batch: int = 128, world: int = 1, accumulate: int = 1, steps: int = 100):
    """A stand-in Trainer with what ``configure_optimizers`` reads (the datamodule's per-process batch, the
    world size, the accumulated batches, the number of optimiser steps)."""
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch), world_size=world,
                              accumulate_grad_batches=accumulate, estimated_stepping_batches=steps,
                              optimizers=[], lr_scheduler_configs=[])
    module._trainer = trainer
    return trainer


def _configure(module, **trainer):
    _attach(module, **trainer)
    out = module.configure_optimizers()
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize("batch,world,accumulate", [(128, 1, 1), (64, 2, 1), (32, 4, 4), (512, 1, 1)])
def test_peak_learning_rate_follows_deits_linear_scaling(batch, world, accumulate):
    module = get_method("full").factory(tiny_vit(), lr=5e-4)
    opt, _ = _configure(module, batch=batch, world=world, accumulate=accumulate)
    global_batch = batch * world * accumulate
    expected = 5e-4 * global_batch / 512
    assert module.lr_peak == pytest.approx(expected) and module.lr_global_batch == global_batch
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([expected] * len(opt.param_groups))


def test_lr_batch_none_takes_the_learning_rate_as_the_peak():
    module = get_method("full").factory(tiny_vit(), lr=3e-4, lr_batch=None)
    opt, _ = _configure(module, batch=64)
    assert module.lr_peak == pytest.approx(3e-4)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([3e-4] * len(opt.param_groups))


def test_the_schedule_ends_at_min_lr_scaled_the_same_way():
    module = get_method("full").factory(tiny_vit(), lr=5e-4, min_lr=1e-6)
    opt, sched = _configure(module, batch=128, steps=20)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 * 128 / 512)


def test_invalid_lr_batch_rejected():
    with pytest.raises(ValueError, match="lr_batch"):
        get_method("full").factory(tiny_vit(), lr_batch=0)


@pytest.mark.skipif("sparsifiner" not in list_methods(), reason="needs the sparsifiner method")
def test_sparsifiner_predictor_learning_rate_is_absolute():
    module = get_method("sparsifiner").factory(tiny_vit(), keep_rate=0.5, lr=5e-4, predictor_lr=1e-2)
    opt, _ = _configure(module, batch=128)
    pred_ids = {id(p) for n, p in module.model.named_parameters() if ".predictor." in n}
    peaks = {("predictor" if id(g["params"][0]) in pred_ids else "backbone"): g["initial_lr"] for g in opt.param_groups}
    assert peaks == {"predictor": pytest.approx(1e-2), "backbone": pytest.approx(5e-4 * 128 / 512)}


@pytest.mark.skipif("dynamicvit" not in list_methods(), reason="needs the dynamicvit method")
def test_dynamicvit_backbone_factor_is_scaled_with_the_rest():
    module = get_method("dynamicvit").factory(tiny_vit(), keep_rate=0.7, lr=5e-4, backbone_lr_scale=0.01)
    opt, _ = _configure(module, batch=256)
    peaks = sorted({round(g["initial_lr"], 12) for g in opt.param_groups})
    assert peaks == pytest.approx([5e-4 * 0.01 * 0.5, 5e-4 * 0.5])


def test_restored_optimiser_gets_this_runs_peaks_on_train_start():
    """A checkpoint saved by a run with another learning rate (a shared prefix): the restored optimiser and
    scheduler carry that run's peaks; ``on_train_start`` puts this run's back, at the schedule's current step."""
    module = get_method("full").factory(tiny_vit(), lr=5e-4)
    opt, sched = _configure(module, batch=128, steps=50)
    for _ in range(7):
        opt.step()
        sched.step()
    for g in opt.param_groups:  # as restored from the other run's checkpoint
        g["initial_lr"], g["lr"] = 9e-3, 1.0
    sched.base_lrs = [9e-3] * len(opt.param_groups)
    module.trainer.optimizers = [opt]
    module.trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=sched)]
    module.on_train_start()
    peak = 5e-4 * 128 / 512
    for g, lam in zip(opt.param_groups, sched.lr_lambdas):
        assert g["initial_lr"] == pytest.approx(peak)
        assert g["lr"] == pytest.approx(peak * lam(7))
    assert sched.base_lrs == pytest.approx([peak] * len(opt.param_groups))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(peak * sched.lr_lambdas[0](8))

