"""Full generator: ``ΔW = s·D`` with a dense weight-shaped ``D``."""

from __future__ import annotations

import torch
from torch import nn

from liegroup.peft.generators.base import Generator, GeneratorSpec
from liegroup.peft.registry import register_generator

__all__ = ["FullGenerator"]


class FullGenerator(Generator):
    """A dense algebra element: ``ΔW = s·D`` with ``D`` of the weight's shape, zero at init.

    As many parameters as the weight: a baseline (full fine-tuning through the group) and a
    test generator. No dropout (no input factor).

    Example:
        >>> g = FullGenerator(GeneratorSpec(weight_shape=(4, 2, 3), rank=1, scaling=1.0))
        >>> g.D.shape, g().abs().max().item()
        (torch.Size([4, 2, 3]), 0.0)
    """

    name = "full"
    accepted_options = frozenset()

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.D = nn.Parameter(
            torch.zeros(self.weight_shape, dtype=spec.dtype, device=spec.device)
        )

    def forward(self) -> torch.Tensor:
        """``s·D``."""
        return self.D * self.scaling


register_generator(FullGenerator)
