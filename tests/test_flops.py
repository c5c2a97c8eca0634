"""Tests of bench_suite.flops against closed forms (1 MAC = 1 FLOP; MFLOPs = 1e6 FLOPs).

One op/handle per test where possible: tiny one-block models whose ``blocks.0.attn`` runs a single op on
the input ``x [B, C, H, W]`` read as ``[B, heads, N, d]``; then timm ViTs against the paper's numbers.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench_suite.backbones import create_backbone, keep_count
from bench_suite.flops import (
    FLOP_HANDLES,
    FlopReport,
    UncountedOpError,
    count_flops,
    dense_mhsa_flops,
    einsum_macs,
    mark_macs,
    register_flop_handle,
    token_pruning_paper_flops,
    zero_flop_handle,
)


# --------------------------------------------------------------------------- tiny one-op models
class OneBlock(nn.Module):
    """A model with ``blocks.0.attn = attn`` (and nothing else); ``forward(x) = attn(x)``."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        blk = nn.Module()
        blk.attn = attn
        self.blocks = nn.ModuleList([blk])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].attn(x)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def mhsa_flops_per_image(fn, x: torch.Tensor, **kw) -> float:
    """MHSA FLOPs per image (absolute, not MFLOPs) of ``fn`` run inside ``blocks.0.attn``."""
    return count_flops(OneBlock(Fn(fn)), x, **kw).mhsa_mflops * 1e6


B, H, N, D = 2, 3, 11, 8  # batch, heads, tokens, head dim


@pytest.mark.parametrize("nq,dv", [(N, D), (5, 3)])
def test_sdpa_matches_closed_form(nq, dv):
    x = torch.randn(B, H, N, D)
    got = mhsa_flops_per_image(lambda t: F.scaled_dot_product_attention(t[:, :, :nq], t, t[..., :dv]), x)
    assert got == pytest.approx(H * nq * N * D + H * nq * N * dv)  # Q K^T + A V
    if nq == N and dv == D:
        assert got == pytest.approx(H * N ** 2 * D * 2)


def test_fvcore_alone_drops_sdpa():
    """The reason for the handle: fvcore's defaults count timm's fused attention as nothing."""
    x = torch.randn(B, H, N, D)
    with torch.no_grad():
        fca = FlopCountAnalysis(Fn(lambda t: F.scaled_dot_product_attention(t, t, t)), x)
        assert fca.unsupported_ops_warnings(False).total() == 0


def test_baddbmm():
    x = torch.randn(B, H, N, D)
    got = mhsa_flops_per_image(lambda t: torch.baddbmm(t[:, 0, :, :1], t[:, 0], t[:, 1].transpose(1, 2)), x)
    assert got == pytest.approx(N * D * N)  # per image: [N, D] @ [D, N]


def test_matmul_two_d_at_batched_is_not_undercounted():
    """Linformer's token projection E [k, N] @ K [B, H, N, d]: B H k N d MACs (fvcore: k N d)."""
    k = 4
    proj = torch.randn(k, N)
    got = mhsa_flops_per_image(lambda t: proj @ t, torch.randn(B, H, N, D))
    assert got == pytest.approx(H * k * N * D)


def test_matmul_broadcast_heads():
    """[B, 1, N, d] @ [B, H, d, N] broadcasts to H heads."""
    got = mhsa_flops_per_image(lambda t: t[:, :1] @ t.transpose(-1, -2), torch.randn(B, H, N, D))
    assert got == pytest.approx(H * N * D * N)


