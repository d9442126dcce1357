"""The fused adapter layer: one autograd node for ``op(x, W')`` with a low-rank ``ΔW = L·R``.

:func:`adapted_op_lowrank` runs the base module's op (``F.linear`` / ``F.convNd``, described by
an :class:`OpGeometry`) on ``W' = W ⊙ exp(L·R)`` (exact), ``W + W ⊙ L·R`` (first order),
``W ⊙ T_k(L·R)`` or ``W + L·R`` (additive) without keeping weight-sized tensors between
forward and backward beyond what full fine-tuning keeps: ``W'`` is formed in one buffer and
freed (or kept under the keep rule), ``∂L/∂W'`` is written into that buffer and turned into
``∂L/∂ΔW`` in place, per cache-sized row block for the exact map; a Linear with an additive
low-rank update takes its factor gradients from ``gyᵀ(x Rᵀ)`` and ``(gy L)ᵀ x`` when that is
cheaper than forming ``∂L/∂W'``. See ``docs/performance.md`` for the design and measurements.
"""


from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from liegroup.errors import ShapeError
from liegroup.peft import _fused_kernel as _fk
from liegroup.peft.functional import (
    Additive,
    HadamardExp,
    Update,
    _exp_inplace,
    _lowrank_hadamard,
    adapted_weight_lowrank,
    get_update,
)

__all__ = [
    "LowRankAdaptedOpFunction",
    "OpGeometry",
    "StepLedger",
    "adapted_op_lowrank",
    "autocast_dtype",
    "weights_outside_autocast",
]


# Row blocks of the chunked backward hold about this many entries (256 KiB in float32), so the
# recomputed exp(ΔW) of a block stays in cache and never takes a weight-sized buffer.
_CHUNK_ENTRIES = 1 << 16


@dataclass(frozen=True)
class OpGeometry:
    """The base module's op for :func:`adapted_op_lowrank`: ``F.linear`` or an N-d conv.

    Attributes:
        kind: ``"linear"`` or ``"conv"``.
        stride, padding, dilation: per spatial dimension (convs; explicit symmetric padding —
            a ``padding_mode`` other than zeros is applied to the input before the op).
        groups: the conv's groups.

    Example:
        >>> OpGeometry("conv", (1, 1), (1, 1), (1, 1), 1).ndim
        2
    """

    kind: str
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv"):
            raise ValueError(f"kind must be 'linear' or 'conv', got {self.kind!r}")
        n = len(self.stride)
        if self.kind == "conv" and (
            n not in (1, 2, 3) or len(self.padding) != n or len(self.dilation) != n
        ):
            raise ShapeError(
                f"a conv needs stride, padding and dilation of one length 1-3, got {self}"
            )

    @property
    def ndim(self) -> int:
        """Spatial dimensions (0 for linear)."""
        return len(self.stride)

    def output_numel(self, x: torch.Tensor, W: torch.Tensor) -> int:
        """Entries of ``op(x, W)`` (``x`` batched, padding already applied), without running it.

        Example:
            >>> import torch
            >>> op = OpGeometry("conv", (2, 1), (1, 0), (1, 2), 1)
            >>> x, W = torch.zeros(2, 3, 9, 8), torch.zeros(5, 3, 3, 3)
            >>> op.output_numel(x, W) == torch.nn.functional.conv2d(
            ...     x, W, None, (2, 1), (1, 0), (1, 2)).numel()
            True
        """
        if self.kind == "linear":
            return x.numel() // W.shape[1] * W.shape[0]
        n = x.shape[0] * W.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], W.shape[2:], self.stride, self.padding,
                                    self.dilation, strict=True):
            n *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        return n


