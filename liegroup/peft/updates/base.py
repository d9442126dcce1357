"""The update base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from liegroup._validation import check_tensor
from liegroup.errors import AdapterStateError, ConfigError, DTypeError, ShapeError

__all__ = ["MAX_TAYLOR_ORDER", "Update", "parse_exp_map"]


MAX_TAYLOR_ORDER = 32
"""Largest Taylor order ``exp_map`` accepts (``"exact"`` has no truncation)."""


def parse_exp_map(exp_map: object) -> int | None:
    """Map ``exp_map`` to a Taylor order: ``"exact"`` → ``None``, ``"first_order"`` → 1, k → k.

    A Taylor order is at most :data:`MAX_TAYLOR_ORDER`: beyond it every term of a float64
    series that can matter is already in, and a larger order only costs time (an order read
    from a file is bounded before anything runs).

    Raises:
        ConfigError: for an unknown string or an int outside ``[1, MAX_TAYLOR_ORDER]``.
        DTypeError: for any other type.

    Example:
        >>> parse_exp_map("exact"), parse_exp_map("first_order"), parse_exp_map(3)
        (None, 1, 3)
    """
    if isinstance(exp_map, str):
        if exp_map == "exact":
            return None
        if exp_map == "first_order":
            return 1
        raise ConfigError(f"exp_map must be 'exact', 'first_order' or an int >= 1, got {exp_map!r}")
    if isinstance(exp_map, bool) or not isinstance(exp_map, int):
        raise DTypeError(
            f"exp_map must be 'exact', 'first_order' or an int >= 1, got {type(exp_map).__name__}"
        )
    if not 1 <= exp_map <= MAX_TAYLOR_ORDER:
        raise ConfigError(
            f"exp_map as a Taylor order must be in [1, {MAX_TAYLOR_ORDER}], got {exp_map}; "
            "use exp_map='exact' for the full exponential"
        )
    return exp_map


class Update(ABC):
    """How an algebra element ``ΔW`` acts on a frozen weight ``W``: ``W' = apply(W, ΔW)``.

    Subclasses set :attr:`invertible` (whether :meth:`inverse` recovers ``W`` from ``W'``
    accurately, so unmerging needs no copy of ``W``) and :attr:`zeros_frozen` (whether zero
    entries of ``W`` can never move).

    Example:
        >>> import torch
        >>> from liegroup.peft.updates import Additive
        >>> Additive().apply(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    name: ClassVar[str] = ""
    #: the map a config with ``exp_map=None`` gets for this update
    default_exp_map: ClassVar[str | int] = "exact"
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
            >>> from liegroup.peft.updates import Additive, HadamardExp
            >>> HadamardExp("first_order").fused_form(), Additive().fused_form()
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
