"""Structure-preserving parameter-efficient fine-tuning (LieRA) on top of :mod:`liegroup`.

This subpackage imports :mod:`liegroup`; the reverse never happens. An adapter is a triple
(group, action, generator): a :class:`Generator` produces an algebra element ``ΔW`` of a
weight's shape, an :class:`Update` maps ``(W, ΔW)`` to ``W'`` (LieRA: ``W ⊙ exp(ΔW)``; LoRA:
``W + ΔW``), and :class:`LieRALayer` runs the base module's own op once on ``W'``.

Where things live: ``config.py`` (:class:`LieRAConfig`), ``model.py`` (the model verbs),
``layer.py`` (the adapter layer), ``registry.py`` (names → implementations),
``functional.py`` (:func:`adapted_weight`), ``generators/`` (one file per method),
``updates/`` (one file per update rule) and ``_engine/`` (the private speed and memory engine).

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU())
    >>> model = get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"]))
    >>> model(torch.randn(1, 2, 9)).shape
    torch.Size([1, 4, 7])
"""

from liegroup.peft import generators as generators
from liegroup.peft import updates as updates
from liegroup.peft.config import LieRAConfig
from liegroup.peft.functional import adapted_weight, adapted_weight_lowrank
from liegroup.peft.generators import Generator, GeneratorSpec, RankAllocator
from liegroup.peft.layer import LieRALayer
from liegroup.peft.model import LieRAModel, get_peft_model
from liegroup.peft.registry import (
    available_generators,
    available_initialisers,
    available_updates,
    get_generator,
    get_initialiser,
    get_update,
    register_generator,
    register_initialiser,
    register_update,
)
from liegroup.peft.updates import Update

__all__ = [
    "Generator",
    "GeneratorSpec",
    "LieRAConfig",
    "LieRALayer",
    "LieRAModel",
    "RankAllocator",
    "Update",
    "adapted_weight",
    "adapted_weight_lowrank",
    "available_generators",
    "available_initialisers",
    "available_updates",
    "get_generator",
    "get_initialiser",
    "get_peft_model",
    "get_update",
    "register_generator",
    "register_initialiser",
    "register_update",
]
