"""Sparsifiner / Sparsif-EViT LightningModules (methods/sparsifiner.py) and the visual check."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_suite.backbones import create_backbone
from methods.adapter import merge_heads, split_heads
from methods.sparse_attention import attention_budget
from methods.sparsif_evit import SparsifEViT
from methods.sparsifiner import Sparsifiner, SparsifinerAttention
from tests.conftest import random_images, tiny_vit


def have_fashion_mnist() -> bool:
    from datamodules import DataError
    from datamodules.fashion_mnist import locate

    try:
        locate(None, download=False)
        return True
    except DataError:
        return False


N, D, H, DEPTH, NDOWN = 17, 16, 2, 4, 8  # the tiny profile: 16 patches + CLS, head dim 16, 2 heads, 4 blocks


def test_registered_with_keep_rates_and_typed_defaults():
    from bench_suite.registry import get_method

    spec = get_method("sparsifiner")
    assert spec.factory is Sparsifiner and spec.keep_rates == (0.5, 0.25, 0.1)
    se = get_method("sparsif_evit")
    assert se.factory is SparsifEViT and 0.25 in se.keep_rates
    defaults = se.defaults()
    assert defaults["token_keep_rate"] == 0.7 and defaults["tau"] == 0.05 and defaults["w_up_threshold"] == 0.01
    assert defaults["distill_tokens"] == 0.5 and defaults["distill_logits"] == 0.5


def test_keep_rate_one_equals_full_attention():
    base = tiny_vit().eval()
    x = random_images(3)
    with torch.no_grad():
        ref = base(x)
        m = Sparsifiner(copy.deepcopy(base), keep_rate=1.0).eval()
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
        m.set_phase(2)  # pruning W_up changes nothing at B = N
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
        se = SparsifEViT(copy.deepcopy(base), **SparsifEViT.noop_settings()).eval()  # both rates 1.0
        torch.testing.assert_close(se(x), ref, atol=1e-5, rtol=0)


def test_sparsif_evit_at_attention_keep_one_equals_evit():
    from methods.evit import EViT

    base = tiny_vit().eval()
    x = random_images(3)
    with torch.no_grad():
        ref = EViT(copy.deepcopy(base), keep_rate=0.5).eval()(x)
        m = SparsifEViT(copy.deepcopy(base), keep_rate=1.0, token_keep_rate=0.5, token_pruning="evit").eval()
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)
    assert [m.model.blocks[i].tokens_out for i in m.model.evit_stages] == [10, 7, 5]


def test_every_query_row_has_exactly_b_connections():
    m = Sparsifiner(tiny_vit(), keep_rate=0.25).eval()
    for a in m.model.blocks:
        a.attn.record = True
    with torch.no_grad():
        m(random_images(3))
    b = attention_budget(0.25, N)
    for blk in m.model.blocks:
        mask = blk.attn.last["records"]["mask"]  # [B, H, N, N]
        assert mask.shape == (3, H, N, N)
        assert mask[:, :, 1:].sum(-1).eq(b).all()  # patch queries: B keys
        assert mask[:, :, 0].all()  # the CLS query row is full
        sparse = blk.attn.last["records"]["sparse_probs"]
        assert torch.equal(sparse > 0, mask)
    report = m.sparsity_report()
    assert report["attention_budget"] == b
    assert report["mask_density"] == pytest.approx((N + (N - 1) * b) / N**2)
    w = torch.cat([blk.attn.predictor.w_up.detach().flatten() for blk in m.model.blocks])
    assert report["w_up_sparsity"] == pytest.approx(float((w.abs() < 0.01).float().mean()))


def test_sparse_path_matches_dense_masked_reference_in_the_model():
    """The gathered sparse attention equals masked_fill(-inf) dense attention with the same mask, in a model."""
    m = Sparsifiner(tiny_vit(), keep_rate=0.25).eval()
    attn = m.model.blocks[0].attn
    attn.record = True
    x = torch.randn(2, N, 32)
    with torch.no_grad():
        out = attn(x)
        q, k, v = split_heads(attn, x)
        probs = attn.last["records"]["sparse_probs"]
        ref = merge_heads(attn, probs @ v)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def _graph_has(t: torch.Tensor, name: str) -> bool:
    """Whether the autograd graph of ``t`` holds a node whose type name starts with ``name``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith(name):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("method", [Sparsifiner, SparsifEViT])
