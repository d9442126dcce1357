"""Pure maps from a frozen weight and an algebra element to the adapted weight.

An adapter is a triple (group, action, generator). The generator produces an algebra element
``ΔW`` with the weight's shape; an :class:`Update` turns ``(W, ΔW)`` into ``W'``:

* :class:`HadamardExp` — LieRA: ``W' = W ⊙ exp(ΔW)`` (``order=None``), or with the truncated
  exponential ``T_k(ΔW) = Σ_{j≤k} ΔW^j/j!`` (``order=k``; ``k = 1`` is ``W + W ⊙ ΔW``), both
  through :class:`liegroup.Hadamard`. Its entry-wise error against the exact map is bounded by
  ``|W| ⊙ (e^{|ΔW|} − T_k(|ΔW|))`` (:func:`liegroup.groups.taylor_remainder_bound`).
* :class:`Additive` — LoRA: the additive group of tensors, whose exponential is the identity,
  acting by translation: ``W' = W + ΔW``.

New updates (e.g. a matrix group acting on a tensor mode) subclass :class:`Update` and are
registered with :func:`register_update`. :func:`adapted_weight` is the one function that both
the adapter layer's forward and merging call.

The Hadamard update runs as one autograd node (:class:`HadamardExpFunction`): its backward
forms ``∂L/∂ΔW = ∂L/∂W' ⊙ W'`` (exact) or ``∂L/∂W' ⊙ W`` (first order) from tensors that
already exist (``W'`` is kept by the layer's op anyway), so the exact and first-order maps cost
the same and no extra weight-sized tensor is kept between forward and backward (except
``ΔW`` for Taylor orders ``k ≥ 2``).

Example:
    >>> import torch
    >>> W = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    >>> adapted_weight(W, torch.zeros(2, 2))
    tensor([[ 1., -2.],
            [ 0.,  3.]])
    >>> adapted_weight(W, torch.full((2, 2), 0.5), order=1)
    tensor([[ 1.5000, -3.0000],
            [ 0.0000,  4.5000]])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.autograd.function import once_differentiable

from liegroup._validation import check_tensor
from liegroup.errors import AdapterStateError, ShapeError
from liegroup.groups.hadamard import Hadamard

__all__ = [
    "Additive",
    "HadamardExp",
    "HadamardExpFunction",
    "LowRankAdaptedOpFunction",
    "LowRankHadamardExpFunction",
    "OpGeometry",
    "Update",
    "adapted_op_lowrank",
    "adapted_weight",
    "adapted_weight_lowrank",
    "get_update",
    "register_update",
]


class HadamardExpFunction(torch.autograd.Function):
    """``W' = W ⊙ exp(ΔW)`` (or ``W ⊙ T_k(ΔW)``) as a single autograd node.

    Backward: ``∂L/∂ΔW = G ⊙ W ⊙ exp(ΔW) = G ⊙ W'`` (exact), ``G ⊙ W`` (order 1),
    ``G ⊙ W ⊙ T_{k−1}(ΔW)`` (order k); ``∂L/∂W = G ⊙ exp(ΔW)`` (resp. ``T_k``) only when ``W``
    requires grad.

    Example:
        >>> import torch
        >>> W = torch.tensor([2.0, -1.0], dtype=torch.float64)
        >>> X = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
        >>> HadamardExpFunction.apply(W, X, None).sum().backward()
        >>> torch.allclose(X.grad, W * X.detach().exp())
        True
    """

    @staticmethod
    def forward(ctx: Any, W: torch.Tensor, delta: torch.Tensor, order: int | None) -> torch.Tensor:
        """``W ⊙ exp(ΔW)`` (or ``W ⊙ T_k(ΔW)``) through :class:`liegroup.Hadamard`."""
        # W' = G.act(G.exp(ΔW, order), W) = W ⊙ exp(ΔW), with every step written into one
        # fresh buffer (bit-identical to the group's maps, tested).
        Wp = _exp_inplace(delta, order).mul_(W)
        ctx.order = order
        need_w = ctx.needs_input_grad[0]
        if order is None:
            ctx.save_for_backward(Wp, delta if need_w else None)
        elif order == 1:
            ctx.save_for_backward(W, delta if need_w else None)
        else:
            ctx.save_for_backward(W, delta)
        return Wp

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients from the saved ``W'`` (exact) or ``W`` (truncated), no extra copies."""
        order: int | None = ctx.order
        saved, delta = ctx.saved_tensors
        g_delta = g_w = None
        if ctx.needs_input_grad[1]:
            if order is None or order == 1:
                g_delta = grad * saved  # saved is W' (exact) or W (first order)
            else:
                g_delta = _exp_inplace(delta, order - 1).mul_(saved).mul_(grad)
        if ctx.needs_input_grad[0]:
            g_w = _exp_inplace(delta, order).mul_(grad)
        return g_w, g_delta, None


