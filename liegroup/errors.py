"""Typed errors of :mod:`liegroup`.

Every class subclasses a built-in exception, so ``except ValueError`` (or ``TypeError``,
``RuntimeError``) keeps working for callers that do not know this module.

Example:
    >>> import torch, liegroup
    >>> try:
    ...     liegroup.Hadamard((2,)).log(torch.tensor([1.0, -2.0]))
    ... except ValueError as e:
    ...     print(type(e).__name__)
    DomainError
"""

from __future__ import annotations

__all__ = [
    "AdapterStateError",
    "CheckpointError",
    "ConfigError",
    "DTypeError",
    "DeviceError",
    "DomainError",
    "LieGroupError",
    "NonFiniteError",
    "OverflowResultError",
    "ShapeError",
    "UnsupportedModuleError",
]


class LieGroupError(Exception):
    """Base class of every error raised on purpose by :mod:`liegroup`."""


class ShapeError(LieGroupError, ValueError):
    """A tensor has the wrong shape (number of dimensions, mode sizes or batch shape)."""


class DomainError(LieGroupError, ValueError):
    """An input lies outside the domain of a map (e.g. ``log`` of a non-positive entry)."""


class NonFiniteError(LieGroupError, ValueError):
    """An input (or a result about to be written) contains NaN or infinite values."""


class OverflowResultError(NonFiniteError, OverflowError):
    """A finite input whose exact result lies beyond the range of its dtype.

    Raised instead of returning ``inf``/``NaN`` (e.g. ``expm`` of a matrix whose exponential
    overflows, or a Hadamard manifold step that diverges). Also a :class:`NonFiniteError` and
    a built-in :class:`OverflowError`.
    """


class ConfigError(LieGroupError, ValueError):
    """An option, argument or name is invalid.

    E.g. an unknown generator or update, a rank or Taylor order out of range, a
    ``target_modules`` entry that matches no module, an adapter name that does not exist.
    """


class DTypeError(LieGroupError, TypeError):
    """A tensor has an unsupported dtype, or an argument has the wrong Python type.

    E.g. an integer tensor where a real one is needed, a list where a tensor is, a ``dict``
    where a ``LieRAConfig`` is, a class registered as a generator that does not subclass
    ``Generator``, a keyword ``act`` does not take.
    """


class DeviceError(LieGroupError, TypeError):
    """A tensor is on a device the operation cannot run on.

    E.g. ``meta``, which has no values for a check or a host-side decision to read.
    """


class UnsupportedModuleError(LieGroupError, TypeError):
    """A module of a type the adapter layer cannot wrap was targeted."""


class AdapterStateError(LieGroupError, RuntimeError):
    """An operation is invalid in the adapter's current state (e.g. merging twice)."""


class CheckpointError(LieGroupError, ValueError):
    """A saved adapter does not fit the model it is loaded into."""
