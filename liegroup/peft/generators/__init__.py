"""Generators: modules that produce the Lie-algebra element ``ΔW`` of an adapted weight.

A matrix PEFT method becomes a generator; one file each:

* :mod:`~liegroup.peft.generators.lora` — LoRA ``ΔW = s·fold(B·A)`` (``"lora"``) and its
  non-zero initialisers (PiSSA);
* :mod:`~liegroup.peft.generators.adalora` — AdaLoRA ``s·fold(P·diag(λ)·Q)`` with global rank
  allocation (``"adalora"``, :class:`RankAllocator`);
* :mod:`~liegroup.peft.generators.tucker` — a Tucker core and one factor per mode
  (``"tucker"``);
* :mod:`~liegroup.peft.generators.full` — a dense ``ΔW`` (``"full"``);
* :mod:`~liegroup.peft.generators.modewise` — one matrix per tensor mode, for the mode-wise
  matrix-group updates (``"modewise"``).

:mod:`~liegroup.peft.generators.base` holds :class:`Generator` and :class:`GeneratorSpec`, the
two things a new generator needs.

Example:
    >>> from liegroup.peft.generators import GeneratorSpec, LoRAGenerator
    >>> LoRAGenerator(GeneratorSpec(weight_shape=(8, 4), rank=2, scaling=1.0))().shape
    torch.Size([8, 4])
"""

from liegroup.peft.generators.adalora import (
    AdaLoRAGenerator,
    RankAllocator,
    budget_schedule,
    orthogonality_penalty,
)
from liegroup.peft.generators.base import Generator, GeneratorSpec, lowrank_dims
from liegroup.peft.generators.full import FullGenerator
from liegroup.peft.generators.lora import LoRAGenerator
from liegroup.peft.generators.modewise import ModeWiseGenerator
from liegroup.peft.generators.tucker import TuckerGenerator

__all__ = [
    "AdaLoRAGenerator",
    "FullGenerator",
    "Generator",
    "GeneratorSpec",
    "LoRAGenerator",
    "ModeWiseGenerator",
    "RankAllocator",
    "TuckerGenerator",
    "budget_schedule",
    "lowrank_dims",
    "orthogonality_penalty",
]
