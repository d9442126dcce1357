"""Model level: inject LieRA adapters into a model, merge them, save and load them.

:func:`get_peft_model` replaces every targeted ``nn.Linear``/``nn.Conv{1,2,3}d`` by a
:class:`~liegroup.peft.layer.LieRALayer` (same dotted name), wraps ``modules_to_save`` in a
:class:`~liegroup.peft.layer.ModulesToSaveWrapper`, freezes everything else, and returns a
:class:`LieRAModel`. The wrapper's forward is the base model's.

Targets: a list of suffixes (``"conv1"`` matches ``"conv1"`` and ``"block.conv1"``, not
``"xconv1"``; every suffix must match) or a regex string (``re.fullmatch`` on the full name; it
must match something). Modules inside adapter wrappers are never targets themselves.

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3))
    >>> model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"],
    ...                                         modules_to_save=["2"]))
    >>> model.get_nb_trainable_parameters()
    (461, 936)
    >>> x = torch.randn(2, 1, 8, 8)
    >>> y = model(x)
    >>> model.merge_adapter(); torch.allclose(model.eval()(x), y, atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from liegroup._version import __version__
from liegroup.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DTypeError,
    NonFiniteError,
)
from liegroup.peft._files import read_tensors, write_files
from liegroup.peft.config import CONFIG_NAME, LieRAConfig
from liegroup.peft.generators.base import Generator
from liegroup.peft.layer import (
    LieRALayer,
    ModulesToSaveWrapper,
    check_adapter_name,
    check_supported,
)

__all__ = ["WEIGHTS_NAME", "LieRAModel", "get_peft_model"]

_W = TypeVar("_W", bound=nn.Module)
WEIGHTS_NAME = "adapter_model.safetensors"
_SAVE_PREFIX = "modules_to_save."


def _matches(name: str, spec: list[str] | str | None) -> list[str]:
    """Every entry of ``spec`` that ``name`` matches (peft's rule: equal, or a ``.``-suffix)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec] if re.fullmatch(spec, name) else []
    return [s for s in spec if name == s or name.endswith("." + s)]


def _match(name: str, spec: list[str] | str | None) -> str | None:
    """The longest entry of ``spec`` that ``name`` matches (``None`` if none).

    Order-free: ``["conv1", "block.conv1"]`` and its reverse match alike, and an entry counts
    as used when it matches any module, even one that a longer entry also matches.
    """
    return max(_matches(name, spec), key=len, default=None)


def _logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without descending into adapter wrappers, and without deduplication.

    A module registered under two names (one layer used twice) is listed under both, so that
    both places get the same adapter layer.
    """

    def walk(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in m._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not isinstance(child, (LieRALayer, ModulesToSaveWrapper)):
                yield from walk(name, child)

    yield from walk("", model)


def _first_names(model: nn.Module, kind: type[_W]) -> list[tuple[str, _W]]:
    """``(name, module)`` for each module of type ``kind``, once, under its first name."""
    seen: set[int] = set()
    out = []
    for n, m in _logical_modules(model):
        if isinstance(m, kind) and id(m) not in seen:
            seen.add(id(m))
            out.append((n, m))
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _with_signature_of(wrapper: nn.Module, model: nn.Module) -> Callable[..., Any]:
    """``wrapper``'s class ``forward`` bound to it, whose signature is ``model.forward``'s.

    A ``functools.partial`` with ``__wrapped__`` (what ``inspect.signature`` follows), as
    accelerate's hooks set a module's ``forward``: it survives ``copy.deepcopy`` and pickling
    (it refers to the class's function, not a closure) and ``torch.compile`` traces it.
    """
    bound = functools.partial(type(wrapper).forward, wrapper)
    return functools.update_wrapper(bound, model.forward)


class LieRAModel(nn.Module):
    """A model with LieRA adapters injected; forward is the base model's.

    Args:
        model: the base model (modified in place: targeted modules are wrapped).
        config: the first adapter's :class:`LieRAConfig`.
        adapter_name: its name.

    Attributes:
        base_model: the wrapped model.
        peft_config: adapter name → config.
        active_adapter: the adapter used in forward.
    """

    def __init__(self, model: nn.Module, config: LieRAConfig, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise DTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.base_model = model
        # forward with the base model's signature: transformers' Trainer reads it to keep the
        # input columns the model takes (an instance attribute in front of the class method)
        self.forward = _with_signature_of(self, model)  # type: ignore[method-assign]
        self.peft_config: dict[str, LieRAConfig] = {}
        self.active_adapter: str = adapter_name
        self._trainable = True
        # the user's requires_grad flags, put back by unload() and after a failed injection
        self._user_flags = [
            (p, p.requires_grad)
            for p in model.parameters()
            if not isinstance(p, nn.parameter.UninitializedParameter)
        ]
        try:
            self._inject(adapter_name, config)
            self._mark_trainable()
        except BaseException:
            self._restore_flags()
            raise

    # ------------------------------------------------------------------ plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward (with adapters active)."""
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (adapters injected in place), as peft's ``get_base_model``.

        Example:
            >>> import torch
            >>> from liegroup.peft import LieRAConfig, get_peft_model
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
            >>> m = get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"]))
            >>> m.get_base_model() is net
            True
        """
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def lie_layers(self) -> list[tuple[str, LieRALayer]]:
        """``(name, layer)`` for every adapter layer, names relative to ``base_model``.

        A layer reachable under several names (one module used twice) is listed once, under
        its first name.
        """
        return _first_names(self.base_model, LieRALayer)

    def _restore_flags(self) -> None:
        for p, flag in self._user_flags:
            p.requires_grad_(flag)

    def generators(self, adapter_name: str | None = None) -> dict[str, Generator]:
        """Module name → the adapter's generator (default: the active adapter).

        What :class:`~liegroup.peft.RankAllocator` and
        :func:`~liegroup.peft.generators.orthogonality_penalty` take.

        Example:
            >>> import torch
            >>> from liegroup.peft import LieRAConfig, get_peft_model
            >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)),
            ...                    LieRAConfig(rank=1, target_modules=["0"]))
            >>> {n: type(g).__name__ for n, g in m.generators().items()}
            {'0': 'LoRAGenerator'}
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        return {
            n: layer.generators[name]  # type: ignore[misc]
            for n, layer in self.lie_layers()
            if name in layer.generators
        }

    def _save_wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return _first_names(self.base_model, ModulesToSaveWrapper)

    def _inject(self, adapter_name: str, config: LieRAConfig) -> None:
        if not isinstance(config, LieRAConfig):
            raise DTypeError(f"config must be a LieRAConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists")
        # Plan first, touch nothing until every check passed.
        targets: list[tuple[str, nn.Module]] = []
        saves: list[tuple[str, nn.Module]] = []
        hit_t: set[str] = set()
        hit_s: set[str] = set()
        for name, module in _logical_modules(self.base_model):
            if _match(name, config.exclude_modules) is not None:
                continue
            t = _match(name, config.target_modules)
            s = _match(name, config.modules_to_save)
            if t is not None and s is not None:
                raise ConfigError(
                    f"module {name!r} is matched by both target_modules ({t!r}) and "
                    f"modules_to_save ({s!r}); choose one"
                )
            if t is not None:
                inner = module.base_layer if isinstance(module, LieRALayer) else module
                check_supported(inner, name)
                targets.append((name, module))
                hit_t.update(_matches(name, config.target_modules))
            if s is not None:
                if isinstance(module, LieRALayer):
                    raise ConfigError(f"module {name!r} already carries adapters; cannot save it")
                saves.append((name, module))
                hit_s.update(_matches(name, config.modules_to_save))
        for spec, hit, what in (
            (config.target_modules, hit_t, "target_modules"),
            (config.modules_to_save, hit_s, "modules_to_save"),
        ):
            if spec is None:
                continue
            missing = [spec] if isinstance(spec, str) else [s for s in spec if s not in hit]
            if isinstance(spec, str) and hit:
                missing = []
            if missing:
                raise ConfigError(
                    f"{what} entries {missing} match no module of the model (after "
                    "exclude_modules); check the names with model.named_modules()"
                )
        if config.rank_pattern is not None:
            names = {n for n, _ in targets}
            unknown = sorted(set(config.rank_pattern) - names)
            if unknown:
                raise ConfigError(
                    f"rank_pattern names modules that are not adapted: {unknown[:5]}"
                )
        undo: list[Callable[[], None]] = []
        made: dict[int, LieRALayer] = {}  # one module used under several names: one layer
        flags = [(p, p.requires_grad) for _, m in targets for p in m.parameters()]

        def restore_flags() -> None:
            for p, f in flags:
                p.requires_grad_(f)

        undo.append(restore_flags)
        try:
            for name, module in targets:
                if id(module) in made:
                    _set_submodule(self.base_model, name, made[id(module)])
                    undo.append(functools.partial(_set_submodule, self.base_model, name, module))
                    continue
                if isinstance(module, LieRALayer):
                    layer = module
                else:
                    layer = LieRALayer(module, name)
                    _set_submodule(self.base_model, name, layer)
                    undo.append(functools.partial(_set_submodule, self.base_model, name, module))
                made[id(module)] = layer
                made[id(layer)] = layer
                layer.add_adapter(adapter_name, config)
                undo.append(functools.partial(layer.delete_adapter, adapter_name))
                if config.rank_pattern is not None and name in config.rank_pattern:
                    # rebuild the pruned shapes of a rank-allocating generator (AdaLoRA)
                    gen: Generator = layer.generators[adapter_name]  # type: ignore[assignment]
                    gen.prune_(config.rank_pattern[name])
                if self.active_adapter != adapter_name:
                    layer.active_adapter = self._layer_active(layer)
            wrapped: dict[int, ModulesToSaveWrapper] = {}  # one module, several names
            for name, module in saves:
                if id(module) in wrapped:
                    _set_submodule(self.base_model, name, wrapped[id(module)])
                    undo.append(functools.partial(_set_submodule, self.base_model, name, module))
                    continue
                if isinstance(module, ModulesToSaveWrapper):
                    wrapper = module
                else:
                    wrapper = ModulesToSaveWrapper(module, name)
                    _set_submodule(self.base_model, name, wrapper)
                    undo.append(functools.partial(_set_submodule, self.base_model, name, module))
                wrapped[id(module)] = wrapped[id(wrapper)] = wrapper
                wrapper.add_adapter(adapter_name)
                undo.append(functools.partial(wrapper.delete_adapter, adapter_name))
                wrapper.set_adapter(self.active_adapter)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        self.peft_config[adapter_name] = config

    def _layer_active(self, layer: LieRALayer) -> str | None:
        return self.active_adapter if self.active_adapter in layer.generators else None

    def _mark_trainable(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        if not self._trainable:
            return
        name = self.active_adapter
        for _, layer in self.lie_layers():
            if name in layer.generators:
                for p in layer.generators[name].parameters():
                    p.requires_grad_(True)
        for _, wrapper in self._save_wrappers():
            if name in wrapper.modules_to_save:
                for p in wrapper.modules_to_save[name].parameters():
                    p.requires_grad_(True)

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(
                f"no adapter {adapter_name!r}; known: {sorted(self.peft_config)}"
            )

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: LieRAConfig) -> None:
        """Inject another adapter (its own targets); the active adapter does not change."""
        if self.merged:
            raise AdapterStateError("cannot add an adapter while one is merged; unmerge first")
        self._inject(adapter_name, config)
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` active (and the only trainable one)."""
        self._check_adapter(adapter_name)
        if self.merged:
            raise AdapterStateError("cannot switch adapters while merged; unmerge_adapter() first")
        self.active_adapter = adapter_name
        for _, layer in self.lie_layers():
            layer.set_adapter(self._layer_active(layer))
        for _, wrapper in self._save_wrappers():
            wrapper.set_adapter(adapter_name)
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; the active one cannot be deleted while merged."""
        self._check_adapter(adapter_name)
        for _, layer in self.lie_layers():
            if layer.merged_adapter == adapter_name:
                raise AdapterStateError(f"adapter {adapter_name!r} is merged; unmerge first")
        for _, layer in self.lie_layers():
            if adapter_name in layer.generators:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        # Wrappers left without adapters give their module back: the model is as before.
        for name, layer in self.lie_layers():
            if not layer.generators:
                _set_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in self._save_wrappers():
            if not wrapper.modules_to_save:
                _set_submodule(self.base_model, name, wrapper.original_module)
        if self.active_adapter == adapter_name:
            remaining = sorted(self.peft_config)
            self.active_adapter = remaining[0] if remaining else ""
            for _, layer in self.lie_layers():
                layer.active_adapter = self._layer_active(layer)
            for _, wrapper in self._save_wrappers():
                wrapper.set_adapter(self.active_adapter)
        self._mark_trainable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model computes with the base weights and original modules."""
        if self.merged:
            raise AdapterStateError("cannot disable adapters while merged; unmerge first")
        mods: list[LieRALayer | ModulesToSaveWrapper] = [m for _, m in self.lie_layers()]
        mods += [m for _, m in self._save_wrappers()]
        old = [m.disabled for m in mods]
        for m in mods:
            m.disabled = True
        try:
            yield
        finally:
            for m, o in zip(mods, old, strict=True):
                m.disabled = o

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (each tensor counted once)."""
        seen: set[int] = set()
        trainable = total = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: … || all params: … || trainable%: …``."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ------------------------------------------------------------------ merging
    @property
    def merged(self) -> bool:
        """Whether an adapter is merged into the base weights."""
        return any(layer.merged_adapter is not None for _, layer in self.lie_layers())

    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Write ``W'`` of the active adapter into every adapted base weight.

        Args:
            safe_merge: check every layer's merged weight (NaN/inf; an inverse that would not
                restore ``W``) before writing any — each ``W'`` is then computed twice, one
                layer at a time; on failure nothing is merged and every weight keeps its bits
                (:class:`~liegroup.errors.NonFiniteError`,
                :class:`~liegroup.errors.AdapterStateError`).

        Raises:
            AdapterStateError: if already merged.
        """
        if self.merged:
            raise AdapterStateError("an adapter is already merged; unmerge_adapter() first")
        shared = self._shared_weights()
        layers = [layer for _, layer in self.lie_layers() if layer.active_adapter is not None]
        if safe_merge:  # every layer checked before any is written (one W' at a time)
            for layer in layers:
                layer._merge_plan(safe_merge=True)
        done: list[LieRALayer] = []
        try:
            for layer in layers:
                layer.merge(safe_merge=safe_merge, untie=id(layer) in shared)
                done.append(layer)
        except BaseException:
            for layer in reversed(done):
                layer.unmerge()
            raise

    def _shared_weights(self) -> set[int]:
        """Adapter layers whose base weight is also used outside the layer.

        Tied or reused parameters, and a base module registered under a second name that is
        not adapted: every place a parameter is reachable from counts, all places inside one
        adapter layer (a layer used twice) as one.
        """
        users: dict[tuple[str, int], set[object]] = {}

        def walk(mod: nn.Module, path: str, layer: LieRALayer | None) -> None:
            if isinstance(mod, LieRALayer):
                layer = mod
            for pname, p in mod._parameters.items():
                if p is not None and not p.is_meta:
                    key = (str(p.device), p.untyped_storage().data_ptr())
                    users.setdefault(key, set()).add(
                        id(layer) if layer is not None else f"{path}.{pname}"
                    )
            for cname, child in mod._modules.items():
                if child is not None:
                    walk(child, f"{path}.{cname}", layer)

        walk(self.base_model, "", None)
        out = set()
        for _, layer in self.lie_layers():
            w = layer.weight
            if not w.is_meta and len(users[(str(w.device), w.untyped_storage().data_ptr())]) > 1:
                out.add(id(layer))
        return out

    def unmerge_adapter(self) -> None:
        """Restore the base weights (see :meth:`LieRALayer.unmerge`).

        Raises:
            AdapterStateError: if nothing is merged.
        """
        if not self.merged:
            raise AdapterStateError("no adapter is merged; nothing to unmerge")
        for _, layer in self.lie_layers():
            if layer.merged_adapter is not None:
                layer.unmerge()

    def _unwrap(self) -> nn.Module:
        for name, layer in self.lie_layers():
            _set_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in self._save_wrappers():
            _set_submodule(self.base_model, name, wrapper.active_module())
        self._restore_flags()
        return self.base_model

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Merge the active adapter and return the plain base model (original classes).

        ``modules_to_save`` are replaced by the active adapter's trained copies. The base
        model's parameters get back the ``requires_grad`` flags they had before wrapping. A
        layer whose weight was shared with another module (tied embeddings) keeps its own
        merged weight: the tie is not restored, the other module keeps ``W``. This object is
        unusable after.
        """
        if not self.merged:
            self.merge_adapter(safe_merge=safe_merge)
        return self._unwrap()

    def unload(self) -> nn.Module:
        """Return the plain base model without merging (unmerging first if needed)."""
        if self.merged:
            self.unmerge_adapter()
        for name, wrapper in self._save_wrappers():
            wrapper.disabled = True
            _set_submodule(self.base_model, name, wrapper.original_module)
        return self._unwrap()

    # ------------------------------------------------------------------ save / load
    def adapter_state_dict(
        self, adapter_name: str | None = None, live: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes: generator states and ``modules_to_save``.

        Generators export their own state (:meth:`Generator.export_state`: AdaLoRA keeps only
        the unmasked triplets); ``live=True`` gives the generators' ``state_dict`` tensors
        themselves (what loading writes into).
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        out: dict[str, torch.Tensor] = {}
        for lname, layer in self.lie_layers():
            if name in layer.generators:
                gen: Generator = layer.generators[name]  # type: ignore[assignment]
                state = gen.state_dict() if live else gen.export_state()
                for k, v in state.items():
                    out[f"{lname}.{k}"] = v
        for wname, wrapper in self._save_wrappers():
            if name in wrapper.modules_to_save:
                for k, v in wrapper.modules_to_save[name].state_dict().items():
                    out[f"{_SAVE_PREFIX}{wname}.{k}"] = v
        return out

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], adapter_name: str | None = None
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for one adapter.

        The config carries ``peft_type="LIERA"`` and ``liegroup_version``; the tensors are
        the generator states (keys ``<module name>.<param>``) and the ``modules_to_save``
        copies (keys ``modules_to_save.<module name>.<param>``) — never the base weights.

        All or nothing: both files are written under temporary names in ``save_directory``
        and renamed into place (weights first, then the config) only when both are complete;
        a failure leaves an existing checkpoint there as it was.

        Raises:
            AdapterStateError: while an adapter is merged.
            NonFiniteError: an adapter tensor has NaN/inf entries (nothing is written).
            CheckpointError: when a file cannot be written (the directory is left as it was).
        """
        from safetensors.torch import save_file

        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        if self.merged:
            raise AdapterStateError("unmerge_adapter() before saving (the base weights changed)")
        config = self.peft_config[name]
        patterns = {
            lname: pat
            for lname, layer in self.lie_layers()
            if name in layer.generators
            and (pat := layer.generators[name].rank_pattern()) is not None  # type: ignore[operator]
        }
        if any(not all(p) for p in patterns.values()):
            config = dataclasses.replace(config, rank_pattern=patterns)
        state = self.adapter_state_dict(name)
        # own copies: tied modules_to_save tensors share memory, which safetensors refuses
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        for k, v in tensors.items():  # loading refuses them: a checkpoint that cannot be loaded
            if v.is_floating_point() and (bad_n := int((~torch.isfinite(v)).sum())):
                raise NonFiniteError(
                    f"adapter {name!r}: {k} has {bad_n} NaN/inf entries (training diverged?); "
                    "nothing was written"
                )
        write_files(save_directory, {
            WEIGHTS_NAME: lambda p: save_file(
                tensors, p, metadata={"format": "pt", "liegroup_version": __version__}
            ),
            CONFIG_NAME: config.save_as,
        })

    def load_adapter(
        self,
        directory: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
    ) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` (all or nothing).

        Raises:
            AdapterStateError: while an adapter is merged.
            CheckpointError: missing/invalid files, a config that does not fit the model,
                missing, unexpected or mis-shaped tensors. The model is left as it was.
        """
        if self.merged:
            raise AdapterStateError("unmerge_adapter() before loading another adapter")
        config, tensors = _read_checkpoint(directory)
        if adapter_name in self.peft_config:
            raise CheckpointError(f"adapter {adapter_name!r} already exists; pick another name")
        try:
            self._inject(adapter_name, config)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"adapter in {os.fspath(directory)!r} does not fit: {e}") from e
        try:
            self._copy_in(adapter_name, tensors, directory)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._trainable = self._trainable and is_trainable
        self._mark_trainable()

    def _copy_in(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], directory: object
    ) -> None:
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        bad = [
            f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in tensors and tensors[k].shape != v.shape
        ]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"checkpoint {directory!r} does not fit the model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {bad[:5]}; "
                "nothing was loaded"
            )
        live = self.adapter_state_dict(adapter_name, live=True)
        if set(live) != set(expected) or any(
            live[k].shape != expected[k].shape for k in expected
        ):
            raise CheckpointError(
                f"checkpoint {directory!r}: the adapter's exported tensors do not match its live "
                "state (a generator's export_state and state_dict disagree); nothing was loaded"
            )
        for k, v in live.items():
            t = tensors[k]
            if t.dtype != v.dtype:
                raise CheckpointError(
                    f"checkpoint {directory!r}: {k} is {t.dtype} but the model's is {v.dtype}; "
                    f"load it onto the model in {t.dtype} (model.to({t.dtype})) or convert the "
                    "checkpoint; nothing was loaded"
                )
            if t.is_floating_point() or t.is_complex():
                bad_n = int((~torch.isfinite(t)).sum())
                if bad_n:
                    raise CheckpointError(
                        f"checkpoint {directory!r}: {k} has {bad_n} non-finite entries; "
                        "nothing was loaded"
                    )
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(tensors[k])

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> LieRAModel:
        """Rebuild a :class:`LieRAModel` from ``save_pretrained`` output.

        Args:
            model: the base model the adapter was trained on (modified in place).
            directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: name to give the loaded adapter.
            is_trainable: keep the adapter trainable (default: frozen, for inference).

        Raises:
            CheckpointError: as :meth:`load_adapter`; ``model`` is left unmodified.
        """
        config, tensors = _read_checkpoint(directory)
        try:
            peft = cls(model, config, adapter_name)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"adapter in {os.fspath(directory)!r} does not fit: {e}") from e
        try:
            peft._copy_in(adapter_name, tensors, os.fspath(directory))
        except BaseException:
            peft.unload()
            raise
        peft._trainable = is_trainable
        peft._mark_trainable()
        if not is_trainable:
            peft.eval()
        return peft


def _read_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[LieRAConfig, dict[str, torch.Tensor]]:
    return LieRAConfig.load(directory), read_tensors(directory, WEIGHTS_NAME)


def get_peft_model(
    model: nn.Module, config: LieRAConfig, adapter_name: str = "default"
) -> LieRAModel:
    """Inject a LieRA adapter into ``model`` (in place) and wrap it in a :class:`LieRAModel`.

    The base model's parameters are frozen; the adapter's generators and the
    ``modules_to_save`` copies are trainable.

    Raises:
        ConfigError: a target or ``modules_to_save`` entry matching nothing (named).
        UnsupportedModuleError: a matched module of an unsupported type (named).

    Example:
        >>> import torch
        >>> from liegroup.peft import LieRAConfig
        >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
        ...                    LieRAConfig(rank=1, target_modules=["0"]))
        >>> type(m.base_model[0]).__name__
        'LieRALayer'
    """
    return LieRAModel(model, config, adapter_name)
