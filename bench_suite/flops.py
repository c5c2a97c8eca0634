"""MHSA FLOP counting on top of fvcore's ``FlopCountAnalysis``.

Units: one multiply-accumulate (MAC) is one FLOP (fvcore's and the paper's convention, Wei et al., CVPR 2023);
MFLOPs = 1e6 FLOPs, GFLOPs = 1e9 FLOPs. Element-wise ops, softmax, normalisation of attention rows,
gathers, top-k and sorting are free, as in the paper.

What is counted (:func:`count_flops`):

* ``mhsa_mflops``, the paper's "MHSA FLOPs" (Wei et al., CVPR 2023, sec. 4, Table 1-4): everything executed inside
  each block's attention module ``blocks.<i>.attn`` except its ``qkv`` and ``proj`` Linear children,
  i.e. ``Q K^T`` and ``A V`` for dense attention, plus whatever a method runs inside the attention
  module (e.g. low-rank token projections of keys and values, a connectivity mask predictor and sparse
  products).
* ``mhsa_proj_mflops``: the whole attention modules, ``qkv`` and ``proj`` included.
* ``total_gflops``: the whole model as fvcore counts it (linear, conv, layer norm, attention).

All three are per image: the count of the given batch divided by its size ``B``. fvcore traces the model
with ``torch.jit`` on that very batch, so token-pruning methods (whose token counts depend on the
input) are counted with the tokens they really keep on this batch.

What fvcore gets wrong, and what this module does about it (:data:`FLOP_HANDLES`):

* ``aten::scaled_dot_product_attention`` (timm's default fused attention, ``timm.layers.use_fused_attn``)
  has no fvcore handle and is dropped *silently*: DeiT-S comes out at 4.251 G instead of 4.608 G.
  :func:`sdpa_flop_handle` counts it, so timm's fused and unfused paths give the same count.
* ``aten::baddbmm``/``addbmm``/``addmv``/``mv``/``dot`` have no handle (counted as zero with a warning).
* ``aten::matmul`` is under-counted when the operands broadcast (fvcore multiplies the *first*
  operand's size by the last dim of the second: a 2-D ``E [k, n]`` @ ``K [B, H, n, d]`` counts
  ``k n d`` instead of ``B H k n d``); :func:`matmul_flop_handle` broadcasts the batch dims.
* ``aten::einsum`` outside two special equations is estimated by numpy's ``einsum_path`` and rounded to
  4 significant digits (and halves outer products); :func:`einsum_flop_handle` is exact.
* Ops on sparse tensors trace without shapes, so a shape-based handle cannot count them. Every
  matmul-like handle here raises :class:`UncountedOpError` on an operand without a complete shape
  instead of crashing or guessing. Sparse code reports its real MACs with :func:`mark_macs`.

Fail loudly: after counting, any *uncounted* op that can hide multiply-accumulates (a name containing
matmul, mm, bmm, mv, dot, einsum, attention, linear, conv, sparse, ...; any custom op outside the
``aten`` namespace; any ``torch.autograd.Function``, which the tracer records as an opaque
``prim::PythonOp``) raises :class:`UncountedOpError`. fvcore's own warnings about free ops (add, mul,
softmax, gelu, topk, scatter, ...) are silenced.

Paper convention (pure closed forms, no model): :func:`dense_mhsa_flops`, :func:`token_pruning_paper_flops`.
"""
from __future__ import annotations

import math
import string
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

with warnings.catch_warnings():  # fvcore scripts a function with torch.jit at import: not the user's business
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_jit, linear_flop_jit
from torch import nn

from bench_suite.backbones import keep_count, pruning_stages

__all__ = [
    "FlopReport",
    "UncountedOpError",
    "Handle",
    "FLOP_HANDLES",
    "FREE_OPS",
    "register_flop_handle",
    "count_flops",
    "attention_module_names",
    "mark_macs",
    "measured_macs_flop_handle",
    "zero_flop_handle",
    "sdpa_flop_handle",
    "matmul_flop_handle",
    "addmm_like_flop_handle",
    "einsum_flop_handle",
    "inner_flop_handle",
    "einsum_macs",
    "dense_mhsa_flops",
    "token_pruning_paper_flops",
]

