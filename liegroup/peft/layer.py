"""The one adapter layer for ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv1d/2d/3d``.

:class:`LieRALayer` wraps a base module and runs **one** op, the base module's own
(``F.linear``; ``Conv1D``'s ``x @ W + b`` on its ``(in, out)`` weight, whose ``ΔW`` and ``W'``
keep that layout; or the conv's ``_conv_forward``, which honours stride, padding, dilation,
groups and every ``padding_mode``), on the adapted weight
``W' = adapted_weight(W, ΔW)`` (:func:`liegroup.peft.adapted_weight`). Nothing is
specific to a dimensionality: the generator sees the weight's shape and ``groups``.

Several adapters can live in one layer (keyed by name, one active); merging writes ``W'``
into the base weight, unmerging restores ``W`` by the group inverse (exact map, additive) or
from a copy kept at merge time (truncated maps: a division by ``T_k(ΔW)`` is ill-conditioned).

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig
    >>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    >>> layer = LieRALayer(conv)
    >>> layer.add_adapter("default", LieRAConfig(rank=2, target_modules=["x"]))
    >>> x = torch.randn(1, 4, 8, 8)
    >>> torch.equal(layer(x), conv(x))   # identity at init
    True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from liegroup._validation import check_finite
from liegroup.errors import (
    AdapterStateError,
    ConfigError,
    DeviceError,
    NonFiniteError,
    ShapeError,
    UnsupportedModuleError,
)
from liegroup.peft._engine import (
    adapted_forward,
    check_adapter,
    is_transposed_linear,
    transposed_linear_class,
    weights_outside_autocast,
)
from liegroup.peft.config import LieRAConfig
from liegroup.peft.functional import adapted_weight, adapted_weight_lowrank
from liegroup.peft.generators.base import Generator, GeneratorSpec
from liegroup.peft.registry import get_generator, get_update
from liegroup.peft.updates.base import Update

__all__ = [
    "SUPPORTED_MODULES",
    "LieRALayer",
    "ModulesToSaveWrapper",
    "check_adapter_name",
    "check_supported",
]

_SMALL_RANK = 256  # any rank up to this is accepted, whatever the weight's size

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_supported(module: nn.Module, name: str = "") -> None:
    """Raise :class:`UnsupportedModuleError` unless ``module`` can be wrapped.

    Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers' ``Conv1D`` (GPT-2's linear
    layer, weight stored ``(in, out)``; run as a transposed-weight linear op) and subclasses
    that keep their base ``forward``. Refused: anything else (transposed convs, embeddings,
    lazy modules, the ``out_proj`` of ``nn.MultiheadAttention``, whose weight is read
    directly, not through ``forward``).

    Example:
        >>> import torch
        >>> check_supported(torch.nn.Conv3d(2, 2, 3))
        >>> try:
        ...     check_supported(torch.nn.Embedding(3, 2), "emb")
        ... except TypeError as e:
        ...     print(type(e).__name__)
        UnsupportedModuleError
    """
    label = f"module {name!r} ({type(module).__name__})" if name else type(module).__name__
    base = next((c for c in SUPPORTED_MODULES if isinstance(module, c)), None)
    if base is None and is_transposed_linear(module):
        base = transposed_linear_class()
        assert base is not None
    if (
        base is None
        or isinstance(module, nn.modules.lazy.LazyModuleMixin)
        or type(module).forward is not base.forward
        or type(module).__name__ == "NonDynamicallyQuantizableLinear"
    ):
        raise UnsupportedModuleError(
            f"cannot adapt {label}: supported are "
            f"{', '.join(c.__name__ for c in SUPPORTED_MODULES)}, transformers' Conv1D (with "
            "their own forward); "
            "exclude it with exclude_modules or narrow target_modules"
        )


def check_adapter_name(name: object) -> str:
    """Validate an adapter name: a non-empty string without ``.`` (it becomes a module key).

    Raises:
        ConfigError: for anything else, saying what a valid name is.

    Example:
        >>> check_adapter_name("task_a")
        'task_a'
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(
            f"adapter name must be a non-empty string without '.', got {name!r} (it names "
            "submodules and checkpoint keys; use e.g. 'task_a')"
        )
    return name


def _inverse_restores(update: Update, W: torch.Tensor, Wp: torch.Tensor, delta: object) -> bool:
    """Whether the group inverse of the rounded ``W'`` gives ``W`` back to rounding.

    Tolerance: 16 ulps of W's dtype, relative to ``|W|`` (a round trip rounds ``W'`` once
    and the inverse a few times); entries where ``W'`` underflowed to zero or overflowed
    fail it (so do subnormal W' that lost digits: the bound is relative, with no floor).
    """
    if not update.invertible:
        return False
    wide = torch.promote_types(W.dtype, torch.float32)
    back = update.inverse(Wp.to(wide), delta)  # type: ignore[arg-type]
    W64 = W.to(wide)
    tol = 16 * torch.finfo(W.dtype).eps
    ok = (back - W64).abs() <= tol * W64.abs()
    return bool(ok.all())