class StepLedger:
    """The weight-gradient memory full fine-tuning would hold at this point of a step.

    Shared by the adapted layers of one model (:class:`~liegroup.peft.LieRAModel` gives each of
    its layers the same ledger). Full fine-tuning keeps ``∂L/∂W`` of every layer whose backward
    has run until the optimizer step; the fused node keeps none of them. ``credit`` counts
    those entries — the weight sizes of the adapted layers whose backward ran since the step
    began — and a layer whose weight has at most ``credit`` entries may hold a second
    weight-sized buffer in its backward (a recomputed ``W'`` next to ``∂L/∂W'``, one ``exp``
    and one weight pass fewer), while the model as a whole stays within full fine-tuning's
    memory at every point of the backward. A forward after a backward starts a new step and
    zeroes the credit (gradient accumulation, checkpoint recomputation: the count can only be
    low, never high).

    Example:
        >>> ledger = StepLedger()
        >>> ledger.allows(10)
        False
        >>> ledger.backward_done(16)
        >>> ledger.allows(10), ledger.credit
        (True, 16)
        >>> ledger.forward_seen(); ledger.credit
        0
    """

    __slots__ = ("_buffers", "_views", "credit", "in_backward")

    def __init__(self) -> None:
        self.credit = 0
        self.in_backward = False
        self._buffers: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        # the views of the buffers by shape, made once: a view costs a few µs per layer call
        self._views: dict[tuple[int, torch.device, torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def workspace(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous scratch tensor of ``shape`` reused by every layer for a transient ``W'``.

        One flat buffer per thread, device and dtype, grown to the largest adapted weight and
        kept: a fresh weight-sized buffer per layer and step would cost page faults (measured:
        a third of the adapter's overhead in a ResNet-50 step on CPU) for no memory saved —
        only one transient ``W'`` exists at a time. The model keeps this one buffer between
        steps, and the view of each shape asked for (made once: a view costs a few µs, on
        every layer and step). Its contents are valid only until the next call.
        """
        views = self._views
        key = (threading.get_ident(), like.device, like.dtype, shape)
        view = views.get(key)
        if view is not None:
            return view
        bkey, n = key[:3], math.prod(shape)
        buf = self._buffers.get(bkey)
        if buf is None or buf.numel() < n:
            del buf
            self._drop(bkey)  # the views of a smaller buffer would keep it alive
            buf = self._buffers[bkey] = torch.empty(n, dtype=like.dtype, device=like.device)
        view = views[key] = buf[:n].view(shape)
        return view

    def _drop(self, bkey: tuple[int, torch.device, torch.dtype]) -> None:
        self._buffers.pop(bkey, None)
        for k in [k for k in self._views if k[:3] == bkey]:
            del self._views[k]

    def held(self, like: torch.Tensor) -> int:
        """Entries of this thread's workspace for ``like``'s device and dtype (0: none)."""
        buf = self._buffers.get((threading.get_ident(), like.device, like.dtype))
        return 0 if buf is None else buf.numel()

    def release(self, like: torch.Tensor | None = None) -> None:
        """Free this thread's workspace for ``like``'s device and dtype (``None``: all).

        A layer whose backward is not covered by the credit releases it before ``∂L/∂W'`` is
        allocated, so that a model holds one weight-sized buffer at a time there.
        """
        if like is None:
            self._buffers.clear()
            self._views.clear()
        else:
            self._drop((threading.get_ident(), like.device, like.dtype))

    def forward_seen(self) -> None:
        """A layer's forward ran: after a backward it is a new step (credit back to 0)."""
        if self.in_backward:
            self.credit, self.in_backward = 0, False

    def allows(self, entries: int) -> bool:
        """Whether a second buffer of ``entries`` entries fits the credit."""
        return entries <= self.credit

    def backward_done(self, entries: int) -> None:
        """A layer's backward ran: full fine-tuning would now hold its ``entries``-entry grad."""
        self.in_backward = True
        self.credit += entries

    def __getstate__(self) -> dict[str, Any]:
        # pickling / deepcopy of a model: the counters travel, the scratch buffers do not
        return {"credit": self.credit, "in_backward": self.in_backward}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.credit, self.in_backward = state["credit"], state["in_backward"]
        self._buffers, self._views = {}, {}

    def __repr__(self) -> str:
        return f"StepLedger(credit={self.credit}, in_backward={self.in_backward})"


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}


def _op_forward(
    x: torch.Tensor, Wp: torch.Tensor, bias: torch.Tensor | None, op: OpGeometry
) -> torch.Tensor:
    if op.kind == "linear":
        return torch.nn.functional.linear(x, Wp, bias)
    out: torch.Tensor = _CONV[op.ndim](
        x, Wp, bias, op.stride, op.padding, op.dilation, op.groups
    )
    return out


def _conv_backward(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, op: OpGeometry,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]] if need_b else None, list(op.stride),
        list(op.padding), list(op.dilation), False, [0] * op.ndim, op.groups,
        [need_x, need_w, need_b],
    )
    return gx, gw, gb


class LowRankAdaptedOpFunction(torch.autograd.Function):
    """``op(x, W', b)`` with ``W' = update(W, (L @ R).view(W.shape))`` as one autograd node.

    The whole adapted layer in one node, so that no more weight-sized memory exists at any time
    than full fine-tuning of the layer needs (``∂L/∂W``):

    * forward forms ``W'`` in one buffer, runs the op and frees ``W'``; it keeps ``x`` (as the
      op would), ``W`` and the small factors — and ``W'`` itself only when the weight has at
      most 1/32 of the entries of ``x`` and ``y`` together (then it costs ≤ 3 % of the
      activations, and the backward neither recomputes ``W'`` nor a second ``exp``);
    * backward recomputes ``W'`` (if not kept) only if ``∂L/∂x`` is needed, forms ``∂L/∂x``
      and, for Linear, writes ``G = ∂L/∂W'`` into the same buffer (convs: frees ``W'`` before
      ``G`` exists, or with a kept ``W'`` forms ``∂L/∂x``, ``G``, ``∂L/∂b`` in one call); then
      turns ``G`` *in place* into ``G_Δ = G ⊙ W'`` (exact; without a kept ``W'``,
      ``W ⊙ exp(L_i R)`` is recomputed per cache-sized row block ``i`` in one reused block
      buffer, the factor products taken per block), ``G ⊙ W`` (first order),
      ``G ⊙ W ⊙ T_{k−1}(ΔW)`` (order k, per block) or ``G`` (additive), and returns
      ``∂L/∂L = G_Δ Rᵀ``, ``∂L/∂R = Lᵀ G_Δ``.

    For an additive Linear whose ``L @ R`` is ``W``'s ``(out, in)`` matrix, the factor
    gradients are taken through the activations when that is cheaper
    (:func:`_factor_route`): ``∂L/∂L = gyᵀ(x Rᵀ)``, ``∂L/∂R = (gy L)ᵀ x``, and ``G`` is
    never formed (the mode-wise Linear comes here through :meth:`Update.additive_factors`).

    Inside a model (``ledger``, a :class:`StepLedger` shared by its layers) a transient ``W'``
    is formed in the ledger's reused workspace instead of a fresh buffer (a kept ``W'`` is
    formed in a buffer of its own), and a layer whose weight is no larger than the gradients full
    fine-tuning would hold by now (``ledger.allows``) recomputes ``W'`` once and keeps it next
    to ``∂L/∂W'``: the exact map's ``G ⊙ W'`` is then one multiply (no blocked second
    ``exp``) and a conv forms ``∂L/∂x``, ``∂L/∂W'``, ``∂L/∂b`` in one call.

    Extra work against full fine-tuning: the rank-r products and the element-wise map (twice
    when ``∂L/∂x`` is needed and ``W'`` was not kept) — a few passes over the weight, small
    next to the op when the activations are large; the exact map adds one ``exp`` per entry
    in the backward's blocks.
    ``update`` is ``"additive"`` or ``"hadamard"`` (with ``order``); ``W`` must be frozen.
    The forward is bit-identical to ``op(x, adapted_weight_lowrank(W, L, R))``.

    ``cast`` (autocast's dtype, see :func:`autocast_dtype`): ``W'`` is formed in ``W``'s dtype
    and the op runs in ``cast`` on a copy of ``W'`` that is kept for the backward (full
    fine-tuning under autocast keeps the same copy of its weight); ``∂L/∂W'`` from the op is
    cast to ``W``'s dtype for the factor gradients, and ``∂L/∂x``, ``∂L/∂b`` come back in the
    dtypes of ``x`` and the bias. Bit-identical to autocast applied to the unfused op.

    Example:
        >>> import torch
        >>> x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        >>> W = torch.randn(4, 6, dtype=torch.float64)
        >>> L = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        >>> R = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
        >>> f = LowRankAdaptedOpFunction.apply
        >>> torch.autograd.gradcheck(
        ...     lambda a, lf, rf: f(a, W, None, lf, rf, "hadamard", None, OpGeometry("linear")),
        ...     (x, L, R))
        True
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        L: torch.Tensor,
        R: torch.Tensor,
        update: str,
        order: int | None,
        op: OpGeometry,
        ledger: StepLedger | None = None,
        cast: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``op(x, W', bias)``; ``W'`` lives only during the op."""
        if ctx.needs_input_grad[1]:
            raise TypeError("LowRankAdaptedOpFunction does not differentiate W; freeze it")
        if update not in ("hadamard", "additive"):
            raise ValueError(f"update must be 'hadamard' or 'additive', got {update!r}")
        if ledger is not None:
            ledger.forward_seen()
        need_x, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # keep W' for the backward (no recompute there) only where it is small next to the
        # activations; it is then needed by ∂L/∂x or by the exact map's G ⊙ W'
        computed = _computed_entries(L, R)
        keep = need_f and (need_x or (update == "hadamard" and order is None)) and (
            _keep_second_buffer(W, x, op.output_numel(x, W), computed)
        )
        ctx.x_dtype, ctx.cast = x.dtype, cast
        kept: torch.Tensor | None = None
        if cast is None:
            # a kept W' gets its own buffer; a transient one the shared workspace
            Wp = _lowrank_apply(W, L, R, update, order, None if keep else ledger)
            out = _op_forward(x, Wp, bias, op)
            kept = Wp if keep else None
            del Wp
        else:
            # autocast: W' formed in W's dtype, the op in the autocast dtype. The op's copy of
            # W' is kept for the backward whenever a gradient needs it: autocast's weight
            # cache keeps the same low-precision copy of every fully fine-tuned weight from
            # forward to backward, so this costs no memory beyond full fine-tuning's
            keep = need_x or need_f
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(cast)
                Wc = _lowrank_apply_cast(W, L, R, update, order, ledger, x)
                out = _op_forward(x, Wc, _cast(bias, cast), op)
                kept = Wc if keep else None
                del Wc
        ctx.update, ctx.order, ctx.op, ctx.keep, ctx.ledger = update, order, op, keep, ledger
        ctx.computed = computed
        ctx.save_for_backward(x, W, L, R, kept)
        del kept
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``∂L/∂x``, ``∂L/∂b`` and the factor gradients with one weight-sized buffer at a time."""
        x, W, L, R, kept = ctx.saved_tensors
        update, order, op = ctx.update, ctx.order, ctx.op
        need_x, _, need_b, need_l, need_r = ctx.needs_input_grad[:5]
        need_f = need_l or need_r
        gx = gb = None
        G: torch.Tensor | None = None  # ∂L/∂W'
        Wp: torch.Tensor | None = kept  # W' from the forward (small weights), else None
        exact = update == "hadamard" and order is None
        ledger: StepLedger | None = ctx.ledger
        if ctx.cast is not None:
            return _backward_autocast(ctx, gy, x, W, L, R, kept)

        # full fine-tuning holds grads this size by now, so the workspace may live next to
        # ∂L/∂W': W' computed once there — for the exact map's G ⊙ W' and for a conv's ∂L/∂x
        # (then one backward call for all); otherwise it is released before ∂L/∂W' exists
        covered = ledger is not None and ledger.allows(max(W.numel(), ledger.held(W)))
        if Wp is None and need_f and (exact or (need_x and op.kind == "conv")) and covered:
            Wp = _lowrank_apply(W, L, R, update, order, ledger)
        by_products = False  # additive Linear: factor gradients without G (see below)
        if op.kind == "linear":
            gy2 = gy.reshape(-1, W.shape[0])
            x2 = x.reshape(-1, W.shape[1])
            by_products = update == "additive" and need_f and _factor_route(W, L, R, x2)
            if need_b:
                gb = gy2.sum(0)
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order, ledger) if Wp is None else Wp
                gx = gy2.mm(Wq).view(*x.shape[:-1], W.shape[1])  # 2-d: no bmm for strided gy
                if need_f and Wp is None and not by_products:
                    G = torch.mm(gy2.T, x2, out=Wq)  # ∂L/∂W' in the recomputed W''s buffer
                del Wq
            if need_f and G is None and not by_products:
                if Wp is None and ledger is not None:  # into the workspace: one buffer
                    G = torch.mm(gy2.T, x2, out=ledger.workspace(W.shape, W))
                else:
                    G = gy2.T.mm(x2)
        elif Wp is not None:  # one call: ∂L/∂x (if needed), ∂L/∂W' and ∂L/∂b
            gx, G, gb = _conv_backward(gy, x, Wp, op, need_x, True, need_b)
        else:
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order, ledger)
                gx, _, _ = _conv_backward(gy, x, Wq, op, True, False, False)
                del Wq  # freed before ∂L/∂W' exists: one weight-sized buffer at a time
            if ledger is not None and not covered:
                ledger.release(W)
            if need_f:
                # ∂L/∂b with ∂L/∂W': asked for with ∂L/∂x alone, oneDNN's backward takes a
                # path that costs as much as ∂L/∂x again (measured: Conv2d(64,64,3), 4×32²)
                _, G, gb = _conv_backward(gy, x, W, op, False, True, need_b)
            elif need_b:
                gb = gy.sum([0, *range(2, gy.dim())])
        g_l = g_r = None
        if by_products:  # G Rᵀ = gyᵀ(x Rᵀ), Lᵀ G = (gy L)ᵀ x: G = gyᵀx never formed
            g_l = gy2.T.mm(x2.mm(R.T)) if need_l else None
            g_r = gy2.mm(L).T.mm(x2) if need_r else None
        elif G is not None:
            g_l, g_r = _factor_grads(
                G, W, L, R, update, order, Wp, x, gy, need_l, need_r, ctx.computed
            )
        del G, Wp
        if gb is not None and ctx.bias_shape is not None:
            gb = gb.view(ctx.bias_shape)
        if ledger is not None:
            ledger.backward_done(W.numel())
        return gx, None, gb, g_l, g_r, None, None, None, None, None


def _backward_autocast(
    ctx: Any, gy: torch.Tensor, x: torch.Tensor, W: torch.Tensor, L: torch.Tensor,
    R: torch.Tensor, Wc: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The node's backward under autocast: the op on the kept low-precision ``W'``.

    ``∂L/∂x``, ``∂L/∂W'`` and ``∂L/∂b`` from the op in the autocast dtype (one call for a
    conv), as autocast's own backward would; ``G_Δ`` and the factor gradients in ``W``'s dtype
    (the exact map's ``W ⊙ exp(L_i R)`` recomputed per row block, as without autocast);
    gradients returned in the dtypes of ``x`` and the bias.
    """
    op: OpGeometry = ctx.op
    need_x, _, need_b, need_l, need_r = ctx.needs_input_grad[:5]
    need_f = need_l or need_r
    gx = gb = G = None
    if Wc is None:  # (kept whenever ∂L/∂x or the factors need it) only ∂L/∂b
        if need_b:
            lin = op.kind == "linear"
            gb = gy.sum(list(range(gy.dim() - 1)) if lin else [0, *range(2, gy.dim())])
    elif op.kind == "linear":
        gy2, x2 = gy.reshape(-1, W.shape[0]), x.reshape(-1, W.shape[1])
        gb = gy2.sum(0) if need_b else None
        gx = gy2.mm(Wc).view(*x.shape[:-1], W.shape[1]) if need_x else None
        G = gy2.T.mm(x2) if need_f else None
    else:
        gx, G, gb = _conv_backward(gy, x, Wc, op, need_x, need_f, need_b)
    del Wc
    g_l = g_r = None
    if G is not None:
        g_l, g_r = _factor_grads(G, W, L, R, ctx.update, ctx.order, None, x, gy, need_l, need_r,
                                 ctx.computed)
    del G
    if gb is not None and ctx.bias_shape is not None:
        gb = gb.view(ctx.bias_shape).to(ctx.bias_dtype)
    if gx is not None and gx.dtype != ctx.x_dtype:
        gx = gx.to(ctx.x_dtype)
    if ctx.ledger is not None:
        ctx.ledger.backward_done(W.numel())
    return gx, None, gb, g_l, g_r, None, None, None, None, None


# The memory rule for keeping W' from the forward to the backward (a second weight-sized
# buffer next to ∂L/∂W'; no recompute of W' and, for the exact map, no second exp): allowed
# when what the node then saves beyond full fine-tuning — W' and any factor computed from
# parameters (Tucker's R; LoRA's factors are the parameters themselves) — has at most 1/32
# of the entries of the layer's input plus output, i.e. ≤ ~3 % of activations that a
# training step holds anyway (full fine-tuning's ∂L/∂x and ∂L/∂y are that size), so peak
# memory stays within 1.05× of full fine-tuning, for one layer and, summed, for a network.
# Otherwise W' is recomputed in the backward (row blocks for exp).
_KEEP_RATIO = 32


def _factor_route(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether an additive Linear's factor gradients are cheaper through the activations.

    ``∂L/∂L = G Rᵀ = gyᵀ(x Rᵀ)`` and ``∂L/∂R = Lᵀ G = (gy L)ᵀ x`` cost ``2Nm(n₀ + n₁)``
    multiply-adds for ``N`` rows of ``x`` and rank ``m``; through ``G = gyᵀx`` they cost
    ``N n₀ n₁ + 2 n₀ n₁ m``. Only when ``L @ R`` is ``W``'s own ``(out, in)`` matrix.
    """
    n0, n1 = W.shape[0], W.shape[-1]
    if W.dim() != 2 or L.shape[0] != n0 or R.shape[1] != n1:
        return False
    N, m = x2.shape[0], L.shape[1]
    return 2 * N * m * (n0 + n1) < N * n0 * n1 + 2 * n0 * n1 * m


def _computed_entries(L: torch.Tensor, R: torch.Tensor) -> int:
    """Entries of the factors computed from parameters (saved by the node: extra memory)."""
    return sum(f.numel() for f in (L, R) if f.grad_fn is not None)


def _keep_second_buffer(W: torch.Tensor, x: torch.Tensor, y_numel: int, computed: int) -> bool:
    return (W.numel() + computed) * _KEEP_RATIO <= x.numel() + y_numel


def _block_rows(
    W: torch.Tensor, cols: int, x: torch.Tensor, gy: torch.Tensor, computed: int
) -> int:
    """Rows per block of the blocked backward.

    A block holds at most ``_CHUNK_ENTRIES`` entries (it stays in cache through its
    ``L_i R → exp → ⊙ W_i → ⊙ G_i`` chain) and at most the larger of 1/16 of the weight and
    the keep rule's budget, 1/32 of the activations less the factors computed from parameters
    that the node saves (Tucker's ``R``): its buffer is the only memory the block adds. Small
    blocks cost a few kernel launches each, so blocks are as large as these allow.
    """
    budget = (x.numel() + gy.numel()) // 32 - computed
    entries = min(_CHUNK_ENTRIES, max(W.numel() // 16, budget))
    return max(1, entries // max(cols, 1))


def _factor_grads(
    G: torch.Tensor, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, update: str,
    order: int | None, Wp: torch.Tensor | None, x: torch.Tensor, gy: torch.Tensor,
    need_l: bool, need_r: bool, computed: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``G_Δ`` from ``G = ∂L/∂W'`` (in place in ``G``), then ``G_Δ Rᵀ`` and ``Lᵀ G_Δ``.

    ``G_Δ = G`` (additive), ``G ⊙ W`` (first order), ``G ⊙ W'`` (exact; from ``Wp`` when it
    was kept, else ``W ⊙ exp(L_i R)`` recomputed per row block in one reused block buffer,
    the factor products taken per block while it is in cache), ``G ⊙ W ⊙ T_{k−1}(ΔW)``
    (order ``k ≥ 2``, per block).
    """
    rows, cols = L.shape[0], R.shape[1]
    if update == "additive" or order in (None, 1):  # the compiled kernel: one pass, G kept
        # the kernel reads raw contiguous memory: no (rows, cols) views needed
        Gk = (G if G.dtype is W.dtype else G.to(W.dtype)).contiguous()
        Lc, Rc, Wc = L.contiguous(), R.contiguous(), W.contiguous()
        M: torch.Tensor | None = Wc
        mode = _fk.GRAD_TIMES_EXP  # exact, W' not at hand: G ⊙ W ⊙ exp(L R)
        if update == "additive":
            M, mode = None, _fk.GRAD_PLAIN
        elif order == 1:
            mode = _fk.GRAD_TIMES
        elif Wp is not None:
            M, mode = Wp.contiguous(), _fk.GRAD_TIMES
        if _fk.takes(Gk, Lc, Rc, Wc, *(() if M is None or M is Wc else (M,))):
            g_l, g_r = _fk.factor_grads(Gk, M, Lc, Rc, mode)
            return (g_l if need_l else None), (g_r if need_r else None)
        G = Gk  # already in W's dtype and contiguous: the torch path below casts nothing again
    Gm = G.view(rows, cols) if G.is_contiguous() else G.contiguous().view(rows, cols)
    # G ⊙ W' is G_Δ for the exact map only (order k ≥ 2: G ⊙ W ⊙ T_{k−1}, per block)
    blocked = update == "hadamard" and order != 1 and (Wp is None or order is not None)
    if not blocked:
        if Gm.dtype != W.dtype:  # autocast: G in the op's dtype (a cast, then in place:
            Gm = Gm.to(W.dtype)  # measured faster than a mixed-dtype multiply)
        if update == "hadamard":
            Gm.mul_((W if order == 1 else Wp).reshape(rows, cols))  # type: ignore[union-attr]
        return (Gm.mm(R.T) if need_l else None), (L.T.mm(Gm) if need_r else None)
    if Gm.dtype != W.dtype:
        Gm = Gm.to(W.dtype)
    Wm = W.reshape(rows, cols)
    step = min(rows, _block_rows(W, cols, x, gy, computed))
    buf = torch.empty((step, cols), dtype=W.dtype, device=W.device)
    RT = R.T
    for i in range(0, rows, step):
        j = min(i + step, rows)
        Li, Gi = L[i:j], Gm[i:j]
        if order is None:
            t = torch.mm(Li, R, out=buf[: j - i]).exp_()
        else:
            t = _exp_inplace(Li @ R, order - 1)
        Gi.mul_(t.mul_(Wm[i:j]))
    del buf, t  # freed before the factor gradients exist: not part of the node's peak
    return (Gm.mm(RT) if need_l else None), (L.T.mm(Gm) if need_r else None)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _lowrank_apply_cast(
    W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, update: str, order: int | None,
    ledger: StepLedger | None, like: torch.Tensor,
) -> torch.Tensor:
    """``W'`` in ``like``'s (autocast) dtype, in a buffer of its own (kept for the backward).

    Formed in ``W``'s dtype in the ledger's workspace when there is one, then cast: measured
    (CPU, 512×4608) faster than a mixed-dtype ``torch.mul(W'₃₂, W, out=W'₁₆)``.
    """
    return _lowrank_apply(W, L, R, update, order, ledger).to(like.dtype)


def _lowrank_apply(
    W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, update: str, order: int | None,
    ledger: StepLedger | None = None,
) -> torch.Tensor:
    """``W'``; in the ledger's workspace when one is given (a transient ``W'`` only)."""
    out = None if ledger is None else ledger.workspace(W.shape, W)
    if update == "additive":
        rows, cols = L.shape[0], R.shape[1]
        Wm = W.reshape(rows, cols)
        if out is None:
            return torch.addmm(Wm, L, R).view(W.shape)
        torch.addmm(Wm, L, R, out=out.view(rows, cols))
        return out
    return _lowrank_hadamard(W, L, R, order, out)


def adapted_op_lowrank(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    L: torch.Tensor,
    R: torch.Tensor,
    update: Update | str,
    op: OpGeometry,
    order: int | None = None,
    ledger: StepLedger | None = None,
) -> torch.Tensor:
    """``op(x, update(W, (L @ R).view(W.shape)), bias)`` at the memory of full fine-tuning.

    Uses :class:`LowRankAdaptedOpFunction` for the shipped updates (:class:`HadamardExp`,
    :class:`Additive`) when ``W`` is frozen; otherwise (another update, a
    trainable ``W``) it runs ``op(x, adapted_weight_lowrank(W, L, R, update), bias)``.
    Same forward values bit for bit either way. Under autocast ``W'`` is formed in ``W``'s
    dtype and the op runs in autocast's dtype (:func:`autocast_dtype`).

    Args:
        x: the op's input (batched for convs, any padding already applied).
        W: frozen weight ``(out, in)`` or ``(C_out, C_in/g, *k)``.
        bias: the op's bias or ``None``.
        L, R: factors with ``L.shape[0] * R.shape[1] == W.numel()``.
        update: an :class:`Update` or a registered name.
        op: the op and its geometry.
        order: Taylor order when ``update`` is a name.
        ledger: the model's :class:`StepLedger` (``None``: this layer alone; its backward
            then holds one weight-sized buffer at a time).

    Example:
        >>> import torch
        >>> x, W = torch.randn(3, 4), torch.randn(2, 4)
        >>> L, R = torch.randn(2, 1), torch.randn(1, 4)
        >>> y = adapted_op_lowrank(x, W, None, L, R, "hadamard", OpGeometry("linear"))
        >>> torch.equal(y, x @ adapted_weight_lowrank(W, L, R).T)
        True
    """
    if isinstance(update, str):
        update = get_update(update, order)
    if type(update) is HadamardExp:
        name, order = "hadamard", update.order
    elif type(update) is Additive:
        name, order = "additive", None
    else:
        name = ""
    if not name or W.requires_grad:
        with weights_outside_autocast(x):
            Wp = adapted_weight_lowrank(W, L, R, update)
        return _op_forward(x, Wp, bias, op)
    out: torch.Tensor = LowRankAdaptedOpFunction.apply(
        x, W, bias, L, R, name, order, op, ledger, autocast_dtype(x, W)
    )
    return out


def weights_outside_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context that forms an adapted weight in the weight's own dtype under autocast.

    Autocast is meant for the layer's op; the adapter's ``W'`` (rank-r products, ``exp``,
    matrix exponentials of mode-wise updates) is computed in the weight's dtype, as a
    master weight is, and cast by autocast only where the op uses it. Outside autocast this
    is a no-op context.

    Example:
        >>> import torch
        >>> x = torch.zeros(2)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with weights_outside_autocast(x):
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(x: torch.Tensor, W: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``op(x, W)`` in, or ``None`` when it would not cast.

    Autocast (enabled for ``x``'s device type) casts float32 operands of linear and conv ops
    to its lower-precision dtype; float64 and lower-precision weights are left alone.

    Example:
        >>> import torch
        >>> x, W = torch.zeros(2, 3), torch.zeros(4, 3)
        >>> autocast_dtype(x, W) is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype(x, W)
        torch.bfloat16
    """
    dev = x.device.type
    if W.dtype != torch.float32 or not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return None if dt == W.dtype else dt