Handle = Callable[[list, list], Any]
"""An fvcore op handle: ``(inputs: list[torch._C.Value], outputs: list[torch._C.Value]) -> FLOPs``."""

FREE_OPS: frozenset[str] = frozenset({
    # element-wise arithmetic, comparisons and activations (the paper counts multiply-accumulates only)
    *(f"aten::{op}{suffix}" for op in (
        "add", "sub", "mul", "div", "neg", "abs", "pow", "sqrt", "rsqrt", "exp", "log", "log1p", "expm1",
        "reciprocal", "square", "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "masked_fill_",
        "sigmoid", "tanh", "relu", "gelu", "silu", "hardtanh", "erf", "sign", "round", "floor", "ceil",
        "trunc", "lerp", "nan_to_num", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
        "logical_not", "bitwise_and", "bitwise_or", "fill", "zero", "copy", "rsub", "add_", "mul_", "div_")
      for suffix in ("", "_")),
    # normalisation of attention rows, reductions and selections (free by the paper's convention)
    "aten::softmax", "aten::log_softmax", "aten::_softmax", "aten::sum", "aten::mean", "aten::amax",
    "aten::amin", "aten::max", "aten::min", "aten::argmax", "aten::argmin", "aten::cumsum", "aten::any",
    "aten::all", "aten::sort", "aten::argsort", "aten::topk", "aten::kthvalue",
    # indexing, scattering and tensor creation
    "aten::scatter", "aten::scatter_", "aten::scatter_add", "aten::scatter_add_", "aten::gather",
    "aten::index_select", "aten::index_add", "aten::index_add_", "aten::take_along_dim", "aten::one_hot",
    "aten::eye", "aten::ones", "aten::ones_like", "aten::new_ones", "aten::zeros", "aten::zeros_like",
    "aten::empty_like", "aten::full", "aten::full_like", "aten::arange", "aten::linspace", "aten::rand",
    "aten::randn", "aten::rand_like", "aten::randn_like", "aten::bernoulli", "aten::bernoulli_",
    "aten::repeat", "aten::repeat_interleave", "aten::expand_as", "aten::flip", "aten::tril", "aten::triu",
    "aten::alias", "aten::clone", "aten::dropout", "aten::feature_dropout",
})
"""Ops known to do no multiply-accumulate: counted as free without a word. fvcore ignores shape ops
(``view``, ``cat``, ``permute``, ...) itself. Every other op that the trace holds and no handle counts makes
:func:`count_flops` fail with :class:`UncountedOpError` naming it: an allowlist, not a blocklist, so a new
op (``torch.cdist`` in a plugin, say) is never silently counted as zero."""


class UncountedOpError(RuntimeError):
    """A multiply-accumulate op was traced but cannot be counted.

    Raised by :func:`count_flops` when such an op has no handle, and by the handles of this module when
    an operand has no complete shape (typically a sparse tensor). ``ops`` maps each offending op name to
    the number of times it occurred (1 when raised by a handle).
    """

    def __init__(self, message: str, ops: Mapping[str, int] | None = None) -> None:
        super().__init__(message)
        self.ops = dict(ops or {})


# --------------------------------------------------------------------------- shape helpers
def _is_tensor_value(value: Any) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _shape(value: Any, op: str, what: str) -> list[int]:
    """Complete shape of a traced tensor value, or :class:`UncountedOpError`."""
    if not value.isCompleteTensor():
        raise UncountedOpError(
            f"{op}: operand {what} has no complete shape in the trace (a sparse tensor?); its "
            f"multiply-accumulates cannot be counted from shapes. Report them with "
            f"bench_suite.flops.mark_macs and run the product through an op registered with "
            f"zero_flop_handle.", {op: 1})
    return list(value.type().sizes())


