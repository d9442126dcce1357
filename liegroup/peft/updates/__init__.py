"""Update rules: how a generator's algebra element ``ΔW`` acts on a frozen weight ``W``.

An adapter is a triple (group, action, generator). The generator produces ``ΔW``; an
:class:`Update` turns ``(W, ΔW)`` into ``W'``:

* :class:`HadamardExp` (``update="hadamard"``) — LieRA: ``W' = W ⊙ exp(ΔW)``, or with the
  truncated exponential ``T_k(ΔW) = Σ_{j≤k} ΔW^j/j!`` (``exp_map=k``; ``"first_order"`` is
  ``W + W ⊙ ΔW``). Its entry-wise error against the exact map is bounded by
  ``|W| ⊙ (e^{|ΔW|} − T_k(|ΔW|))`` (:func:`liegroup.groups.taylor_remainder_bound`).
* :class:`Additive` (``update="additive"``) — LoRA: ``W' = W + ΔW``.
* :class:`ModeWiseUpdate` (``update="so" | "gl" | "sl"``) — a matrix group per tensor mode,
  acting by the mode product (:mod:`liegroup.peft.updates.modewise`).

A new rule subclasses :class:`Update` and is registered with
:func:`liegroup.peft.register_update`.

Example:
    >>> import torch
    >>> from liegroup.peft.updates import HadamardExp
    >>> HadamardExp("first_order").apply(torch.tensor([2.0]), torch.tensor([0.5]))
    tensor([3.])
"""

from liegroup.peft.updates.additive import Additive
from liegroup.peft.updates.base import Update, parse_exp_map
from liegroup.peft.updates.hadamard import HadamardExp
from liegroup.peft.updates.modewise import ModeBlocks, ModeFactors, ModeWiseUpdate

__all__ = [
    "Additive",
    "HadamardExp",
    "ModeBlocks",
    "ModeFactors",
    "ModeWiseUpdate",
    "Update",
    "parse_exp_map",
]
