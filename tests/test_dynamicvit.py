"""Tests of DynamicViT (methods/dynamicvit.py): attention masking, inference pruning, losses, optimiser
groups, keep rate 1.0, a Lightning training step and the measured MHSA FLOPs on DeiT-S."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import methods.dynamicvit as dvit
from bench_suite.backbones import create_backbone
from tests.conftest import fit_steps
from bench_suite.registry import get_method
from methods.dynamicvit import DynamicViT, PredictorLG, softmax_with_policy
from tests.conftest import random_images, tiny_vit


def _expected_tokens(depth: int, n_patches: int, stages: tuple[int, ...], rho: float) -> list[int]:
    """Closed form, independent of the module: block l sees 1 + int(n * rho^s) tokens after stage s."""
    out, cur = [], n_patches
    for layer in range(depth):
        if layer in stages:
            s = stages.index(layer) + 1
            cur = max(1, int(n_patches * rho ** s + 1e-9))
        out.append(1 + cur)
    return out


# ------------------------------------------------------------------ registry and config
def test_registered_with_typed_defaults() -> None:
    spec = get_method("dynamicvit")
    assert spec.keep_rates == (0.7, 0.5, 0.3)
    d = spec.defaults()
    assert (d["ratio_weight"], d["distill_logits"], d["distill_tokens"], d["backbone_lr_scale"]) == (2.0, 0.5, 0.5, 0.01)
    with pytest.raises(ValueError):
        DynamicViT(tiny_vit(), keep_rate=0.0)
    with pytest.raises(ValueError):
        DynamicViT(tiny_vit(), keep_rate=0.5, ratio_weight=-1.0)


def test_predictor_outputs_log_probabilities_and_global_feature_uses_policy() -> None:
    torch.manual_seed(0)
    pred = PredictorLG(32)
    with torch.no_grad():  # the official init (std 0.02, zero bias) is almost constant; spread it out
        for p in pred.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 16, 32)
    keep = torch.ones(2, 16, 1)
    out = pred(x, keep)
    assert out.shape == (2, 16, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 16))
    # the global half averages over the kept tokens only: changing a dropped token changes only its own row
    policy = keep.clone()
    policy[:, 5] = 0
    x2 = x.clone()
    x2[:, 5] = torch.randn(2, 32) * 3  # (a constant shift would vanish in the LayerNorm)
    a, b = pred(x, policy), pred(x2, policy)
    rows = torch.arange(16) != 5
    torch.testing.assert_close(a[:, rows], b[:, rows])
    assert not torch.allclose(a[:, 5], b[:, 5])


# ------------------------------------------------------------------ attention masking (training)
def test_softmax_with_policy_masks_dropped_keys_but_keeps_the_diagonal() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    policy = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.float32).unsqueeze(-1)
    probs = softmax_with_policy(logits, policy)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 6))
    eye = torch.eye(6, dtype=torch.bool)
    allowed = (policy.squeeze(-1) == 1)[:, None, None, :] | eye  # [B, 1, N, N]: kept keys + own key
    # the masked softmax, up to the official eps smoothing (eps / N added to every entry)
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, ref, atol=1e-4, rtol=0)
    assert probs[(~allowed).expand_as(probs)].max() < 1e-4
    # a dropped token still attends to itself (and to the kept keys): its diagonal is not masked
    dropped_rows = policy.squeeze(-1) == 0
    diag = probs.diagonal(dim1=-2, dim2=-1).permute(0, 2, 1)  # [B, N, H]
    assert diag[dropped_rows].min() > 1e-3
    # the eps smoothing is exactly the official one
    w = (logits - logits.amax(-1, keepdim=True)).exp() * allowed
    torch.testing.assert_close(probs, (w + 1e-6 / 6) / (w.sum(-1, keepdim=True) + 1e-6))
    with pytest.raises(ValueError):
        softmax_with_policy(logits, policy[:, :5])


def test_training_policy_masks_keys_keeps_diagonal_and_is_cumulative(monkeypatch: pytest.MonkeyPatch) -> None:
    module = DynamicViT(tiny_vit(), keep_rate=0.5).train()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        probs = softmax_with_policy(logits, policy, eps)
        captured.append((probs.detach(), policy.detach()))
        return probs

    monkeypatch.setattr(dvit, "softmax_with_policy", spy)
    out = module.forward_train(random_images(8))
    depth, stages = len(module.model.blocks), module.stages
    assert len(captured) == depth - stages[0]  # every block from the first stage on is masked
    decisions = out["decisions"]
    assert len(decisions) == len(stages)
    for prev, cur in zip(decisions, decisions[1:]):
        assert torch.all(cur <= prev)  # a dropped token stays dropped
    assert set(torch.cat(decisions).unique().tolist()) <= {0.0, 1.0}
    eye = torch.eye(17, dtype=torch.bool)
    for layer, (probs, policy) in zip(range(stages[0], depth), captured):
        stage = sum(layer >= s for s in stages) - 1
        assert torch.equal(policy[:, 0, 0], torch.ones(8))  # the CLS token is never dropped
        assert torch.equal(policy[:, 1:, 0], decisions[stage])
        dropped = policy[:, :, 0] == 0
        assert dropped.any(), "the random predictor should drop something at keep 0.5"
        mask = dropped[:, None, None, :] & ~eye
        assert probs[mask.expand_as(probs)].max() < 1e-4  # dropped keys get only the eps smoothing
        diag = probs.diagonal(dim1=-2, dim2=-1).permute(0, 2, 1)  # [B, N, H]
        assert diag[dropped].min() > 1e-3  # ... but every token, even a dropped one, attends to itself
        kept_keys = (~dropped)[:, None, None, :] | eye
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
        assert (probs * kept_keys).sum(-1).min() > 1 - 1e-3


# ------------------------------------------------------------------ inference pruning
@pytest.mark.parametrize("profile,rho", [("tiny", 0.7), ("tiny", 0.5), ("mini", 0.7), ("mini", 0.3)])
def test_eval_keeps_exactly_the_scheduled_tokens(profile: str, rho: float) -> None:
    module = DynamicViT(tiny_vit(profile), keep_rate=rho).eval()
    model = module.model
    seen: list[int] = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        logits = module(random_images(3))
    for h in hooks:
        h.remove()
    expected = _expected_tokens(len(model.blocks), model.patch_embed.num_patches, module.stages, rho)
    assert seen == expected
    assert module.token_schedule() == expected
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_eval_gathers_the_top_scored_patch_tokens_and_keeps_cls() -> None:
    module = DynamicViT(tiny_vit(), keep_rate=0.5).eval()
    stage_block = module.model.blocks[module.stages[0]]
    got: dict[str, torch.Tensor] = {}
    h1 = stage_block.register_forward_pre_hook(lambda m, args: got.__setitem__("before", args[0]))
    h2 = stage_block.predictor.register_forward_hook(lambda m, args, out: got.__setitem__("scores", out[..., 0]))
    h3 = stage_block.norm1.register_forward_pre_hook(lambda m, args: got.__setitem__("after", args[0]))
    with torch.no_grad():
        module(random_images(3))
    for h in (h1, h2, h3):
        h.remove()
    before, after, scores = got["before"], got["after"], got["scores"]
    k = module.keep_counts[0]
    assert after.shape[1] == 1 + k
    torch.testing.assert_close(after[:, 0], before[:, 0])  # CLS first, untouched
    for b in range(before.shape[0]):
        top = set(scores[b].topk(k).indices.tolist())
        kept = [before[b, 1 + i] for i in sorted(top)]
        torch.testing.assert_close(after[b, 1:], torch.stack(kept))


# ------------------------------------------------------------------ keep rate 1.0 is full attention
def test_keep_one_equals_the_unpatched_model() -> None:
    full = tiny_vit(seed=3)
    module = DynamicViT(copy.deepcopy(full), keep_rate=1.0, teacher=copy.deepcopy(full))
    x = random_images(4, seed=1)
    for train in (False, True):
        full.train(train)
        module.train(train)
        with torch.no_grad():
            torch.testing.assert_close(module(x), full(x), atol=1e-5, rtol=0)
            out = module.forward_train(x)
            torch.testing.assert_close(out.logits, full(x), atol=1e-5, rtol=0)
        assert out["decisions"] == [] and out["policy"] is None
    assert module.token_schedule() == [17] * 4
    module.train()
    terms = module.losses(module.forward_train(x), module.forward_teacher(x), (x, torch.zeros(4, dtype=torch.long)))
    assert "ratio" not in terms
    assert terms["kl"].abs().item() < 1e-6 and terms["token_mse"].abs().item() < 1e-8  # student == teacher
    assert module.paper_mhsa_flops() is None


# ------------------------------------------------------------------ losses
def test_ratio_loss_is_zero_at_the_target_and_closed_form_otherwise() -> None:
    module = DynamicViT(tiny_vit(), keep_rate=0.5)  # 16 patches: targets 0.5, 0.25, 0.125 -> 8, 4, 2 tokens
    b, n = 3, 16
    exact = []
    for k in (8, 4, 2):
        d = torch.zeros(b, n)
        for row in range(b):
            d[row, torch.randperm(n)[:k]] = 1.0
        exact.append(d)
    assert module.ratio_loss(exact).item() == 0.0
    all_kept = [torch.ones(b, n)] * 3
    expected = sum((1 - 0.5 ** s) ** 2 for s in (1, 2, 3)) / 3
    assert module.ratio_loss(all_kept).item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        module.ratio_loss(exact[:2])


def test_weighted_losses_and_token_distillation_over_kept_tokens_only() -> None:
    full = tiny_vit(seed=5)
    module = DynamicViT(copy.deepcopy(full), keep_rate=0.5, teacher=full).train()
    x, y = random_images(6), torch.randint(0, 10, (6,))
    out = module.forward_train(x)
    t_out = module.forward_teacher(x)
    terms = module.losses(out, t_out, (x, y))
    assert set(terms) == {"ce", "kl", "token_mse", "ratio"}
    assert terms["ratio"].item() == pytest.approx(2.0 * module.ratio_loss(out["decisions"]).item())
    # the token MSE is the official one: final patch tokens, kept tokens only (not the base class's)
    policy = out["policy"][..., 0] > 0.5  # [B, 16]
    s, t = out.tokens[:, 1:], t_out.tokens[:, 1:]
    expected = ((s - t) ** 2)[policy].mean()
    assert terms["token_mse"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    # changing the teacher at dropped positions (and at CLS) does not change it
    t_changed = t_out.tokens.clone()
    t_changed[:, 0] += 5.0
    t_changed[:, 1:][~policy] += 5.0
    again = module.token_distill_loss(out.tokens, t_changed, out["policy"])
    assert again.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ optimiser
def test_predictors_train_at_lr_and_the_backbone_at_one_hundredth() -> None:
    module = DynamicViT(tiny_vit(), keep_rate=0.7, lr=1e-3)
    groups = module.param_groups()
    pred_ids = {id(p) for i in module.stages for p in module.model.blocks[i].predictor.parameters()}
    seen: list[int] = []
    for g in groups:
        for p in g["params"]:
            seen.append(id(p))
            assert g["lr"] == pytest.approx(1e-3 if id(p) in pred_ids else 1e-5)
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0
    trainable = [id(p) for p in module.model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # every parameter exactly once
    assert pred_ids <= set(seen)
    opt = module.configure_optimizers()["optimizer"]
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    ratios = [lrs[i] / lrs[j] for i in trainable if i not in pred_ids for j in pred_ids]
    assert ratios and all(r == pytest.approx(0.01) for r in ratios)


# ------------------------------------------------------------------ a real training step
def test_training_steps_with_teacher_are_finite_and_train_the_predictors() -> None:
    full = tiny_vit(seed=7)
    module = DynamicViT(copy.deepcopy(full), keep_rate=0.5, teacher=full, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit_steps(module, random_images(16, seed=2), torch.randint(0, 10, (16,)))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    for n, p in module.model.named_parameters():
        assert torch.isfinite(p).all(), n
    moved = [n for n, p in module.model.named_parameters() if "predictor" in n and not torch.equal(p, before[n])]
    assert moved, "the prediction modules received no update"
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(module(random_images(2))).all()


# ------------------------------------------------------------------ FLOPs on DeiT-S
@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return create_backbone("deit_s", num_classes=10)


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_measured_mhsa_flops_on_deit_s_follow_the_kept_tokens(deit_s, rho: float) -> None:
    flops = pytest.importorskip("bench_suite.flops")
    module = DynamicViT(copy.deepcopy(deit_s), keep_rate=rho).eval()
    report = flops.count_flops(module.model, random_images(1, chans=3, size=224))
    tokens = _expected_tokens(12, 196, (3, 6, 9), rho)
    closed_form = 2 * 384 * sum(n * n for n in tokens)  # Q K^T and A V: 2 N_l^2 D per layer
    assert report.mhsa_mflops * 1e6 == pytest.approx(closed_form, rel=1e-9)
    reference = {0.7: 165.63, 0.5: 119.20}[rho]  # methods-and-flops.md, measured DynamicViT on DeiT-S
    assert round(report.mhsa_mflops, 2) == reference
    # the paper's hand count uses ceil(rho^s * 196) and full CLS rows: Table 1's 193.1 / 149.1
    paper = module.paper_mhsa_flops() / 1e6
    assert paper == pytest.approx(flops.token_pruning_paper_flops(12, 197, 384, rho, (3, 6, 9)) / 1e6)
    assert round(paper, 1) == {0.7: 193.1, 0.5: 149.1}[rho]
    dense = flops.dense_mhsa_flops(12, 197, 384) / 1e6
    assert report.mhsa_mflops < dense and math.isfinite(report.total_gflops)


# ------------------------------------------------------------------ official recipe: backbone freeze (fix_step)
@pytest.mark.parametrize("frac,steps", [(1.0, 2), (0.5, 4)])
def test_backbone_is_unchanged_during_its_freeze_and_cls_pos_never_train(frac: float, steps: int) -> None:
    full = create_backbone("mini", num_classes=10)  # the conv stem has BatchNorm statistics
    module = DynamicViT(copy.deepcopy(full), keep_rate=0.5, teacher=full, lr=1e-2, backbone_freeze_frac=frac)
    before = {n: t.detach().clone() for n, t in module.model.state_dict().items()}
    fit_steps(module, random_images(16, seed=2), torch.randint(0, 10, (16,)), steps=steps, batch_size=8)
    after = module.model.state_dict()
    backbone = [n for n in before if ".predictor." not in f".{n}" and not n.endswith("num_batches_tracked")]
    changed = {n for n in backbone if not torch.equal(before[n], after[n])}
    assert "cls_token" not in changed and "pos_embed" not in changed
    assert any(".predictor." in f".{n}" and not torch.equal(before[n], after[n]) for n in before)
    if frac == 1.0:  # frozen for every step: weights and BatchNorm statistics untouched
        assert changed == set()
    else:  # frozen for the first 2 of 4 steps, then the backbone trains
        assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.stem.1.running_mean" in changed


def test_train_cls_pos_flag_trains_them() -> None:
    module = DynamicViT(tiny_vit(), keep_rate=0.5, train_cls_pos=True)
    names = {n for g in module.param_groups() for n, p in module.model.named_parameters()
             if any(p is q for q in g["params"])}
    assert {"cls_token", "pos_embed"} <= names
    default = DynamicViT(tiny_vit(), keep_rate=0.5)
    names = {n for g in default.param_groups() for n, p in default.model.named_parameters()
             if any(p is q for q in g["params"])}
    assert not {"cls_token", "pos_embed"} & names
