"""Generators: modules that produce the Lie-algebra element ``ΔW`` with a weight's shape.

A matrix PEFT method becomes a generator. :class:`LoRAGenerator` ships here:
``ΔW = s·fold(B·A)`` with ``B = 0`` at init (so ``W' = W`` at step 0), ``A`` Kaiming-uniform,
``s = alpha/r`` (``alpha/√r`` with rsLoRA), in one of two layouts:

* ``mode1`` — ``B ∈ R^{C_out×r}``, ``A ∈ R^{r×(C_in/g·∏k)}``, ``fold`` = reshape of the mode-1
  unfolding (as HF peft and LyCORIS LoCon do). For Linear, rows ``out``, cols ``in``.
* ``loralib`` — the paper's conv layout, ``B ∈ R^{(C_out/g·k)×(r·k)}``,
  ``A ∈ R^{(r·k)×(C_in·k^{N−1})}`` for an N-d kernel with all sizes ``k``, then a row-major view
  (for 2-d kernels exactly loralib's ``ConvLoRA``). Linear layers use ``mode1``.

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

from liegroup.errors import ShapeError

__all__ = [
    "Generator",
    "GeneratorSpec",
    "LoRAGenerator",
    "available_generators",
    "register_generator",
    "resolve_generator",
]


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
        >>> spec = GeneratorSpec(weight_shape=(3, 5), rank=2, scaling=0.5)
        >>> LoRAGenerator(spec)().abs().max().item()
        0.0
    """

    name: ClassVar[str] = ""
    supports_dropout: ClassVar[bool] = False

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        if spec.dropout > 0 and not self.supports_dropout:
            raise ValueError(
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


def _kaiming_uniform_(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoRAGenerator(Generator):
    """LoRA: ``ΔW = s·fold(B·A)``, ``B`` zeros, ``A`` Kaiming-uniform; dropout acts on ``A``.

    Args:
        spec: the weight's :class:`GeneratorSpec`; ``layout="loralib"`` needs equal kernel
            sizes for a conv weight.

    Example:
        >>> import torch
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0)
        >>> g = LoRAGenerator(spec)
        >>> g.B.shape, g.A.shape
        (torch.Size([8, 2]), torch.Size([2, 36]))
        >>> g2 = LoRAGenerator(GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                                  layout="loralib"))
        >>> g2.B.shape, g2.A.shape
        (torch.Size([24, 6]), torch.Size([6, 12]))
    """

    name = "lora"
    supports_dropout = True

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        shape = self.weight_shape
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
            rows, mid, cols = c_out // spec.groups * ks, r * ks, c_in * ks ** (len(k) - 1)
        else:
            rows, mid, cols = shape[0], r, math.prod(shape[1:])
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.B = nn.Parameter(torch.zeros(rows, mid, **kw))  # type: ignore[arg-type]
        self.A = nn.Parameter(torch.empty(mid, cols, **kw))  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``B = 0`` (identity at init), ``A`` Kaiming-uniform as in LoRA."""
        nn.init.zeros_(self.B)
        _kaiming_uniform_(self.A)

    def forward(self) -> torch.Tensor:
        """``s·fold(B·dropout(A))``; the scale multiplies the small factor ``B``."""
        L, R = self.factors()
        return (L @ R).view(self.weight_shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B, dropout(A))``: ``ΔW = (s·B @ dropout(A)).view(weight_shape)``."""
        return self.B * self.scaling, self.dropout(self.A)


_GENERATORS: dict[str, type[Generator]] = {"lora": LoRAGenerator}


def register_generator(cls: type[Generator]) -> type[Generator]:
    """Register a :class:`Generator` subclass under ``cls.name`` (usable as a decorator).

    Re-registering the same class (same module and qualified name, e.g. a re-run notebook
    cell) replaces it; another class under a taken name raises ``ValueError``.

    Example:
        >>> @register_generator
        ... class MyLoRA(LoRAGenerator):
        ...     name = "my_lora_doc"
        >>> resolve_generator("my_lora_doc") is MyLoRA
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise TypeError(f"only Generator subclasses can be registered, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    old = _GENERATORS.get(name)
    if old is not None and old is not cls and (
        (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__)
    ):
        raise ValueError(
            f"generator name {name!r} is already taken by {old.__module__}.{old.__qualname__}"
        )
    _GENERATORS[name] = cls
    return cls


def resolve_generator(generator: str | type[Generator]) -> type[Generator]:
    """The generator class for a registered name, or the class itself (registered on the way).

    Example:
        >>> resolve_generator("lora").__name__
        'LoRAGenerator'
    """
    if isinstance(generator, type):
        return register_generator(generator)
    if isinstance(generator, str):
        if generator not in _GENERATORS:
            raise ValueError(
                f"unknown generator {generator!r}; known: {sorted(_GENERATORS)} (register a "
                "Generator subclass with liegroup.peft.register_generator)"
            )
        return _GENERATORS[generator]
    raise TypeError(f"generator must be a name or a Generator subclass, got {generator!r}")


def available_generators() -> list[str]:
    """Names of the registered generators.

    Example:
        >>> "lora" in available_generators()
        True
    """
    return sorted(_GENERATORS)