def _guard_shapes(op: str, handle: Handle) -> Handle:
    """Wrap a shape-based fvcore handle so that an operand without a complete shape raises
    :class:`UncountedOpError` (instead of an ``AssertionError``/``TypeError`` deep inside fvcore)."""

    def guarded(inputs: list, outputs: list) -> Any:
        for i, v in enumerate(inputs):
            if _is_tensor_value(v):
                _shape(v, op, f"#{i}")
        return handle(inputs, outputs)

    guarded.__name__ = f"guarded_{getattr(handle, '__name__', 'handle')}"
    guarded.__doc__ = handle.__doc__
    return guarded


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Broadcast two batch shapes (numpy rules; a dimension of size 1 stretches)."""
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [max(x, y) for x, y in zip(a, b)]


def _matmul_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """MACs of ``torch.matmul(A, B)`` with ``A``, ``B`` of the given shapes (all broadcasting cases).

    ``[k] @ [k]`` -> ``k``; ``[..., n, k] @ [k]`` -> ``prod(...) n k``; ``[k] @ [..., k, m]`` ->
    ``prod(...) k m``; ``[..., n, k] @ [..., k, m]`` -> ``prod(broadcast(...)) n k m``.
    """
    if len(a) == 0 or len(b) == 0:
        raise ValueError("matmul operands must have at least one dimension")
    if len(a) == 1 and len(b) == 1:
        return int(a[0])
    if len(b) == 1:
        return math.prod(a)
    if len(a) == 1:
        return math.prod(b)
    batch = _broadcast(a[:-2], b[:-2])
    return math.prod(batch) * int(a[-2]) * int(a[-1]) * int(b[-1])


# --------------------------------------------------------------------------- handles
def zero_flop_handle(inputs: list, outputs: list) -> int:
    """Counts an op as 0 FLOPs.

    For ops whose cost is reported by a :func:`mark_macs` marker instead (e.g. ``aten::_sparse_mm`` in a
    method that marks the real nonzeros of its sparse product), and for free format conversions
    (``to_sparse``, ``to_dense``, ...). Registering it for an op makes every use of that op free: do so
    only for ops all of whose uses in the counted models are marked (or pass it per call through
    ``count_flops(..., handles=...)``).
    """
    return 0


def sdpa_flop_handle(inputs: list, outputs: list, op: str = "aten::scaled_dot_product_attention") -> int:
    """``aten::scaled_dot_product_attention(query, key, value, attn_mask, ...)``.

    Shapes ``q [..., Nq, d]``, ``k [..., Nk, d]``, ``v [..., Nk, dv]`` with broadcasting batch dims
    ``[..., ]`` (usually ``[B, H]``; grouped-query ``k``/``v`` with fewer heads are repeated to ``H``).
    MACs = ``prod(...) * Nq * Nk * d`` (``Q K^T``) ``+ prod(...) * Nq * Nk * dv`` (``A V``), the same as
    timm's unfused path (two ``aten::matmul``). Scaling, masking, softmax and dropout are free; a causal
    mask is counted dense (the paper's convention counts the products, not the kernel's skipping).
    """
    q, k, v = (_shape(x, op, n) for x, n in zip(inputs[:3], ("query", "key", "value")))
    batch = _broadcast(q[:-2], k[:-2])
    return math.prod(batch) * q[-2] * k[-2] * (q[-1] + v[-1])


def matmul_flop_handle(inputs: list, outputs: list, op: str = "aten::matmul") -> int:
    """``aten::matmul``/``mm``/``bmm``/``mv``/``dot`` with numpy broadcasting: MACs =
    ``prod(broadcast batch) * n * k * m`` for ``[..., n, k] @ [..., k, m]`` (1-D operands as in
    ``torch.matmul``). Fixes fvcore's under-count of a 2-D @ batched product."""
    return _matmul_macs(_shape(inputs[0], op, "#0"), _shape(inputs[1], op, "#1"))


