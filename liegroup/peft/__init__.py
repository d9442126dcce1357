"""Structure-preserving parameter-efficient fine-tuning (LieRA) on top of :mod:`liegroup`.

This subpackage imports :mod:`liegroup`; the reverse never happens. An adapter is a triple
(group, action, generator): a :class:`Generator` produces an algebra element ``ΔW`` of a
weight's shape, an :class:`Update` maps ``(W, ΔW)`` to ``W'`` (LieRA: ``W ⊙ exp(ΔW)``; LoRA:
``W + ΔW``), and :class:`LieRALayer` runs the base module's own op once on ``W'``.

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU())
    >>> model = get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"]))
    >>> model(torch.randn(1, 2, 9)).shape
    torch.Size([1, 4, 7])
"""

from liegroup.peft._engine import compiled_kernel
from liegroup.peft.adalora import (
    AdaLoRAGenerator,
    RankAllocator,
    budget_schedule,
    orthogonality_penalty,
)
from liegroup.peft.config import LieRAConfig, parse_exp_map
from liegroup.peft.functional import (
    Additive,
    HadamardExp,
    HadamardExpFunction,
    LowRankHadamardExpFunction,
    Update,
    adapted_weight,
    adapted_weight_lowrank,
    get_update,
    register_update,
)
from liegroup.peft.generators import (
    FullGenerator,
    Generator,
    GeneratorSpec,
    LoRAGenerator,
    TuckerGenerator,
    available_generators,
    register_generator,
    resolve_generator,
)
from liegroup.peft.init import register_initialiser
from liegroup.peft.layer import LieRALayer, ModulesToSaveWrapper
from liegroup.peft.model import LieRAModel, get_peft_model
from liegroup.peft.modewise import ModeBlocks, ModeFactors, ModeWiseGenerator, ModeWiseUpdate

__all__ = [
    "AdaLoRAGenerator",
    "Additive",
    "FullGenerator",
    "Generator",
    "GeneratorSpec",
    "HadamardExp",
    "HadamardExpFunction",
    "LieRAConfig",
    "LieRALayer",
    "LieRAModel",
    "LoRAGenerator",
    "LowRankHadamardExpFunction",
    "ModeBlocks",
    "ModeFactors",
    "ModeWiseGenerator",
    "ModeWiseUpdate",
    "ModulesToSaveWrapper",
    "RankAllocator",
    "TuckerGenerator",
    "Update",
    "adapted_weight",
    "adapted_weight_lowrank",
    "available_generators",
    "budget_schedule",
    "compiled_kernel",
    "get_peft_model",
    "get_update",
    "orthogonality_penalty",
    "parse_exp_map",
    "register_generator",
    "register_initialiser",
    "register_update",
    "resolve_generator",
]
