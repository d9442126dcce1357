"""Input checks shared by the public functions (private; raise the typed errors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from liegroup.errors import DeviceError, DTypeError, NonFiniteError, ShapeError


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a real floating tensor, else raise a typed error."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DTypeError(
            f"{name} must be a real floating tensor, got dtype {x.dtype}; "
            "convert it with .to(torch.float32) or .double()"
        )
    return x


_COMPILED_CHECK = (
    "liegroup: an input failed a value check (a non-finite entry, or one outside the map's "
    "domain) inside a torch.compile'd graph; run the same call eagerly for the typed error "
    "that names the entries"
)


def check_device_has_values(x: torch.Tensor, what: str) -> None:
    """Raise :class:`DeviceError` if ``x`` lives on the ``meta`` device (no values to read).

    ``what`` names the operation that needs the values. Fake tensors (``torch.compile``,
    ``FakeTensorMode``) report their fake device, not ``meta``, and pass.
    """
    if x.device.type == "meta":
        raise DeviceError(
            f"{what} reads the values of its input (a check or a data-dependent decision), "
            "but the tensor is on the 'meta' device, which has none; run it on a real device "
            "(cpu/cuda), or trace shapes with torch.compile / FakeTensorMode instead"
        )


def offending(bad: torch.Tensor, limit: int = 5) -> tuple[int, list[list[int]]] | None:
    """``None`` if no entry of the boolean mask ``bad`` is set, else (count, first indices).

    The one place that turns a failed check into what an error message names. Inside a
    ``torch.compile``'d graph a value cannot decide Python control flow without a graph
    break: the check becomes an assertion in the graph (``torch._assert_async``), which
    raises a ``RuntimeError`` when the compiled code runs on a bad input, and this returns
    ``None``. On the ``meta`` device (no values) it raises :class:`DeviceError`.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(torch.logical_not(bad.any()), _COMPILED_CHECK)
        return None
    check_device_has_values(bad, "this value check")
    if not bool(bad.any()):
        return None
    return int(bad.sum()), bad.nonzero()[:limit].tolist()


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` naming the first offending entries of ``x``."""
    hit = offending(~torch.isfinite(x))
    if hit is not None:
        count, idx = hit
        vals = [x[tuple(i)].item() for i in idx]
        raise NonFiniteError(
            f"{name} has {count} non-finite entries, e.g. at {idx} (values {vals}); "
            "find where they came from (learning rate too high? division by zero?)"
        )


def check_trailing_shape(x: torch.Tensor, shape: Sequence[int], name: str) -> tuple[int, ...]:
    """Check that ``x.shape`` ends with ``shape``; return the leading (batch) shape."""
    shape = tuple(shape)
    n = len(shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n :]) != shape:
        raise ShapeError(
            f"{name} must have shape (*batch, {', '.join(map(str, shape))})"
            f"{',' if n == 1 else ''} got {tuple(x.shape)}"
        )
    return tuple(x.shape[: x.dim() - n])


def normalize_mode(k: int, ndim: int, name: str = "mode") -> int:
    """Map a possibly negative mode index to ``0..ndim-1`` or raise :class:`ShapeError`."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise DTypeError(f"{name} must be an int, got {type(k).__name__}")
    if not -ndim <= k < ndim:
        raise ShapeError(f"{name}={k} is out of range for a tensor of order {ndim}")
    return k % ndim
