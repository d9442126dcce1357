"""Rotation angles beyond the closed forms' range, reduced mod 2π without losing the input.

The closed forms of SO(3)/SE(3) evaluate their coefficients at ``θ = sqrt(ω·ω)`` rounded to the
dtype. Its rounding error ``≈ u·θ`` is an absolute error in the angle: harmless for ``θ`` of
order one, but at ``θ = 10²⁰`` (float64) it exceeds ``2π`` and the rotation is arbitrary —
and in float32 ``ω·ω`` overflows from ``θ ≈ 1.8·10¹⁹`` (NaN). Above :data:`BIG_ANGLE` the
angle is therefore carried in float64 as an unevaluated sum ``θ = θ_hi + θ_lo``:

* ``ω`` is scaled by an exact power of two to ``v`` with ``max|v_i| ∈ [½, 1)`` (no overflow);
* ``z = v·v`` is rounded as usual (it carries the gradient); the exact sum of squares is
  ``z + z_lo``, with ``z_lo`` from error-free products (Dekker's splitting, no FMA needed)
  and sums (Knuth's two-sum), to ``≈ 2⁻¹⁰⁴`` relative;
* ``θ_hi = sqrt(z)``, ``θ_lo = (z − θ_hi² + z_lo)/(2θ_hi)`` (``θ_hi²`` again error-free);
* ``sin``/``cos`` of ``θ/2 = θ_hi/2 + θ_lo/2`` by the addition theorem: each of ``θ_hi/2``,
  ``θ_lo/2`` is a float64 that libm reduces mod 2π exactly, so the result is accurate to
  ``≈ θ·2⁻¹⁰⁴ + a few u`` (at ``θ = 10²⁰``: ``≈ 5·10⁻¹²`` rad).

``θ_lo`` is a constant shift for autograd (the gradient flows through ``sqrt(z)``), so first
and higher derivatives are those of the exact map. SO(2)/SE(2) take ``θ`` as given (no square
root) and use :func:`half_angle_sin_cos` on the error-free sum of the two generator entries.

Example:
    >>> import torch
    >>> from liegroup.groups._angles import rotation_parts
    >>> w = torch.tensor([[0.0, 0.0, 1e20]], dtype=torch.float64)
    >>> axis, s, omc, theta = rotation_parts(w)
    >>> axis.tolist(), round(float(s[0]), 9)   # sin(1e20) = -0.6452512852...
    ([[0.0, 0.0, 1.0]], -0.645251285)
"""

from __future__ import annotations

import torch

from liegroup.errors import DomainError

__all__ = ["BIG_ANGLE", "half_angle_sin_cos", "is_big", "rotation_parts", "two_sum"]

# Angles above this take the reduced path (below, the closed forms' angle error u·θ stays
# below 16u, and their bits are unchanged).
BIG_ANGLE = 16.0

_SPLIT = 134217729.0  # 2^27 + 1 (Dekker's splitting constant for float64)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth).

    Example:
        >>> import torch
        >>> s, e = two_sum(torch.tensor(1.0, dtype=torch.float64),
        ...                torch.tensor(1e-20, dtype=torch.float64))
        >>> float(s), float(e)
        (1.0, 1e-20)
    """
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)`` with ``p = fl(ab)``, ``p + e = ab`` exactly (float64, ``|a|, |b| ≤ 2⁹⁹⁶``)."""

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = _SPLIT * x
        hi = c - (c - x)
        return hi, x - hi

    p = a * b
    ah, al = split(a)
    bh, bl = split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def is_big(z: torch.Tensor) -> torch.Tensor:
    """Where ``θ = sqrt(z)`` is above :data:`BIG_ANGLE` (or ``z`` overflowed to ``inf``)."""
    return z > BIG_ANGLE * BIG_ANGLE


def half_angle_sin_cos(
    hi: torch.Tensor, lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sin(θ/2), cos(θ/2)`` of ``θ = hi + lo`` (two floats; addition theorem).

    Example:
        >>> import math, torch
        >>> s, c = half_angle_sin_cos(torch.tensor(math.pi, dtype=torch.float64),
        ...                           torch.tensor(0.0, dtype=torch.float64))
        >>> round(float(s), 12), round(float(c), 12)
        (1.0, 0.0)
    """
    h, l2 = 0.5 * hi, 0.5 * lo
    sh, ch = torch.sin(h), torch.cos(h)
    sl, cl = torch.sin(l2), torch.cos(l2)
    return sh * cl + ch * sl, ch * cl - sh * sl


def rotation_parts(
    w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit axis, ``sin θ``, ``1 − cos θ`` and ``θ`` of rotation vectors ``w (..., 3)``.

    Computed in float64 (whatever ``w``'s dtype) with the angle reduced as in the module
    docstring; for ``w ≠ 0`` of any finite size. Differentiable.

    Raises:
        DomainError: ``‖w‖`` overflows float64 (no angle to reduce).

    Example:
        >>> import torch
        >>> axis, s, omc, theta = rotation_parts(torch.tensor([3.0, 4.0, 0.0]))
        >>> theta.item()
        5.0
    """
    w64 = w.to(torch.float64)
    with torch.no_grad():
        mx = w64.detach().abs().amax(-1, keepdim=True)
        e = torch.frexp(torch.where(mx > 0, mx, torch.ones_like(mx)))[1]
        # 2^-e in two exact steps (2^-e alone underflows to 0 for e = 1024)
        e1 = torch.div(e, 2, rounding_mode="floor")
        s1 = torch.ldexp(torch.ones_like(mx), -e1)
        s2 = torch.ldexp(torch.ones_like(mx), e1 - e)
    v = w64 * s1 * s2  # exact: max |v_i| in [1/2, 1)
    z = (v * v).sum(-1)
    th_hi = torch.sqrt(z)
    with torch.no_grad():
        vd = v.detach()
        ph, pl = _two_prod(vd, vd)
        s, err = ph[..., 0], pl[..., 0]
        for i in range(1, vd.shape[-1]):
            s, t = two_sum(s, ph[..., i])
            err = err + (t + pl[..., i])
        zd = z.detach()
        z_lo = (s - zd) + err  # exact sum of squares = z + z_lo (s, z within a factor 2)
        th = th_hi.detach()
        qh, ql = _two_prod(th, th)
        th_lo = ((zd - qh) - ql + z_lo) / (2 * th)
    # θ = 2^e·(θ_hi + θ_lo), scaled back in two exact steps; the gradient flows through θ_hi
    u1, u2 = (1.0 / s1).squeeze(-1), (1.0 / s2).squeeze(-1)
    big_hi = th_hi * u1 * u2
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(big_hi.detach()).all()):
        raise DomainError(
            "the rotation angle ‖ω‖ overflows float64 (‖ω‖ > 1.8e308): no rotation can be "
            "computed; reduce the rotation vector first"
        )
    sh, ch = half_angle_sin_cos(big_hi, th_lo * u1 * u2)
    axis = v / th_hi[..., None]
    return axis, 2 * sh * ch, 2 * sh * sh, big_hi
