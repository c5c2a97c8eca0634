"""Top-K token pruning (methods/topk.py): the kept token counts, the selection and the FLOPs."""
from __future__ import annotations

import copy

import pytest
import torch

from bench_suite.backbones import keep_count
from methods.evit import EViT
from methods.topk import TopK, topk_token_schedule
from tests.conftest import random_images, tiny_vit


@pytest.mark.parametrize("rho", [0.7, 0.5, 0.3])
def test_topk_keeps_ceil_rho_times_n_minus_1_tokens_per_stage(rho):
    m = TopK(tiny_vit(), keep_rate=rho).eval()
    with torch.no_grad():
        m(random_images(2))
    n, expected = 17, []
    for _ in m.model.evit_stages:
        n = 1 + keep_count(rho, n - 1)  # CLS + the kept tokens, nothing fused
        expected.append(n)
    assert [m.model.blocks[i].evit_tokens_out for i in m.model.evit_stages] == expected
    assert m.model.evit_stages == (1, 2, 3)  # tiny: 4 blocks
    schedule = topk_token_schedule(17, 4, rho, (1, 2, 3))
    assert schedule == [17, 17, expected[0], expected[1]]  # the tokens each block's MHSA sees
    assert m.sparsity_report()["token_keep_frac"] == pytest.approx(sum(schedule) / (17 * 4))


def test_topk_keeps_the_tokens_evit_keeps_and_drops_the_fused_one():
    base = tiny_vit().eval()
    x = random_images(2)
    tk = TopK(copy.deepcopy(base), keep_rate=0.5).eval()
    ev = EViT(copy.deepcopy(base), keep_rate=0.5).eval()
    first = tk.model.evit_stages[0]
    with torch.no_grad():
        tk(x)
        ev(x)
    # the same selection at the first stage (same input): EViT has exactly one token more (the fused one)
    assert ev.model.blocks[first].evit_tokens_out == tk.model.blocks[first].evit_tokens_out + 1


def test_topk_counts_fewer_flops_than_evit_at_the_same_keep_rate():
    from bench_suite.flops import count_flops

    x = random_images(2)
    f_tk = count_flops(TopK(tiny_vit(), keep_rate=0.5).model, x).mhsa_mflops
    f_ev = count_flops(EViT(tiny_vit(), keep_rate=0.5).model, x).mhsa_mflops
    f_full = count_flops(tiny_vit(), x).mhsa_mflops
    assert f_tk < f_ev < f_full
