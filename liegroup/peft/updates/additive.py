"""LoRA's update ``W + ΔW``."""

from __future__ import annotations

import torch

from liegroup.peft.registry import register_update
from liegroup.peft.updates.base import Update

__all__ = ["Additive"]


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


register_update("additive", lambda order: Additive())