def addmm_like_flop_handle(inputs: list, outputs: list, op: str = "aten::baddbmm") -> int:
    """``aten::addmm``/``baddbmm``/``addbmm``/``addmv(self, A, B, beta, alpha)``: the MACs of ``A @ B``
    (``baddbmm``: ``[b, n, k] @ [b, k, m]`` -> ``b n k m``); adding ``beta * self`` is free."""
    return _matmul_macs(_shape(inputs[1], op, "#1"), _shape(inputs[2], op, "#2"))


def _for_op(handle: Callable[..., int], op: str) -> Handle:
    """``handle`` with ``op`` bound, so that its errors name the traced op."""

    def bound(inputs: list, outputs: list) -> int:
        return handle(inputs, outputs, op=op)

    bound.__name__ = f"{handle.__name__}[{op}]"
    bound.__doc__ = handle.__doc__
    return bound


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Exact MACs of ``torch.einsum(equation, *operands)`` for operands of the given shapes.

    A pairwise contraction costs one MAC per point of the index space spanned by the indices it keeps:
    the union of both operands' indices, without an index that occurs in one operand only and not in
    the result (torch sums such an index out before multiplying, which is free). One operand (a
    transpose, trace or sum) is free. Three or more operands are contracted left to right, torch's
    order when ``opt_einsum`` is not used. Supports ``...`` and the implicit output form.

    Raises:
        ValueError: for an equation that does not match the number or ranks of the operands.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r} has {len(terms)} operands, got {len(shapes)} shapes")
    used = {c for c in eq if c.isalpha()}
    pool = [c for c in string.ascii_letters if c not in used]
    ell_dims = [len(s) - (len(t) - 3) if "..." in t else 0 for t, s in zip(terms, shapes)]
    n_ell = max(ell_dims, default=0)
    ell = "".join(pool[:n_ell])
    expanded = []
    for t, s, e in zip(terms, shapes, ell_dims):
        t = t.replace("...", ell[n_ell - e:])
        if len(t) != len(s):
            raise ValueError(f"einsum term {t!r} does not match operand shape {tuple(s)}")
        expanded.append(t)
    if arrow:
        out = rhs.replace("...", ell)
    else:  # implicit form: broadcast dims, then the indices that occur exactly once, sorted
        counts = Counter("".join(terms).replace("...", ""))
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1))
    size: dict[str, int] = {}
    for t, s in zip(expanded, shapes):
        for c, n in zip(t, s):
            size[c] = max(size.get(c, 1), int(n))
    total, cur = 0, set(expanded[0])
    for i in range(1, len(expanded)):
        nxt = set(expanded[i])
        later = set(out).union(*[set(t) for t in expanded[i + 1:]])
        keep_cur = {c for c in cur if c in nxt or c in later}
        keep_nxt = {c for c in nxt if c in cur or c in later}
        total += math.prod(size[c] for c in keep_cur | keep_nxt)
        cur = (keep_cur | keep_nxt) & later
    return int(total)


def inner_flop_handle(inputs: list, outputs: list) -> int:
    """``aten::inner``: ``torch.inner(a [..., d], b [..., d])`` -> ``[*a.shape[:-1], *b.shape[:-1]]``, one MAC per
    output element and reduced index: ``prod(a.shape[:-1]) * prod(b.shape[:-1]) * d`` (a scalar operand
    makes it an element-wise product: 0)."""
    a, b = _shape(inputs[0], "aten::inner", "a"), _shape(inputs[1], "aten::inner", "b")
    if not a or not b:
        return 0
    return math.prod(a[:-1]) * math.prod(b[:-1]) * int(a[-1])


def einsum_flop_handle(inputs: list, outputs: list) -> int:
    """``aten::einsum(equation, operands, path)``: exact MACs by :func:`einsum_macs` (fvcore's handle
    rounds numpy's estimate to 4 significant digits outside two special equations)."""
    op = "aten::einsum"
    equation = inputs[0].toIValue()
    operands = list(inputs[1].node().inputs())
    return einsum_macs(equation, [_shape(v, op, f"#{i}") for i, v in enumerate(operands)])