@pytest.mark.parametrize("equation,shapes,expected", [
    ("bhnd,kn->bhkd", [(2, 6, 197, 64), (68, 197)], 2 * 6 * 68 * 197 * 64),  # Linformer E K
    ("bhnd,bhmd->bhnm", [(2, 6, 197, 64), (2, 6, 197, 64)], 2 * 6 * 197 * 197 * 64),
    ("...nd,...md", [(2, 3, 5, 4), (3, 7, 4)], 2 * 3 * 5 * 7 * 4),  # ellipsis, implicit output
    ("ij,ij->ij", [(5, 7), (5, 7)], 35),  # element-wise: one multiply per output
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], 2 * 3 * 4 + 2 * 4 * 5),  # left to right
    ("ij,jk->k", [(9, 3), (3, 4)], 3 * 4),  # i is summed out before the product (free)
    ("ii->i", [(5, 5)], 0),  # one operand: free
])
def test_einsum_macs_closed_form(equation, shapes, expected):
    assert einsum_macs(equation, shapes) == expected


def test_einsum_traced_is_exact():
    """fvcore's default rounds numpy's estimate; the registered handle is exact."""
    e = torch.randn(68, 197)
    x = torch.randn(1, 6, 197, 64)
    got = mhsa_flops_per_image(lambda t: torch.einsum("bhnd,kn->bhkd", t, e), x)
    assert got == 6 * 68 * 197 * 64


# --------------------------------------------------------------------------- measured MACs (marker)
def test_marker_constant_counts_per_image():
    x = torch.randn(3, 1, 2, 2)
    report = count_flops(OneBlock(Fn(lambda t: mark_macs(t, 12345) * 2)), x)
    assert report.mhsa_mflops * 1e6 == pytest.approx(12345 / 3)
    assert report.per_layer_mhsa_mflops == [pytest.approx(12345 / 3 / 1e6)]
    assert report.batch_size == 3


def test_marker_counts_real_nonzeros_of_the_batch():
    """A data-dependent count (nonzeros of this batch, given as a tensor) is averaged per image."""
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, :3, :] = 1.0  # 12 nonzeros
    x[1, 0, 0, :2] = 1.0  # 2 nonzeros
    got = mhsa_flops_per_image(lambda t: mark_macs(t, torch.count_nonzero(t) * 10), x)
    assert got == pytest.approx((12 + 2) * 10 / 2)


def test_marker_survives_when_result_unused():
    def fn(t):
        mark_macs(t, 7)  # result dropped: the op must not be dead-code eliminated
        return t * 2
    assert mhsa_flops_per_image(fn, torch.randn(1, 1, 2, 2)) == 7


def test_mark_macs_outside_tracing_is_identity():
    x = torch.randn(3, 4)
    assert mark_macs(x, 5) is x
    y = torch.ops.bench_suite.measured_macs(x, 5)
    assert torch.equal(y, x)
    assert torch.ops.bench_suite.measured_macs(torch.empty(3, 4, device="meta"), 5).shape == (3, 4)
    g = torch.randn(3, requires_grad=True)
    torch.ops.bench_suite.measured_macs(g, 1).sum().backward()
    assert torch.equal(g.grad, torch.ones(3))


def test_marker_is_traceable_by_jit_trace():
    traced = torch.jit.trace(Fn(lambda t: mark_macs(t, 99) + 1), torch.randn(2, 2))
    nodes = [n for n in traced.graph.nodes() if n.kind() == "bench_suite::measured_macs"]
    assert len(nodes) == 1 and list(nodes[0].inputs())[1].toIValue() == 99


def test_mark_macs_rejects_negative_count():
    with pytest.raises(ValueError, match="non-negative"):
        count_flops(OneBlock(Fn(lambda t: mark_macs(t, -1))), torch.randn(1, 1, 2, 2))


# --------------------------------------------------------------------------- failing loudly
def _sparse_product(t: torch.Tensor) -> torch.Tensor:
    a = t[0, 0].to_sparse()  # [N, D]
    return torch.sparse.mm(a, t[0, 0].t())  # [N, N]


def test_uncounted_sparse_mm_raises():
    with pytest.raises(UncountedOpError, match="aten::_sparse_mm") as err:
        count_flops(OneBlock(Fn(_sparse_product)), torch.randn(1, 1, N, D))
    assert "aten::_sparse_mm" in err.value.ops


