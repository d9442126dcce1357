"""LieRA's Hadamard map as autograd nodes: ``W ⊙ exp(ΔW)`` and its low-rank fused form.

:class:`HadamardExpFunction` takes a dense ``ΔW``; :class:`LowRankHadamardExpFunction` takes
``ΔW = L·R`` in factored form and keeps only ``W, L, R`` for the backward. Both are what
:class:`liegroup.peft.updates.HadamardExp` runs; the operators they call (``ops``) validate
every tensor before a compiled kernel reads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from liegroup.errors import AdapterStateError
from liegroup.peft._engine import ops

__all__ = ["HadamardExpFunction", "LowRankHadamardExpFunction"]


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
        """``W ⊙ exp(ΔW)`` (or ``W ⊙ T_k(ΔW)``): the group's maps without their checks."""
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
        ops.check_factors(W, L, R)
        if ctx.needs_input_grad[0]:
            raise AdapterStateError(
                "LowRankHadamardExpFunction does not differentiate W; freeze it"
            )
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
        need_l, need_r = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if order in (None, 1):  # one operator: a single pass over G and W where compiled
            mode = ops.GRAD_TIMES if order == 1 else ops.GRAD_TIMES_EXP
            g_l, g_r = ops.lowrank_factor_grads(grad, W, L, R, mode)
            return None, (g_l if need_l else None), (g_r if need_r else None), None
        delta = (L @ R).view(W.shape)
        g = _exp_inplace(delta, order - 1).mul_(W).mul_(grad)
        gm = g.view(L.shape[0], R.shape[1])
        return None, (gm @ R.T if need_l else None), (L.T @ gm if need_r else None), None


def _lowrank_hadamard(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                      order: int | None) -> torch.Tensor:
    """``W ⊙ exp((L @ R).view(W.shape))`` (or ``T_k``), in one fresh buffer.

    Orders ``None`` and 1 run the ``liegroup::lowrank_form`` operator (the compiled kernel for
    float32 CPU operands, torch ops elsewhere), which every path that forms ``W'`` shares;
    higher orders are bit-identical to ``Hadamard.act(Hadamard.exp(ΔW, order), W)``.
    """
    if order in (None, 1):
        return ops.lowrank_form(W, L, R, order == 1)
    return _exp_inplace((L @ R).view(W.shape), order).mul_(W)


def _exp_inplace(X: torch.Tensor, order: int | None) -> torch.Tensor:
    """``Hadamard.exp(X, order)`` in one fresh buffer (Horner's rule done in place).

    Same operations in the same order as :func:`liegroup.groups.taylor_exp`, so bit-identical;
    ``order=0`` gives ones.
    """
    if order is None:
        # the weight's map, not a group element: an entry that underflows or overflows here is
        # caught where it matters (safe_merge), as on the low-rank path, with no host sync
        return torch.exp(X)
    return ops.exp_taylor(X, order)
