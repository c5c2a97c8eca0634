"""Tests of EViT (methods/evit.py): the reorganisation, the timm patch and the registered method."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from bench_suite.backbones import create_backbone, num_tokens, pruning_stages
from bench_suite.registry import get_method
from bench_suite.flops import token_pruning_paper_flops
from methods.evit import (EViT, EViTAttention, EViTBlock, apply_evit,
                          evit_reorganise, evit_token_schedule)
from tests.conftest import random_images


def _expected_schedule(n: int, depth: int, stages: tuple[int, ...], rho: float) -> list[int]:
    """Tokens each block outputs: after a pruning block n -> 1 + ceil(rho (n-1)) + 1 (fused)."""
    out = []
    for i in range(depth):
        if i in stages and math.ceil(rho * (n - 1)) < n - 1:
            n = 1 + math.ceil(rho * (n - 1)) + 1
        out.append(n)
    return out


def _tokens_out(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    seen: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ------------------------------------------------------------------ keep rate 1.0 is the full model
@pytest.mark.parametrize("profile,keep_rate", [("tiny", 1.0), ("tiny", 0.99), ("mini", 1.0)])
def test_keep_one_is_exactly_the_full_model(profile: str, keep_rate: float) -> None:
    # 0.99 on tiny: ceil(0.99 * 16) = 16 = N - 1, so nothing is dropped either
    torch.manual_seed(1)
    full = create_backbone(profile, drop_rate=0.0, drop_path_rate=0.0)
    evit = apply_evit(copy.deepcopy(full), keep_rate)
    assert all(isinstance(evit.blocks[i], EViTBlock) for i in evit.evit_stages)
    x = random_images(3)
    for train in (False, True):
        full.train(train)
        evit.train(train)
        with torch.no_grad():
            assert torch.equal(evit(x), full(x)), f"train={train}"


# ------------------------------------------------------------------ token schedule
@pytest.mark.parametrize("profile,rho", [("tiny", 0.7), ("tiny", 0.5), ("mini", 0.3)])
def test_token_counts_follow_the_schedule(profile: str, rho: float) -> None:
    torch.manual_seed(2)
    model = create_backbone(profile).eval()
    n, depth = num_tokens(model), len(model.blocks)
    apply_evit(model, rho)
    expected = _expected_schedule(n, depth, pruning_stages(depth), rho)
    assert expected[-1] < n  # the test prunes something
    assert _tokens_out(model, random_images(2)) == expected
    # the closed-form schedule helper agrees (tokens *seen* by each block = output of the previous)
    assert evit_token_schedule(n, depth, rho) == [n] + expected[:-1]
    assert model.evit_stages == pruning_stages(depth) and all(model.blocks[s].keep_rate == rho for s in model.evit_stages)


def test_deit_s_measured_tokens_match_reference_mhsa_flops() -> None:
    """DeiT-S at keep 0.7 / 0.5: tokens per block as really run give the measured MHSA FLOPs of the
    reference notes, 2 * 384 * sum_l n_l^2 = 195.38 M / 149.70 M (MACs, QK^T and AV only)."""
    torch.manual_seed(3)
    model = create_backbone("deit_s", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    for rho, mflops in ((0.7, 195.38), (0.5, 149.70)):
        seen.clear()
        apply_evit(model, rho)
        with torch.no_grad():
            model(x)
        assert seen == evit_token_schedule(197, 12, rho)
        assert round(2 * 384 * sum(t * t for t in seen) / 1e6, 2) == mflops
    for h in hooks:
        h.remove()
    module = EViT(model, keep_rate=0.7)  # the method's paper-convention hook on the same geometry
    assert round(module.paper_mhsa_flops() / 1e6, 1) == 193.1
    assert module.paper_mhsa_flops() == token_pruning_paper_flops(12, 197, 384, 0.7)


def test_paper_convention_mhsa_flops_closed_form() -> None:
    # Sparsifiner Table 1 rows (EViT/DynamicViT on DeiT-S): stage budgets ceil(rho^s * 196), layers 4/3/3/2,
    # per head nnz = k^2 + 197 in pruned layers
    for rho, paper in ((0.7, 193.1), (0.5, 149.1)):
        ks = [math.ceil(rho ** s * 196) for s in (1, 2, 3)]
        closed = 768 * (4 * 197 ** 2 + 3 * (ks[0] ** 2 + 197) + 3 * (ks[1] ** 2 + 197) + 2 * (ks[2] ** 2 + 197))
        assert token_pruning_paper_flops(12, 197, 384, rho) == closed
        assert round(closed / 1e6, 1) == paper
    assert token_pruning_paper_flops(12, 197, 384, 1.0) == 12 * 2 * 197 ** 2 * 384  # keep 1.0: dense


# ------------------------------------------------------------------ the pure reorganisation
def test_reorganise_keeps_top_attention_and_fuses_the_rest() -> None:
    b, n, c = 2, 6, 3
    x = torch.arange(b * n * c, dtype=torch.float32).reshape(b, n, c) / 7.0
    cls_attn = torch.tensor([[0.10, 0.40, 0.05, 0.30, 0.15],
                             [0.02, 0.08, 0.50, 0.25, 0.15]])
    x_new, keep_idx = evit_reorganise(x, cls_attn, 0.5)  # k = ceil(0.5 * 5) = 3
    assert keep_idx.tolist() == [[1, 3, 4], [2, 3, 4]]  # descending class attention
    assert x_new.shape == (b, 1 + 3 + 1, c)
    assert torch.equal(x_new[:, 0], x[:, 0])
    assert torch.equal(x_new[0, 1:4], x[0, [2, 4, 5]]) and torch.equal(x_new[1, 1:4], x[1, [3, 4, 5]])
    fused0 = 0.10 * x[0, 1] + 0.05 * x[0, 3]  # dropped tokens 0 and 2 (positions 1 and 3 in x)
    fused1 = 0.02 * x[1, 1] + 0.08 * x[1, 2]
    torch.testing.assert_close(x_new[0, 4], fused0)
    torch.testing.assert_close(x_new[1, 4], fused1)

    x_drop, idx = evit_reorganise(x, cls_attn, 0.5, fuse=False)
    assert x_drop.shape == (b, 4, c) and torch.equal(x_drop, x_new[:, :4]) and torch.equal(idx, keep_idx)

    same, idx_all = evit_reorganise(x, cls_attn, 1.0)
    assert same is x and idx_all.tolist() == [list(range(5))] * 2


def test_reorganise_gradient_reaches_tokens_and_attention() -> None:
    x = torch.randn(2, 9, 4, requires_grad=True)
    attn = torch.rand(2, 8).softmax(-1).requires_grad_()
    out, keep_idx = evit_reorganise(x, attn, 0.5)
    out.sum().backward()
    dropped = torch.ones(2, 8, dtype=torch.bool).scatter_(1, keep_idx, False)
    assert (attn.grad[dropped] != 0).all() and (attn.grad[~dropped] == 0).all()
    assert (x.grad[:, 0] == 1).all()


# ------------------------------------------------------------------ patching and the Lightning method
def test_only_pruning_blocks_are_patched_and_reapply_restores() -> None:
    model = create_backbone("tiny")
    apply_evit(model, 0.5, stages=(0, 2))
    assert [type(b) for b in model.blocks] == [EViTBlock, Block, EViTBlock, Block]
    assert type(model.blocks[1].attn) is Attention and type(model.blocks[0].attn) is EViTAttention
    apply_evit(model, 0.7)  # default stages (1, 2, 3) for 4 blocks
    assert [type(b) for b in model.blocks] == [Block, EViTBlock, EViTBlock, EViTBlock]
    assert type(model.blocks[0].attn) is Attention and model.blocks[1].keep_rate == 0.7


def test_training_step_reaches_every_parameter() -> None:
    torch.manual_seed(4)
    teacher = create_backbone("tiny")
    module = get_method("evit").factory(create_backbone("tiny"), keep_rate=0.5, teacher=teacher,
                                        distill_tokens=0.5)
    assert isinstance(module, EViT) and module.model.blocks[module.model.evit_stages[0]].keep_rate == 0.5
    module.train()
    x, y = random_images(4), torch.tensor([0, 1, 2, 3])
    terms = module.losses(module.forward_train(x), module.forward_teacher(x), (x, y))
    assert set(terms) == {"ce", "kl"}  # no EViT loss; token MSE skipped (token counts differ)
    opt = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.model.parameters()]
    opt.zero_grad()
    torch.stack(list(terms.values())).sum().backward()
    for name, p in module.model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, module.model.parameters()))
    report = module.sparsity_report()
    assert report["tokens_after_block3"] == _expected_schedule(17, 4, (1, 2, 3), 0.5)[-1]


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5, float("nan")])
def test_keep_rate_outside_unit_interval_raises(bad: float) -> None:
    with pytest.raises(ValueError):
        apply_evit(create_backbone("tiny"), bad)
    with pytest.raises(ValueError):
        get_method("evit").factory(create_backbone("tiny"), keep_rate=bad)
    with pytest.raises(ValueError):
        evit_reorganise(torch.zeros(1, 3, 2), torch.zeros(1, 2), bad)


def test_invalid_stages_raise() -> None:
    with pytest.raises(ValueError):
        apply_evit(create_backbone("tiny"), 0.5, stages=(4,))
    with pytest.raises(ValueError):
        apply_evit(create_backbone("tiny"), 0.5, stages=(1, 1))
