"""The one per-dtype table of series/closed-form switches used by the closed-form groups.

Every coefficient of the SO(2)/SO(3)/SE(2)/SE(3) closed forms is a function of the rotation
angle ``θ`` that is analytic and even at ``θ = 0`` but whose closed form is ``0/0`` there, and
for some of them (marked *cancelling*) loses ``≈ C·u/θ^p`` relative accuracy to cancellation.
Below a threshold ``θ_s`` each is evaluated as its Taylor polynomial in ``z = θ²`` (exact
rational coefficients below, Horner's rule); above it by the closed form, at a ``θ`` that is
made safe *before* any division so that ``torch.where`` never propagates a NaN gradient.

How the numbers are chosen (and checked by ``tests/test_groups_so_se.py``):

* non-cancelling coefficients (``sinθ/θ``, ``(1−cosθ)/θ² = ½·sinc²(θ/2)``, ``asin(x)/x``) are
  accurate to a few ``u`` in closed form for every ``θ > 0``; their threshold only avoids
  ``0/0`` and is set near ``u^{1/4}``, so that three series terms reach unit roundoff;
* cancelling coefficients lose ``C·u/θ^p`` in closed form (``C/θ^p`` is the ratio of the
  largest term to the result: ``6/θ²`` for ``(θ−sinθ)/θ³``, ``24/θ⁴`` for the ``cos`` remainder,
  ``12/θ²`` for the ``cot`` one, ``120/θ⁴`` for the SE(3) ``Q`` one), so their threshold is put
  where that loss is at most ``≈ 8u`` (``θ_s ≥ (C/8)^{1/p}``); for ``dinv`` the subtracted
  ``(θ/2)cot(θ/2) = h`` carries ``≈ 2u`` and the loss is ``2u·h/(1 − h)``, ``≤ 4u`` from
  ``θ = 2``;
* the number of series terms is *derived* here, at import, from the exact coefficients: the
  smallest ``K`` with ``Σ_{k≥K} |c_k| θ_s^{2k} ≤ u/4 · |f(θ_s)|`` (tail bounded by a geometric
  series), per dtype;
* ``log_pi``: SO(3) ``log`` takes the rotation axis from the skew part ``(R − Rᵀ)/2`` (axis error
  ``≈ u/sinθ``) below this angle and from the largest column of the symmetric part
  ``(R + Rᵀ)/2 − cosθ·I = (1 − cosθ)·n nᵀ`` (axis error ``≈ u/(1 − cosθ)``) above it; the two
  errors are equal at ``θ = π/2``.

Example:
    >>> import torch
    >>> from liegroup.groups._thresholds import switch
    >>> s = switch("sinc", torch.float64)
    >>> s.threshold, s.terms
    (0.001, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = ["SERIES", "THRESHOLDS", "Switch", "switch", "unit_roundoff"]

_N = 40  # exact series terms kept (far more than any dtype needs)


def _fact(k: int) -> Fraction:
    return Fraction(math.factorial(k))


def _div(num: list[Fraction], den: list[Fraction]) -> list[Fraction]:
    """Power-series division ``num / den`` (``den[0] != 0``), both in the same variable."""
    out: list[Fraction] = []
    for k in range(len(num)):
        acc = num[k] - sum((out[j] * den[k - j] for j in range(k)), Fraction(0))
        out.append(acc / den[0])
    return out


# Series in z = θ² (coefficient k multiplies z^k).
_sinc = [Fraction((-1) ** k) / _fact(2 * k + 1) for k in range(_N)]  # sin θ / θ
_half_sinc = [c / Fraction(4) ** k for k, c in enumerate(_sinc)]  # sin(θ/2)/(θ/2)
_half_cos = [Fraction((-1) ** k) / _fact(2 * k) / Fraction(4) ** k for k in range(_N)]
_half_cot = _div(_half_cos, _half_sinc)  # (θ/2)·cot(θ/2)
# asin(x)/x in z = x²: Σ (2k)! / (4^k (k!)² (2k+1)) z^k
_asinc = [
    Fraction(math.factorial(2 * k), 4**k * math.factorial(k) ** 2 * (2 * k + 1)) for k in range(_N)
]

#: exact Taylor coefficients, in ``z = θ²`` (``z = x²`` for ``asinc``), of every coefficient.
SERIES: dict[str, list[Fraction]] = {
    # sin θ / θ
    "sinc": _sinc,
    # (1 − cos θ)/θ² = ½·sinc²(θ/2)
    "cosc": [Fraction((-1) ** k) / _fact(2 * k + 2) for k in range(_N)],
    # (θ − sin θ)/θ³
    "sinc3": [Fraction((-1) ** k) / _fact(2 * k + 3) for k in range(_N)],
    # (θ²/2 + cos θ − 1)/θ⁴
    "cosc4": [Fraction((-1) ** k) / _fact(2 * k + 4) for k in range(_N)],
    # (2θ − 3 sin θ + θ cos θ)/(2θ⁵)   (SE(3) Q coefficient)
    "q3": [Fraction((-1) ** k * (2 * k - 2), 2) / _fact(2 * k + 1) for k in range(2, _N + 2)],
    # (1 − (θ/2)·cot(θ/2))/θ²   (inverse Jacobians; pole at θ = 2π)
    "dinv": [-c for c in _half_cot[1:]],
    # asin(x)/x in z = x²   (SO(3) log near the identity, x = sin θ)
    "asinc": _asinc,
}

_U: dict[torch.dtype, float] = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of the dtype the closed forms compute in (float32 for half types)."""
    return _U.get(dtype, _U[torch.float32])