# --------------------------------------------------------------------------- measured MACs (marker op)
_MARKER = "bench_suite::measured_macs"
_MARKER_SCHEMA = "measured_macs(Tensor x, int macs) -> Tensor"


def _define_marker_op() -> torch.library.Library | None:
    try:  # already defined (module re-imported)
        torch.ops.bench_suite.measured_macs.default
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("bench_suite", "FRAGMENT")  # other modules may add ops to the namespace
    # CONSERVATIVE alias analysis: torch.jit treats the op as having side effects, so the marker stays
    # in the traced graph even when its result is unused (dead-code elimination would drop it).
    lib.define(_MARKER_SCHEMA, alias_analysis="CONSERVATIVE")

    def _impl(x: torch.Tensor, macs: int) -> torch.Tensor:
        return x.clone()

    def _fake(x: torch.Tensor, macs: int) -> torch.Tensor:
        return torch.empty_like(x)

    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None

    torch.library.impl(_MARKER, "CompositeExplicitAutograd", lib=lib)(_impl)
    torch.library.register_fake(_MARKER, _fake, lib=lib)
    torch.library.register_autograd(_MARKER, _backward, lib=lib)
    return lib


_MARKER_LIB = _define_marker_op()


def mark_macs(x: torch.Tensor, macs: int | torch.Tensor) -> torch.Tensor:
    """Report ``macs`` multiply-accumulates, measured on the real data, to :func:`count_flops`.

    Call it inside the module whose cost it is (e.g. inside ``blocks.<i>.attn`` for a sparse attention),
    on any tensor of the computation: ``x = mark_macs(x, nnz * head_dim)``. Outside a ``torch.jit``
    trace it returns ``x`` itself and does nothing (no cost in training or inference). While tracing it
    inserts the custom op ``bench_suite::measured_macs(Tensor x, int macs) -> Tensor`` (returns a copy
    of ``x``; fake/meta and autograd implementations registered), whose fvcore handle
    (:func:`measured_macs_flop_handle`) reads ``macs`` back from the trace.

    Why this is sound: fvcore's count *is* a ``torch.jit`` trace of the model on the batch given to
    :func:`count_flops`, and nothing else. Shape-based handles see only shapes, but here ``macs`` is
    computed in Python from the real tensors of this very batch (e.g. the nonzeros of the connectivity
    mask), converted to a Python ``int`` and recorded by the tracer as a constant of the graph
    (``prim::Constant``). The handle returns that constant, so the count is exact for this batch;
    the trace is never reused on other inputs, so the usual "trace might not generalise" caveat of
    baking a value into a trace does not apply. The op is declared with conservative alias analysis,
    so the tracer keeps it even if the returned tensor is unused; it is attributed to the module whose
    forward runs it, like any other op.

    Do not count twice: if the sparse product itself runs through an op with a shape-based handle,
    that op is counted as well. Run it through a sparse op registered with :func:`zero_flop_handle`
    (``register_flop_handle("aten::_sparse_mm", zero_flop_handle)`` or
    ``count_flops(..., handles=...)``), or mark only what the shape-based handles miss.

    Args:
        x: any tensor; returned unchanged in value.
        macs: non-negative MAC count for the whole batch (``int`` or a one-element integer tensor).

    Returns:
        ``x`` (outside tracing, the same object; while tracing, an equal tensor).

    Raises:
        ValueError: for a negative, non-integral or multi-element count (checked only while tracing).
    """
    if not torch.jit.is_tracing():
        return x
    if isinstance(macs, torch.Tensor):
        if macs.numel() != 1:
            raise ValueError(f"mark_macs needs a one-element count, got shape {tuple(macs.shape)}")
        with warnings.catch_warnings():  # the value is meant to become a trace constant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            value = macs.item()
    else:
        value = macs
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"mark_macs needs an integral MAC count, got {value}")
        value = int(value)
    value = int(value)
    if value < 0:
        raise ValueError(f"mark_macs needs a non-negative MAC count, got {value}")
    return torch.ops.bench_suite.measured_macs(x, value)