class LieRALayer(nn.Module):
    """A supported base module plus named adapters; forward is one op on ``W'``.

    Args:
        base_layer: an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (see :func:`check_supported`);
            its parameters are frozen.
        module_name: its dotted name in the model (for messages).

    Attributes:
        generators: ``nn.ModuleDict`` adapter name → :class:`Generator`.
        active_adapter: the adapter used in forward (``None``: none).
        merged_adapter: the adapter merged into the base weight (``None``: unmerged).
        disabled: when ``True`` forward is the base module's.

    Example:
        >>> import torch
        >>> from liegroup.peft import LieRAConfig
        >>> lin = torch.nn.Linear(5, 3)
        >>> layer = LieRALayer(lin)
        >>> layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"]))
        >>> sorted(n for n, _ in layer.named_parameters() if "generators" in n)
        ['generators.a.A', 'generators.a.B']
    """

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        check_supported(base_layer, module_name)
        super().__init__()
        for p in base_layer.parameters():  # the base is frozen: only adapters train
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.module_name = module_name
        self.generators = nn.ModuleDict()
        self.updates: dict[str, Update] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self._merge_backup: torch.Tensor | None = None
        self._tied_base: nn.Module | None = None

    # ------------------------------------------------------------------ adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight (``W``, or ``W'`` while merged)."""
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        """The base module's bias."""
        b = self.base_layer.bias
        assert b is None or isinstance(b, torch.Tensor)
        return b

    def _groups(self) -> int:
        return int(getattr(self.base_layer, "groups", 1))

    def add_adapter(self, adapter_name: str, config: LieRAConfig) -> None:
        """Create adapter ``adapter_name`` from ``config``; it becomes active if none is.

        Warns when more than ``config.zero_warning_fraction`` of ``W``'s entries are exactly
        zero and the group keeps zeros fixed (Hadamard): those entries can never move.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.generators:
            raise ConfigError(f"adapter {adapter_name!r} already exists in {self.module_name!r}")
        W = self.weight
        if W.is_meta:
            raise DeviceError(
                f"the weight of {self.module_name or 'the module'!r} is on the meta device (no "
                "values); materialise the model first (load its weights, or "
                "model.to_empty(device=...) and load the state dict), then add the adapter"
            )
        if W.numel() == 0:
            raise ShapeError(
                f"the weight of {self.module_name or 'the module'!r} has no entries (shape "
                f"{tuple(W.shape)}): there is nothing to adapt; leave it out of target_modules"
            )
        bad = int((~torch.isfinite(W)).sum())
        if bad:
            raise NonFiniteError(
                f"the weight of {self.module_name or 'the module'!r} has {bad} NaN/inf entries; "
                "an adapter on it would give NaN/inf outputs: reload or repair the weights"
            )
        rows, cols = W.shape[0], W.numel() // W.shape[0]
        if config.rank > max(rows, cols, _SMALL_RANK):
            raise ConfigError(
                f"rank={config.rank} exceeds both sides of the weight of "
                f"{self.module_name or 'the module'!r} ({rows} x {cols}) and {_SMALL_RANK}: "
                "such a rank adds parameters and no expressiveness; use rank <= "
                f"{max(rows, cols, _SMALL_RANK)}"
            )
        spec = GeneratorSpec(
            weight_shape=tuple(W.shape),
            rank=config.rank,
            scaling=config.scaling,
            layout=config.layout,
            groups=self._groups(),
            dropout=config.dropout,
            dtype=W.dtype,
            device=W.device,
            module_name=self.module_name,
            options=dict(config.generator_kwargs),
            weight=W.detach(),
        )
        gen_cls = get_generator(config.generator)
        generator = gen_cls(spec)
        assert config.exp_map is not None  # LieRAConfig.__post_init__ resolved it
        update = get_update(config.update, config.exp_map)
        check_adapter(W, generator, update)  # a generator that does not fit W fails here
        if update.zeros_frozen:
            frac = float((W == 0).sum()) / W.numel()
            if frac > config.zero_warning_fraction:
                warnings.warn(
                    f"{100 * frac:.1f}% of the weight of {self.module_name or 'a module'!r} is "
                    "exactly zero; under the Hadamard group those entries can never move "
                    "(W' = W ⊙ exp(ΔW)). Use update='additive' for this module or exclude it.",
                    UserWarning,
                    stacklevel=3,
                )
        self.generators[adapter_name] = generator
        self.updates[adapter_name] = update
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make ``adapter_name`` active (``None``: no adapter); cheap, no tensor is touched."""
        if self.merged_adapter is not None:
            raise AdapterStateError(
                f"{self.module_name!r}: cannot switch adapters while {self.merged_adapter!r} is "
                "merged; call unmerge_adapter() first"
            )
        if adapter_name is not None and adapter_name not in self.generators:
            raise ConfigError(f"no adapter {adapter_name!r} in {self.module_name!r}")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (not while it is merged)."""
        if adapter_name not in self.generators:
            raise ConfigError(f"no adapter {adapter_name!r} in {self.module_name!r}")
        if self.merged_adapter == adapter_name:
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged into {self.module_name!r}; unmerge first"
            )
        del self.generators[adapter_name]
        del self.updates[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.generators), None)

    # ------------------------------------------------------------------ maths
    def delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """The algebra element ``ΔW`` of an adapter (default: the active one), in W's dtype."""
        name = self._name(adapter_name)
        gen: Generator = self.generators[name]  # type: ignore[assignment]
        with weights_outside_autocast(self.weight):
            return gen()

    def adapted_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``W' = update(W, ΔW)`` for an adapter (default: the active one), in W's dtype.

        Computed in the weight's dtype also under autocast (as the layer's forward does).
        """
        name = self._name(adapter_name)
        gen: Generator = self.generators[name]  # type: ignore[assignment]
        with weights_outside_autocast(self.weight):
            factors = gen.factors()
            if factors is not None:
                return adapted_weight_lowrank(self.weight, *factors, self.updates[name])
            return adapted_weight(self.weight, gen(), self.updates[name])

    def _name(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name is None or name not in self.generators:
            raise ConfigError(f"no adapter {name!r} in {self.module_name!r}")
        return name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One op on ``W'`` (active adapter), or the base module when disabled/merged/none."""
        if self.merged_adapter is not None:
            if self.training and torch.is_grad_enabled() and any(
                p.requires_grad for p in self.generators[self.merged_adapter].parameters()
            ):
                raise AdapterStateError(
                    f"{self.module_name!r}: training while adapter {self.merged_adapter!r} is "
                    "merged would not update it; call unmerge_adapter() first (or use "
                    "model.eval() / torch.no_grad() for inference)"
                )
            if self.disabled:
                raise AdapterStateError(
                    f"{self.module_name!r}: cannot disable adapters while merged; unmerge first"
                )
            out: torch.Tensor = self.base_layer(x)
            return out
        if self.disabled or self.active_adapter is None:
            out = self.base_layer(x)
            return out
        name = self.active_adapter
        return adapted_forward(self.base_layer, x, self.generators[name], self.updates[name])

    # ------------------------------------------------------------------ merge
    def _merge_weight(self, name: str) -> tuple[torch.Tensor, Any]:
        """``(W', ΔW)`` computed in at least float32 (``W'`` not yet rounded to W's dtype)."""
        gen: Generator = self.generators[name]  # type: ignore[assignment]
        update = self.updates[name]
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        W = self.weight.detach().to(wide)
        with weights_outside_autocast(self.weight):
            factors = gen.factors()
            if factors is not None:
                L, R = (f.detach().to(wide) for f in factors)
                return adapted_weight_lowrank(W, L, R, update), (L @ R).view(W.shape)
            delta = gen()
        if not isinstance(delta, torch.Tensor):  # e.g. one matrix per mode: W's own dtype
            return adapted_weight(self.weight.detach(), delta, update), delta
        delta = delta.detach().to(wide)
        return adapted_weight(W, delta, update), delta

    @torch.no_grad()
    def _merge_plan(self, safe_merge: bool) -> tuple[str, torch.Tensor, bool]:
        """``(adapter, W' in W's dtype, keep a copy of W)`` for a merge; nothing is written.

        Raises what :meth:`merge` raises, before any state changes.
        """
        if self.merged_adapter is not None:
            raise AdapterStateError(
                f"{self.module_name!r} already has adapter {self.merged_adapter!r} merged; "
                "unmerge_adapter() first"
            )
        if self.active_adapter is None:
            raise AdapterStateError(f"{self.module_name!r} has no active adapter to merge")
        name = self.active_adapter
        update = self.updates[name]
        W = self.weight
        Wp_wide, delta = self._merge_weight(name)
        if safe_merge:
            check_finite(Wp_wide, f"merged weight of {self.module_name!r} (adapter {name!r})")
        Wp = Wp_wide.to(W.dtype)
        keep_copy = (
            not update.invertible
            or torch.finfo(W.dtype).eps > torch.finfo(torch.float32).eps
            or not _inverse_restores(update, W, Wp, delta)
        )
        if keep_copy and safe_merge and update.invertible and W.dtype.itemsize >= 4:
            raise AdapterStateError(
                f"merging adapter {name!r} into {self.module_name!r} cannot be undone: W' "
                f"underflows or overflows in {W.dtype} where W does not, so the group inverse "
                "would not restore W; keep the model unmerged (its outputs are the same), or "
                "merge with safe_merge=False, which keeps a copy of W for unmerging"
            )
        return name, Wp, keep_copy

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, untie: bool = False) -> None:
        """Write ``W'`` of the active adapter into the base weight, so that unmerging restores W.

        ``W'`` is computed in at least float32 and rounded once to the weight's dtype. Unmerge
        restores ``W`` by the group inverse (exact map, additive; float32/float64 weights)
        or, bit for bit, from a copy of ``W`` kept here: for truncated maps, for weights
        narrower than float32 (a float16/bfloat16 inverse would drift over merge cycles), and
        where the inverse would not give ``W`` back (``W'`` underflowed or overflowed).

        Args:
            safe_merge: compute ``W'`` first and raise (leaving ``W`` untouched)
                :class:`~liegroup.errors.NonFiniteError` if it has NaN/inf entries, or
                :class:`~liegroup.errors.AdapterStateError` if the group inverse would not
                restore ``W`` from it.
            untie: the base weight or the base module is also used outside this layer (tied
                embeddings, a weight used by two layers, a module registered under a second,
                untargeted name): give this layer a private copy of its base module whose own
                parameter holds ``W'`` instead of writing into the shared tensor; unmerging
                puts the shared module back.

        Raises:
            AdapterStateError: when already merged, or when no adapter is active.

        Example:
            >>> import torch
            >>> from liegroup.peft import LieRAConfig
            >>> layer = LieRALayer(torch.nn.Linear(3, 2))
            >>> layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"]))
            >>> with torch.no_grad():
            ...     _ = layer.generators["a"].B.fill_(0.1)
            >>> x, W = torch.randn(4, 3), layer.weight.clone()
            >>> y = layer.eval()(x)
            >>> layer.merge(safe_merge=True)
            >>> torch.allclose(layer(x), y), layer.merged_adapter
            (True, 'a')
            >>> layer.unmerge()
            >>> torch.allclose(layer.weight, W, rtol=1e-6, atol=0)
            True
        """
        name, Wp, keep_copy = self._merge_plan(safe_merge)
        W = self.weight
        if untie:
            base = self.base_layer
            private = copy.copy(base)  # the same tensors, its own registries
            private._parameters = dict(base._parameters)
            private._buffers = dict(base._buffers)
            private._modules = dict(base._modules)
            private.weight = nn.Parameter(Wp, requires_grad=W.requires_grad)
            self.base_layer = private
            self._tied_base = base
        else:
            if keep_copy:
                self._merge_backup = W.detach().clone()
            W.copy_(Wp)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W``: the shared parameter, the copy kept at merge, or the group inverse.

        The inverse runs in at least float32 and is rounded once to the weight's dtype.

        Raises:
            AdapterStateError: when nothing is merged.
        """
        name = self.merged_adapter
        if name is None:
            raise AdapterStateError(f"{self.module_name!r} has no merged adapter to unmerge")
        if self._tied_base is not None:
            self.base_layer = self._tied_base
            self._tied_base = None
        elif self._merge_backup is not None:
            self.weight.copy_(self._merge_backup)
            self._merge_backup = None
        else:
            wide = torch.promote_types(self.weight.dtype, torch.float32)
            _, delta = self._merge_weight(name)
            W = self.updates[name].inverse(self.weight.detach().to(wide), delta)
            self.weight.copy_(W)
        self.merged_adapter = None

    def extra_repr(self) -> str:
        """Adapters, the active and the merged one."""
        return (
            f"adapters={list(self.generators)}, active={self.active_adapter!r}, "
            f"merged={self.merged_adapter!r}"
        )


class ModulesToSaveWrapper(nn.Module):
    """A frozen original module plus one fully trainable copy per adapter.

    Example:
        >>> import torch
        >>> w = ModulesToSaveWrapper(torch.nn.Linear(2, 2))
        >>> w.add_adapter("a")
        >>> w.active_adapter
        'a'
    """

    def __init__(self, original_module: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.original_module = original_module
        self.module_name = module_name
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable deep copy of the original module for ``adapter_name``."""
        import copy

        if adapter_name in self.modules_to_save:
            raise ConfigError(f"adapter {adapter_name!r} already exists in {self.module_name!r}")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str | None) -> None:
        """Use the copy of ``adapter_name`` (or the original when absent/None)."""
        ok = adapter_name is not None and adapter_name in self.modules_to_save
        self.active_adapter = adapter_name if ok else None

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the copy of ``adapter_name``."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        """The module forward uses now."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        m: nn.Module = self.modules_to_save[self.active_adapter]
        return m

    def forward(self, *args: object, **kwargs: object) -> object:
        """Forward of :meth:`active_module`."""
        return self.active_module()(*args, **kwargs)