class LowRankHadamardExpFunction(torch.autograd.Function):
    """``W' = W ⊙ exp(ΔW)`` (or ``W ⊙ T_k(ΔW)``) with ``ΔW = (L @ R).view(W.shape)``.

    Saves only ``W`` and the small factors: backward recomputes ``ΔW = L @ R`` (a rank-r
    product, cheap next to the layer's op), forms ``G_Δ = G ⊙ W ⊙ exp(ΔW)`` (exact),
    ``G ⊙ W`` (order 1) or ``G ⊙ W ⊙ T_{k−1}(ΔW)`` in one buffer, and returns
    ``∂L/∂L = G_Δ Rᵀ``, ``∂L/∂R = Lᵀ G_Δ`` (``G_Δ`` as the ``rows × cols`` matrix). Exact and
    truncated maps cost the same; peak memory is one weight-sized buffer above the layer's own.

    Example:
        >>> import torch
        >>> W = torch.randn(4, 6, dtype=torch.float64)
        >>> L = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        >>> R = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.gradcheck(
        ...     lambda lf, rf: LowRankHadamardExpFunction.apply(W, lf, rf, None), (L, R))
        True
    """

    @staticmethod
    def forward(
        ctx: Any, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, order: int | None
    ) -> torch.Tensor:
        """``W ⊙ exp((L @ R).view(W.shape))``, every step in one fresh buffer."""
        if L.dim() != 2 or R.dim() != 2 or L.shape[0] * R.shape[1] != W.numel():
            raise ShapeError(
                f"L @ R must have as many entries as W {tuple(W.shape)}, got L "
                f"{tuple(L.shape)} and R {tuple(R.shape)}"
            )
        if ctx.needs_input_grad[0]:
            raise TypeError("LowRankHadamardExpFunction does not differentiate W; freeze it")
        # bit-identical to Hadamard.act(Hadamard.exp(ΔW, order), W) (tested)
        Wp = _lowrank_hadamard(W, L, R, order)
        ctx.order = order
        ctx.save_for_backward(W, L, R)
        return Wp

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Recompute ``ΔW`` from the factors; two small matmuls give the factor gradients."""
        W, L, R = ctx.saved_tensors
        order: int | None = ctx.order
        if order == 1:
            g = grad * W
        else:
            delta = (L @ R).view(W.shape)
            t = delta.exp_() if order is None else _exp_inplace(delta, order - 1)
            g = t.mul_(W).mul_(grad)
        gm = g.view(L.shape[0], R.shape[1])
        g_l = gm @ R.T if ctx.needs_input_grad[1] else None
        g_r = L.T @ gm if ctx.needs_input_grad[2] else None
        return None, g_l, g_r, None


def _lowrank_hadamard(
    W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, order: int | None
) -> torch.Tensor:
    """``W ⊙ exp((L @ R).view(W.shape))`` (or ``T_k``) with one weight-sized buffer for k ≤ 1.

    Bit-identical to ``Hadamard.act(Hadamard.exp(ΔW, order), W)``: ``X.add_(1)`` is ``X + 1``.
    """
    delta = (L @ R).view(W.shape)
    if order is None:
        return delta.exp_().mul_(W)
    if order == 1:
        return delta.add_(1).mul_(W)
    return _exp_inplace(delta, order).mul_(W)


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

    Extra work against full fine-tuning: the rank-r products and the element-wise map (twice
    when ``∂L/∂x`` is needed and ``W'`` was not kept) — a few passes over the weight, small
    next to the op when the activations are large; the exact map adds one ``exp`` per entry
    in the backward's blocks.
    ``update`` is ``"additive"`` or ``"hadamard"`` (with ``order``); ``W`` must be frozen.
    The forward is bit-identical to ``op(x, adapted_weight_lowrank(W, L, R))``.

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
    ) -> torch.Tensor:
        """``op(x, W', bias)``; ``W'`` lives only during the op."""
        if ctx.needs_input_grad[1]:
            raise TypeError("LowRankAdaptedOpFunction does not differentiate W; freeze it")
        if update not in ("hadamard", "additive"):
            raise ValueError(f"update must be 'hadamard' or 'additive', got {update!r}")
        Wp = _lowrank_apply(W, L, R, update, order)
        out = _op_forward(x, Wp, bias, op)
        need_x, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # keep W' for the backward (no recompute there) only where it is small next to the
        # activations; it is then needed by ∂L/∂x or by the exact map's G ⊙ W'
        keep = need_f and (need_x or (update == "hadamard" and order is None)) and (
            _keep_second_buffer(W, x, out)
        )
        ctx.update, ctx.order, ctx.op, ctx.keep = update, order, op, keep
        ctx.save_for_backward(x, W, L, R, Wp if keep else None)
        del Wp
        ctx.bias_shape = None if bias is None else bias.shape
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
        by_products = False  # additive Linear: factor gradients without G (see below)
        if op.kind == "linear":
            gy2 = gy.reshape(-1, W.shape[0])
            x2 = x.reshape(-1, W.shape[1])
            by_products = update == "additive" and need_f and _factor_route(W, L, R, x2)
            if need_b:
                gb = gy2.sum(0)
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order) if Wp is None else Wp
                gx = gy.matmul(Wq)
                if need_f and Wp is None and not by_products:
                    G = torch.mm(gy2.T, x2, out=Wq)  # ∂L/∂W' in the recomputed W''s buffer
                del Wq
            if need_f and G is None and not by_products:
                G = gy2.T.mm(x2)
        elif Wp is not None:  # one call: ∂L/∂x (if needed), ∂L/∂W' and ∂L/∂b
            gx, G, gb = _conv_backward(gy, x, Wp, op, need_x, True, need_b)
        else:
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order)
                gx, _, _ = _conv_backward(gy, x, Wq, op, True, False, False)
                del Wq  # freed before ∂L/∂W' exists: one weight-sized buffer at a time
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
            g_l, g_r = _factor_grads(G, W, L, R, update, order, Wp, x, gy, need_l, need_r)
        if gb is not None and ctx.bias_shape is not None:
            gb = gb.view(ctx.bias_shape)
        return gx, None, gb, g_l, g_r, None, None, None


# The memory rule for keeping W' from the forward to the backward (a second weight-sized
# buffer next to ∂L/∂W'; no recompute of W' and, for the exact map, no second exp): allowed
# when the weight has at most 1/32 of the entries of the layer's input plus output, i.e.
# ≤ ~3 % of activations that a training step holds anyway (full fine-tuning's ∂L/∂x and ∂L/∂y
# are that size), so peak memory stays within 1.05× of full fine-tuning, for one layer and,
# summed, for a network. Otherwise W' is recomputed in the backward (row blocks for exp).
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


def _keep_second_buffer(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> bool:
    return W.numel() * _KEEP_RATIO <= x.numel() + y.numel()


def _block_rows(W: torch.Tensor, cols: int, x: torch.Tensor, gy: torch.Tensor) -> int:
    """Rows per block of the blocked backward.

    A block holds at most ``_CHUNK_ENTRIES`` entries (it stays in cache through its
    ``L_i R → exp → ⊙ W_i → ⊙ G_i → factor products`` chain) and at most the larger of 1/16
    of the weight and 1/32 of the activations (its buffer is the only memory the block adds).
    Small blocks cost a few kernel launches each, so blocks are as large as these allow.
    """
    entries = min(_CHUNK_ENTRIES, max(W.numel() // 16, (x.numel() + gy.numel()) // 32))
    return max(1, entries // max(cols, 1))


def _factor_grads(
    G: torch.Tensor, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, update: str,
    order: int | None, Wp: torch.Tensor | None, x: torch.Tensor, gy: torch.Tensor,
    need_l: bool, need_r: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``G_Δ`` from ``G = ∂L/∂W'`` (in place in ``G``), then ``G_Δ Rᵀ`` and ``Lᵀ G_Δ``.

    ``G_Δ = G`` (additive), ``G ⊙ W`` (first order), ``G ⊙ W'`` (exact; from ``Wp`` when it
    was kept, else ``W ⊙ exp(L_i R)`` recomputed per row block in one reused block buffer,
    the factor products taken per block while it is in cache), ``G ⊙ W ⊙ T_{k−1}(ΔW)``
    (order ``k ≥ 2``, per block).
    """
    rows, cols = L.shape[0], R.shape[1]
    Gm = G.view(rows, cols) if G.is_contiguous() else G.contiguous().view(rows, cols)
    # G ⊙ W' is G_Δ for the exact map only (order k ≥ 2: G ⊙ W ⊙ T_{k−1}, per block)
    blocked = update == "hadamard" and order != 1 and (Wp is None or order is not None)
    if not blocked:
        if update == "hadamard":
            Gm.mul_((W if order == 1 else Wp).reshape(rows, cols))  # type: ignore[union-attr]
        return (Gm.mm(R.T) if need_l else None), (L.T.mm(Gm) if need_r else None)
    Wm = W.reshape(rows, cols)
    step = min(rows, _block_rows(W, cols, x, gy))
    buf = torch.empty((step, cols), dtype=G.dtype, device=G.device)
    RT = R.T
    for i in range(0, rows, step):
        j = min(i + step, rows)
        Li, Gi = L[i:j], Gm[i:j]
        if order is None:
            t = torch.mm(Li, R, out=buf[: j - i]).exp_()
        else:
            t = _exp_inplace(Li @ R, order - 1)
        Gi.mul_(t.mul_(Wm[i:j]))
    return (Gm.mm(RT) if need_l else None), (L.T.mm(Gm) if need_r else None)


def _lowrank_apply(
    W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, update: str, order: int | None
) -> torch.Tensor:
    if update == "additive":
        return torch.addmm(W.reshape(L.shape[0], R.shape[1]), L, R).view(W.shape)
    return _lowrank_hadamard(W, L, R, order)


def adapted_op_lowrank(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    L: torch.Tensor,
    R: torch.Tensor,
    update: Update | str,
    op: OpGeometry,
    order: int | None = None,
) -> torch.Tensor:
    """``op(x, update(W, (L @ R).view(W.shape)), bias)`` at the memory of full fine-tuning.

    Uses :class:`LowRankAdaptedOpFunction` for the shipped updates (:class:`HadamardExp`,
    :class:`Additive`) when ``W`` is frozen; otherwise (another update, a
    trainable ``W``) it runs ``op(x, adapted_weight_lowrank(W, L, R, update), bias)``.
    Same forward values bit for bit either way.

    Args:
        x: the op's input (batched for convs, any padding already applied).
        W: frozen weight ``(out, in)`` or ``(C_out, C_in/g, *k)``.
        bias: the op's bias or ``None``.
        L, R: factors with ``L.shape[0] * R.shape[1] == W.numel()``.
        update: an :class:`Update` or a registered name.
        op: the op and its geometry.
        order: Taylor order when ``update`` is a name.

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
        return _op_forward(x, adapted_weight_lowrank(W, L, R, update), bias, op)
    out: torch.Tensor = LowRankAdaptedOpFunction.apply(x, W, bias, L, R, name, order, op)
    return out


def _exp_inplace(X: torch.Tensor, order: int | None) -> torch.Tensor:
    """``Hadamard.exp(X, order)`` in one fresh buffer (Horner's rule done in place).

    Same operations in the same order as :func:`liegroup.groups.taylor_exp`, so bit-identical;
    ``order=0`` gives ones.
    """
    if order is None:
        return Hadamard(tuple(X.shape)).exp(X)
    if order == 0:
        return torch.ones_like(X)
    t = X / order + 1 if order > 1 else X + 1
    for j in range(order - 1, 0, -1):
        t.mul_(X)
        if j > 1:
            t.div_(j)
        t.add_(1)
    return t


class Update(ABC):
    """How an algebra element ``ΔW`` acts on a frozen weight ``W``: ``W' = apply(W, ΔW)``.

    Subclasses set :attr:`invertible` (whether :meth:`inverse` recovers ``W`` from ``W'``
    accurately, so unmerging needs no copy of ``W``) and :attr:`zeros_frozen` (whether zero
    entries of ``W`` can never move).

    Example:
        >>> import torch
        >>> Additive().apply(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    name: ClassVar[str] = ""
    invertible: ClassVar[bool] = False
    zeros_frozen: ClassVar[bool] = False

    def check_delta(self, W: torch.Tensor, delta: torch.Tensor) -> None:
        """Validate the algebra element; by default a real tensor of ``W``'s shape.

        Updates whose algebra element is not weight-shaped (e.g. one matrix per tensor mode)
        override this.
        """
        check_tensor(delta, "delta")
        if delta.shape != W.shape:
            raise ShapeError(
                f"delta must have W's shape {tuple(W.shape)}, got {tuple(delta.shape)}"
            )

    @abstractmethod
    def apply(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The adapted weight ``W'`` (differentiable in ``delta``, and in ``W`` if it asks)."""

    def apply_lowrank(self, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``apply(W, (L @ R).view(W.shape))``; subclasses may fuse it to save memory."""
        return self.apply(W, (L @ R).view(W.shape))

    def additive_factors(
        self, W: torch.Tensor, delta: Any
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, R)`` with ``apply(W, ΔW) == torch.addmm(W, L, R)`` bit for bit, or ``None``.

        A hook for updates that, on a matrix ``W`` ``(out, in)``, are a low-rank additive
        correction ``W + L R`` (``L`` ``(out, m)``, ``R`` ``(m, in)``) whose factors cost far
        less than ``W'``: a Linear layer then runs them through
        :class:`LowRankAdaptedOpFunction` (``"additive"``), whose backward never forms
        ``∂L/∂W'``. ``L, R`` are differentiable functions of ``ΔW``. Default: ``None``.
        """
        return None

    def inverse(self, Wp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Recover ``W`` from ``W'`` by the group inverse; only when :attr:`invertible`."""
        raise AdapterStateError(f"the {self!r} update has no accurate inverse; keep a copy of W")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class HadamardExp(Update):
    """LieRA's update ``W' = W ⊙ exp(ΔW)`` (``order=None``) or ``W ⊙ T_k(ΔW)`` (``order=k``).

    The exact map is invertible by the group inverse ``W = W' ⊙ exp(−ΔW)``; a truncated map
    would need a division by ``T_k(ΔW)``, which can be 0 or tiny, so it is not.

    Example:
        >>> import torch
        >>> u = HadamardExp(None)
        >>> W = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> d = torch.tensor([0.3, -0.1], dtype=torch.float64)
        >>> torch.allclose(u.inverse(u.apply(W, d), d), W)
        True
    """

    name = "hadamard"
    zeros_frozen = True

    def __init__(self, order: int | None = None) -> None:
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise TypeError(f"order must be None or an int >= 1, got {order!r}")
        if order is not None and order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order

    @property
    def invertible(self) -> bool:  # type: ignore[override]
        """Only the exact exponential has an accurate inverse."""
        return self.order is None

    def apply(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``W ⊙ exp(ΔW)`` or ``W ⊙ T_k(ΔW)`` as one autograd node."""
        out: torch.Tensor = HadamardExpFunction.apply(W, delta, self.order)
        return out

    def apply_lowrank(self, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``W ⊙ exp((L @ R).view(W.shape))`` as one node that keeps only ``W, L, R``.

        Falls back to :meth:`apply` when ``W`` itself requires grad.
        """
        if W.requires_grad:
            return self.apply(W, (L @ R).view(W.shape))
        out: torch.Tensor = LowRankHadamardExpFunction.apply(W, L, R, self.order)
        return out

    def inverse(self, Wp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``W' ⊙ exp(−ΔW)`` (exact map only)."""
        if self.order is not None:
            return super().inverse(Wp, delta)
        G = Hadamard(tuple(Wp.shape))
        return G.act(G.exp(-delta), Wp)

    def __repr__(self) -> str:
        return f"HadamardExp(order={self.order})"


class Additive(Update):
    """LoRA's update ``W' = W + ΔW`` (the additive group; its exponential is the identity).

    Example:
        >>> import torch
        >>> Additive().inverse(torch.tensor([3.0]), torch.tensor([1.0]))
        tensor([2.])
    """

    name = "additive"
    invertible = True

    def apply(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``W + ΔW``."""
        return W + delta

    def apply_lowrank(self, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``W + L @ R`` as one ``addmm`` (nothing weight-sized kept for backward)."""
        return torch.addmm(W.reshape(L.shape[0], R.shape[1]), L, R).view(W.shape)

    def inverse(self, Wp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``W' − ΔW``."""
        return Wp - delta

    def __repr__(self) -> str:
        return "Additive()"


UpdateFactory = Callable[[int | None], Update]
_UPDATES: dict[str, UpdateFactory] = {
    "hadamard": HadamardExp,
    "additive": lambda order: Additive(),
}


def register_update(name: str, factory: UpdateFactory) -> None:
    """Make ``group=name`` available in :class:`~liegroup.peft.LieRAConfig`.

    Args:
        name: the config value.
        factory: called with the Taylor order (``None`` for exact) and returning an
            :class:`Update`.

    Example:
        >>> register_update("additive2", lambda order: Additive())
        >>> get_update("additive2", None)
        Additive()
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"update name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    _UPDATES[name] = factory


def get_update(name: str, order: int | None) -> Update:
    """The :class:`Update` registered as ``name`` for Taylor ``order`` (``None``: exact).

    Example:
        >>> get_update("hadamard", 1)
        HadamardExp(order=1)
    """
    if name not in _UPDATES:
        raise ValueError(f"unknown group {name!r}; known: {sorted(_UPDATES)}")
    return _UPDATES[name](order)


def adapted_weight_lowrank(
    W: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    update: Update | str = "hadamard",
    order: int | None = None,
) -> torch.Tensor:
    """:func:`adapted_weight` with ``ΔW = (L @ R).view(W.shape)``, fused where possible.

    Equal to ``adapted_weight(W, (L @ R).view(W.shape), update, order)``; the Hadamard and
    additive updates compute it without keeping a weight-sized tensor for the backward.

    Example:
        >>> import torch
        >>> W, L, R = torch.ones(2, 2), torch.ones(2, 1), torch.full((1, 2), 0.5)
        >>> adapted_weight_lowrank(W, L, R, order=1)
        tensor([[1.5000, 1.5000],
                [1.5000, 1.5000]])
    """
    check_tensor(W, "W")
    check_tensor(L, "L")
    check_tensor(R, "R")
    if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0] or (
        L.shape[0] * R.shape[1] != W.numel()
    ):
        raise ShapeError(
            f"L @ R must be a matrix with W's {W.numel()} entries, got L {tuple(L.shape)} "
            f"and R {tuple(R.shape)}"
        )
    if isinstance(update, str):
        update = get_update(update, order)
    return update.apply_lowrank(W, L, R)


def adapted_weight(
    W: torch.Tensor,
    delta: torch.Tensor,
    update: Update | str = "hadamard",
    order: int | None = None,
) -> torch.Tensor:
    """The adapted weight ``W' = update(W, ΔW)``; used by the layer's forward and by merging.

    Args:
        W: frozen weight, any shape (``(C_out, C_in)`` or ``(C_out, C_in/g, *k)``).
        delta: algebra element, for the shipped updates a tensor of ``W``'s shape, dtype and
            device (checked by :meth:`Update.check_delta`).
        update: an :class:`Update`, or a registered group name (``"hadamard"``,
            ``"additive"``).
        order: Taylor order when ``update`` is a name (``None``: exact exponential).

    Returns:
        ``W'`` with ``W``'s shape.

    Example:
        >>> import torch
        >>> W = torch.ones(2, 3)
        >>> adapted_weight(W, torch.full((2, 3), 0.1), "additive")[0, 0]
        tensor(1.1000)
    """
    check_tensor(W, "W")
    if isinstance(update, str):
        update = get_update(update, order)
    update.check_delta(W, delta)
    return update.apply(W, delta)