def measured_macs_flop_handle(inputs: list, outputs: list) -> int:
    """fvcore handle of ``bench_suite::measured_macs``: the ``int`` baked into the trace as a constant.

    Raises:
        UncountedOpError: if the count is not a trace constant (the marker was called with a traced
            value instead of through :func:`mark_macs`).
    """
    try:
        value = inputs[1].toIValue()
    except RuntimeError:
        value = None
    if not isinstance(value, int) or isinstance(value, bool):
        raise UncountedOpError(f"{_MARKER}: the MAC count is not a constant of the trace; use mark_macs",
                               {_MARKER: 1})
    return value


# --------------------------------------------------------------------------- the handle registry
_MATMUL_OPS = ("aten::matmul", "aten::mm", "aten::bmm", "aten::mv", "aten::dot")
_ADDMM_OPS = ("aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::addmv")
_SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
_FREE_SPARSE_OPS = (  # layout conversions and accessors: no multiply-accumulate
    "aten::to_sparse", "aten::to_sparse_csr", "aten::to_sparse_csc", "aten::to_sparse_coo",
    "aten::_to_sparse", "aten::_to_sparse_csr", "aten::to_dense", "aten::_to_dense", "aten::coalesce",
    "aten::_coalesce", "aten::indices", "aten::values", "aten::_indices", "aten::_values",
    "aten::crow_indices", "aten::col_indices", "aten::sparse_coo_tensor", "aten::_sparse_coo_tensor_unsafe",
    "aten::sparse_csr_tensor", "aten::_sparse_csr_tensor_unsafe", "aten::_nnz",
    "aten::_convert_indices_from_coo_to_csr", "aten::_convert_indices_from_csr_to_coo",
)

FLOP_HANDLES: dict[str, Handle] = {
    **{op: _for_op(matmul_flop_handle, op) for op in _MATMUL_OPS},
    **{op: _for_op(addmm_like_flop_handle, op) for op in _ADDMM_OPS},
    **{op: _for_op(sdpa_flop_handle, op) for op in _SDPA_OPS},
    "aten::einsum": einsum_flop_handle,
    "aten::inner": inner_flop_handle,
    "aten::linear": _guard_shapes("aten::linear", linear_flop_jit),
    "aten::_convolution": _guard_shapes("aten::_convolution", conv_flop_jit),
    _MARKER: measured_macs_flop_handle,
    **{op: zero_flop_handle for op in _FREE_SPARSE_OPS},
}
"""Op name -> fvcore handle, applied on top of fvcore's defaults by :func:`count_flops`."""


def register_flop_handle(op_name: str, handle: Handle) -> Handle | None:
    """Register (or replace) the fvcore handle of ``op_name`` for every later :func:`count_flops`.

    Args:
        op_name: traced op name, ``"namespace::op"`` (e.g. ``"aten::_sparse_mm"``), or
            ``"prim::PythonOp.<FunctionName>"`` for a ``torch.autograd.Function``.
        handle: ``(inputs, outputs) -> FLOPs`` (see :data:`Handle`); :func:`zero_flop_handle` for ops
            whose cost is reported by :func:`mark_macs`.

    Returns:
        The handle previously registered for ``op_name`` (``None`` if there was none).

    Raises:
        ValueError: for an op name without a namespace.
        TypeError: for a handle that is not callable.
    """
    if "::" not in op_name:
        raise ValueError(f"op name must look like 'namespace::op', got {op_name!r}")
    if not callable(handle):
        raise TypeError(f"handle for {op_name} must be callable, got {type(handle).__name__}")
    previous = FLOP_HANDLES.get(op_name)
    FLOP_HANDLES[op_name] = handle
    return previous


