"""What every generator is: :class:`Generator`, a module returning ``ΔW``, and its spec.

Write a generator in a few lines: subclass :class:`Generator`, create parameters from the
:class:`GeneratorSpec` in ``__init__``, return ``ΔW`` (the weight's shape) from ``forward``,
and register it (``@register_generator``) or pass the class as ``LieRAConfig(generator=...)``.

Example:
    >>> import torch
    >>> class Full(Generator):
    ...     name = "full_doc_example"
    ...     def __init__(self, spec: GeneratorSpec) -> None:
    ...         super().__init__(spec)
    ...         self.D = torch.nn.Parameter(torch.zeros(spec.weight_shape, dtype=spec.dtype))
    ...     def forward(self) -> torch.Tensor:
    ...         return self.scaling * self.D
    >>> g = Full(GeneratorSpec(weight_shape=(4, 2, 3, 3), rank=1, scaling=1.0))
    >>> g().shape
    torch.Size([4, 2, 3, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from liegroup.errors import ConfigError, DTypeError, ShapeError

__all__ = ["Generator", "GeneratorSpec", "lowrank_dims"]


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything a generator may need to know about the weight it adapts.

    Attributes:
        weight_shape: the base weight's shape, ``(out, in)`` or ``(C_out, C_in/g, *k)``.
        rank: the configured rank ``r``.
        scaling: ``alpha/r`` (or ``alpha/√r``).
        layout: ``"mode1"`` or ``"loralib"``.
        groups: the conv's ``groups`` (1 for Linear).
        dropout: dropout probability for the input factor.
        dtype, device: of the base weight.
        module_name: dotted name of the adapted module (for error messages).
        options: ``LieRAConfig.generator_kwargs``.
        weight: the frozen base weight itself (detached), for data-dependent initialisers
            such as PiSSA; ``None`` when the caller does not provide it. Not compared, not
            printed.
    """

    weight_shape: tuple[int, ...]
    rank: int
    scaling: float
    layout: str = "mode1"
    groups: int = 1
    dropout: float = 0.0
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    module_name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Spatial kernel sizes (empty for Linear)."""
        return tuple(self.weight_shape[2:])


class Generator(nn.Module):
    """Base class: an ``nn.Module`` whose ``forward()`` returns ``ΔW`` of ``weight_shape``.

    Subclasses set ``name`` (the registry key) and, if they apply ``self.dropout`` to an input
    factor (so that the adapter's forward stays one op on ``W'``), ``supports_dropout = True``;
    otherwise a config with ``dropout > 0`` is refused. ``ΔW`` must be zero at init (identity).

    Example:
        >>> from liegroup.peft.generators import LoRAGenerator
        >>> spec = GeneratorSpec(weight_shape=(3, 5), rank=2, scaling=0.5)
        >>> LoRAGenerator(spec)().abs().max().item()
        0.0
    """

    name: ClassVar[str] = ""
    supports_dropout: ClassVar[bool] = False
    #: ``"tensor"``: ``forward`` returns a weight-shaped ``ΔW`` (Hadamard and additive
    #: groups); ``"modes"``: a dict ``{mode k: n_k × n_k matrix}`` for mode-wise matrix groups.
    algebra_kind: ClassVar[str] = "tensor"
    #: the ``generator_kwargs`` keys this generator reads; any other key is an error (a typo
    #: would otherwise be ignored). ``None`` (the default, for user generators): not checked.
    accepted_options: ClassVar[frozenset[str] | None] = None

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        check_options(type(self), spec.options)
        if spec.dropout > 0 and not self.supports_dropout:
            raise ConfigError(
                f"generator {type(self).__name__} does not support dropout (it has no input "
                "factor to drop); set dropout=0"
            )
        self.spec = spec
        self.weight_shape = tuple(spec.weight_shape)
        self.scaling = float(spec.scaling)
        self.dropout: nn.Module = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self) -> torch.Tensor:
        """The algebra element ``ΔW`` (shape ``weight_shape``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional low-rank form: ``(L, R)`` with ``ΔW = (L @ R).view(weight_shape)``.

        A generator that returns factors lets the update form ``W'`` without keeping ``ΔW``
        (it is recomputed from the small factors in backward). ``None`` (the default): only
        :meth:`forward` is used.
        """
        return None

    def export_state(self) -> dict[str, torch.Tensor]:
        """The tensors written by ``save_pretrained`` (default: the full ``state_dict``).

        Generators that prune at save time (AdaLoRA) return smaller tensors here and rebuild
        the matching shapes from the config's ``rank_pattern`` at load (:meth:`prune_`).
        """
        return dict(self.state_dict())

    def rank_pattern(self) -> list[bool] | None:
        """Which rank components are kept, in the original numbering (``None``: no ranks)."""
        return None

    def prune_(self, keep: list[bool]) -> None:
        """Drop the rank components where ``keep`` is ``False`` (only rank-allocating ones)."""
        raise DTypeError(f"generator {type(self).__name__} has no prunable rank components")


def check_options(cls: type[Generator], options: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the ``generator_kwargs`` keys ``cls`` does not read.

    Example:
        >>> from liegroup.peft.generators import LoRAGenerator
        >>> check_options(LoRAGenerator, {"init": "pissa"})
    """
    accepted = cls.accepted_options
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"generator {cls.name or cls.__name__!r} does not take generator_kwargs {unknown}; "
            f"it takes {sorted(accepted) or 'none'}"
        )


def lowrank_dims(spec: GeneratorSpec) -> tuple[int, int, int]:
    """``(rows, mid, cols)`` of the low-rank factorisation ``rows×mid @ mid×cols`` for a layout.

    ``mode1``: ``(C_out, r, C_in/g·∏k)``; ``loralib`` (equal kernel sizes ``k``):
    ``(C_out/g·k, r·k, C_in·k^{N−1})``. In both, ``fold`` is a row-major view.

    Example:
        >>> lowrank_dims(GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0))
        (8, 2, 36)
    """
    shape = tuple(spec.weight_shape)
    r = spec.rank
    k = spec.kernel_size
    if spec.layout == "loralib" and k:
        if len(set(k)) != 1:
            raise ShapeError(
                f"layout='loralib' needs equal kernel sizes, but {spec.module_name or 'the '}"
                f" module has kernel {k}; use layout='mode1'"
            )
        ks = k[0]
        c_out, c_in = shape[0], shape[1] * spec.groups
        if c_out % spec.groups:
            raise ShapeError(f"C_out={c_out} is not divisible by groups={spec.groups}")
        return c_out // spec.groups * ks, r * ks, c_in * ks ** (len(k) - 1)
    return shape[0], r, math.prod(shape[1:])


def _kaiming_uniform_(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


@torch.no_grad()
def orthogonal_(t: torch.Tensor) -> torch.Tensor:
    """``nn.init.orthogonal_`` for any floating dtype: QR in float32 at least, then rounded.

    (The CPU QR has no float16/bfloat16 kernel.)

    Example:
        >>> import torch
        >>> q = orthogonal_(torch.empty(4, 2, dtype=torch.bfloat16))
        >>> q.dtype, bool((q.float().T @ q.float() - torch.eye(2)).abs().max() < 0.02)
        (torch.bfloat16, True)
    """
    wide = torch.promote_types(t.dtype, torch.float32)
    if wide == t.dtype:
        return nn.init.orthogonal_(t)
    return t.copy_(nn.init.orthogonal_(torch.empty(t.shape, dtype=wide, device=t.device)))
