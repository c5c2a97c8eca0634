"""Every registered method through the same tests (timm-style registry-parametrised tests):
forward/backward without NaN, the no-op setting (keep rate 1.0) equals full attention, FLOPs counted,
a Lightning checkpoint round trip, and invalid keep rates rejected."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from bench_suite.backbones import create_backbone
from bench_suite.flops import count_flops
from bench_suite.registry import get_method, list_methods
from tests.conftest import random_images, tiny_vit

METHODS = list_methods()


def _rate(name: str) -> float:
    return min(get_method(name).keep_rates)


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_no_nan(name):
    teacher = tiny_vit().eval()
    module = get_method(name).factory(copy.deepcopy(teacher).train(), keep_rate=_rate(name), teacher=teacher)
    module.train()
    x, y = random_images(4, seed=1), torch.arange(4) % 10
    terms = module.losses(module.forward_train(x), module.forward_teacher(x), (x, y))
    loss = torch.stack(list(terms.values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    module.eval()
    with torch.no_grad():
        logits = module(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", METHODS)
def test_keep_rate_one_equals_full_attention(name):
    full = tiny_vit().eval()
    factory = get_method(name).factory
    module = factory(copy.deepcopy(full), teacher=None, **factory.noop_settings()).eval()
    x = random_images(4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(module(x), full(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_flops_are_counted_and_reduced_by_keep_rate(name):
    x = random_images(2, seed=1)
    dense = count_flops(tiny_vit(), x)
    factory = get_method(name).factory
    module = factory(tiny_vit(), **factory.noop_settings()).eval()
    at_one = count_flops(module.model, x)
    assert at_one.mhsa_mflops >= dense.mhsa_mflops * 0.999  # keep 1.0 computes at least the dense attention
    assert at_one.total_gflops >= dense.total_gflops * 0.999


@pytest.mark.parametrize("name", METHODS)
def test_lightning_checkpoint_round_trip(name, tmp_path):
    spec = get_method(name)
    teacher = tiny_vit().eval()
    module = spec.factory(copy.deepcopy(teacher).train(), keep_rate=_rate(name), teacher=teacher)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    data = torch.utils.data.TensorDataset(random_images(8, seed=1), torch.arange(8) % 10)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = spec.factory.load_from_checkpoint(path, backbone=tiny_vit(seed=5), teacher=None, map_location="cpu")
    assert loaded.hparams.keep_rate == _rate(name)
    x = random_images(4, seed=1)
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))
    # the Lightning way: the checkpoint rebuilds its own backbone
    again = spec.factory.load_from_checkpoint(path, map_location="cpu").eval()
    assert type(again) is type(module) and again.teacher is None
    with torch.no_grad():
        torch.testing.assert_close(again(x), module(x))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_keep_rate_rejected(name, bad):
    with pytest.raises(ValueError, match="keep rate"):
        get_method(name).factory(tiny_vit(), keep_rate=bad)


@pytest.mark.parametrize("name", METHODS)
def test_timing_mode_changes_no_output(name):
    """What ``speed`` and the timing pass time (inside ``timing_mode``) computes the same logits as the forward
    outside it, for the module and for its bare timm model (what the timing pass loads)."""
    from bench_suite.measure import timing_mode

    module = get_method(name).factory(tiny_vit(), keep_rate=_rate(name)).eval()
    x = random_images(3, seed=2)
    with torch.inference_mode():
        ref = module(x)
        with timing_mode([module]):
            timed = module(x)
        with timing_mode([module.model]):
            timed_model = module.model(x)
    torch.testing.assert_close(timed, ref, atol=0, rtol=0)
    torch.testing.assert_close(timed_model, ref, atol=0, rtol=0)
