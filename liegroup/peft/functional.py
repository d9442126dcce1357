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
from typing import Any, ClassVar

import torch
from torch.autograd.function import once_differentiable

from liegroup._validation import check_tensor
from liegroup.errors import AdapterStateError, ShapeError
from liegroup.groups.hadamard import Hadamard
from liegroup.peft._engine import ops as _ops

__all__ = [
    "Additive",
    "HadamardExp",
    "HadamardExpFunction",
    "LowRankHadamardExpFunction",
    "Update",
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
        _ops.check_factors(W, L, R)
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
        need_l, need_r = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if order in (None, 1):  # one operator: a single pass over G and W where compiled
            mode = _ops.GRAD_TIMES if order == 1 else _ops.GRAD_TIMES_EXP
            g_l, g_r = _ops.lowrank_factor_grads(grad, W, L, R, mode)
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
        return _ops.lowrank_form(W, L, R, order == 1)
    return _exp_inplace((L @ R).view(W.shape), order).mul_(W)


def _exp_inplace(X: torch.Tensor, order: int | None) -> torch.Tensor:
    """``Hadamard.exp(X, order)`` in one fresh buffer (Horner's rule done in place).

    Same operations in the same order as :func:`liegroup.groups.taylor_exp`, so bit-identical;
    ``order=0`` gives ones.
    """
    if order is None:
        return Hadamard(tuple(X.shape)).exp(X)
    return _ops.exp_taylor(X, order)


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
        the engine's fused low-rank node (``"additive"``), whose
        backward never forms ``∂L/∂W'``. ``L, R`` are differentiable functions of ``ΔW``.
        Default: ``None``.
        """
        return None

    def fused_form(self) -> tuple[str, int | None] | None:
        """``(name, order)`` when the engine may run this update as a fused low-rank node.

        ``("hadamard", order)`` and ``("additive", None)`` for the shipped updates (exactly
        those classes, not subclasses, whose ``apply`` may differ); ``None`` (the default) for
        every other update, which runs through :meth:`apply` / :meth:`apply_lowrank`.

        Example:
            >>> HadamardExp(1).fused_form(), Additive().fused_form()
            (('hadamard', 1), ('additive', None))
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

    def fused_form(self) -> tuple[str, int | None] | None:
        """``("hadamard", order)`` for this class itself (see :meth:`Update.fused_form`)."""
        return ("hadamard", self.order) if type(self) is HadamardExp else None

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

    def fused_form(self) -> tuple[str, int | None] | None:
        """``("additive", None)`` for this class itself (see :meth:`Update.fused_form`)."""
        return ("additive", None) if type(self) is Additive else None

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