def test_kernel_and_torch_impls_agree_in_a_training_step(method):
    """The default "auto" implementation (the C++ forward and backward kernels on the CPU) and the PyTorch
    gather reference give the same phase-2 loss and the same parameter gradients."""
    from bench_suite.kernels import kernel_available

    if not kernel_available():  # pragma: no cover - a machine without a compiler
        pytest.skip("the C++ kernel cannot be built here")
    teacher = tiny_vit(seed=1).eval()
    mods = {impl: method(tiny_vit(), keep_rate=0.25, teacher=copy.deepcopy(teacher), attention_impl=impl)
            for impl in ("auto", "torch")}
    x, y = random_images(4), torch.arange(4)
    losses, grads = {}, {}
    for impl, m in mods.items():
        m.set_phase(2)
        m.train()
        out, t_out = m.forward_train(x), m.forward_teacher(x)
        loss = sum(m.losses(out, t_out, (x, y)).values())
        assert _graph_has(loss, "_SparseAttentionCpp") == (impl == "auto")
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=1e-5, atol=1e-6)
    assert grads["auto"].keys() == grads["torch"].keys() and "blocks.0.attn.qkv.weight" in grads["auto"]
    for n, g in grads["auto"].items():
        torch.testing.assert_close(g, grads["torch"][n], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{n}: {msg}")


def _hand_made(m: Sparsifiner):
    """W_down = 0 makes every A_down row uniform (1 / n_down); W_up row r gets r + 1 entries above 1e-2."""
    nnz = []
    with torch.no_grad():
        for blk in m.model.blocks:
            p = blk.attn.predictor
            p.w_down.zero_()
            p.w_up.fill_(0.001)  # below the threshold: pruned
            for r in range(p.n_down):
                p.w_up[:, r, : r + 1] = 0.5
            nnz.append(sum(r + 1 for r in range(p.n_down)))
    return nnz


@pytest.mark.parametrize("keep_rate,tau", [(0.25, 0.05), (0.5, 0.05), (0.1, 0.2)])
def test_mhsa_flops_equal_closed_form_from_nonzeros(keep_rate, tau):
    from bench_suite.flops import count_flops

    m = Sparsifiner(tiny_vit(), keep_rate=keep_rate, tau=tau, coef_topk=None).eval()
    row_nnz = _hand_made(m)
    b = attention_budget(keep_rate, N)
    coef_nonzero = 1.0 / NDOWN > tau  # uniform coefficients: all kept or all pruned
    per_layer = []
    for nnz in row_nnz:
        lowrank = H * (NDOWN * N * D + (N - 1) * NDOWN * D)  # W_down K and Q K_down^T
        sparse_sparse = H * (N - 1) * nnz if coef_nonzero else 0  # sum over nonzero coefs of nnz(W_up row)
        attention = H * 2 * D * (N + (N - 1) * b)  # q k at nnz(M) and A V; CLS row full
        per_layer.append(lowrank + sparse_sparse + attention)
    report = count_flops(m.model, random_images(4))
    assert report.per_layer_mhsa_mflops == pytest.approx([v / 1e6 for v in per_layer], abs=1e-9)
    assert report.mhsa_mflops == pytest.approx(sum(per_layer) / 1e6, abs=1e-9)
    m(random_images(2))
    assert m.sparsity_report()["coef_sparsity"] == (0.0 if coef_nonzero else 1.0)


def test_sparsif_evit_counts_fewer_flops_and_tracks_positions():
    from bench_suite.flops import count_flops

    x = random_images(4)
    sp = Sparsifiner(tiny_vit(), keep_rate=0.25).eval()
    se = SparsifEViT(tiny_vit(), keep_rate=0.25, token_keep_rate=0.5, token_pruning="evit").eval()
    f_sp, f_se = count_flops(sp.model, x), count_flops(se.model, x)
    assert f_se.per_layer_mhsa_mflops[0] == pytest.approx(f_sp.per_layer_mhsa_mflops[0])  # same 17 tokens
    assert f_se.mhsa_mflops < f_sp.mhsa_mflops
    with torch.no_grad():
        se(x)
    last = se.model.blocks[-1].attn.last
    assert last["n"] == 7 and last["budget"] == attention_budget(0.25, 7)
    pos = last["positions"]  # [B, 7, 17]: CLS, kept tokens one-hot, the new fused token (last) soft
    torch.testing.assert_close(pos.sum(-1), torch.ones(4, 7))
    assert (pos[:, 0, 0] == 1).all()
    assert (pos[:, -1] > 0).sum(-1).gt(1).all()
    assert (pos.amax(-1) < 1).sum(-1).le(2).all()  # at most one earlier fused token was kept


def _loader(n=16, batch=4):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch)


