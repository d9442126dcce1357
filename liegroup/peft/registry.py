"""Name → implementation tables: generators, updates and initialisers.

Every registry has the same three verbs: ``register_<kind>`` adds an entry,
``get_<kind>`` looks one up (a ``ConfigError`` lists the known names), ``available_<kind>s``
lists them. The shipped generators, updates and initialisers register themselves when
:mod:`liegroup.peft` is imported; a user's class or function registers the same way and is
then usable by name in :class:`~liegroup.peft.LieRAConfig`.

Example:
    >>> from liegroup.peft import available_generators, available_updates, get_update
    >>> {"adalora", "full", "lora", "modewise", "tucker"} <= set(available_generators())
    True
    >>> {"additive", "gl", "hadamard", "sl", "so"} <= set(available_updates())
    True
    >>> get_update("hadamard", "first_order")
    HadamardExp(exp_map=1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from liegroup.errors import ConfigError, DTypeError

if TYPE_CHECKING:  # the registered modules import this one, so it imports them lazily
    from liegroup.peft.generators.base import Generator, GeneratorSpec
    from liegroup.peft.updates.base import Update

__all__ = [
    "Initialiser",
    "UpdateFactory",
    "available_generators",
    "available_initialisers",
    "available_updates",
    "get_generator",
    "get_initialiser",
    "get_update",
    "register_generator",
    "register_initialiser",
    "register_update",
]

UpdateFactory = Callable[[int | None], "Update"]
"""Builds an :class:`Update` from the Taylor order of ``exp_map`` (``None``: exact)."""

Initialiser = Callable[["GeneratorSpec", int, int, int], tuple[torch.Tensor, torch.Tensor]]
"""``(spec, rows, mid, cols) -> (B₀, A₀)`` of shapes ``(rows, mid)`` and ``(mid, cols)``."""

_GENERATORS: dict[str, type[Generator]] = {}
_UPDATES: dict[str, UpdateFactory] = {}
_INITIALISERS: dict[str, Initialiser] = {}


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{kind} name must be a non-empty string, got {name!r}")
    if "." in name:
        raise ConfigError(f"{kind} name must not contain '.', got {name!r}")
    return name


def register_generator(cls: type[Generator]) -> type[Generator]:
    """Register a :class:`Generator` subclass under ``cls.name`` (usable as a decorator).

    Re-registering the same class (same module and qualified name, e.g. a re-run notebook
    cell) replaces it; another class under a taken name raises ``ConfigError``.

    Example:
        >>> from liegroup.peft.generators import LoRAGenerator
        >>> @register_generator
        ... class MyLoRA(LoRAGenerator):
        ...     name = "my_lora_doc"
        >>> get_generator("my_lora_doc") is MyLoRA
        True
    """
    from liegroup.peft.generators.base import Generator

    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise DTypeError(f"only Generator subclasses can be registered, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ConfigError(f"{cls.__name__} must set a non-empty class attribute `name`")
    name = _check_name("generator", cls.name)
    old = _GENERATORS.get(name)
    if old is not None and old is not cls and (
        (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__)
    ):
        raise ConfigError(
            f"generator name {name!r} is already taken by {old.__module__}.{old.__qualname__}"
        )
    _GENERATORS[name] = cls
    return cls


def get_generator(generator: str | type[Generator]) -> type[Generator]:
    """The generator class registered as ``generator``, or the class itself (registered).

    Example:
        >>> get_generator("lora").__name__
        'LoRAGenerator'
    """
    if isinstance(generator, type):
        return register_generator(generator)
    if isinstance(generator, str):
        if generator not in _GENERATORS:
            raise ConfigError(
                f"unknown generator {generator!r}; known: {sorted(_GENERATORS)} (register a "
                "Generator subclass with liegroup.peft.register_generator)"
            )
        return _GENERATORS[generator]
    raise DTypeError(f"generator must be a name or a Generator subclass, got {generator!r}")


def available_generators() -> list[str]:
    """Names of the registered generators, sorted.

    Example:
        >>> "lora" in available_generators()
        True
    """
    return sorted(_GENERATORS)


def register_update(name: str, factory: UpdateFactory) -> None:
    """Make ``LieRAConfig(update=name)`` available.

    Args:
        name: the config value.
        factory: called with the Taylor order of ``exp_map`` (``None`` for ``"exact"``, ``1``
            for ``"first_order"``, ``k`` for ``k``) and returning an :class:`Update`.

    Example:
        >>> from liegroup.peft.updates import Additive
        >>> register_update("additive_doc", lambda order: Additive())
        >>> get_update("additive_doc")
        Additive()
    """
    _check_name("update", name)
    if not callable(factory):
        raise DTypeError(f"factory must be callable, got {factory!r}")
    _UPDATES[name] = factory


def get_update(name: str, exp_map: str | int = "exact") -> Update:
    """The :class:`Update` registered as ``name``, for the map ``exp_map``.

    Args:
        name: a registered update (``"hadamard"``, ``"additive"``, ``"so"``, ...).
        exp_map: ``"exact"``, ``"first_order"`` or a Taylor order ``k >= 1``.

    Example:
        >>> get_update("hadamard", "first_order")
        HadamardExp(exp_map=1)
    """
    from liegroup.peft.updates.base import parse_exp_map

    if name not in _UPDATES:
        raise ConfigError(
            f"unknown update {name!r}; known: {sorted(_UPDATES)} (register one with "
            "liegroup.peft.register_update)"
        )
    return _UPDATES[name](parse_exp_map(exp_map))


def available_updates() -> list[str]:
    """Names of the registered updates, sorted.

    Example:
        >>> "hadamard" in available_updates()
        True
    """
    return sorted(_UPDATES)


def register_initialiser(name: str, fn: Initialiser) -> None:
    """Make ``LieRAConfig(generator_kwargs={"init": name})`` available to low-rank generators.

    ``fn(spec, rows, mid, cols)`` returns ``(B₀, A₀)`` of shapes ``(rows, mid)``, ``(mid, cols)``
    (``spec.weight`` holds the base weight).

    Example:
        >>> import torch
        >>> register_initialiser("ones_doc", lambda spec, r, m, c: (torch.ones(r, m),
        ...                                                           torch.ones(m, c)))
        >>> get_initialiser("ones_doc")(None, 2, 1, 3)[1].shape
        torch.Size([1, 3])
    """
    _check_name("initialiser", name)
    if name == "zeros":
        raise ConfigError("'zeros' is the built-in LoRA start (B = 0) and cannot be replaced")
    if not callable(fn):
        raise DTypeError(f"initialiser must be callable, got {fn!r}")
    _INITIALISERS[name] = fn


def get_initialiser(name: str) -> Initialiser:
    """The initialiser registered as ``name``.

    Example:
        >>> callable(get_initialiser("pissa"))
        True
    """
    if name not in _INITIALISERS:
        raise ConfigError(
            f"unknown init {name!r}; known: {['zeros', *sorted(_INITIALISERS)]} (register one "
            "with liegroup.peft.register_initialiser)"
        )
    return _INITIALISERS[name]


def available_initialisers() -> list[str]:
    """Names of the registered initialisers (``"zeros"``, LoRA's ``B = 0`` start, included).

    Example:
        >>> available_initialisers()[:3]
        ['gaussian', 'pissa', 'zeros']
    """
    return sorted(["zeros", *_INITIALISERS])