def _check_counted(unsupported: Mapping[str, int]) -> None:
    """Every traced op is counted by a handle, ignored by fvcore as a shape op, or in :data:`FREE_OPS`."""
    bad = {op: int(n) for op, n in unsupported.items() if op not in FREE_OPS}
    if bad:
        listing = ", ".join(f"{op} (x{n})" for op, n in sorted(bad.items()))
        raise UncountedOpError(
            f"ops that no FLOP handle counts and that are not known to be free: {listing}. Register a handle "
            f"with bench_suite.flops.register_flop_handle (or pass handles= to count_flops; zero_flop_handle "
            f"for an op that does no multiply-accumulate); for sparse products, report the real MACs with "
            f"mark_macs and register zero_flop_handle.", bad)


# --------------------------------------------------------------------------- counting a model
@dataclass
class FlopReport:
    """Per-image FLOPs of one model on one batch (1 MAC = 1 FLOP).

    Attributes:
        mhsa_mflops: MHSA MFLOPs, the paper's definition (attention modules without ``qkv``/``proj``).
        mhsa_proj_mflops: MFLOPs of the whole attention modules (``qkv`` and ``proj`` included).
        total_gflops: GFLOPs of the whole model.
        per_layer_mhsa_mflops: MHSA MFLOPs of each block, in block order (sums to ``mhsa_mflops``).
        batch_size: ``B``, the number of images the counts were averaged over.
    """

    mhsa_mflops: float
    mhsa_proj_mflops: float
    total_gflops: float
    per_layer_mhsa_mflops: list[float] = field(default_factory=list)
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Flat dict with unit-suffixed keys: ``mhsa_mflops``, ``mhsa_proj_mflops``, ``total_gflops``,
        ``per_layer_mhsa_mflops`` (list), ``batch_size``."""
        return asdict(self)


def attention_module_names(model: nn.Module) -> list[str]:
    """Names of the attention modules, ``blocks.<i>.attn``, one per entry of ``model.blocks``.

    Raises:
        ValueError: if ``model`` has no ``blocks`` or a block has no ``attn`` child.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `blocks`; pass the ViT backbone (e.g. module.model)")
    names = []
    for i, blk in enumerate(blocks):
        if not isinstance(getattr(blk, "attn", None), nn.Module):
            raise ValueError(f"block {i} ({type(blk).__name__}) has no `attn` module")
        names.append(f"blocks.{i}.attn")
    return names


