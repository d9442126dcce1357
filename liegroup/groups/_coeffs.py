"""Cancellation-free, NaN-gradient-free evaluation of the closed-form coefficients.

Each coefficient ``f(θ)`` (see :data:`liegroup.groups._thresholds.SERIES` for the list) is
evaluated from ``z = θ²`` as its Taylor polynomial below the switch of
:mod:`liegroup.groups._thresholds` and in closed form above it. The closed form is evaluated at
``θ_safe = sqrt(z)`` with ``z`` replaced by the threshold *before* the square root and the
divisions on the series side, so neither branch of ``torch.where`` produces inf/NaN and the
gradient through ``z = ω·ω`` is finite at ``ω = 0``.

``sin θ/θ`` vanishes at ``θ = π``, where its relative condition number in ``θ`` is
``≈ π/|π − θ|``: evaluated as ``sin(θ)`` the rounding of ``θ = sqrt(z)`` (up to 1 ulp for a
vectorised CPU ``sqrt``) would be amplified by it (10⁶ u in float32 at ``π − θ = 10⁻⁶``).
For ``θ ∈ [π/2, 3π/2]`` it is evaluated as ``sin(π − θ)/θ`` with
``π − θ = (π² − z)/(π + θ)`` instead, from ``z`` itself: ``π²`` is carried as a sum of two
numbers of the dtype, ``π²_hi − z`` is exact there (Sterbenz), and ``θ`` only enters the
well-conditioned sum ``π + θ`` — a few ``u`` relative at every ``z``.

Example:
    >>> import torch
    >>> from liegroup.groups._coeffs import coefficient
    >>> z = torch.tensor([0.0, 4.0], dtype=torch.float64)
    >>> coefficient("cosc", z)  # (1 − cos θ)/θ²
    tensor([0.5000, 0.3540], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from liegroup.groups._thresholds import SERIES, switch

__all__ = ["coefficient", "series"]


def _sinc(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(t) / t


# π² = hi + lo per dtype: hi is π² rounded to the dtype, lo the rest rounded to it.
_PI2: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (float.fromhex("0x1.3bd3cc9be45dep+3"), float.fromhex("0x1.692b71366cc04p-51")),
    torch.float32: (float.fromhex("0x1.3bd3ccp+3"), float.fromhex("0x1.37c8bcp-22")),
}


def _sinc_z(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sin θ/θ`` at ``θ = t = sqrt(z)``, cancellation-free near ``π`` (module docstring)."""
    hi, lo = _PI2[z.dtype]
    d = ((hi - z) + lo) / (math.pi + t)  # π − θ, from z
    near = (z >= 0.25 * hi) & (z <= 2.25 * hi)  # θ ∈ [π/2, 3π/2]: |π − θ| ≤ π/2
    return torch.sin(torch.where(near, d, t)) / t


def _cosc(t: torch.Tensor) -> torch.Tensor:
    h = t / 2
    s = torch.sin(h) / h
    return 0.5 * s * s


def _sinc3(t: torch.Tensor) -> torch.Tensor:
    return (t - torch.sin(t)) / (t * t * t)


def _cosc4(t: torch.Tensor) -> torch.Tensor:
    t2 = t * t
    return (t2 / 2 + torch.cos(t) - 1) / (t2 * t2)


def _q3(t: torch.Tensor) -> torch.Tensor:
    t2 = t * t
    return (2 * t - 3 * torch.sin(t) + t * torch.cos(t)) / (2 * t2 * t2 * t)


def _dinv(t: torch.Tensor) -> torch.Tensor:
    # (θ/2)·cot(θ/2) to ≈ 2u, then the cancelling 1 − (·) (mild for θ >= 2, the switch).
    h = t / 2
    return (1 - h * torch.cos(h) / torch.sin(h)) / (t * t)


def _asinc(t: torch.Tensor) -> torch.Tensor:
    return torch.asin(t) / t


_DIRECT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sinc": _sinc,
    "cosc": _cosc,
    "sinc3": _sinc3,
    "cosc4": _cosc4,
    "q3": _q3,
    "dinv": _dinv,
    "asinc": _asinc,
}


# the series' coefficients as floats, made once: a plain dict lookup, which Dynamo traces on
# torch 2.9 and 2.13 alike (torch 2.9's Dynamo does not inline a functools.cache wrapper)
_SERIES_FLOATS: dict[str, tuple[float, ...]] = {
    name: tuple(float(c) for c in coeffs) for name, coeffs in SERIES.items()
}


def _floats(name: str, dtype: torch.dtype) -> tuple[tuple[float, ...], float]:
    sw = switch(name, dtype)
    return _SERIES_FLOATS[name][: sw.terms], sw.threshold


def series(name: str, z: torch.Tensor) -> torch.Tensor:
    """Taylor polynomial of coefficient ``name`` in ``z`` with the dtype's number of terms."""
    c = _floats(name, z.dtype)[0]
    out = torch.full_like(z, c[-1])
    for ck in reversed(c[:-1]):
        out = out * z + ck
    return out


def coefficient(name: str, z: torch.Tensor) -> torch.Tensor:
    """Coefficient ``name`` at ``θ = sqrt(z)`` (``z >= 0``), series below its switch.

    Args:
        name: a key of :data:`~liegroup.groups._thresholds.SERIES`.
        z: ``θ²`` (for ``"asinc"``, ``x²``), any shape.

    Returns:
        Tensor of ``z``'s shape; finite, with finite gradients, for every ``z`` in the domain.
    """
    thr = _floats(name, z.dtype)[1]
    small = z < thr * thr
    z_safe = torch.where(small, torch.full_like(z, 4 * thr * thr), z)
    t = torch.sqrt(z_safe)
    closed = _sinc_z(t, z_safe) if name == "sinc" else _DIRECT[name](t)
    return torch.where(small, series(name, z), closed)