@dataclass(frozen=True)
class Switch:
    """One series/closed-form switch: series of ``terms`` terms for ``θ < threshold``."""

    threshold: float
    terms: int


def _value(coeffs: list[Fraction], z: float) -> float:
    return float(sum(float(c) * z**k for k, c in enumerate(coeffs)))


def _terms_needed(name: str, theta: float, u: float) -> int:
    c = SERIES[name]
    z = theta * theta
    target = u / 4 * abs(_value(c, z))
    for K in range(1, len(c) - 2):
        # tail Σ_{k≥K}: bound by the first omitted term over (1 − ratio) of later terms
        first = abs(float(c[K])) * z**K
        ratio = max(
            abs(float(c[k + 1]) / float(c[k])) * z for k in range(K, len(c) - 1) if c[k] != 0
        )
        if ratio < 1 and first / (1 - ratio) <= target:
            return K
    raise AssertionError(f"series of {name} does not converge fast enough at θ={theta}")


# Thresholds (radians; for "asinc", on x = sin θ). Non-cancelling: ≈ u^{1/4}. Cancelling: the
# angle where the closed form's loss C·u/θ^p is at most ≈ 8u (dtype independent), rounded up.
_CHOSEN: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {
        "sinc": 1e-3, "cosc": 1e-3, "asinc": 1e-3,
        "sinc3": 1.0, "dinv": 2.0, "cosc4": 1.5, "q3": 2.0,
    },
    torch.float32: {
        "sinc": 3e-2, "cosc": 3e-2, "asinc": 3e-2,
        "sinc3": 1.0, "dinv": 2.0, "cosc4": 1.5, "q3": 2.0,
    },
}  # fmt: skip

#: the per-dtype table: ``THRESHOLDS[dtype][name]`` (plus ``"log_pi"``, an angle, terms 0).
THRESHOLDS: dict[torch.dtype, dict[str, Switch]] = {
    dtype: {
        **{
            name: Switch(theta, _terms_needed(name, theta, _U[dtype]))
            for name, theta in chosen.items()
        },
        "log_pi": Switch(math.pi / 2, 0),
    }
    for dtype, chosen in _CHOSEN.items()
}


def switch(name: str, dtype: torch.dtype) -> Switch:
    """The switch ``name`` for ``dtype`` (float16/bfloat16 use the float32 entry)."""
    table = THRESHOLDS.get(dtype, THRESHOLDS[torch.float32])
    return table[name]
