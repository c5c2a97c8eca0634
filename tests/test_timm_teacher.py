"""Teachers from timm: timm-format weight files (safetensors / pth) and ``timm:<name>`` (#13)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bench_suite.errors import TeacherError
from bench_suite.teacher import is_suite_checkpoint, load_timm_teacher
from tests.conftest import tiny_vit


def test_safetensors_and_pth_in_timm_format_load_exactly(tmp_path):
    src = tiny_vit(seed=3)
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    pth = tmp_path / "tiny.pth"
    torch.save({"model": src.state_dict()}, pth)  # timm's load_state_dict unwraps "model" / "state_dict"
    for path in (st, pth):
        assert not is_suite_checkpoint(path)
        model, prov = load_timm_teacher(str(path), "tiny", 10)
        for k, v in src.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v)
        assert prov["file"] == str(path) and len(prov["sha256"]) == 64 and "classifier" not in prov


def test_other_classes_replace_the_classifier_with_a_note(tmp_path):
    src = tiny_vit(seed=3, num_classes=5)
    path = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, prov = load_timm_teacher(str(path), "tiny", 10)
    assert model.head.weight.shape[0] == 10 and "classifier replaced" in prov["classifier"]
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])


def test_position_embedding_resized_by_timm_for_deit_t_at_384(tmp_path):
    import timm

    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "deit_t.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, _ = load_timm_teacher(str(path), "deit_t384", 10)
    assert model.pos_embed.shape == (1, 577, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], src.pos_embed[:, 0])  # the CLS position is kept


def test_a_file_of_another_architecture_is_a_one_line_error_naming_the_weight(tmp_path, capsys):
    src = tiny_vit(profile="mini")
    path = tmp_path / "mini.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(TeacherError, match=r"does not fit profile 'tiny'.*(cls_token|pos_embed|patch_embed|blocks)"):
        load_timm_teacher(str(path), "tiny", 10)
    from bench_suite.cli import main

    code = main(["run", "--profile", "tiny", "--methods", "full", "--teacher", str(path), "--epochs", "0",
                 "--output", str(tmp_path / "out"), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "does not fit profile 'tiny'" in err[0]


def test_timm_names_check_the_architecture_and_fail_in_one_line_offline():
    with pytest.raises(TeacherError, match="is not profile 'tiny'"):
        load_timm_teacher("timm:deit_small_patch16_224.fb_in1k", "tiny", 10)
    with pytest.raises(TeacherError, match="could not load its pretrained weights"):
        load_timm_teacher("timm:bench_vit_tiny", "tiny", 10)  # the suite's CPU backbones have no hub weights


def test_rows_carry_the_teacher_provenance(tmp_path, capsys):
    from bench_suite.cli import main
    from bench_suite.store import ResultsStore
    from tests.test_sparsifiner import have_fashion_mnist

    if not have_fashion_mnist():
        pytest.skip("apt-get install dataset-fashion-mnist")
    src = tiny_vit(seed=3)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out = tmp_path / "out"
    code = main(["run", "--profile", "tiny", "--methods", "full", "--teacher", str(path), "--epochs", "0",
                 "--train-subset", "64", "--output", str(out), "--no-progress", "--accelerator", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows = ResultsStore(out / "results.sqlite").rows()
    assert set(rows.method) == {"teacher", "full"}
    for config in rows["config"]:
        prov = config["teacher_provenance"]
        assert prov["file"] == str(path) and len(prov["sha256"]) == 64


def test_official_lvvit_s_checkpoint_keys_map_onto_the_suite_lvvit_s(tmp_path):
    """A checkpoint with the official TokenLabeling key names (PatchEmbed4_2's conv1/bn1/..., no LayerScale
    (skip_lam = 2 is a constant), an aux_head) loads into the suite's lvvit_s and computes the same."""
    from bench_suite.backbones import create_backbone

    torch.manual_seed(0)
    suite = create_backbone("lvvit_s", num_classes=1000).eval()
    inverse = {"stem.0": "conv1", "stem.1": "bn1", "stem.3": "conv2", "stem.4": "bn2", "stem.6": "conv3",
               "stem.7": "bn3"}
    official = {}
    for k, v in suite.state_dict().items():
        if ".ls1." in k or ".ls2." in k:
            continue  # the official blocks divide by skip_lam instead
        for ours, theirs in inverse.items():
            k = k.replace(f"patch_embed.{ours}.", f"patch_embed.{theirs}.")
        official[k] = v.clone()
    official["aux_head.weight"], official["aux_head.bias"] = torch.randn(1000, 384), torch.zeros(1000)
    assert "patch_embed.conv1.weight" in official and "patch_embed.bn3.running_var" in official
    path = tmp_path / "lvvit_s-26M-224-83.3.pth"
    torch.save({"model": official}, path)
    model, prov = load_timm_teacher(str(path), "lvvit_s", 1000)
    for k, v in suite.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)  # LayerScale 0.5 = 1 / skip_lam
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), suite(x))
