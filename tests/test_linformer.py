"""Tests of Linformer (methods/linformer.py): shapes, the budget rule, keep 1.0 == full attention, the
low-rank attention itself, MHSA FLOPs against the closed form, and a Lightning training step."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bench_suite.backbones import create_backbone
from tests.conftest import fit_steps
from bench_suite.registry import get_method
from methods.adapter import merge_heads, split_heads
from methods.linformer import Linformer, LinformerAttention, apply_linformer, init_projection
from tests.conftest import random_images, tiny_vit


def test_registered_and_budget_rule() -> None:
    spec = get_method("linformer")
    assert spec.keep_rates == (0.5, 0.25, 0.1)
    assert spec.defaults()["k"] is None
    for rho in spec.keep_rates:  # tiny: N = 17 tokens
        module = Linformer(tiny_vit(), keep_rate=rho)
        assert module.k == math.ceil(rho * 17)
        for blk in module.model.blocks:
            assert isinstance(blk.attn, LinformerAttention)
            assert blk.attn.E.shape == blk.attn.F.shape == (module.k, 17)
            assert blk.attn.E is not blk.attn.F
    assert Linformer(tiny_vit(), keep_rate=0.5, k=3).k == 3  # k set directly wins
    for bad in (0, 18):
        with pytest.raises(ValueError):
            Linformer(tiny_vit(), k=bad)
    with pytest.raises(ValueError):
        Linformer(tiny_vit(), keep_rate=1.5)


def test_output_shape_and_wrong_token_count_raises() -> None:
    module = Linformer(tiny_vit(), keep_rate=0.25).eval()
    with torch.no_grad():
        logits = module(random_images(5))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    attn = module.model.blocks[0].attn
    with pytest.raises(ValueError, match="17 tokens"):
        attn(torch.randn(2, 16, 32))


def test_low_rank_attention_matches_equation_7() -> None:
    torch.manual_seed(0)
    module = Linformer(tiny_vit(), keep_rate=0.5).eval()
    attn = module.model.blocks[1].attn
    x = torch.randn(2, 17, 32)
    q, k, v = split_heads(attn, x)  # [B, H, N, d]
    kk = torch.einsum("kn,bhnd->bhkd", attn.E, k)
    vv = torch.einsum("kn,bhnd->bhkd", attn.F, v)
    probs = torch.softmax(q @ kk.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, N, k]
    assert probs.shape == (2, 2, 17, 9)
    out = (probs @ vv).transpose(1, 2).reshape(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(out))


def test_projection_init() -> None:
    torch.testing.assert_close(init_projection(5, 5), torch.eye(5))
    torch.testing.assert_close(init_projection(5, 5, "pool"), torch.eye(5))
    torch.manual_seed(0)
    e = init_projection(9, 17)
    assert e.shape == (9, 17) and e.abs().max() <= 1 / math.sqrt(9) and e.std() > 0.1
    with pytest.raises(ValueError, match="unknown Linformer projection init"):
        init_projection(9, 17, "xavier")


def test_pool_init_averages_contiguous_groups() -> None:
    e = init_projection(2, 5, "pool")  # groups [0, 3) and [2, 5) (adaptive pooling overlaps at 2)
    torch.testing.assert_close(e, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]]))
    e = init_projection(13, 50, "pool")
    torch.testing.assert_close(e.sum(1), torch.ones(13))  # each row is an average
    assert (e > 0).sum(0).min() >= 1  # every token is in some group
    # pooling identical keys gives the same key: with constant tokens the output equals full attention's
    model = apply_linformer(tiny_vit(), k=4, proj_init="pool")
    x = torch.randn(1, 1, 32).expand(2, 17, 32)
    attn = model.blocks[0].attn
    with torch.no_grad():
        q, k, v = split_heads(attn, x)
        ref = merge_heads(attn, torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1) @ v)
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_keep_one_is_full_attention() -> None:
    full = tiny_vit(seed=3)
    module = Linformer(copy.deepcopy(full), keep_rate=1.0)
    assert module.k == 17
    x = random_images(4, seed=1)
    for train in (False, True):
        full.train(train)
        module.train(train)
        with torch.no_grad():
            torch.testing.assert_close(module(x), full(x), atol=1e-5, rtol=0)


def test_share_kv_ties_the_projections() -> None:
    model = apply_linformer(tiny_vit(), k=4, share_kv=True)
    assert model.linformer_k == 4
    for blk in model.blocks:
        assert blk.attn.E is blk.attn.F
    names = [n for n, _ in model.named_parameters() if n.endswith((".E", ".F"))]
    assert len(names) == len(model.blocks)  # one tied matrix per layer


@pytest.mark.parametrize("profile,k", [("tiny", 9), ("tiny", 17), ("mini", 13)])
def test_mhsa_flops_equal_4_n_k_d_per_layer(profile: str, k: int) -> None:
    flops = pytest.importorskip("bench_suite.flops")
    module = Linformer(tiny_vit(profile), k=k).eval()
    model = module.model
    n, d, depth = module.n_tokens, int(model.embed_dim), len(model.blocks)
    report = flops.count_flops(model, random_images(2))
    per_layer = 4 * n * k * d  # E K, F V, Q (E K)^T, A (F V): k n D MACs each
    assert report.per_layer_mhsa_mflops == [pytest.approx(per_layer / 1e6, rel=1e-12)] * depth
    assert report.mhsa_mflops * 1e6 == pytest.approx(depth * per_layer, rel=1e-12)


def test_training_steps_with_teacher_are_finite_and_train_e_and_f() -> None:
    full = tiny_vit(seed=7)
    module = Linformer(copy.deepcopy(full), keep_rate=0.25, teacher=full, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit_steps(module, random_images(16, seed=2), torch.randint(0, 10, (16,)))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for n, p in module.model.named_parameters():
        assert torch.isfinite(p).all(), n
    moved = [n for n, p in module.model.named_parameters() if n.endswith((".E", ".F")) and not torch.equal(p, before[n])]
    assert len(moved) == 2 * len(module.model.blocks)
