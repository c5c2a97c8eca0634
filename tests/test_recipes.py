"""Paper recipes: each method's official fine-tuning recipe (``paper_recipe``) is used on the paper profiles
(``deit_s``, ``deit_t384``, ``lvvit_s``), enters every row's configuration, and yields to ``--epochs`` /
``--hparams``; the CPU profiles keep one shared protocol."""
from __future__ import annotations

import pytest

from bench_suite.backbones import PROFILES
from bench_suite.plan import method_recipe, recipe_epochs, recipe_settings, resolve_plan, train_config
from bench_suite.registry import get_method, list_methods
from bench_suite.store import config_key
from tests.conftest import tiny_vit

PAPER = [p for p in PROFILES.values() if p.paper_recipes]


def test_the_paper_profiles_and_only_they_run_paper_recipes():
    assert {p.name for p in PAPER} == {"deit_s", "deit_t384", "lvvit_s"}
    for name in ("mini", "mini197", "tiny"):
        assert method_recipe(get_method("evit"), PROFILES[name]) == {}


@pytest.mark.parametrize("name", list_methods())
def test_every_declared_recipe_is_settings_the_method_takes(name):
    spec = get_method(name)
    recipe = spec.paper_recipe
    if not recipe:
        pytest.skip(f"{name} has no paper recipe (the profile's protocol)")
    assert isinstance(recipe.get("epochs"), int) and recipe["epochs"] > 0
    for setting in recipe:
        assert setting == "epochs" or spec.accepts(setting), (name, setting)
    spec.factory(tiny_vit(), keep_rate=spec.keep_rates[0], **recipe_settings(spec, PAPER[0]))  # it builds


def test_official_values():
    """The numbers read from the official repositories (methods-and-flops.md), as DeiT-base learning rates."""
    sp, evit, dyn = (get_method(n).paper_recipe for n in ("sparsifiner", "evit", "dynamicvit"))
    assert sp["epochs"] + sp["phase1_epochs"] == 50 and sp["phase1_epochs"] == 5
    assert sp["lr"] * 1344 / 512 == pytest.approx(8e-5) and sp["predictor_lr"] == pytest.approx(3e-4)
    assert evit["epochs"] == 30 and evit["lr"] * 1024 / 512 == pytest.approx(2e-5) and evit["warmup_frac"] == 0
    assert dyn["epochs"] == 30 and dyn["backbone_lr_scale"] == 0.01 and dyn["backbone_freeze_frac"] * 30 == 5
    module = get_method("sparsifiner").factory(tiny_vit(), **recipe_settings(get_method("sparsifiner"), PAPER[0]))
    assert module.train_epochs(sp["epochs"]) == 50  # 5 phase-1 epochs before the 45


def test_recipe_enters_the_configuration_and_yields_to_the_user():
    evit, deit_s, mini = get_method("evit"), PROFILES["deit_s"], PROFILES["mini"]
    base = {"profile": "deit_s", "seed": 0}
    paper = train_config(evit, 0.7, {}, base, recipe_epochs(evit, deit_s, 30, given=False), profile=deit_s)
    assert paper["epochs"] == 30 and paper["hparams"]["lr"] == pytest.approx(1e-5)
    assert paper["recipe"]["name"] == "paper" and "overrides" not in paper  # not a label of the row
    plain = train_config(evit, 0.7, {}, base, recipe_epochs(evit, mini, 1, given=False), profile=mini)
    assert plain["epochs"] == 1 and plain["hparams"]["lr"] == 5e-4 and "recipe" not in plain
    assert config_key(paper) != config_key(plain)
    assert recipe_epochs(evit, deit_s, 2, given=True) == 2  # --epochs wins
    assert recipe_epochs(get_method("sparsifiner"), deit_s, 1, given=False) == 45
    # --hparams: a value equal to the method's default is still the user's choice where the recipe differs
    (_, _, on_deit), = resolve_plan([("evit", 0.7, {"lr": 5e-4})], deit_s)
    (_, _, on_mini), = resolve_plan([("evit", 0.7, {"lr": 5e-4})], mini)
    assert on_deit == {"lr": 5e-4} and on_mini == {}
    user = train_config(evit, 0.7, on_deit, base, 30, profile=deit_s)
    assert user["hparams"]["lr"] == 5e-4 and user["overrides"] == {"lr": 5e-4}
