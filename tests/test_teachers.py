"""The shipped teachers (bench_suite/assets/teachers): every CPU profile that runs on real data by default has
one, its file is intact, it fits its profile and its key is the one a default run computes (so that run
uses it instead of training a teacher)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench_suite.backbones import get_profile, num_tokens
from bench_suite.plan import make_datamodule
from bench_suite.teacher import (
    TEACHER_RECIPES,
    TeacherRecipe,
    file_sha256,
    find_shipped,
    load_teacher_checkpoint,
    shipped_teachers,
    teacher_key,
)


def _default_key(profile: str) -> str:
    """The key ``run --profile <profile>`` computes for its teacher (see ``teacher.resolve_teacher``)."""
    cfg = SimpleNamespace(profile=profile, data="fashion_mnist", data_dir=None, num_workers=0)
    dm = make_datamodule(cfg, train_subset=None)
    recipe = TEACHER_RECIPES.get(profile, TeacherRecipe())
    return teacher_key(profile, {**dm.describe(), "batch_size": recipe.batch_size}, 0, recipe)


@pytest.mark.parametrize("profile,tokens", [("mini", 50), ("mini197", 197)])
def test_default_cpu_profiles_ship_a_teacher_that_fits(profile, tokens):
    path = find_shipped(_default_key(profile))
    assert path is not None, f"no shipped teacher for {profile} matches the key of a default run"
    model, meta = load_teacher_checkpoint(path, profile, 10)
    assert meta["profile"] == profile and num_tokens(model) == tokens
    assert model.patch_embed.img_size[0] == get_profile(profile).img_size


def test_every_shipped_manifest_is_complete_and_its_file_intact():
    teachers = shipped_teachers()
    assert {t["profile"] for t in teachers} >= {"mini", "mini197"}
    for t in teachers:
        assert file_sha256(t["path"]) == t["sha256"]
        for field in ("key", "seed", "data", "recipe", "command", "test_top1_at_creation", "versions"):
            assert field in t, f"{t['path']}: manifest lacks {field}"
        assert t["test_top1_at_creation"] >= 0.89  # the bar for a shipped teacher
