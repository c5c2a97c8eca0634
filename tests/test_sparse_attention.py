"""Sparsifiner's framework-free core (methods/sparse_attention.py): budget, predictor, sparse MHSA, FLOPs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench_suite import kernels as K
from methods import sparse_attention as sa


def _qkv(b=2, h=3, n=11, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]
    if grad:
        out = [t.requires_grad_(True) for t in out]
    return out


def _random_idx(b, h, nq, nk, budget, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nq, nk, generator=g).argsort(-1)[..., :budget]


# --------------------------------------------------------------------------- budget and sizes
def test_attention_budget_matches_paper_table2():
    assert [sa.attention_budget(r, 197) for r in (0.5, 0.25, 0.1, 0.05, 0.01, 1.0)] == [99, 50, 20, 10, 2, 197]
    assert sa.attention_budget(0.001, 17) == 1
    with pytest.raises(ValueError):
        sa.attention_budget(0.0, 17)
    with pytest.raises(ValueError):
        sa.attention_budget(1.5, 17)


def test_default_n_down_is_the_papers_32_and_scales_down_for_small_profiles():
    assert sa.default_n_down(197) == 32
    assert sa.default_n_down(577) == 32  # "in all of our experiments, we set n_down to 32" (sec. 4)
    assert sa.default_n_down(50) == 8 and sa.default_n_down(17) == 8 and sa.default_n_down(5) == 5


# --------------------------------------------------------------------------- sparse MHSA (eq. 4-6)
@pytest.mark.parametrize("nq_offset", [0, 1])  # all rows, or without the CLS row (Nq = N - 1)
def test_sparse_attention_equals_dense_masked_reference_outputs_and_gradients(nq_offset):
    q, k, v = _qkv(grad=True)
    b, h, n, d = q.shape
    budget = 4
    idx = _random_idx(b, h, n - nq_offset, n, budget)
    qr = q[:, :, nq_offset:]
    scale = d ** -0.5
    out_sparse = K.sparse_attention_torch(qr, k, v, idx, scale)
    out_dense, probs = sa.dense_masked_attention(qr, k, v, sa.indices_to_mask(idx, n), scale)
    torch.testing.assert_close(out_sparse, out_dense, rtol=1e-10, atol=1e-12)
    assert (probs > 0).sum(-1).eq(budget).all()
    w = torch.randn_like(out_dense)
    g_sparse = torch.autograd.grad((out_sparse * w).sum(), (q, k, v))
    g_dense = torch.autograd.grad((out_dense * w).sum(), (q, k, v))
    for a, b_ in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    if nq_offset:
        assert g_sparse[0][:, :, 0].abs().sum() == 0  # the CLS query row was not part of this product


def test_sparse_attention_with_all_keys_is_full_attention():
    q, k, v = _qkv()
    n, d = q.shape[2], q.shape[3]
    idx = _random_idx(q.shape[0], q.shape[1], n, n, n)  # every key, in a random order
    full = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, -1) @ v
    torch.testing.assert_close(K.sparse_attention_torch(q, k, v, idx, d ** -0.5), full)


def test_sparse_attention_rejects_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        K.sparse_attention_torch(q, k, v, torch.zeros(2, 3, 5, 2, dtype=torch.long), 1.0)


def test_impl_registry_and_torch_path_under_grad():
    q, k, v = _qkv()
    idx = _random_idx(2, 3, 11, 11, 3)
    calls = []

    def fake(q_, k_, v_, idx_, scale):
        calls.append(1)
        return K.sparse_attention_torch(q_, k_, v_, idx_, scale)

    with pytest.raises(ValueError, match="known: .*torch"):
        K.get_sparse_attention_impl("nope")
    with pytest.raises(ValueError):
        K.register_sparse_attention_impl("torch", fake)
    K.register_sparse_attention_impl("test_fake", fake)
    try:
        with torch.no_grad():
            K.sparse_attention(q, k, v, idx, 0.3, impl="test_fake")
        assert calls == [1]
        qg = q.clone().requires_grad_(True)
        out = K.sparse_attention(qg, k, v, idx, 0.3, impl="test_fake")  # needs a gradient: torch path
        assert calls == [1] and out.requires_grad
    finally:
        K.SPARSE_ATTENTION_IMPLS.pop("test_fake")


# --------------------------------------------------------------------------- predictor (eq. 1-3)
def test_predictor_shapes_thresholds_and_exactly_b_connections_per_row():
    torch.manual_seed(0)
    b, h, n, d, n_down = 2, 3, 17, 8, 6
    pred = sa.ConnectivityPredictor(n, d, h, n_down, tau=0.15, w_up_threshold=0.02)
    q, k, _ = (t.float() for t in _qkv(b, h, n, d))
    out = pred(q[:, :, 1:], k)
    assert out.a_down.shape == out.coef.shape == (b, h, n - 1, n_down)
    assert out.scores.shape == (b, h, n - 1, n)
    torch.testing.assert_close(out.a_down.sum(-1), torch.ones(b, h, n - 1))
    assert torch.equal(out.coef == 0, out.a_down <= 0.15)  # eq. 2
    assert torch.equal(out.w_up == 0, pred.w_up.abs() < 0.02)  # sparse basis
    torch.testing.assert_close(out.scores, out.coef @ out.w_up)  # eq. 3 scores
    assert 0.0 < pred.w_up_sparsity() < 1.0
    budget = sa.attention_budget(0.25, n)
    idx = sa.topk_connectivity(out.scores, budget)
    mask = sa.indices_to_mask(idx, n)
    assert mask.sum(-1).eq(budget).all()  # exactly B connections in every row
    # they are the B highest scores of each row
    kth = out.scores.topk(budget, -1).values[..., -1:]
    assert (out.scores[mask].view(b, h, n - 1, budget) >= kth).all()
    # pruning in place: exactly the small entries become 0 and the forward is unchanged
    small = pred.w_up.abs() < 0.02
    pred.prune_()
    assert torch.equal(pred.w_up == 0, small)
    torch.testing.assert_close(pred(q[:, :, 1:], k).scores, out.scores)


def test_sparse_w_up_is_reused_without_a_graph_and_recomputed_when_w_up_changes():
    """Outside autograd the thresholded basis is computed once per W_up state: reused while W_up is unchanged,
    recomputed after an optimiser step, a load_state_dict, pruning or a new threshold; with a graph it is fresh
    and carries W_up's gradient."""
    pred = sa.ConnectivityPredictor(9, 8, 2, 4).eval()

    def expected():
        w = pred.w_up.detach()
        return w * (w.abs() >= pred.w_up_threshold)

    with torch.no_grad():
        a = pred.sparse_w_up()
        assert pred.sparse_w_up() is a and not a.requires_grad
    with torch.inference_mode():
        assert pred.sparse_w_up() is a and not a.is_inference()
    opt = torch.optim.SGD(pred.parameters(), lr=0.01)
    pred.w_up.grad = torch.ones_like(pred.w_up)
    opt.step()
    with torch.no_grad():
        b = pred.sparse_w_up()
    assert b is not a and torch.equal(b, expected()) and not torch.equal(b, a)
    pred.load_state_dict({**pred.state_dict(), "w_up": torch.full_like(pred.w_up, 0.5)})
    with torch.no_grad():
        assert torch.equal(pred.sparse_w_up(), torch.full_like(pred.w_up, 0.5))
        pred.w_up_threshold = 0.6
        assert torch.equal(pred.sparse_w_up(), torch.zeros_like(pred.w_up))
    live = pred.sparse_w_up()  # grad mode and a trainable W_up: a graph, not the cache
    assert live.requires_grad and live.grad_fn is not None


