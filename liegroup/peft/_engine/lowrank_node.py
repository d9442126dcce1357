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

import threading
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from liegroup.errors import AdapterStateError, ConfigError
from liegroup.peft._engine import ops, policy
from liegroup.peft._engine.geometry import (
    OpGeometry,
    autocast_dtype,
    conv_backward,
    linear_input_grad,
    linear_weight_grad,
    op_forward,
)
from liegroup.peft._engine.ledger import StepLedger, current

__all__ = ["LowRankAdaptedOpFunction", "adapted_op_lowrank", "factor_route"]


class LowRankAdaptedOpFunction(torch.autograd.Function):
    """``op(x, W', b)`` with ``W' = update(W, (L @ R).view(W.shape))`` as one autograd node.

    The whole adapted layer in one node, so that no more weight-sized memory exists at any time
    than full fine-tuning of the layer needs (``∂L/∂W``):

    * forward forms ``W'`` in one buffer, runs the op and frees ``W'``; it keeps ``x`` (as the
      op would), ``W`` and the small factors — and ``W'`` itself only under
      :func:`~liegroup.peft._engine.policy.keep_adapted_weight` (then the backward neither
      recomputes ``W'`` nor a second ``exp``);
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
    (:func:`factor_route`): ``∂L/∂L = gyᵀ(x Rᵀ)``, ``∂L/∂R = (gy L)ᵀ x``, and ``G`` is
    never formed (the mode-wise Linear comes here through :meth:`Update.additive_factors`).

    With a ledger (the thread's :class:`~liegroup.peft._engine.ledger.StepLedger`, CPU) a
    transient ``W'`` is formed in the ledger's reused workspace instead of a fresh buffer (a
    kept ``W'`` is formed in a buffer of its own), and a layer whose weight is no larger than
    the gradients full fine-tuning would hold by now (``ledger.allows``) recomputes ``W'`` once
    and keeps it next to ``∂L/∂W'``: the exact map's ``G ⊙ W'`` is then one multiply (no
    blocked second ``exp``) and a conv forms ``∂L/∂x``, ``∂L/∂W'``, ``∂L/∂b`` in one call.

    Extra work against full fine-tuning: the rank-r products and the element-wise map (twice
    when ``∂L/∂x`` is needed and ``W'`` was not kept) — a few passes over the weight, small
    next to the op when the activations are large; the exact map adds one ``exp`` per entry
    in the backward's blocks.
    ``update`` is ``"additive"`` or ``"hadamard"`` (with ``order``); ``W`` must be frozen.
    The forward is bit-identical to ``op(x, lowrank_form(W, L, R))``.

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
            raise AdapterStateError("LowRankAdaptedOpFunction does not differentiate W; freeze it")
        if update not in ("hadamard", "additive"):
            raise ConfigError(f"update must be 'hadamard' or 'additive', got {update!r}")
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
            out = op_forward(x, Wp, bias, op)
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
                out = op_forward(x, Wc, _cast(bias, cast), op)
                kept = Wc if keep else None
                del Wc
        ctx.update, ctx.order, ctx.op, ctx.keep, ctx.ledger = update, order, op, keep, ledger
        ctx.thread = threading.get_ident()
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
        ledger = _backward_ledger(ctx, W)
        if ctx.cast is not None:
            return _backward_autocast(ctx, gy, x, W, L, R, kept)

        # full fine-tuning holds grads this size by now, so the workspace may live next to
        # ∂L/∂W': W' computed once there — for the exact map's G ⊙ W' and for a conv's ∂L/∂x
        # (then one backward call for all); otherwise it is released before ∂L/∂W' exists
        covered = ledger is not None and ledger.allows(max(W.numel(), ledger.held(W.dtype)))
        if Wp is None and need_f and (exact or (need_x and op.kind == "conv")) and covered:
            Wp = _lowrank_apply(W, L, R, update, order, ledger)
        by_products = False  # additive Linear: factor gradients without G (see below)
        if op.kind == "linear":  # ∂L/∂W' in W's own layout (Conv1D: transposed)
            n_out, n_in = op.linear_features(W)
            gy2 = gy.reshape(-1, n_out)
            x2 = x.reshape(-1, n_in)
            by_products = (update == "additive" and need_f and not op.transposed
                           and factor_route(W, L, R, x2))
            if need_b:
                gb = gy2.sum(0)
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order, ledger) if Wp is None else Wp
                # 2-d: no bmm for strided gy
                gx = linear_input_grad(gy2, Wq, op).view(*x.shape[:-1], n_in)
                if need_f and Wp is None and not by_products:
                    # ∂L/∂W' in the recomputed W''s buffer
                    G = linear_weight_grad(gy2, x2, op, out=Wq)
                del Wq
            if need_f and G is None and not by_products:
                if Wp is None and ledger is not None:  # into the workspace: one buffer
                    G = linear_weight_grad(gy2, x2, op, out=ledger.workspace(W.shape, W))
                else:
                    G = linear_weight_grad(gy2, x2, op)
        elif Wp is not None:  # one call: ∂L/∂x (if needed), ∂L/∂W' and ∂L/∂b
            gx, G, gb = conv_backward(gy, x, Wp, op, need_x, True, need_b)
        else:
            if need_x:
                Wq = _lowrank_apply(W, L, R, update, order, ledger)
                gx, _, _ = conv_backward(gy, x, Wq, op, True, False, False)
                del Wq  # freed before ∂L/∂W' exists: one weight-sized buffer at a time
            if ledger is not None and not covered:
                ledger.release(W.dtype)
            if need_f:
                # ∂L/∂b with ∂L/∂W': asked for with ∂L/∂x alone, oneDNN's backward takes a
                # path that costs as much as ∂L/∂x again (measured: Conv2d(64,64,3), 4×32²)
                _, G, gb = conv_backward(gy, x, W, op, False, True, need_b)
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
        n_out, n_in = op.linear_features(W)
        gy2, x2 = gy.reshape(-1, n_out), x.reshape(-1, n_in)
        gb = gy2.sum(0) if need_b else None
        gx = linear_input_grad(gy2, Wc, op).view(*x.shape[:-1], n_in) if need_x else None
        G = linear_weight_grad(gy2, x2, op) if need_f else None
    else:
        gx, G, gb = conv_backward(gy, x, Wc, op, need_x, need_f, need_b)
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
    ledger = _backward_ledger(ctx, W)
    if ledger is not None:
        ledger.backward_done(W.numel())
    return gx, None, gb, g_l, g_r, None, None, None, None, None


def factor_route(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, x2: torch.Tensor) -> bool:
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


def _backward_ledger(ctx: Any, W: torch.Tensor) -> StepLedger | None:
    """The forward's ledger, or this thread's when the backward runs on another thread.

    The workspace is one buffer per thread: a backward on another thread (a user's, or a
    device thread) must not write into the buffer the forward's thread may be using.
    """
    if ctx.ledger is None or threading.get_ident() == ctx.thread:
        return ctx.ledger
    return current(W.device)


def _keep_second_buffer(W: torch.Tensor, x: torch.Tensor, y_numel: int, computed: int) -> bool:
    return policy.keep_adapted_weight(W.numel(), computed, x.numel() + y_numel)


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
    if G.dtype != W.dtype:  # autocast: G in the op's dtype (a cast, then in place: measured
        G = G.to(W.dtype)  # faster than a mixed-dtype multiply)
    step = min(rows, policy.block_rows(W.numel(), cols, x.numel() + gy.numel(), computed))
    if update == "additive" or order in (None, 1):  # one op: G ⊙ (W' | W | W ⊙ exp(L R)) or G
        M: torch.Tensor | None = W
        mode = ops.GRAD_TIMES_EXP  # exact, W' not at hand: G ⊙ W ⊙ exp(L R)
        if update == "additive":
            M, mode = None, ops.GRAD_PLAIN
        elif order == 1:
            mode = ops.GRAD_TIMES
        elif Wp is not None:
            M, mode = Wp, ops.GRAD_TIMES
        # G is the node's own ∂L/∂W' (or its cast): scratch for the torch implementation
        g_l, g_r = ops.lowrank_factor_grads(G, M, L, R, mode, scratch=True, block_rows=step)
        return (g_l if need_l else None), (g_r if need_r else None)
    # Taylor order k ≥ 2: G ⊙ W ⊙ T_{k−1}(L_i R), per row block
    Gm = G.view(rows, cols) if G.is_contiguous() else G.contiguous().view(rows, cols)
    Wm = W.reshape(rows, cols)
    for i in range(0, rows, step):
        j = min(i + step, rows)
        t = ops.exp_taylor(L[i:j] @ R, order - 1)
        Gm[i:j].mul_(t.mul_(Wm[i:j]))
    del t  # freed before the factor gradients exist: not part of the node's peak
    return (Gm.mm(R.T) if need_l else None), (L.T.mm(Gm) if need_r else None)


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
    rows, cols = L.shape[0], R.shape[1]
    if update == "additive":
        Wm = W.reshape(rows, cols)
        if out is None:
            return torch.addmm(Wm, L, R).view(W.shape)
        torch.addmm(Wm, L, R, out=out.view(rows, cols))
        return out
    if order in (None, 1):
        return ops.lowrank_form(W, L, R, order == 1, out)
    d = L @ R if out is None else torch.mm(L, R, out=out.view(rows, cols))
    t = ops.exp_taylor(d.view(W.shape), order)
    if out is None:
        return t.mul_(W)
    return torch.mul(t, W, out=out)


def adapted_op_lowrank(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    L: torch.Tensor,
    R: torch.Tensor,
    update: str,
    order: int | None,
    op: OpGeometry,
    ledger: StepLedger | None,
) -> torch.Tensor:
    """``op(x, update(W, (L @ R).view(W.shape)), bias)`` at the memory of full fine-tuning.

    Args:
        x: the op's input (batched for convs, any padding already applied).
        W: frozen weight ``(out, in)`` or ``(C_out, C_in/g, *k)``.
        bias: the op's bias or ``None``.
        L, R: ``(rows, r)`` and ``(r, cols)`` with ``rows·cols == W.numel()`` (checked).
        update: ``"hadamard"`` (with ``order``: ``None`` exact, ``k`` Taylor) or
            ``"additive"``.
        op: the op and its geometry.
        ledger: this thread's :class:`StepLedger` (``None``: the backward holds one
            weight-sized buffer at a time).

    Raises:
        ShapeError: factors that do not unfold ``W``.

    Example:
        >>> import torch
        >>> from liegroup.peft._engine.ops import lowrank_form
        >>> x, W = torch.randn(3, 4), torch.randn(2, 4)
        >>> L, R = torch.randn(2, 1), torch.randn(1, 4)
        >>> y = adapted_op_lowrank(x, W, None, L, R, "hadamard", None, OpGeometry("linear"),
        ...                        None)
        >>> torch.equal(y, x @ lowrank_form(W, L, R).T)
        True
    """
    ops.check_factors(W, L, R)
    out: torch.Tensor = LowRankAdaptedOpFunction.apply(
        x, W, bias, L, R, update, order, op, ledger, autocast_dtype(x, W)
    )
    return out