def test_sparse_operand_in_matmul_raises():
    """A sparse operand traces without a shape: the matmul handle refuses to guess."""
    with pytest.raises(UncountedOpError, match="aten::matmul"):
        count_flops(OneBlock(Fn(lambda t: t[0, 0].to_sparse() @ t[0, 0].t())), torch.randn(1, 1, N, D))


def test_sparse_product_with_marker_and_zero_handle():
    """How sparse code is counted: the sparse op is free, the marker reports nnz(A) * m MACs."""
    x = torch.randn(2, 1, N, D).clamp(min=0)  # about half the entries are zero

    def fn(t):
        a = t[0, 0].to_sparse()
        out = torch.sparse.mm(a, t[0, 0].t())
        return mark_macs(out, a._nnz() * N)  # each nonzero a_ij meets a row of N columns

    got = mhsa_flops_per_image(fn, x, handles={"aten::_sparse_mm": zero_flop_handle})
    assert got == pytest.approx(int(torch.count_nonzero(x[0, 0])) * N / 2)
    assert FLOP_HANDLES.get("aten::_sparse_mm") is None  # per-call handles do not leak


@torch.library.custom_op("bench_suite_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_custom_op_needs_a_handle():
    model = OneBlock(Fn(lambda t: torch.ops.bench_suite_test.double(t)))
    x = torch.randn(2, 1, 3, 3)
    with pytest.raises(UncountedOpError, match="bench_suite_test::double"):
        count_flops(model, x)
    previous = register_flop_handle("bench_suite_test::double", lambda i, o: 1000)
    try:
        assert previous is None
        assert count_flops(model, x).mhsa_mflops * 1e6 == pytest.approx(1000 / 2)
    finally:
        FLOP_HANDLES.pop("bench_suite_test::double")


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x @ x.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


def test_autograd_function_is_opaque_and_raises():
    with pytest.raises(UncountedOpError, match="PythonOp"):
        count_flops(OneBlock(Fn(_Twice.apply)), torch.randn(1, 1, 3, 3))


def test_free_ops_count_zero_without_error():
    def fn(t):
        s = (t * 2 + 1).softmax(-1)
        v, idx = s.topk(2, dim=-1)
        return F.gelu(torch.gather(s, -1, idx)) + v
    assert mhsa_flops_per_image(fn, torch.randn(1, 2, 3, 4)) == 0


def test_inner_is_counted_by_its_closed_form():
    # torch.inner(a [B, 1, N, d], b [M, d]) -> [B, 1, N, M]: B * N * M * d MACs, per image N * M * d
    w = torch.randn(5, 4)
    assert mhsa_flops_per_image(lambda t: torch.inner(t, w), torch.randn(2, 1, 7, 4)) == 7 * 5 * 4


@pytest.mark.parametrize("fn, op", [
    (lambda t: torch.cdist(t, t), "aten::cdist"),
    (lambda t: F.cosine_similarity(t, t, dim=-1), "aten::cosine_similarity"),
    (lambda t: torch.linalg.matrix_power(t, 2), "aten::linalg_matrix_power"),
])
def test_an_op_not_known_to_be_free_fails_loudly_naming_it(fn, op):
    """The counter is an allowlist: an op that is neither counted by a handle nor known to be free fails."""
    with pytest.raises(UncountedOpError, match=op.replace(".", r"\.")) as info:
        mhsa_flops_per_image(fn, torch.randn(2, 1, 4, 4))
    assert op in info.value.ops


def test_register_flop_handle_validates():
    with pytest.raises(ValueError):
        register_flop_handle("no_namespace", zero_flop_handle)
    with pytest.raises(TypeError):
        register_flop_handle("aten::foo", 3)


def test_count_flops_validates_inputs():
    with pytest.raises(ValueError, match="B, C, H, W"):
        count_flops(OneBlock(Fn(lambda t: t)), torch.randn(3, 4))
    with pytest.raises(ValueError, match="blocks"):
        count_flops(Fn(lambda t: t), torch.randn(1, 1, 2, 2))


# --------------------------------------------------------------------------- timm ViTs
def test_tiny_profile_closed_forms_and_restored_modes():
    """``tiny`` profile (4 blocks, width 32, 17 tokens): MHSA = 4 * 2 * 17^2 * 32, and the attention
    modules add qkv (N * D * 3D) and proj (N * D * D) per block."""
    model = create_backbone("tiny")
    model.train()
    model.blocks[1].eval()  # a mixed state must come back as it was
    depth, n, d = 4, 17, 32
    report = count_flops(model, torch.randn(2, 1, 28, 28))
    assert report.mhsa_mflops * 1e6 == pytest.approx(dense_mhsa_flops(depth, n, d))
    assert report.per_layer_mhsa_mflops == [pytest.approx(2 * n * n * d / 1e6)] * depth
    assert report.mhsa_proj_mflops * 1e6 == pytest.approx(dense_mhsa_flops(depth, n, d) + depth * 4 * n * d * d)
    assert model.training and not model.blocks[1].training and model.blocks[0].training
    assert isinstance(report, FlopReport)
    assert set(report.to_dict()) == {"mhsa_mflops", "mhsa_proj_mflops", "total_gflops",
                                     "per_layer_mhsa_mflops", "batch_size"}


def _set_fused(model: nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


@pytest.fixture(scope="module")
def deit_s() -> nn.Module:
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def deit_s_counts(deit_s) -> dict[bool, FlopReport]:
    """DeiT-S counted on timm's fused (SDPA) and unfused (two matmuls) attention paths, batch 1."""
    x = torch.randn(1, 3, 224, 224)
    out = {}
    try:
        for fused in (True, False):
            _set_fused(deit_s, fused)
            out[fused] = count_flops(deit_s, x)
    finally:
        _set_fused(deit_s, timm.layers.use_fused_attn())
    return out


def test_deit_s_mhsa_and_total(deit_s_counts):
    expected = 12 * 2 * 197 ** 2 * 384
    assert expected == dense_mhsa_flops(12, 197, 384)
    for report in deit_s_counts.values():
        assert report.mhsa_mflops * 1e6 == pytest.approx(expected)
        assert round(report.mhsa_mflops, 2) == 357.66
        assert round(report.total_gflops, 3) == 4.608


def test_deit_s_fused_equals_unfused(deit_s_counts):
    fused, unfused = deit_s_counts[True], deit_s_counts[False]
    assert fused.to_dict() == pytest.approx(unfused.to_dict())


def test_deit_s_cross_check_torch_flop_counter(deit_s, deit_s_counts):
    """Independent count: torch's FlopCounterMode (2 FLOPs per MAC) on the unfused path, attention
    modules minus qkv and proj. (On CPU it does not count the fused kernel, hence the unfused path.)"""
    _set_fused(deit_s, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            deit_s(torch.randn(1, 3, 224, 224))
    finally:
        _set_fused(deit_s, timm.layers.use_fused_attn())
    counts = counter.get_flop_counts()

    def flops(name):
        return sum(counts.get(f"VisionTransformer.{name}", {}).values()) / 2

    per_layer = [flops(f"blocks.{i}.attn") - flops(f"blocks.{i}.attn.qkv") - flops(f"blocks.{i}.attn.proj")
                 for i in range(12)]
    assert [v / 1e6 for v in per_layer] == pytest.approx(deit_s_counts[True].per_layer_mhsa_mflops)


def test_deit_t_384_mhsa():
    """DeiT-T at 384x384 (577 tokens). timm 1.0 has no ``deit_tiny_patch16_384``: the same architecture
    is ``deit_tiny_patch16_224`` built at ``img_size=384``."""
    name = "deit_tiny_patch16_384" if timm.is_model("deit_tiny_patch16_384") else "deit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, img_size=384)
    assert model.patch_embed.num_patches + 1 == 577
    report = count_flops(model, torch.randn(1, 3, 384, 384))
    assert report.mhsa_mflops * 1e6 == pytest.approx(dense_mhsa_flops(12, 577, 192))
    assert round(report.mhsa_mflops, 2) == 1534.14


# --------------------------------------------------------------------------- paper convention
def test_dense_closed_forms():
    assert round(dense_mhsa_flops(12, 197, 384) / 1e6, 2) == 357.66  # DeiT-S
    assert round(dense_mhsa_flops(16, 197, 384) / 1e6, 2) == 476.88  # LV-ViT-S
    assert round(dense_mhsa_flops(12, 577, 192) / 1e6, 2) == 1534.14  # DeiT-T at 384


@pytest.mark.parametrize("rho,paper", [(0.7, 193.09), (0.5, 149.05)])
def test_token_pruning_paper_convention_deit_s(rho, paper):
    k = [math.ceil(rho ** s * 196 - 1e-9) for s in (1, 2, 3)]
    by_hand = 768 * (4 * 197 ** 2 + 3 * (k[0] ** 2 + 197) + 3 * (k[1] ** 2 + 197) + 2 * (k[2] ** 2 + 197))
    got = token_pruning_paper_flops(12, 197, 384, rho, (3, 6, 9))
    assert got == by_hand
    assert round(got / 1e6, 2) == paper
    assert token_pruning_paper_flops(12, 197, 384, rho) == got  # default stages (3, 6, 9)


def test_token_pruning_paper_convention_generalises():
    """LV-ViT-S: 16 blocks, stages (4, 8, 12): 5 dense layers, then 4, 4, 3."""
    rho = 0.7
    k = [keep_count(rho ** s, 196) for s in (1, 2, 3)]
    by_hand = 768 * (5 * 197 ** 2 + 4 * (k[0] ** 2 + 197) + 4 * (k[1] ** 2 + 197) + 3 * (k[2] ** 2 + 197))
    assert token_pruning_paper_flops(16, 197, 384, rho, (4, 8, 12)) == by_hand
    assert token_pruning_paper_flops(16, 197, 384, rho) == by_hand
    assert token_pruning_paper_flops(12, 197, 384, 1.0) == dense_mhsa_flops(12, 197, 384)
    for bad in [dict(keep_rate=0.0), dict(keep_rate=1.5), dict(stages=(6, 3)), dict(stages=(3, 12))]:
        args = dict(depth=12, n_tokens=197, dim=384, keep_rate=0.7, stages=(3, 6, 9)) | bad
        with pytest.raises(ValueError):
            token_pruning_paper_flops(**args)


# --------------------------------------------------------------------------- EViT (measured)
def evit_schedule(n: int, depth: int, rho: float, stages=(3, 6, 9)) -> list[int]:
    """Tokens each block's MHSA sees under EViT: after a pruning block, cls + ceil(rho (n-1)) + fused."""
    seen = []
    for layer in range(depth):
        seen.append(n)
        if layer in stages:
            n = 1 + math.ceil(rho * (n - 1) - 1e-9) + 1
    return seen


@pytest.fixture(scope="module")
def evit_model(deit_s):
    pytest.importorskip("methods.evit")
    return copy.deepcopy(deit_s)


@pytest.mark.parametrize("rho,measured", [(0.7, 195.38), (0.5, 149.70)])
def test_evit_deit_s_measured(evit_model, rho, measured):
    from methods.evit import apply_evit

    apply_evit(evit_model, rho)
    report = count_flops(evit_model, torch.randn(1, 3, 224, 224))
    seen = evit_schedule(197, 12, rho)
    assert report.per_layer_mhsa_mflops == pytest.approx([2 * 384 * n * n / 1e6 for n in seen])
    assert report.mhsa_mflops * 1e6 == pytest.approx(768 * sum(n * n for n in seen))
    assert round(report.mhsa_mflops, 2) == measured
