"""Fixed-pattern sparse attention (methods/fixed_sparse.py): exactly B keys per query, the same for every
image, the patterns' rules, full attention at keep 1.0, FLOPs against the closed form."""
from __future__ import annotations

import copy

import pytest
import torch

from methods.adapter import split_heads
from methods.fixed_sparse import PATTERNS, FixedLocal, FixedRandom, FixedStrided, fixed_pattern
from methods.sparse_attention import attention_budget, dense_masked_attention, indices_to_mask
from tests.conftest import random_images, tiny_vit

N, D, H = 17, 16, 2  # tiny: 4x4 patches + CLS


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("budget", [1, 2, 5, 9, 17])
@pytest.mark.parametrize("cls_full_row", [True, False])
def test_every_query_keeps_exactly_b_distinct_keys_including_cls(pattern, budget, cls_full_row):
    idx = fixed_pattern(pattern, (4, 4), budget, H, cls_full_row, seed=3, layer=1)
    assert idx.shape == (H, 16 + (0 if cls_full_row else 1), budget)
    assert (idx[..., 0] == 0).all()  # the CLS key
    assert idx.min() >= 0 and idx.max() < N
    assert all(len(set(row.tolist())) == budget for row in idx.reshape(-1, budget))
    assert torch.equal(idx, fixed_pattern(pattern, (4, 4), budget, H, cls_full_row, seed=3, layer=1))


def test_pattern_rules_on_a_hand_checked_grid():
    local = fixed_pattern("local", (4, 4), 6, 1)  # patch 5 = grid (1, 1): itself, then its 4 neighbours
    assert local[0, 5].tolist() == [0, 6, 2, 5, 7, 10]  # token = patch + 1; ties by index
    strided = fixed_pattern("strided", (4, 4), 5, 1)  # 4 patch keys, stride 16 // 4 = 4
    assert strided[0, 1].tolist() == [0, 2, 6, 10, 14]  # patch 1: 1, 5, 9, 13 (+1)
    rand = fixed_pattern("random", (4, 4), 5, 2, seed=0, layer=0)
    assert not torch.equal(rand[0], rand[1])  # per head
    assert not torch.equal(rand, fixed_pattern("random", (4, 4), 5, 2, seed=0, layer=1))  # per layer


@pytest.mark.parametrize("method", [FixedLocal, FixedStrided, FixedRandom])
def test_output_equals_dense_masked_attention_and_is_the_same_pattern_for_every_image(method):
    m = method(tiny_vit(), keep_rate=0.25).eval()
    attn = m.model.blocks[1].attn
    x = torch.randn(3, N, 32)
    b = attention_budget(0.25, N)
    with torch.no_grad():
        out = attn(x)
        q, k, v = split_heads(attn, x)
        mask = indices_to_mask(attn.pattern_idx, N).unsqueeze(0).expand(3, -1, -1, -1)
        mask = torch.cat([torch.ones(3, H, 1, N, dtype=torch.bool), mask], 2)  # the dense CLS row
        ref, _ = dense_masked_attention(q, k, v, mask, attn.scale)
        from methods.adapter import merge_heads

        torch.testing.assert_close(out, merge_heads(attn, ref), atol=1e-5, rtol=1e-5)
    assert attn.pattern_idx.shape == (H, N - 1, b)


@pytest.mark.parametrize("method", [FixedLocal, FixedStrided, FixedRandom])
def test_keep_one_is_full_attention(method):
    base = tiny_vit().eval()
    x = random_images(2)
    with torch.no_grad():
        torch.testing.assert_close(method(copy.deepcopy(base), keep_rate=1.0).eval()(x), base(x), atol=1e-5, rtol=0)


def test_flops_equal_closed_form():
    from bench_suite.flops import count_flops

    b = attention_budget(0.25, N)
    report = count_flops(FixedLocal(tiny_vit(), keep_rate=0.25).model, random_images(2))
    per_layer = H * 2 * D * (N + (N - 1) * b)  # q k at nnz(M) and A V; the CLS row dense
    assert report.per_layer_mhsa_mflops == pytest.approx([per_layer / 1e6] * 4, abs=1e-9)


def test_unknown_pattern_and_budget_are_rejected():
    with pytest.raises(ValueError, match="pattern"):
        fixed_pattern("diagonal", (4, 4), 3, 1)
    with pytest.raises(ValueError, match="budget"):
        fixed_pattern("local", (4, 4), 18, 1)
