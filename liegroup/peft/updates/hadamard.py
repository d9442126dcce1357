"""LieRA's update ``W ⊙ exp(ΔW)``."""

from __future__ import annotations

import torch

from liegroup.peft._engine import HadamardExpFunction, LowRankHadamardExpFunction
from liegroup.peft.registry import register_update
from liegroup.peft.updates.base import Update, parse_exp_map

__all__ = ["HadamardExp"]


class HadamardExp(Update):
    """LieRA's update ``W' = W ⊙ exp(ΔW)`` (``exp_map="exact"``) or ``W ⊙ T_k(ΔW)`` (``exp_map=k``).

    ``exp_map="first_order"`` is ``k = 1``: ``W + W ⊙ ΔW``. :attr:`order` holds the parsed
    Taylor order (``None`` for the exact map).

    The exact map is invertible by the group inverse ``W = W' ⊙ exp(−ΔW)``; a truncated map
    would need a division by ``T_k(ΔW)``, which can be 0 or tiny, so it is not.

    Example:
        >>> import torch
        >>> u = HadamardExp("exact")
        >>> W = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> d = torch.tensor([0.3, -0.1], dtype=torch.float64)
        >>> torch.allclose(u.inverse(u.apply(W, d), d), W)
        True
    """

    name = "hadamard"
    default_exp_map = "first_order"
    zeros_frozen = True

    def __init__(self, exp_map: str | int = "exact") -> None:
        self.order = parse_exp_map(exp_map)

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
        return torch.exp(-delta) * Wp  # G.act(G.exp(−ΔW), W') without the group's checks

    def __repr__(self) -> str:
        return f"HadamardExp(exp_map={'exact' if self.order is None else self.order!r})"


register_update("hadamard", lambda order: HadamardExp("exact" if order is None else order))