def test_predictor_official_options_and_errors():
    q, k, _ = (t.float() for t in _qkv(1, 2, 9, 8))
    pred = sa.ConnectivityPredictor(9, 8, 2, 4, coef_topk=2, reduce_c_factor=2, shared_heads=False)
    out = pred(q, k)
    assert pred.w_up.shape == (2, 4, 9) and pred.channels == 4
    assert out.coef.ne(0).sum(-1).eq(2).all()
    with pytest.raises(ValueError):
        sa.ConnectivityPredictor(9, 8, 2, 10)  # n_down > N
    with pytest.raises(ValueError, match="pass positions"):
        pred(q, k[:, :, :5])


def test_mix_positions_is_a_gather_for_one_hot_rows():
    w = torch.randn(1, 4, 9)
    src = torch.tensor([[0, 3, 5, 8], [0, 1, 2, 7]])
    pos = torch.nn.functional.one_hot(src, 9).float()
    mixed = sa.mix_positions(w, pos)
    assert mixed.shape == (2, 1, 4, 4)
    torch.testing.assert_close(mixed[1, 0], w[0][:, src[1]])
    fused = torch.zeros(1, 1, 9)
    fused[0, 0, [2, 4]] = 0.5
    torch.testing.assert_close(sa.mix_positions(w, fused)[0, 0, :, 0], 0.5 * (w[0, :, 2] + w[0, :, 4]))
    assert sa.position_mix_macs(4, torch.cat([pos[:1], torch.cat([pos[0, :3], fused[0]])[None]])) == 4 * 2


