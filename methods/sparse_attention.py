"""Sparsifiner's attention core, framework-free (plain torch; no Lightning, no timm).

Wei et al., "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers", CVPR 2023, section 3. Per layer and head (shapes ``[B, H, ...]``; ``N`` tokens,
``d`` head dim, ``n_down`` the low rank):

* eq. 1, low-rank attention ``A_down = softmax(Q (W_down K)^T / sqrt(d))``, ``W_down [n_down, N]``,
  ``A_down [B, H, Nq, n_down]`` (the *basis coefficients*);
* eq. 2, sparse coefficients ``A~_down = A_down * 1[A_down > tau]`` (``tau = 0.05``);
* eq. 3, connectivity scores ``A~_down @ W_up`` with the sparse up-projection (*sparse basis*)
  ``W_up [n_down, N]`` whose entries with ``|w| < 1e-2`` are zero, and the connectivity mask
  ``M = 1[top-B(scores)]``: exactly ``B = ceil(keep_rate * N)`` keys per query row;
* eq. 4-6, sparse MHSA: ``softmax(q k^T / sqrt(d))`` evaluated only at the ``B`` kept keys of each row
  and the sparse attention-value product, through :func:`bench_suite.kernels.sparse_attention` (the one
  dispatcher: the PyTorch gather reference, the fused C++ kernels, or a registered implementation; no
  dense ``N x N`` tensor); :func:`dense_masked_attention` is the dense ``masked_fill(-inf)`` reference
  (the official code's way) used by the tests.

The query rows of the predictor and of the sparse product may be a subset of the tokens
(``Nq <= Nk``): by default the CLS query row is kept full (see :func:`sparsifiner_attention`).

FLOP counting (``bench_suite.flops``, 1 MAC = 1 FLOP, per head)
---------------------------------------------------------------
While ``torch.jit`` traces the model (fvcore), the dense emulations of sparse products run through
custom ops that fvcore counts exactly:

* ``bench_suite::sparse_attention`` (shape-exact handle, :mod:`bench_suite.kernels`): ``2 * Nq * Bk * d``
  (``q k`` at the mask's nonzeros and the attention-value product), whatever implementation runs inside;
* ``sparsifiner::sparse_sparse_matmul`` (zero handle) plus a :func:`bench_suite.flops.mark_macs` marker
  with the measured ``sum over nonzeros (i, j) of A~_down of nnz(W_up[j, :])``;
* ``sparsifiner::position_mix`` (zero handle) plus a marker with ``n_down * nnz`` of the soft-position
  rows that are not one-hot (Sparsif-EViT's fused token; a one-hot row is a free gather).

The low-rank products ``W_down K`` (``n_down N d``) and ``Q K_down^T`` (``Nq n_down d``) are plain
matmuls that fvcore counts from shapes. Thresholds, softmax and top-k are free (the paper's convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench_suite.backbones import keep_count
from bench_suite.flops import mark_macs, register_flop_handle, zero_flop_handle
from bench_suite.kernels import CONNECTIVITY_TOPK_IMPLS, DEFAULT_IMPL, sparse_attention
from bench_suite.kernels.fused import fused_applies, lowrank_coefficients_cpp, sparse_attention_rows_cpp

__all__ = [
    "attention_budget",
    "default_n_down",
    "sparse_attention_probs",
    "dense_masked_attention",
    "topk_connectivity",
    "indices_to_mask",
    "mask_recall",
    "lowrank_attention",
    "threshold_coefficients",
    "threshold_basis",
    "connectivity_scores",
    "sparse_product_macs",
    "mix_positions",
    "position_mix_macs",
    "map_attention_to_tokens",
    "PredictorOutput",
    "ConnectivityPredictor",
    "SparsifinerResult",
    "sparsifiner_attention",
    "sparsifiner_mhsa_macs",
]

# --------------------------------------------------------------------------- budget and sizes
def attention_budget(keep_rate: float, n_keys: int) -> int:
    """Attention budget ``B = ceil(keep_rate * n_keys)`` (paper sec. 4), at least 1 and at most ``n_keys``.

    DeiT-S (197 tokens): 0.5 -> 99, 0.25 -> 50, 0.1 -> 20 (paper Table 2 "Att. num.").

    Raises:
        ValueError: for a keep rate outside (0, 1] or ``n_keys < 1``.
    """
    if not 0.0 < float(keep_rate) <= 1.0:
        raise ValueError(f"attention keep rate must lie in (0, 1], got {keep_rate!r}")
    if n_keys < 1:
        raise ValueError(f"need at least one key, got n_keys={n_keys}")
    return min(int(n_keys), max(1, keep_count(float(keep_rate), int(n_keys))))


def default_n_down(n_tokens: int, floor: int = 8, paper: int = 32) -> int:
    """The predictor's low rank ``n_down``. The paper uses 32 in all its experiments (sec. 4: DeiT-S,
    LV-ViT-S at 197 tokens and DeiT-T at 384 with 577 tokens); for the small CPU profiles it is scaled
    down with the token count, ``round(32 * N / 197)``, at least ``floor``, never above 32 or ``N``.
    DeiT-S 32, DeiT-T-384 32, ``mini`` (50 tokens) 8, ``tiny`` (17 tokens) 8.

    Raises:
        ValueError: for ``n_tokens < 1``.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return int(min(n_tokens, paper, max(floor, round(paper * n_tokens / 197))))


