"""ToMe (methods/tome.py): the matching and merging on a hand-computed case, proportional attention, the token
schedule, FLOPs against the closed form, r from the keep rate, and the off-the-shelf variant."""
from __future__ import annotations

import copy

import pytest
import torch

from bench_suite.registry import get_method
from methods.tome import ToMe, ToMeOffShelf, bipartite_soft_matching, merge_wavg, r_from_keep_rate, tome_token_schedule
from tests.conftest import random_images, tiny_vit


def test_matching_and_merging_hand_computed():
    """Tokens 0..5 (0 = CLS): A = {0, 2, 4}, B = {1, 3, 5}. Token 2 is parallel to 3 (cosine 1), token 4 is at
    cosine 0.6 to both 1 and 5 (the first maximum, 1, wins) and 0 to 3; with r = 1 token 2 merges into 3, with
    r = 2 token 4 into 1 too."""
    metric = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.0]]])
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1) * 10  # token i holds 10 i
    merge = bipartite_soft_matching(metric, 1, class_token=True)
    out, size = merge_wavg(merge, x)
    # unmerged A tokens in order (CLS first), then B: 1, 3 (with 2 merged in), 5
    assert out[0, :, 0].tolist() == pytest.approx([0.0, 40.0, 10.0, 25.0, 50.0])
    assert size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 2.0, 1.0]
    out2, size2 = merge_wavg(bipartite_soft_matching(metric, 2, class_token=True), x, None)
    assert out2[0, :, 0].tolist() == pytest.approx([0.0, 25.0, 25.0, 50.0])  # (10 + 40) / 2 and (20 + 30) / 2
    assert size2[0, :, 0].tolist() == [1.0, 2.0, 2.0, 1.0]
    # sizes weight later merges: merging the size-2 token 3 (value 25) with a size-1 token of value 55
    x3 = torch.tensor([[[0.0], [25.0], [55.0]]])
    s3 = torch.tensor([[[1.0], [2.0], [1.0]]])
    m3 = bipartite_soft_matching(torch.tensor([[[1.0, 0], [0, 1.0], [0, 1.0]]]), 1, class_token=True)
    merged, ms = merge_wavg(m3, x3, s3)
    assert merged[0, :, 0].tolist() == pytest.approx([0.0, (2 * 25 + 55) / 3]) and ms[0, :, 0].tolist() == [1.0, 3.0]
    # the CLS token is never merged and at most half of the others go
    assert bipartite_soft_matching(metric, 10, class_token=True)(x).shape[1] == 6 - 2


def test_proportional_attention_adds_log_size_to_the_logits():
    m = ToMe(tiny_vit(), keep_rate=0.5).eval()
    attn = m.model.blocks[1].attn
    x = torch.randn(1, 5, 32)
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0]]])
    with torch.no_grad():
        attn.tome_state["size"] = None
        plain = attn(x)
        attn.tome_state["size"] = size
        prop = attn(x)
        from methods.adapter import merge_heads, split_heads

        q, k, v = split_heads(attn, x)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        ref = merge_heads(attn, logits.softmax(-1) @ v)
    torch.testing.assert_close(prop, ref)
    assert not torch.allclose(prop, plain)


def test_token_schedule_and_flops_equal_closed_form():
    from bench_suite.flops import count_flops

    m = ToMe(tiny_vit(), keep_rate=0.5).eval()
    r = r_from_keep_rate(0.5, 17, 4)
    assert r == round(2 * 17 * 0.5 / 3) == 6 and m.merge_r() == 6
    schedule = tome_token_schedule(17, 4, r)
    assert schedule == [17, 11, 6, 4]  # 17 - 6; 11 - min(6, 5); 6 - min(6, 2); 4 - 1
    with torch.no_grad():
        m(random_images(2))
    assert [b.tome_tokens_out for b in m.model.blocks] == schedule[1:] + [3]
    report = count_flops(m.model, random_images(2))
    assert report.per_layer_mhsa_mflops == pytest.approx([2 * n * n * 32 / 1e6 for n in schedule], abs=1e-12)
    assert m.sparsity_report()["token_keep_frac"] == pytest.approx(sum(schedule) / (17 * 4))


def test_r_zero_and_keep_one_are_full_attention():
    base = tiny_vit().eval()
    x = random_images(2)
    with torch.no_grad():
        torch.testing.assert_close(ToMe(copy.deepcopy(base), keep_rate=1.0).eval()(x), base(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ToMe(copy.deepcopy(base), keep_rate=0.5, r=0).eval()(x), base(x), atol=1e-5,
                                   rtol=0)


def test_offshelf_variant_is_evaluated_without_training():
    assert get_method("tome").fine_tunes and not get_method("tome_offshelf").fine_tunes
    assert get_method("full").fine_tunes
    assert ToMeOffShelf(tiny_vit(), keep_rate=0.5).merge_r() == 6
