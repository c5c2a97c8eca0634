"""``run --compile``: ``torch.compile`` of the model being trained (``bench_suite.training.CompileModel``), the
option's way into the Trainer and into every row's configuration."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench_suite.options import TRAINING_DEFAULTS, training_recipe
from bench_suite.registry import get_method
from bench_suite.compiling import CompileModel
from bench_suite.training import TrainSettings, make_trainer
from tests.conftest import fit_steps, random_images, tiny_vit


def _cfg(**kw):
    return SimpleNamespace(**{**TRAINING_DEFAULTS, **kw})


def test_compile_enters_the_configuration_only_when_set():
    assert training_recipe(_cfg()) == {}  # eager: earlier keys unchanged
    assert training_recipe(_cfg(compile="max-autotune")) == {"compile": "max-autotune"}


def test_make_trainer_turns_compile_into_a_callback_not_a_trainer_argument(tmp_path):
    trainer = make_trainer(tmp_path, TrainSettings(accelerator="cpu", progress=False, loggers=(),
                                                   extra={"compile": "reduce-overhead", "gradient_clip_val": 1.0}))
    compiles = [c for c in trainer.callbacks if isinstance(c, CompileModel)]
    assert len(compiles) == 1 and compiles[0].mode == "reduce-overhead"
    assert trainer.gradient_clip_val == 1.0
    eager = make_trainer(tmp_path / "b", TrainSettings(accelerator="cpu", progress=False, loggers=()))
    assert not [c for c in eager.callbacks if isinstance(c, CompileModel)]


def test_compiled_student_trains_and_keeps_its_state_dict_keys():
    module = get_method("evit").factory(tiny_vit(), keep_rate=0.5)
    keys = list(module.state_dict())
    x = random_images(8)
    module.eval()
    with torch.no_grad():
        eager = module.model(x)
    # the eager backend: TorchDynamo's graph capture (the part that meets the suite's patched modules) without
    # the C++ code generation, in seconds
    callback = CompileModel(backend="eager")
    callback.setup(None, module, "fit")
    assert module.model._compiled_call_impl is not None and list(module.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(module.model(x), eager)
    torch._dynamo.reset()
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = fit_steps(module, x, torch.randint(0, 10, (8,)), steps=2, batch_size=4)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


@pytest.mark.parametrize("bad", ["fast", "true"])
def test_cli_refuses_an_unknown_compile_mode(bad, capsys):
    from bench_suite.cli import main

    assert main(["run", "--compile", bad, "--methods", "full"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--compile" in err and "invalid choice" in err