class _Snapshots(pl.Callback):
    def __init__(self):
        self.at = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # runs before the module's hook
        self.at[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def _trainer(steps, callbacks=()):
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=list(callbacks))


def _bn_stem_backbone(seed=0):
    """tiny with mini's BatchNorm conv stem (patch 4: 49 + 1 tokens), to check that phase 1 freezes BN too."""
    from bench_suite.backbones import _mini_stem

    torch.manual_seed(seed)
    return create_backbone("tiny", num_classes=10, embed_layer=_mini_stem, patch_size=4)


@pytest.mark.parametrize("method,with_teacher", [(Sparsifiner, True), (SparsifEViT, False)])
def test_phase1_trains_only_the_predictor_and_phase2_only_the_backbone(method, with_teacher):
    make = _bn_stem_backbone if with_teacher else tiny_vit
    teacher = make(seed=1) if with_teacher else None
    m = method(make(), keep_rate=0.25, teacher=teacher, phase1_steps=2, lr=1e-2)
    snaps = _Snapshots()
    start = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    _trainer(4, [snaps]).fit(m, train_dataloaders=_loader())
    end = m.model.state_dict()
    mid = snaps.at[2]  # after the two phase-1 steps, before the phase switch

    def pred(k):
        return ".predictor." in k

    for k in start:
        if pred(k):
            assert not torch.equal(start[k], mid[k]), f"phase 1 did not train {k}"
        else:
            assert torch.equal(start[k], mid[k]), f"phase 1 changed the backbone's {k}"
    for k in start:
        if k.endswith("predictor.w_up"):  # phase 2: only pruned at the switch, then frozen
            assert torch.equal(end[k], mid[k] * (mid[k].abs() >= 1e-2))
        elif pred(k):
            assert torch.equal(end[k], mid[k]), f"phase 2 changed the predictor's {k}"
    changed = [k for k in start if not pred(k) and not torch.equal(mid[k], end[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "head.weight" in changed
    if with_teacher:  # BatchNorm statistics: frozen in phase 1 (checked above), updated in phase 2
        assert "patch_embed.stem.1.running_mean" in changed
    assert m.phase == 2 and m.sparsity_report()["w_up_sparsity"] == pytest.approx(
        float(torch.cat([end[k].flatten() for k in end if k.endswith("w_up")]).eq(0).float().mean()))


@pytest.mark.parametrize("reduction", ["image_sum", "sum", "mean"])
def test_phase1_loss_is_attention_distillation_against_teacher_maps(reduction):
    teacher = tiny_vit(seed=1).eval()
    m = Sparsifiner(tiny_vit(), keep_rate=0.25, teacher=teacher, attn_loss_reduction=reduction)
    m.set_phase(1)
    m.train()
    x = random_images(2)
    out, t_out = m.forward_train(x), m.forward_teacher(x)
    assert len(t_out["attn"]) == DEPTH and t_out["attn"][0].shape == (2, H, N, N)
    terms = m.losses(out, t_out, (x, torch.zeros(2, dtype=torch.long)))
    assert list(terms) == ["attn_distill"]
    per_layer = []
    for b, t in zip(m.model.blocks, t_out["attn"]):
        sq = (b.attn.last["scores"] - t[:, :, 1:]) ** 2  # [B, H, N - 1, N]
        per_layer.append({"image_sum": sq.sum() / 2, "sum": sq.sum(), "mean": sq.mean()}[reduction])
    torch.testing.assert_close(terms["attn_distill"], torch.stack(per_layer).mean())
    m.set_phase(2)
    terms2 = m.losses(m.forward_train(x), m.forward_teacher(x), (x, torch.zeros(2, dtype=torch.long)))
    assert set(terms2) == {"ce", "kl", "token_mse"}


def test_attn_loss_reduction_is_validated():
    with pytest.raises(ValueError, match="attn_loss_reduction"):
        Sparsifiner(tiny_vit(), attn_loss_reduction="median")


def test_sparsif_evit_distils_attention_in_pruned_layers_through_positions():
    from methods.sparse_attention import map_attention_to_tokens

    teacher = tiny_vit(seed=1).eval()
    m = SparsifEViT(tiny_vit(), keep_rate=0.25, token_keep_rate=0.5, teacher=teacher, phase1_full_attention=False,
                    token_pruning="evit", attn_loss_reduction="mean")
    m.set_phase(1)
    m.train()
    x = random_images(2)
    out, t_out = m.forward_train(x), m.forward_teacher(x)
    last = m.model.blocks[-1].attn.last
    assert last["scores"].shape == (2, H, 6, 7)  # pruned: 7 tokens in the last layer
    loss = m.losses(out, t_out, (x, torch.zeros(2, dtype=torch.long)))["attn_distill"]
    manual = torch.stack([torch.nn.functional.mse_loss(
        b.attn.last["scores"],
        (t if b.attn.last["positions"] is None else map_attention_to_tokens(t, b.attn.last["positions"]))[:, :, 1:])
        for b, t in zip(m.model.blocks, t_out["attn"])]).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert m.model.blocks[-1].attn.predictor.w_up.grad.abs().sum() > 0
    assert m.model.blocks[-1].attn.qkv.weight.grad is None  # frozen backbone


def _checkpoint(tmp_path, method=Sparsifiner, **kw):
    m = method(create_backbone("tiny", num_classes=10), keep_rate=0.25, phase1_steps=1, **kw)
    trainer = _trainer(2)
    trainer.fit(m, train_dataloaders=_loader(8))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return m, path


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
@pytest.mark.parametrize("method,name", [(Sparsifiner, "sparsifiner"), (SparsifEViT, "sparsif_evit")])
def test_visualize_loads_checkpoint_and_writes_pngs(tmp_path, method, name):
    from bench_suite.cli import main
    from bench_suite.checkpoints import load_trained

    # the runner trains with a teacher, whose weights end up in the checkpoint too
    trained, path = _checkpoint(tmp_path, method, teacher=tiny_vit(seed=1) if method is SparsifEViT else None)
    loaded = load_trained(name, path, "tiny")
    for k, v in trained.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v)
    rc = main(["visualize", "--method", name, "--keep-rate", "0.25", "--profile", "tiny", "--checkpoint", str(path),
               "--images", "2", "--query", "5", "--output", str(tmp_path / "out")])
    assert rc == 0
    pngs = sorted((tmp_path / "out" / "figures").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_visualize_user_errors(tmp_path, capsys):
    from bench_suite.cli import main

    assert main(["visualize", "--profile", "tiny", "--output", str(tmp_path)]) == 2  # no store, no checkpoint
    assert "pass --checkpoint" in capsys.readouterr().err
    assert main(["visualize", "--profile", "tiny", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2


def test_invalid_settings_raise():
    with pytest.raises(ValueError):
        Sparsifiner(tiny_vit(), keep_rate=0.0)
    with pytest.raises(ValueError):
        Sparsifiner(tiny_vit(), keep_rate=0.25, attn_distill_phase1=0.0)
    with pytest.raises(ValueError):
        SparsifEViT(tiny_vit(), keep_rate=0.25, token_keep_rate=1.5)
    with pytest.raises(ValueError, match="attention dropout"):
        Sparsifiner(create_backbone("tiny", attn_drop_rate=0.1), keep_rate=0.25)
    assert isinstance(Sparsifiner(tiny_vit(), keep_rate=0.5).model.blocks[0].attn, SparsifinerAttention)


# ------------------------------------------------------------------ phase 1 as the official code trains it
@pytest.mark.parametrize("coef_topk", [None, 8])
def test_phase1_gradient_reaches_every_coefficient_and_every_w_up_entry(coef_topk):
    """At n_down = 32 a coefficient starts near 1/32 < tau = 0.05 and many W_up entries start under 1e-2:
    phase 1 trains on the dense coefficients and the unthresholded basis, so all of them get a gradient
    (with the paper's tau and with the official top-8 alike)."""
    teacher = tiny_vit(seed=1).eval()
    m = Sparsifiner(tiny_vit(), keep_rate=0.25, teacher=teacher, n_down=16,  # 1/16 > tau only if learned
                    coef_topk=coef_topk)
    m.set_phase(1)
    m.train()
    pred = m.model.blocks[1].attn.predictor
    small = pred.w_up.detach().abs() < 1e-2
    assert small.any()  # some entries start under the threshold
    coefs = []

    def keep(mod, args, out):
        if out.coef.requires_grad:
            out.coef.retain_grad()
            coefs.append(out)

    pred.register_forward_hook(keep)
    x = random_images(2)
    loss = m.losses(m.forward_train(x), m.forward_teacher(x), (x, torch.zeros(2, dtype=torch.long)))["attn_distill"]
    loss.backward()
    out = coefs[0]
    assert torch.equal(out.coef, out.a_down)  # no threshold on the coefficients while phase 1 trains
    assert (out.coef.grad != 0).all(), "a coefficient got no gradient"
    assert (pred.w_up.grad != 0).all() and (pred.w_up.grad[small] != 0).all()
    assert (pred.w_down.grad != 0).any()
    m.eval()  # evaluation thresholds both, also in phase 1
    with torch.no_grad():
        ev = pred(*split_heads(m.model.blocks[1].attn, torch.randn(2, N, 32))[:2])
    assert (ev.w_up[small] == 0).all()
    if coef_topk is None:
        assert torch.equal(ev.coef, ev.a_down * (ev.a_down > pred.tau))
    else:  # exactly the 8 largest of the 16 coefficients of every row survive
        assert ((ev.coef != 0).sum(-1) == coef_topk).all()
        assert (ev.coef.min(-1).values <= 0).all() and torch.equal(ev.coef[ev.coef != 0], ev.a_down[ev.coef != 0])
        kth = ev.a_down.topk(coef_topk, dim=-1).values[..., -1:]
        assert torch.equal(ev.coef != 0, ev.a_down >= kth)


def test_old_phase1_thresholds_are_reachable_by_flags():
    m = Sparsifiner(tiny_vit(), keep_rate=0.25, threshold_coef_in_phase1=True, threshold_w_up_in_phase1=True)
    m.set_phase(1)
    m.train()
    pred = m.model.blocks[0].attn.predictor
    q, k, _ = split_heads(m.model.blocks[0].attn, torch.randn(2, N, 32))
    out = pred(q[:, :, 1:], k)
    assert torch.equal(out.coef, out.a_down * (out.a_down > pred.tau))
    assert torch.equal(out.w_up, pred.w_up * (pred.w_up.abs() >= 1e-2))


def test_flops_with_coef_topk_equal_closed_form():
    """The official top-k coefficients (coef_topk): k coefficients per row, each W_up row with 3 nonzeros,
    so the sparse-sparse product costs H (N - 1) k 3 MACs per layer, whichever k rows are kept."""
    from bench_suite.flops import count_flops

    k_coef, row_nnz = 3, 3
    m = Sparsifiner(tiny_vit(), keep_rate=0.25, coef_topk=k_coef).eval()
    with torch.no_grad():
        for blk in m.model.blocks:
            blk.attn.predictor.w_up.fill_(0.001)
            blk.attn.predictor.w_up[:, :, :row_nnz] = 0.5
    b = attention_budget(0.25, N)
    lowrank = H * (NDOWN * N * D + (N - 1) * NDOWN * D)
    per_layer = lowrank + H * (N - 1) * k_coef * row_nnz + H * 2 * D * (N + (N - 1) * b)
    report = count_flops(m.model, random_images(4))
    assert report.per_layer_mhsa_mflops == pytest.approx([per_layer / 1e6] * DEPTH, abs=1e-9)


# ------------------------------------------------------------------ predictor quality
def test_mask_recall_closed_form_on_a_hand_made_mask():
    from methods.sparse_attention import mask_recall

    target = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])  # [Nq = 2, Nk = 5]
    idx = torch.tensor([[0, 3], [4, 3]])  # row 0 keeps 1 of its top-2 {0, 1}; row 1 keeps both {4, 3}
    torch.testing.assert_close(mask_recall(idx, target), torch.tensor([0.5, 1.0]))
    idx3 = torch.tensor([[2, 3, 4], [0, 1, 2]])  # neither row keeps any of its top-3 but one
    torch.testing.assert_close(mask_recall(idx3, target), torch.tensor([1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="do not fit"):
        mask_recall(idx, target[:1])


def test_mask_recall_is_one_at_keep_one_and_near_keep_rate_for_a_random_predictor():
    teacher = tiny_vit(seed=1).eval()
    full = Sparsifiner(tiny_vit(), keep_rate=1.0, teacher=teacher).eval()
    full.update_mask_recall(random_images(4))
    assert float(full.recall_metric.compute()) == pytest.approx(1.0)
    rand = Sparsifiner(tiny_vit(), keep_rate=0.25, teacher=teacher).eval()
    rand.update_mask_recall(random_images(8))
    assert 0.15 < float(rand.recall_metric.compute()) < 0.5  # B / N = 5 / 17 = 0.29 for a random mask


def test_fit_records_phase1_loss_at_start_and_end_and_keeps_it_in_checkpoints(tmp_path):
    teacher = tiny_vit(seed=1).eval()
    m = Sparsifiner(copy.deepcopy(teacher), keep_rate=0.25, teacher=teacher, phase1_steps=4, predictor_lr=5e-2)
    trainer = _trainer(6)
    trainer.fit(m, train_dataloaders=_loader(8))
    rec = m.phase1_record
    assert set(rec) == {"attn_distill_start", "attn_distill_end"}
    assert rec["attn_distill_end"] < rec["attn_distill_start"]  # 4 predictor steps on the same images
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = Sparsifiner.load_from_checkpoint(path)
    assert loaded.phase1_record == rec
    m.eval()
    with torch.no_grad():
        m(random_images(2))
    assert m.sparsity_report()["attn_distill_start"] == rec["attn_distill_start"]


# ------------------------------------------------------------------ Sparsifiner token pruning, the official variant
def test_official_token_pruning_keeps_138_97_68_of_196_at_0_7_with_the_official_budget():
    from methods.sparsif_evit import official_keep_counts

    assert official_keep_counts(196, 0.7, 3) == [138, 97, 68]
    torch.manual_seed(0)
    backbone = create_backbone("deit_s", num_classes=10, depth=12)
    m = SparsifEViT(backbone, keep_rate=0.25, token_keep_rate=0.7).eval()
    assert m.hparams.token_pruning == "official"
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    blocks = m.model.blocks
    assert [blocks[i].tokens_out for i in (3, 6, 9)] == [139, 98, 69]  # + CLS
    budgets = [b.attn.last["budget"] for b in blocks]
    assert budgets[:4] == [50] * 4  # ceil(0.25 * 197) before pruning
    assert budgets[4:] == [50] * 6 + [50, 50]  # min(50, N_l - 1): 138 and 97 and 68 patches are all >= 50
    lo = SparsifEViT(create_backbone("deit_s", num_classes=10), keep_rate=0.5, token_keep_rate=0.5).eval()
    with torch.no_grad():
        lo(torch.randn(1, 3, 224, 224))
    # rho = 0.5: 98, 49, 25 patches kept; budget min(ceil(0.5 * 197) = 99, N_l - 1)
    assert [lo.model.blocks[i].tokens_out for i in (3, 6, 9)] == [99, 50, 26]
    assert [b.attn.last["budget"] for b in lo.model.blocks] == [99] * 4 + [98] * 3 + [49] * 3 + [25] * 2


def test_official_token_pruning_equals_the_masked_dense_computation():
    """The official code masks pruned tokens instead of removing them: the suite's removal must give the same
    CLS output and kept tokens (tiny profile, pruning after block 1 only, keep 0.5 of 16 patches)."""
    from methods.sparse_attention import dense_masked_attention, indices_to_mask, topk_connectivity

    torch.manual_seed(0)
    base = tiny_vit().eval()
    m = SparsifEViT(copy.deepcopy(base), keep_rate=0.5, token_keep_rate=0.5, stages=(1,)).eval()
    x = random_images(2)
    with torch.no_grad():
        for blk in m.model.blocks:  # no zero (tied) connectivity scores: the top-B is unique
            blk.attn.predictor.w_up.normal_()
        out = m(x)
        # masked reference, written from the official code's description
        model = m.model
        t = model._pos_embed(model.patch_embed(x))
        active = torch.ones(2, N - 1, dtype=torch.bool)
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            q, k, v = split_heads(attn, blk.norm1(t))
            if i > 1:  # q, k, v of pruned tokens zeroed
                keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), active], 1)[:, None, :, None]
                q, k, v = q * keep, k * keep, v * keep
            pred = attn.predictor(q[:, :, 1:], k)
            scores = pred.scores
            n_budget = attention_budget(0.5, N)
            if i > 1:
                scores = scores.masked_fill(~torch.cat([torch.ones(2, 1, dtype=torch.bool), active], 1)[:, None, None],
                                            float("-inf"))
                n_budget = min(n_budget, int(active[0].sum()))
            mask = indices_to_mask(topk_connectivity(scores, n_budget), N)
            mask = torch.cat([torch.ones_like(mask[:, :, :1]), mask], 2)
            if i > 1:  # rows of pruned tokens dropped
                mask[:, :, 1:] &= active[:, None, :, None]
                mask[:, :, 1:, 0] |= ~active[:, None, :]  # keep softmax finite; those rows are discarded
            o, probs = dense_masked_attention(q, k, v, mask, D ** -0.5)
            t = t + blk.ls1(merge_heads(attn, o))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            if i == 1:
                cls_attn = probs[:, :, 0, 1:].mean(1)
                kept = cls_attn.topk(8, dim=-1).indices
                active = torch.zeros(2, N - 1, dtype=torch.bool).scatter(1, kept, True)
            if i >= 1:
                t[:, 1:] = t[:, 1:] * active[..., None]
        ref = model.forward_head(model.norm(t))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_evit_variant_stays_reachable():
    se = SparsifEViT(tiny_vit(), keep_rate=0.25, token_keep_rate=0.5, token_pruning="evit").eval()
    with torch.no_grad():
        se(random_images(2))
    assert se.model.blocks[-1].attn.last["n"] == 7  # 1 + 2 kept + 1 fused ... after three fused stages
    with pytest.raises(ValueError, match="token_pruning"):
        SparsifEViT(tiny_vit(), token_pruning="fuse")


@pytest.mark.parametrize("total,frac,min_steps,expected", [
    (79, 0.1, 40, 39),     # a 1-epoch CPU run: phase 1 gets its minimum, capped at half (79 // 2)
    (200, 0.1, 40, 40),    # its minimum where half the training is more
    (5000, 0.1, 40, 500),  # ImageNet scale: the fraction
    (79, 0.0, 40, 0),      # no phase 1 at all
    (79, 0.1, 0, 8),       # the plain fraction
])
def test_phase1_length_rule(total, frac, min_steps, expected):
    m = Sparsifiner(tiny_vit(), phase1_epochs=0, phase1_frac=frac, phase1_min_steps=min_steps)

    class _T:
        estimated_stepping_batches = total

    m._trainer = _T()
    assert m.phase1_length() == expected


@pytest.mark.parametrize("p1_epochs,epochs,total,max_epochs,expected_epochs,expected_steps", [
    (1, 1, 158, 2, 2, 79),     # the CPU protocol: one phase-1 epoch before the fine-tuning epoch
    (5, 45, 50 * 100, 50, 50, 500),  # the official 5 + 45
    (1, 0, 0, 0, 0, 0),        # evaluate only: no training at all
    (1, 1, 79, 1, 2, 39),      # a Trainer of one epoch (a user's own): the phase1_frac rule
])
def test_phase1_epochs_come_before_the_fine_tuning_epochs(p1_epochs, epochs, total, max_epochs, expected_epochs,
                                                          expected_steps):
    m = Sparsifiner(tiny_vit(), phase1_epochs=p1_epochs)
    assert m.train_epochs(epochs) == expected_epochs

    class _T:
        estimated_stepping_batches = total

    _T.max_epochs = max_epochs
    m._trainer = _T()
    assert m.phase1_length() == expected_steps
    assert Sparsifiner(tiny_vit(), phase1_steps=3).train_epochs(epochs) == epochs  # steps given: no extra epoch


def test_timing_mode_skips_the_coefficient_count_and_restores_it():
    """Inside ``timing_mode`` the attention layers do not count zero coefficients (bookkeeping, not the method);
    the report lacks ``coef_sparsity`` after such a forward (and after a training forward) and has it again after the
    next evaluation forward outside; the switch is restored on an
    exception too."""
    from bench_suite.measure import timing_mode

    m = Sparsifiner(tiny_vit(), keep_rate=0.25).eval()
    x = random_images(2, seed=3)
    with torch.inference_mode():
        m(x)
        assert "coef_sparsity" in m.sparsity_report()
        with timing_mode([m]):
            assert not any(a.track_stats for a in m._attns())
            m(x)
        assert "coef_sparsity" not in m.sparsity_report() and "mask_density" in m.sparsity_report()
        assert all(a.track_stats for a in m._attns())
        m(x)
        assert "coef_sparsity" in m.sparsity_report()
        with pytest.raises(RuntimeError), timing_mode([m.model]):
            raise RuntimeError("boom")
        assert all(a.track_stats for a in m._attns())
    m.train()  # a training forward does not count either (the report reads evaluation forwards)
    m.model(x)
    assert "coef_sparsity" not in m.sparsity_report()
    m.eval()
    with torch.inference_mode():
        m(x)
    assert "coef_sparsity" in m.sparsity_report()
