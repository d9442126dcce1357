"""Mode-wise generator: one matrix per chosen tensor mode."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from liegroup.errors import ConfigError
from liegroup.peft.generators.base import Generator, GeneratorSpec
from liegroup.peft.registry import register_generator
from liegroup.peft.updates.modewise import ModeBlocks, ModeFactors

__all__ = ["ModeWiseGenerator"]


class ModeWiseGenerator(Generator):
    """One matrix per chosen mode, zero at init; the group's update maps it to its algebra.

    Options (``generator_kwargs``):
        modes: tensor modes to act on (default ``[0, 1]``: output and input channels, a
            Linear's two modes; modes of size 1, e.g. a depthwise conv's ``C_in/g``, are
            skipped by default and refused when listed). Kernel modes may be listed too.
        structure: ``"lowrank"`` (default) ``M_k = s·B_k A_kᵀ``, ``B_k ∈ R^{n_k×r}`` zero,
            ``A_k`` Kaiming-uniform (``r`` = the config's rank, clamped to ``n_k``; the skew
            part for SO has rank ≤ 2r); or ``"block"``: ``M_k = s·blockdiag(D_1, …)`` with
            blocks of ``block_size`` (default 4; the last block takes the remainder), zero at
            init (OFT-style).

    Example:
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                      options={"modes": [0, 2], "structure": "block",
        ...                               "block_size": 3})
        >>> d = ModeWiseGenerator(spec)()
        >>> sorted(d), type(d[0]).__name__, tuple(d[0].blocks.shape), tuple(d[2].dense().shape)
        ([0, 2], 'ModeBlocks', (2, 3, 3), (3, 3))
    """

    name = "modewise"
    accepted_options = frozenset({"modes", "structure", "block_size"})
    algebra_kind = "modes"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        shape = self.weight_shape
        opts = spec.options
        default = [k for k in (0, 1) if shape[k] > 1]
        modes = list(opts.get("modes", default))
        if not modes or len(set(modes)) != len(modes) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(shape)
            and shape[k] > 1
            for k in modes
        ):
            raise ConfigError(
                f"generator_kwargs['modes'] must be distinct modes of size > 1 of the weight "
                f"{shape} (0..{len(shape) - 1}), got {opts.get('modes', default)!r}"
            )
        self.modes = sorted(modes)
        self.structure = str(opts.get("structure", "lowrank"))
        if self.structure not in ("lowrank", "block"):
            raise ConfigError(
                "generator_kwargs['structure'] must be 'lowrank' or 'block', got "
                f"{self.structure!r}"
            )
        bs = opts.get("block_size", 4)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"generator_kwargs['block_size'] must be an int >= 1, got {bs!r}")
        self.block_size = bs
        kw: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device}
        self.mats = nn.ParameterDict()
        for k in self.modes:
            n = shape[k]
            if self.structure == "lowrank":
                r = min(spec.rank, n)
                self.mats[f"B{k}"] = nn.Parameter(torch.zeros(n, r, **kw))
                A = torch.empty(n, r, **kw)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                self.mats[f"A{k}"] = nn.Parameter(A)
            else:
                b = min(bs, n)
                q, rem = divmod(n, b)
                self.mats[f"D{k}"] = nn.Parameter(torch.zeros(q, b, b, **kw))
                if rem:
                    self.mats[f"R{k}"] = nn.Parameter(torch.zeros(rem, rem, **kw))

    def forward(self) -> dict[int, ModeFactors | ModeBlocks]:  # type: ignore[override]
        """``{k: M_k}`` in structured form (``.dense()`` gives the ``n_k × n_k`` matrix)."""
        out: dict[int, ModeFactors | ModeBlocks] = {}
        s = self.scaling
        for k in self.modes:
            if self.structure == "lowrank":
                out[k] = ModeFactors(self.mats[f"B{k}"] * s, self.mats[f"A{k}"])
            else:
                tail = self.mats[f"R{k}"] * s if f"R{k}" in self.mats else None
                out[k] = ModeBlocks(self.mats[f"D{k}"] * s, tail)
        return out


register_generator(ModeWiseGenerator)