def count_flops(model: nn.Module, images: torch.Tensor,
                handles: Mapping[str, Handle] | None = None) -> FlopReport:
    """Count the per-image FLOPs of ``model`` on the batch ``images`` with fvcore.

    The model is traced once (``torch.jit``) in eval mode under ``torch.no_grad``; the train/eval mode
    of every submodule is restored afterwards. Counts are attributed to modules by fvcore's
    ``by_module()``; data-dependent methods are counted on this real batch and averaged per image.

    Args:
        model: a timm-style ViT whose ``blocks[i].attn`` are the attention modules.
        images: ``[B, C, H, W]``.
        handles: extra op handles for this call only, on top of :data:`FLOP_HANDLES`.

    Returns:
        :class:`FlopReport` (MFLOPs / GFLOPs per image).

    Raises:
        ValueError: for ``images`` that are not ``[B, C, H, W]`` with ``B >= 1``, or a model without
            ``blocks[i].attn``.
        UncountedOpError: if an op that may hide multiply-accumulates was traced but not counted.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    attn_names = attention_module_names(model)
    b = int(images.shape[0])
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            analysis = (FlopCountAnalysis(model, images)
                        .set_op_handle(**{**FLOP_HANDLES, **dict(handles or {})})
                        .unsupported_ops_warnings(False)
                        .uncalled_modules_warnings(False))
            by_module = analysis.by_module()
            unsupported = analysis.unsupported_ops()
    finally:
        for m, training in modes:
            m.training = training
    _check_counted(unsupported)
    per_layer = [by_module[n] - by_module[f"{n}.qkv"] - by_module[f"{n}.proj"] for n in attn_names]  # FLOPs
    return FlopReport(
        mhsa_mflops=float(sum(per_layer) / b / 1e6),
        mhsa_proj_mflops=float(sum(by_module[n] for n in attn_names) / b / 1e6),
        total_gflops=float(by_module[""] / b / 1e9),
        per_layer_mhsa_mflops=[float(v / b / 1e6) for v in per_layer],
        batch_size=b,
    )


# --------------------------------------------------------------------------- the paper's closed forms
def dense_mhsa_flops(depth: int, n_tokens: int, dim: int) -> int:
    """MHSA FLOPs of dense attention: ``depth * 2 * n_tokens^2 * dim`` (``Q K^T`` and ``A V``, each
    ``n^2 d`` MACs per head, ``H d = dim``). DeiT-S: 357.66 M; LV-ViT-S: 476.88 M; DeiT-T at 384:
    1534.14 M (paper Tables 1, 4: 357.7, 476.9, 1534.1).

    Returns:
        FLOPs (not MFLOPs).

    Raises:
        ValueError: for a non-positive argument.
    """
    if min(depth, n_tokens, dim) < 1:
        raise ValueError(f"depth, n_tokens and dim must be positive, got {depth}, {n_tokens}, {dim}")
    return int(depth) * 2 * int(n_tokens) ** 2 * int(dim)


def token_pruning_paper_flops(depth: int, n_tokens: int, dim: int, keep_rate: float,
                              stages: Sequence[int] | None = None) -> int:
    """MHSA FLOPs of a token-pruning ViT under the paper's convention for its token-pruning rows
    (Wei et al., CVPR 2023, Table 1; ``methods-and-flops.md``).

    Stage ``s = 1..S`` keeps ``k_s = ceil(keep_rate^s * (n_tokens - 1))`` patch tokens (compounded from
    the input, no fused token). Layers ``0..stages[0]`` (up to and including the first pruning block,
    which prunes after its MHSA) are dense, ``2 * dim * n_tokens^2`` each; layers
    ``stages[s-1]+1 .. stages[s]`` (the last stage: up to ``depth - 1``) are charged
    ``2 * dim * (k_s^2 + n_tokens)`` each (per head a ``k_s x k_s`` patch block plus one full CLS row),
    except that a stage that keeps every token (``k_s = n_tokens - 1``, e.g. keep rate 1.0) stays dense,
    so keep rate 1.0 gives :func:`dense_mhsa_flops`.
    DeiT-S (12 blocks, 197 tokens, width 384, stages (3, 6, 9), i.e. 4 dense layers then 3, 3, 2):
    193.09 M at keep rate 0.7, 149.05 M at 0.5 (paper 193.1 / 149.1).

    Args:
        depth: number of blocks.
        n_tokens: tokens ``N`` including the CLS token.
        dim: embedding width ``D``.
        keep_rate: token keep rate ``rho`` in (0, 1].
        stages: 0-based pruning blocks, strictly increasing in ``[0, depth)``; default
            :func:`bench_suite.backbones.pruning_stages` ((3, 6, 9) for 12 blocks, (4, 8, 12) for 16).

    Returns:
        FLOPs (not MFLOPs).

    Raises:
        ValueError: for a keep rate outside (0, 1], a non-positive size, or invalid stages.
    """
    if not 0.0 < float(keep_rate) <= 1.0:
        raise ValueError(f"keep rate must lie in (0, 1], got {keep_rate!r}")
    if min(depth, n_tokens, dim) < 1:
        raise ValueError(f"depth, n_tokens and dim must be positive, got {depth}, {n_tokens}, {dim}")
    stages = tuple(pruning_stages(depth) if stages is None else (int(s) for s in stages))
    if not stages or any(s < 0 or s >= depth for s in stages) or any(a >= b for a, b in zip(stages, stages[1:])):
        raise ValueError(f"stages must be strictly increasing block indices in [0, {depth}), got {stages}")
    total, stage = 0, 0
    for layer in range(depth):
        k = keep_count(float(keep_rate) ** stage, n_tokens - 1)
        total += n_tokens ** 2 if k >= n_tokens - 1 else k * k + n_tokens
        if stage < len(stages) and layer == stages[stage]:
            stage += 1
    return 2 * int(dim) * total
