"""The adapted weight as a pure function: ``W' = update(W, ΔW)``.

:func:`adapted_weight` is the one function that both the adapter layer's forward and merging
call; :func:`adapted_weight_lowrank` is the same map with ``ΔW = L·R`` given in factored form
(fused: nothing weight-sized is kept for the backward). The update rules themselves live in
:mod:`liegroup.peft.updates`.

Example:
    >>> import torch
    >>> W = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    >>> adapted_weight(W, torch.zeros(2, 2))
    tensor([[ 1., -2.],
            [ 0.,  3.]])
    >>> adapted_weight(W, torch.full((2, 2), 0.5), exp_map="first_order")
    tensor([[ 1.5000, -3.0000],
            [ 0.0000,  4.5000]])
"""

from __future__ import annotations

import torch

from liegroup._validation import check_tensor
from liegroup.errors import ShapeError
from liegroup.peft.registry import get_update
from liegroup.peft.updates.base import Update

__all__ = ["adapted_weight", "adapted_weight_lowrank"]


def adapted_weight_lowrank(
    W: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    update: Update | str = "hadamard",
    exp_map: str | int = "exact",
) -> torch.Tensor:
    """:func:`adapted_weight` with ``ΔW = (L @ R).view(W.shape)``, fused where possible.

    Args:
        W: frozen weight, any shape with ``W.numel() == L.shape[0] * R.shape[1]``.
        L: ``(rows, m)`` left factor.
        R: ``(m, cols)`` right factor.
        update: an :class:`~liegroup.peft.Update` or a registered update name.
        exp_map: the map when ``update`` is a name: ``"exact"``, ``"first_order"`` or ``k``.

    Returns:
        ``W'`` with ``W``'s shape, equal to ``adapted_weight(W, (L @ R).view(W.shape), ...)``;
        the Hadamard and additive updates compute it without keeping a weight-sized tensor
        for the backward.

    Example:
        >>> import torch
        >>> W, L, R = torch.ones(2, 2), torch.ones(2, 1), torch.full((1, 2), 0.5)
        >>> adapted_weight_lowrank(W, L, R, exp_map="first_order")
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
        update = get_update(update, exp_map)
    return update.apply_lowrank(W, L, R)


def adapted_weight(
    W: torch.Tensor,
    delta: torch.Tensor,
    update: Update | str = "hadamard",
    exp_map: str | int = "exact",
) -> torch.Tensor:
    """The adapted weight ``W' = update(W, ΔW)``.

    Args:
        W: frozen weight, any shape (``(C_out, C_in)`` or ``(C_out, C_in/g, *k)``).
        delta: algebra element, for the shipped updates a tensor of ``W``'s shape, dtype and
            device (checked by :meth:`~liegroup.peft.Update.check_delta`).
        update: an :class:`~liegroup.peft.Update`, or a registered update name
            (``"hadamard"``, ``"additive"``).
        exp_map: the map when ``update`` is a name: ``"exact"`` (``W ⊙ exp(ΔW)``),
            ``"first_order"`` (``W + W ⊙ ΔW``) or a Taylor order ``k``.

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
        update = get_update(update, exp_map)
    update.check_delta(W, delta)
    return update.apply(W, delta)