def test_map_attention_to_tokens_gathers_kept_and_sums_fused():
    attn = torch.softmax(torch.randn(1, 2, 6, 6), -1)
    pos = torch.zeros(1, 4, 6)
    pos[0, 0, 0] = pos[0, 1, 3] = pos[0, 2, 1] = 1.0  # CLS, tokens 3 and 1 kept
    pos[0, 3, [2, 4, 5]] = torch.tensor([0.5, 0.3, 0.2])  # fused token
    out = sa.map_attention_to_tokens(attn, pos)
    kept = [0, 3, 1]
    torch.testing.assert_close(out[:, :, :3, :3], attn[:, :, kept][:, :, :, kept])
    torch.testing.assert_close(out[:, :, :3, 3], attn[:, :, kept][:, :, :, [2, 4, 5]].sum(-1))
    r = torch.einsum("m,bhmk->bhk", pos[0, 3], attn)  # the fused query: weighted mean of its rows
    expected = torch.stack([r[..., 0], r[..., 3], r[..., 1], r[..., 2] + r[..., 4] + r[..., 5]], -1)
    torch.testing.assert_close(out[:, :, 3], expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, 4))


def test_keep_rate_one_gives_full_attention_in_both_cls_modes():
    torch.manual_seed(0)
    q, k, v = (t.float() for t in _qkv(2, 2, 10, 8))
    full = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1) @ v
    pred = sa.ConnectivityPredictor(10, 8, 2, 4)
    for cls_full in (True, False):
        res = sa.sparsifiner_attention(q, k, v, pred, 1.0, cls_full_row=cls_full, need_cls_attn=True)
        torch.testing.assert_close(res.out, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(res.cls_attn.sum(-1), torch.ones(2, 2))


# --------------------------------------------------------------------------- FLOPs
def test_sparse_product_macs_counts_nonzeros():
    coef = torch.zeros(1, 2, 3, 4)
    coef[0, 0, 0, [0, 2]] = 0.5  # rows 0 and 2 of W_up
    coef[0, 1, 2, 3] = 1.0  # row 3
    w_up = torch.zeros(1, 4, 7)
    for r, nnz in enumerate((1, 2, 3, 4)):
        w_up[0, r, :nnz] = 1.0
    assert sa.sparse_product_macs(coef, w_up) == 1 + 3 + 4


class _HandMadeAttn(nn.Module):
    """blocks.0.attn running the sparse ops on hand-made tensors (no qkv/proj cost)."""

    def __init__(self, q, k, v, idx, coef, w_up):
        super().__init__()
        self.qkv, self.proj = nn.Identity(), nn.Identity()
        self.t = (q, k, v, idx, coef, w_up)

    def forward(self, x):
        q, k, v, idx, coef, w_up = self.t
        out = K.sparse_attention(q, k, v, idx, 0.5)
        scores = sa.connectivity_scores(coef, w_up)
        return x + out.sum() * 0 + scores.sum() * 0


class _Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


class _Model(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.blocks = nn.Sequential(_Block(attn))

    def forward(self, x):
        return self.blocks(x)


def test_fvcore_counts_sparse_ops_at_their_nonzeros():
    from bench_suite.flops import count_flops

    b, h, n, d, budget, n_down = 1, 2, 9, 4, 3, 5
    q, k, v = (t.float() for t in _qkv(b, h, n, d))
    idx = _random_idx(b, h, n - 1, n, budget)
    q = q[:, :, 1:]
    coef = torch.zeros(b, h, n - 1, n_down)
    coef[..., 0] = 0.6
    coef[:, 0, :4, 3] = 0.4  # 4 rows of head 0 also use basis row 3
    w_up = torch.zeros(1, n_down, n)
    w_up[0, 0, :2] = 1.0  # row 0: 2 nonzeros
    w_up[0, 3, :5] = 1.0  # row 3: 5 nonzeros
    closed = 2 * h * (n - 1) * budget * d + (h * (n - 1) * 2 + 4 * 5)
    report = count_flops(_Model(_HandMadeAttn(q, k, v, idx, coef, w_up)), torch.zeros(1, 1, 2, 2))
    assert report.mhsa_mflops * 1e6 == pytest.approx(closed, abs=1e-6)


def test_closed_form_helper():
    # DeiT-S geometry at keep 0.5, sparse attention part only (no predictor): 768 * (196 * 99 + 197) per layer
    attn_only = sa.sparsifiner_mhsa_macs(197, 64, 6, 0, 99)
    assert attn_only == 768 * (196 * 99 + 197)
    assert math.isclose(12 * attn_only / 1e6, 180.6, abs_tol=0.05)
