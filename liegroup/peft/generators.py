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
from liegroup.peft._engine import tucker_factors

__all__ = [
    "FullGenerator",
    "Generator",
    "GeneratorSpec",
    "LoRAGenerator",
    "TuckerGenerator",
    "available_generators",
    "lowrank_dims",
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
    #: ``"tensor"``: ``forward`` returns a weight-shaped ``ΔW`` (Hadamard and additive
    #: groups); ``"modes"``: a dict ``{mode k: n_k × n_k matrix}`` for mode-wise matrix groups.
    algebra_kind: ClassVar[str] = "tensor"

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
        raise TypeError(f"generator {type(self).__name__} has no prunable rank components")


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
        rows, mid, cols = lowrank_dims(spec)
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.B = nn.Parameter(torch.zeros(rows, mid, **kw))  # type: ignore[arg-type]
        self.A = nn.Parameter(torch.empty(mid, cols, **kw))  # type: ignore[arg-type]
        self.init_name = str(spec.options.get("init", "zeros"))
        self.reset_parameters()
        if self.init_name != "zeros":
            from liegroup.peft.init import get_initialiser

            if spec.dropout > 0:
                raise ValueError(
                    f"init={self.init_name!r} with dropout > 0 would not be the identity at step 0 "
                    "(dropout changes B·A but not the frozen B₀·A₀); set dropout=0"
                )
            B0, A0 = get_initialiser(self.init_name)(spec, rows, mid, cols)
            with torch.no_grad():
                self.B.copy_(B0)
                self.A.copy_(A0)
            # frozen copies: ΔW = s(BA − B₀A₀), bit-exactly zero at step 0
            self.register_buffer("B0", B0.detach().clone())
            self.register_buffer("A0", A0.detach().clone())

    def reset_parameters(self) -> None:
        """``B = 0`` (identity at init), ``A`` Kaiming-uniform as in LoRA."""
        nn.init.zeros_(self.B)
        _kaiming_uniform_(self.A)

    def forward(self) -> torch.Tensor:
        """``s·fold(B·dropout(A))`` (minus ``s·fold(B₀·A₀)`` for a non-zero init).

        The scale multiplies the small factor ``B``; with a non-zero initialiser the frozen
        product is computed by the same operations, so ``ΔW`` is exactly zero at step 0.
        """
        delta = (self.B * self.scaling) @ self.dropout(self.A)
        if self.init_name != "zeros":
            B0, A0 = self.B0, self.A0
            assert isinstance(B0, torch.Tensor) and isinstance(A0, torch.Tensor)
            delta = delta - (B0 * self.scaling) @ A0
        return delta.view(self.weight_shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s·B, dropout(A))``: ``ΔW = (s·B @ dropout(A)).view(weight_shape)``.

        ``None`` with a non-zero initialiser (the subtracted ``B₀A₀`` is not low-rank-fused:
        a fused ``[sB, −sB₀]·[A; A₀]`` would round to a non-zero ``ΔW`` at step 0).
        """
        if self.init_name != "zeros":
            return None
        A, drop = self.A, self.dropout
        # no call through an Identity module: this runs once per layer and step
        return self.B * self.scaling, (A if type(drop) is nn.Identity else drop(A))


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

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.D = nn.Parameter(
            torch.zeros(self.weight_shape, dtype=spec.dtype, device=spec.device)
        )

    def forward(self) -> torch.Tensor:
        """``s·D``."""
        return self.D * self.scaling


class TuckerGenerator(Generator):
    """Tucker (FLoRA-style) core: ``ΔW = s·(G ×₀ U₀ ×₁ U₁ ⋯ ×_{N−1} U_{N−1})``.

    ``U_i ∈ R^{I_i×r_i}`` with orthonormal columns (random), core ``G ∈ R^{r_0×⋯×r_{N−1}}``
    zero at init (identity). Ranks per mode: ``generator_kwargs["ranks"]`` (one int per mode),
    else ``rank`` for modes 0 and 1 and ``generator_kwargs["kernel_rank"]`` (default: the full
    kernel size) for the kernel modes; every rank is clamped to its mode's size. Works for any
    weight order (Linear: ``U₀ G U₁ᵀ``), grouped convs included (the modes are the weight's:
    ``C_out, C_in/g, k…``). Layout is ignored (Tucker acts on the tensor, not an unfolding).

    The low-rank fused path uses ``unfold(ΔW, 0) = (s·U₀) · unfold(G ×₁ U₁ ⋯, 0)``.

    Example:
        >>> import torch
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                      options={"kernel_rank": 2})
        >>> g = TuckerGenerator(spec)
        >>> g.core.shape, [tuple(u.shape) for u in g.factors_list]
        (torch.Size([2, 2, 2, 2]), [(8, 2), (4, 2), (3, 2), (3, 2)])
        >>> with torch.no_grad():
        ...     _ = g.core.normal_()
        >>> L, R = g.factors()
        >>> torch.allclose((L @ R).view(8, 4, 3, 3), g(), atol=1e-5)
        True
    """

    name = "tucker"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        shape = self.weight_shape
        opts = spec.options
        if "ranks" in opts:
            ranks = list(opts["ranks"])
            if len(ranks) != len(shape) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks
            ):
                raise ValueError(
                    f"generator_kwargs['ranks'] must be {len(shape)} ints >= 1 (one per mode of "
                    f"the weight {shape}), got {opts['ranks']!r}"
                )
        else:
            kr = opts.get("kernel_rank")
            if kr is not None and (isinstance(kr, bool) or not isinstance(kr, int) or kr < 1):
                raise ValueError(f"generator_kwargs['kernel_rank'] must be an int >= 1, got {kr!r}")
            ranks = [spec.rank] * min(2, len(shape)) + [
                (k if kr is None else kr) for k in shape[2:]
            ]
        self.ranks = [min(r, n) for r, n in zip(ranks, shape, strict=True)]
        # every kernel mode of size 1 (Linear, 1×1 conv): factors() takes the `linear` graph
        self._scalar_kernel = all(n == 1 for n in shape[2:])
        kw: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device}
        self.core = nn.Parameter(torch.zeros(self.ranks, **kw))
        self.factors_list = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, **kw)) for n, r in zip(shape, self.ranks, strict=True)]
        )
        for u in self.factors_list:
            nn.init.orthogonal_(u)

    def forward(self) -> torch.Tensor:
        """``s·(G ×₀ U₀ ×₁ U₁ ⋯)`` via :func:`liegroup.tensor.multi_mode_product`."""
        from liegroup.tensor import multi_mode_product

        return multi_mode_product(self.core, list(self.factors_list)) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·U₀, unfold(G ×₁ U₁ ⋯ ×_{N−1} U_{N−1}, 0))``.

        The kernel modes at once through ``K = U₂ ⊗ ⋯ ⊗ U_{N−1}`` (the row-major unfolding of
        a product over trailing modes is the core's unfolding times ``Kᵀ``), then ``C_in`` in
        one batched product laid out as the unfolding. When every kernel mode has size 1 (a
        Linear, a 1×1 conv) ``K`` is a scalar and the unfolding is ``(G·K) U₁ᵀ``: one
        ``linear``. Autograd keeps only the factors and core-sized operands, nothing
        proportional to the weight. With a kernel mode of size > 1 the product runs as one
        operator, ``liegroup::tucker_factors`` (one autograd node instead of about twenty).
        """
        # the ParameterList's own dict, in index order: iterating the list costs ~6 µs a call
        us: list[torch.Tensor] = [*self.factors_list._parameters.values()]  # type: ignore[list-item]
        r0, r1 = self.ranks[0], self.ranks[1]
        core: torch.Tensor = self.core
        if self._scalar_kernel:  # kernel modes of size 1: K is a scalar
            left = us[0] * self.scaling
            if len(us) > 2:
                k = us[2]
                for u in us[3:]:
                    k = k * u
                core = core.reshape(r0, r1) * k
            return left, torch.nn.functional.linear(core, us[1])  # (r₀, C_in) = G Kᵀ U₁ᵀ
        return tucker_factors(core, us, self.scaling)


_GENERATORS: dict[str, type[Generator]] = {
    "lora": LoRAGenerator,
    "full": FullGenerator,
    "tucker": TuckerGenerator,
}


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


# Generators (and the mode-wise groups) that live in their own modules register on import.
from liegroup.peft import adalora as _adalora  # noqa: E402,F401
from liegroup.peft import modewise as _modewise  # noqa: E402,F401