# --------------------------------------------------------------------------- sparse attention (eq. 4-6)
def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, H, Nk, d]``, ``idx [B, H, Nq, Bk]`` -> ``x`` at the indices, ``[B, H, Nq, Bk, d]``."""
    b, h, nq, bk = idx.shape
    d = x.shape[-1]
    flat = idx.reshape(b, h, nq * bk, 1).expand(b, h, nq * bk, d)
    return torch.gather(x, 2, flat).view(b, h, nq, bk, d)


def sparse_attention_probs(q: Tensor, k: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Attention probabilities at the selected keys only (paper eq. 4): ``softmax_j((q_i . k_idx[i,j]) * scale)``.

    Args:
        q: queries ``[B, H, Nq, d]``.
        k: keys ``[B, H, Nk, d]``.
        idx: selected key indices per query ``[B, H, Nq, Bk]`` (int64, values in ``[0, Nk)``).
        scale: logit scale, ``d ** -0.5``.

    Returns:
        ``[B, H, Nq, Bk]``: each row sums to 1 over its ``Bk`` keys.
    """
    k_sel = _gather_rows(k, idx)  # [B, H, Nq, Bk, d]
    logits = torch.matmul(k_sel, (q * scale).unsqueeze(-1)).squeeze(-1)  # [B, H, Nq, Bk]
    return logits.softmax(dim=-1)


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense reference of the sparse MHSA: ``softmax(masked_fill(q k^T * scale, ~mask, -inf)) v``.

    The official code's (dense, no speed-up) form of eq. 4-6; used to check the sparse implementations.

    Args:
        q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]``; mask: bool ``[B, H, Nq, Nk]`` (every row needs
            at least one ``True``); scale: logit scale.

    Returns:
        ``(out [B, H, Nq, d], probs [B, H, Nq, Nk])``, zeros outside the mask.
    """
    logits = torch.matmul(q * scale, k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.matmul(probs, v), probs


# --------------------------------------------------------------------------- connectivity mask predictor
def topk_connectivity(scores: Tensor, budget: int) -> Tensor:
    """Top-``B`` key indices of every query row of the connectivity scores (paper eq. 3).

    Exactly ``budget`` distinct keys per row, also when fewer than ``budget`` scores are nonzero
    (ties broken by ``torch.topk``), as the official code.

    Args:
        scores: ``[..., Nq, Nk]`` (no gradient is taken through the mask).
        budget: ``B`` in ``[1, Nk]``.

    Returns:
        int64 ``[..., Nq, B]``.

    Raises:
        ValueError: for a budget outside ``[1, Nk]``.
    """
    if not 1 <= budget <= scores.shape[-1]:
        raise ValueError(f"budget must lie in [1, {scores.shape[-1]}], got {budget}")
    return torch.topk(scores.detach(), budget, dim=-1, sorted=False).indices


def indices_to_mask(idx: Tensor, n_keys: int) -> Tensor:
    """Binary connectivity mask ``M`` (bool ``[..., Nq, n_keys]``) from key indices ``[..., Nq, B]``."""
    mask = torch.zeros(*idx.shape[:-1], n_keys, dtype=torch.bool, device=idx.device)
    # a tensor source, not the scalar True: torch.jit's tracer (FLOP counting) rejects scatter_ with a bool scalar
    return mask.scatter(-1, idx, torch.ones_like(idx, dtype=torch.bool))


def mask_recall(idx: Tensor, target: Tensor) -> Tensor:
    """Recall of a connectivity mask against a target attention map: per query row, the fraction of the
    ``B`` largest target entries (the teacher's top-``B`` keys) whose keys the mask keeps.

    A random mask of ``B`` of ``Nk`` keys has expected recall ``B / Nk`` (about the keep rate); the
    oracle mask (the target's own top-``B``) has recall 1, and so does any mask at ``B = Nk``.

    Args:
        idx: kept key indices ``[..., Nq, B]`` (int64, distinct per row).
        target: the target attention ``[..., Nq, Nk]`` (e.g. the teacher's probabilities of those rows).

    Returns:
        ``[..., Nq]`` recall per query row, in ``[0, 1]``.

    Raises:
        ValueError: if the leading shapes differ or ``B > Nk``.
    """
    if idx.shape[:-1] != target.shape[:-1] or idx.shape[-1] > target.shape[-1]:
        raise ValueError(f"mask indices {tuple(idx.shape)} do not fit the target {tuple(target.shape)}")
    budget = idx.shape[-1]
    top = torch.topk(target, budget, dim=-1).indices  # the target's top-B keys
    hits = indices_to_mask(idx, target.shape[-1]).gather(-1, top)  # [..., Nq, B]
    return hits.to(target.dtype).mean(-1)


def lowrank_attention(q: Tensor, k: Tensor, w_down: Tensor, scale: float) -> Tensor:
    """Low-rank attention, the basis coefficients (paper eq. 1): ``softmax(Q (W_down K)^T * scale)``.

    Args:
        q: ``[B, H, Nq, c]``; k: ``[B, H, Nk, c]``.
        w_down: ``[Hw, n_down, Nk]`` (``Hw`` is 1, shared by the heads, or ``H``) or per sample
            ``[B, Hw, n_down, Nk]``.
        scale: ``c ** -0.5``.

    Returns:
        ``A_down [B, H, Nq, n_down]``, rows summing to 1.
    """
    k_down = torch.matmul(w_down, k)  # [B, H, n_down, c]  (n_down * Nk * c MACs per head)
    return torch.matmul(q * scale, k_down.transpose(-2, -1)).softmax(dim=-1)  # Nq * n_down * c MACs


def threshold_coefficients(a_down: Tensor, tau: float, topk: int | None = None) -> Tensor:
    """Sparse basis coefficients (paper eq. 2): entries ``<= tau`` become 0 (gradient only through the
    kept entries). ``topk``: keep the ``topk`` largest per row instead (the official config's
    ``BASIS_COEF.USE_TOPK``, 8)."""
    if topk is not None:
        kept = torch.topk(a_down.detach(), min(int(topk), a_down.shape[-1]), dim=-1).indices
        return a_down * indices_to_mask(kept, a_down.shape[-1]).to(a_down.dtype)
    return a_down * (a_down > tau).to(a_down.dtype)


def threshold_basis(w_up: Tensor, threshold: float) -> Tensor:
    """Sparse basis ``W_up`` (paper sec. 3, eq. 3; sec. 4): entries with ``|w| < threshold`` become 0.
    The gradient reaches the kept entries only (the derivative of ``w * 1[|w| >= t]``)."""
    if threshold <= 0:
        return w_up
    return w_up * (w_up.detach().abs() >= threshold).to(w_up.dtype)


@torch.library.custom_op("sparsifiner::sparse_sparse_matmul", mutates_args=())
def _sparse_sparse_matmul_op(coef: Tensor, w_up: Tensor) -> Tensor:
    """Dense emulation of ``A~_down @ W_up`` for the FLOP trace (zero handle; real MACs marked)."""
    return torch.matmul(coef, w_up)


@_sparse_sparse_matmul_op.register_fake
def _(coef: Tensor, w_up: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(coef.shape[:-2], w_up.shape[:-2]) + (coef.shape[-2], w_up.shape[-1])
    return coef.new_empty(shape)


def sparse_product_macs(coef: Tensor, w_up: Tensor) -> int:
    """MACs of the sparse-sparse product ``A~_down @ W_up`` (paper eq. 3): for every nonzero
    ``A~_down[b, h, i, j]``, the number of nonzeros of row ``j`` of ``W_up`` (of its head / sample).

    Args:
        coef: ``[B, H, Nq, n_down]``; w_up: ``[Hw, n_down, Nk]`` or ``[B, Hw, n_down, Nk]`` (``Hw`` 1 or ``H``).
    """
    row_nnz = (w_up != 0).sum(-1).to(torch.float64)  # [(B,) Hw, n_down]
    if row_nnz.ndim == 2:
        row_nnz = row_nnz.unsqueeze(0)
    per = (coef != 0).to(torch.float64) * row_nnz.unsqueeze(-2)  # [B, H, Nq, n_down]
    return int(per.sum().round().item())


def connectivity_scores(coef: Tensor, w_up: Tensor) -> Tensor:
    """Connectivity scores ``A~_down @ W_up`` (paper eq. 3, the argument of top-k; also eq. 10).

    Runs as a dense matmul (both operands are stored dense); while tracing, the op is counted at the
    real nonzeros (:func:`sparse_product_macs`) and not from its dense shape.

    Args:
        coef: sparse coefficients ``[B, H, Nq, n_down]``; w_up: sparse basis ``[Hw, n_down, Nk]`` or
            ``[B, Hw, n_down, Nk]``.

    Returns:
        ``[B, H, Nq, Nk]``.
    """
    if torch.jit.is_tracing():

        return mark_macs(_sparse_sparse_matmul_op(coef, w_up), sparse_product_macs(coef, w_up))
    return torch.matmul(coef, w_up)


@torch.library.custom_op("sparsifiner::position_mix", mutates_args=())
def _position_mix_op(w: Tensor, positions: Tensor) -> Tensor:
    """Dense emulation of :func:`mix_positions` for the FLOP trace (zero handle; real MACs marked)."""
    return torch.matmul(w.unsqueeze(0), positions.transpose(-2, -1).unsqueeze(1))


@_position_mix_op.register_fake
def _(w: Tensor, positions: Tensor) -> Tensor:
    return w.new_empty((positions.shape[0], w.shape[0], w.shape[1], positions.shape[1]))


def position_mix_macs(n_rows: int, positions: Tensor) -> int:
    """MACs of :func:`mix_positions` for ``n_rows`` weight rows (``Hw * n_down``): one-hot position
    rows are gathers (free); every other row costs its nonzeros per weight row."""
    nnz = (positions != 0).sum(-1)  # [B, N]
    return int(n_rows * nnz[nnz > 1].sum().item())


def mix_positions(w: Tensor, positions: Tensor) -> Tensor:
    """Token-indexed predictor weights for tokens at soft positions (Sparsif-EViT after token pruning).

    ``W [Hw, n_down, N0]`` is indexed by the original token positions; a token whose position is the
    row-stochastic ``p [N0]`` (one-hot for a kept token, the normalised fusion weights for EViT's
    fused token) gets the column ``W p``.

    Args:
        w: ``[Hw, n_down, N0]``; positions: ``[B, N, N0]`` rows summing to 1.

    Returns:
        ``[B, Hw, n_down, N]``.
    """
    if torch.jit.is_tracing():

        macs = position_mix_macs(w.shape[0] * w.shape[1], positions)
        return mark_macs(_position_mix_op(w, positions), macs)
    return torch.matmul(w.unsqueeze(0), positions.transpose(-2, -1).unsqueeze(1))


def map_attention_to_tokens(attn: Tensor, positions: Tensor) -> Tensor:
    """An attention map over the original tokens, seen from tokens at soft positions (after EViT).

    Query rows are averaged with the position weights (a kept token's row is its original row, the
    fused token's row the weighted mean of the rows it fused); key columns are summed over the
    positions a token covers (attention to the fused token is the attention to everything it fused).

    Args:
        attn: ``[B, H, N0, N0]`` (rows sum to 1); positions: row-stochastic ``[B, N, N0]``.

    Returns:
        ``[B, H, N, N]`` (rows still sum to 1 when every original position is covered by a token).
    """
    rows = torch.einsum("bnm,bhmk->bhnk", positions, attn)
    return torch.einsum("bhnk,bjk->bhnj", rows, (positions > 0).to(rows.dtype))


@dataclass
class PredictorOutput:
    """What the connectivity mask predictor computed (paper eq. 1-3).

    Attributes:
        a_down: low-rank attention ``A_down [B, H, Nq, n_down]`` (eq. 1); ``None`` on the fused inference
            path, which computes ``coef`` directly (:func:`bench_suite.kernels.fused.lowrank_coefficients_cpp`).
        coef: sparse coefficients ``A~_down`` (eq. 2), same shape.
        w_up: the sparse basis used, ``[Hw, n_down, Nk]`` or per sample ``[B, Hw, n_down, Nk]``.
        scores: connectivity scores ``A~_down @ W_up`` ``[B, H, Nq, Nk]`` (eq. 3, 10).
    """

    a_down: Tensor | None
    coef: Tensor
    w_up: Tensor
    scores: Tensor | None


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's connectivity mask predictor of one layer (paper eq. 1-3).

    Parameters ``w_down [Hw, n_down, N]`` (the token down-projection ``W_down``) and
    ``w_up [Hw, n_down, N]`` (the up-projection ``W_up``, the *sparse basis*), initialised with a
    truncated normal of std 0.02 as the official code. ``Hw = 1`` (default) shares them by the heads of
    the layer, as the official code and the paper's Fig. 6 (one ``W_up`` per layer); ``Hw = H`` gives
    each head its own. The coefficients ``A_down`` are per head.

    Args:
        num_tokens: ``N``, the tokens the weights are indexed by (all tokens, CLS included).
        head_dim: ``d``.
        num_heads: ``H``.
        n_down: the low rank (paper 32 at 197 tokens; :func:`default_n_down`).
        tau: coefficient threshold of eq. 2 (paper 0.05).
        w_up_threshold: magnitude below which ``W_up`` entries are zero (paper 1e-2).
        shared_heads: one ``W_down``/``W_up`` per layer (True) or per head.
        reduce_c_factor: > 1 projects ``q``/``k`` from ``d`` to ``d // factor`` channels before eq. 1
            (the official code's ``proj_c_q``/``proj_c_k``, factor 2; the paper has no such step).
        coef_topk: keep the top-k coefficients per row instead of thresholding at ``tau`` (official 8).

    Attributes:
        threshold_coef, threshold_w_up: apply eq. 2's coefficient threshold (``tau`` or ``coef_topk``) and the
            ``W_up`` threshold while the module trains (both True by default). Outside training (evaluation,
            FLOP counting) both thresholds always apply. The Sparsifiner LightningModule turns both off for
            its phase-1 training forward, as the official code trains the predictor on the dense
            coefficients and the unthresholded basis (``USE_ATTN_RECON``).
        allow_fused: let inference take the fused coefficient kernel (default True; see :meth:`forward`).

    Raises:
        ValueError: for sizes < 1, ``n_down > num_tokens``, or thresholds < 0.
    """

    def __init__(self, num_tokens: int, head_dim: int, num_heads: int, n_down: int, tau: float = 0.05,
                 w_up_threshold: float = 1e-2, shared_heads: bool = True, reduce_c_factor: int = 1,
                 coef_topk: int | None = None) -> None:
        super().__init__()
        if min(num_tokens, head_dim, num_heads, n_down, reduce_c_factor) < 1 or n_down > num_tokens:
            raise ValueError(f"invalid predictor sizes: N={num_tokens}, d={head_dim}, H={num_heads}, "
                             f"n_down={n_down}, reduce_c_factor={reduce_c_factor} (need 1 <= n_down <= N)")
        if tau < 0 or w_up_threshold < 0:
            raise ValueError(f"thresholds must be >= 0, got tau={tau}, w_up_threshold={w_up_threshold}")
        if coef_topk is not None and coef_topk < 1:
            raise ValueError(f"coef_topk must be >= 1, got {coef_topk}")
        self.num_tokens, self.head_dim, self.num_heads, self.n_down = num_tokens, head_dim, num_heads, n_down
        self.tau, self.w_up_threshold, self.coef_topk = float(tau), float(w_up_threshold), coef_topk
        self.threshold_coef = True
        self.threshold_w_up = True
        self.allow_fused = True
        hw = 1 if shared_heads else num_heads
        self.w_down = nn.Parameter(torch.empty(hw, n_down, num_tokens))
        self.w_up = nn.Parameter(torch.empty(hw, n_down, num_tokens))
        nn.init.trunc_normal_(self.w_down, std=0.02)
        nn.init.trunc_normal_(self.w_up, std=0.02)
        self.channels = head_dim // reduce_c_factor
        if reduce_c_factor > 1:
            self.proj_c_q = nn.Linear(head_dim, self.channels)
            self.proj_c_k = nn.Linear(head_dim, self.channels)
        else:
            self.proj_c_q = self.proj_c_k = None

    def sparse_w_up(self) -> Tensor:
        """``W_up [Hw, n_down, N]`` with entries ``|w| < w_up_threshold`` zeroed (unless training with
        :attr:`threshold_w_up` off).

        Without a graph to record (no gradient mode, or a frozen ``W_up``) the thresholded basis is computed once
        and reused until ``W_up`` changes (its storage or version counter: optimiser steps, ``load_state_dict``,
        :meth:`prune_`) or the threshold does: a fixed basis after training, as deployed (four small tensor ops
        per layer and forward otherwise)."""
        if self.training and not self.threshold_w_up:
            return self.w_up
        w = self.w_up
        if torch.is_grad_enabled() and w.requires_grad:
            return threshold_basis(w, self.w_up_threshold)
        key = (w.data_ptr(), w._version, w.shape, w.dtype, w.device, self.w_up_threshold)
        cached = self.__dict__.get("_sparse_w_up_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode too
            basis = threshold_basis(w.detach(), self.w_up_threshold)
        self.__dict__["_sparse_w_up_cache"] = (key, basis)
        return basis

    def sparse_coefficients(self, a_down: Tensor) -> Tensor:
        """Eq. 2 on ``A_down [B, H, Nq, n_down]`` (unless training with :attr:`threshold_coef` off)."""
        if self.training and not self.threshold_coef:
            return a_down
        return threshold_coefficients(a_down, self.tau, self.coef_topk)

    @torch.no_grad()
    def prune_(self) -> int:
        """Zero the ``W_up`` entries below the threshold in place (sec. 4, "pruned after training");
        returns how many entries are zero afterwards."""
        self.w_up.mul_((self.w_up.abs() >= self.w_up_threshold).to(self.w_up.dtype))
        return int((self.w_up == 0).sum())

    @torch.no_grad()
    def w_up_sparsity(self) -> float:
        """Fraction of ``W_up`` entries with ``|w| < w_up_threshold`` (paper: ~90%)."""
        return float((self.w_up.abs() < self.w_up_threshold).float().mean())

    def forward(self, q: Tensor, k: Tensor, positions: Tensor | None = None,
                need_scores: bool = True, fused_impl: str | None = None) -> PredictorOutput:
        """Eq. 1-3 up to the scores.

        Args:
            q: query rows ``[B, H, Nq, d]`` (``Nq <= Nk``, e.g. without the CLS row).
            k: keys ``[B, H, Nk, d]``.
            positions: ``None`` when the ``Nk`` tokens are the ``N`` original tokens in order; else the
                row-stochastic soft positions ``[B, Nk, N]`` of the tokens (:func:`mix_positions`).
            need_scores: compute the dense scores ``A~_down @ W_up`` (else ``scores`` is ``None``).
            fused_impl: the sparse attention implementation of the caller; in evaluation (or training with
                both thresholds on, as in phase 2), without ``positions``, ``reduce_c_factor`` or a gradient,
                and where :func:`bench_suite.kernels.fused.fused_applies`, eq. 1-2 run as one fused kernel on
                the strided ``q``/``k`` (no copies) and ``a_down`` is ``None``.

        Raises:
            ValueError: if ``Nk`` does not match the weights and no positions are given.
        """
        n_keys = k.shape[2]
        if (fused_impl is not None and not need_scores and positions is None and self.proj_c_q is None
                and self.allow_fused and n_keys == self.num_tokens and self.n_down <= 64
                and (not self.training or (self.threshold_coef and self.threshold_w_up))
                and fused_applies(fused_impl, q, k)):
            coef = lowrank_coefficients_cpp(q, k, self.w_down, self.channels ** -0.5, self.tau, self.coef_topk)
            return PredictorOutput(None, coef, self.sparse_w_up(), None)
        w_down, w_up = self.w_down, self.sparse_w_up()
        if positions is not None:
            w_down, w_up = mix_positions(w_down, positions), mix_positions(w_up, positions)
        elif n_keys != self.num_tokens:
            raise ValueError(f"predictor built for {self.num_tokens} tokens got {n_keys} (pass positions)")
        if self.proj_c_q is not None:
            q, k = self.proj_c_q(q), self.proj_c_k(k)
        a_down = lowrank_attention(q, k, w_down, self.channels ** -0.5)
        coef = self.sparse_coefficients(a_down)
        return PredictorOutput(a_down, coef, w_up, connectivity_scores(coef, w_up) if need_scores else None)


# --------------------------------------------------------------------------- the whole attention core
@dataclass
class SparsifinerResult:
    """Output of :func:`sparsifiner_attention`.

    Attributes:
        out: attention output ``[B, H, N, d]`` (before merging heads).
        cls_attn: attention probabilities of the CLS query row ``[B, H, N]`` (dense layout, zeros at
            keys outside its mask), or ``None`` if not asked for.
        budget: ``B``, keys per predicted query row.
        idx: kept key indices of the predicted rows ``[B, H, Nq, B]`` (``None`` in dense mode without
            the predictor).
        pred: the predictor's output, or ``None``.
        dense_probs: dense ``softmax(q k^T / sqrt(d))`` ``[B, H, N, N]`` if computed (dense mode or
            ``record``), else ``None``.
        records: for visualisation (``record=True``): ``mask`` (bool ``[B, H, N, N]``) and
            ``sparse_probs`` (``[B, H, N, N]``, zeros outside the mask).
    """

    out: Tensor
    cls_attn: Tensor | None
    budget: int
    idx: Tensor | None = None
    pred: PredictorOutput | None = None
    dense_probs: Tensor | None = None
    records: dict[str, Tensor] = field(default_factory=dict)


def sparsifiner_attention(q: Tensor, k: Tensor, v: Tensor, predictor: ConnectivityPredictor, keep_rate: float,
                          cls_full_row: bool = True, impl: str | None = None, dense: bool = False,
                          positions: Tensor | None = None, need_predictor: bool = True,
                          need_cls_attn: bool = False, record: bool = False,
                          need_scores: bool = False, budget: int | None = None,
                          cls_zero_keys: int = 0) -> SparsifinerResult:
    """Sparsifiner MHSA core: predictor (eq. 1-3), top-B connectivity mask, sparse attention (eq. 4-6).

    The CLS query row: with ``cls_full_row`` (default, the official code) the CLS token attends to all
    ``N`` keys densely and the predictor/mask cover the ``N - 1`` patch queries, each with
    ``B = ceil(keep_rate * N)`` keys (``nnz(M) = N + (N - 1) B`` per head); otherwise every row,
    the CLS row included, gets ``B`` predicted keys (``nnz(M) = N B``). The mask is not
    differentiated (detached, as the official code). Without a gradient, or with a frozen predictor (no
    parameter requiring a gradient: Sparsifiner's phase 2), the predictor runs without autograd on the fused
    kernels (:data:`bench_suite.kernels.CONNECTIVITY_TOPK_IMPLS`, :mod:`bench_suite.kernels.fused`) where the
    implementation has them: no dense ``[B, H, Nq, N]`` scores; the dense CLS row then runs inside the sparse
    attention kernel (forward and backward, output stored ``[B, N, H, d]``) unless ``need_cls_attn`` or
    ``cls_zero_keys`` ask for the separate row.

    Args:
        q, k, v: ``[B, H, N, d]`` (after timm's q/k norm, before scaling).
        predictor: the layer's :class:`ConnectivityPredictor`.
        keep_rate: attention keep rate in (0, 1].
        cls_full_row: keep the CLS query row dense.
        impl: sparse attention implementation (:data:`bench_suite.kernels.SPARSE_ATTENTION_IMPLS`).
        dense: full attention instead of sparse (training phase 1 of the official code); the predictor
            still runs if ``need_predictor``.
        positions: soft positions ``[B, N, N0]`` of the tokens (after token pruning), else ``None``.
        need_predictor: in dense mode, whether to run the predictor (for the distillation loss).
        need_cls_attn: return the CLS row's attention probabilities (EViT's token ranking).
        record: also return dense maps for visualisation.
        need_scores: the caller needs the connectivity scores ``pred.scores`` (the attention distillation
            loss): the dense scores are computed, not the fused top-B.
        budget: ``B`` keys per predicted row (default ``ceil(keep_rate * N)``; the official token-pruning
            variant passes ``min(ceil(keep_rate * N0), N - 1)``).
        cls_zero_keys: with ``cls_full_row``, this many extra keys with logit 0 and value 0 enter the CLS
            row's softmax denominator: the official code's masked token pruning zeroes the pruned tokens'
            keys and values but keeps them in the CLS row (its mask row is all ones), so each adds
            ``exp(0)`` to the denominator. 0 (default) for removed tokens.

    Raises:
        ValueError: for a keep rate outside (0, 1] or shapes the predictor does not fit.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5
    budget = attention_budget(keep_rate, n) if budget is None else int(budget)
    if not 1 <= budget <= n:
        raise ValueError(f"budget must lie in [1, {n}], got {budget}")
    first = 1 if cls_full_row else 0
    q_rows = q[:, :, first:]
    if dense:
        probs = torch.matmul(q * scale, k.transpose(-2, -1)).softmax(dim=-1)
        pred = predictor(q_rows, k, positions) if (need_predictor or record) else None
        res = SparsifinerResult(torch.matmul(probs, v), probs[:, :, 0] if need_cls_attn else None, budget,
                                pred=pred, dense_probs=probs)
        if record and pred is not None:
            res.idx = topk_connectivity(pred.scores, budget)
            res.records = _records(res, q, k, scale, cls_full_row, n)
        return res
    fused = None
    name = DEFAULT_IMPL if impl is None else impl
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    # the mask is detached, so a frozen predictor (Sparsifiner's phase 2) needs no graph: it runs without one,
    # on the fused kernels, while the sparse attention itself trains
    frozen = not any(p.requires_grad for p in predictor.parameters())
    if not (record or need_scores or torch.jit.is_tracing() or (grad and not frozen)):
        fused = CONNECTIVITY_TOPK_IMPLS.get(name)
    if fused is not None and grad:
        with torch.no_grad():
            pred = predictor(q_rows.detach(), k.detach(), positions, need_scores=False, fused_impl=name)
    else:
        pred = predictor(q_rows, k, positions, need_scores=fused is None, fused_impl=name if fused else None)
    idx = topk_connectivity(pred.scores, budget) if fused is None else fused(pred.coef, pred.w_up, budget)
    if (fused is not None and cls_full_row and not need_cls_attn and cls_zero_keys == 0
            and fused_applies(name, q, k, v, differentiable=True)):
        # the dense CLS row inside the kernel (forward and, in training, backward); output [B, N, H, d]
        return SparsifinerResult(sparse_attention_rows_cpp(q, k, v, idx, scale, 1), None, budget, idx=idx, pred=pred)
    out_rows = sparse_attention(q_rows, k, v, idx, scale, impl)
    cls_attn = None
    if cls_full_row:
        cls_probs = _cls_row_probs(torch.matmul(q[:, :, :1] * scale, k.transpose(-2, -1)), cls_zero_keys)  # [B,H,1,N]
        out = torch.cat([torch.matmul(cls_probs, v), out_rows], dim=2)
        if need_cls_attn:
            cls_attn = cls_probs[:, :, 0]
    else:
        out = out_rows
        if need_cls_attn:
            p0 = sparse_attention_probs(q[:, :, :1], k, idx[:, :, :1], scale)[:, :, 0]  # [B, H, B]
            cls_attn = torch.zeros(b, h, n, dtype=p0.dtype, device=p0.device).scatter(-1, idx[:, :, 0], p0)
    res = SparsifinerResult(out, cls_attn, budget, idx=idx, pred=pred)
    if record:
        res.records = _records(res, q, k, scale, cls_full_row, n)
    return res


def _cls_row_probs(logits: Tensor, zero_keys: int = 0) -> Tensor:
    """Softmax of the CLS row's logits ``[B, H, 1, N]``; with ``zero_keys`` extra logits 0 in the
    denominator (values 0, so they only dilute: the official masked token pruning, see
    :func:`sparsifiner_attention`)."""
    if zero_keys <= 0:
        return logits.softmax(dim=-1)
    m = logits.amax(dim=-1, keepdim=True).clamp_min(0.0)  # max over the real logits and the zero logits
    e = (logits - m).exp()
    return e / (e.sum(dim=-1, keepdim=True) + zero_keys * torch.exp(-m))


@torch.no_grad()
def _records(res: SparsifinerResult, q: Tensor, k: Tensor, scale: float, cls_full_row: bool, n: int) -> dict:
    """Dense connectivity mask, sparse and full attention maps ``[B, H, N, N]`` (visualisation only)."""
    full = torch.matmul(q * scale, k.transpose(-2, -1)).softmax(dim=-1)
    mask = indices_to_mask(res.idx, n)
    if cls_full_row:
        mask = torch.cat([torch.ones_like(mask[:, :, :1]), mask], dim=2)
    logits = torch.matmul(q * scale, k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    res.dense_probs = full if res.dense_probs is None else res.dense_probs
    return {"mask": mask, "sparse_probs": logits.softmax(-1), "full_probs": full}


def sparsifiner_mhsa_macs(n_tokens: int, head_dim: int, num_heads: int, n_down: int, budget: int,
                          coef_nnz_macs: int = 0, cls_full_row: bool = True, reduce_c_factor: int = 1) -> int:
    """Closed-form MHSA MACs of one Sparsifiner layer for one image (1 MAC = 1 FLOP).

    ``H * [n_down N c + Nq n_down c  (low-rank products, c = d / reduce_c_factor)
    + (2 Nq d c + ... projections if reduce_c_factor > 1)
    + 2 d nnz(M)  (q k at the mask and A V)] + coef_nnz_macs  (sparse-sparse product, measured)``,
    ``Nq = N - 1`` and ``nnz(M) = N + (N - 1) B`` with the full CLS row, else ``Nq = N``, ``nnz(M) = N B``.
    """
    nq = n_tokens - 1 if cls_full_row else n_tokens
    c = head_dim // reduce_c_factor
    lowrank = n_down * n_tokens * c + nq * n_down * c
    proj = (nq + n_tokens) * head_dim * c if reduce_c_factor > 1 else 0
    nnz_m = (n_tokens if cls_full_row else 0) + nq * budget
    return num_heads * (lowrank + proj + 2 * head_dim * nnz_m) + int(coef_nnz_macs)


register_flop_handle("sparsifiner::sparse_sparse_matmul", zero_flop_handle)  # counted by its mark_macs marker
register_flop_handle("sparsifiner::position_mix", zero_flop_handle)  # likewise
