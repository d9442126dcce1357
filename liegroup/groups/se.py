"""The rigid-motion groups ``SE(n)``, closed forms for n = 2, 3.

Layout: homogeneous ``(n+1) × (n+1)`` matrices ``g = [[R, t], [0, 1]]`` (``R ∈ SO(n)``,
``t ∈ R^n``); algebra elements ``X = [[Ω, ρ], [0, 0]]`` with ``Ω`` skew (the bottom row is
exactly zero). ``dim = n(n+1)/2``. ``hat``/``vee`` coordinates: **translation first**,
``ξ = (ρ, ω)`` with ``ω`` the :class:`~liegroup.groups.so.SO` ``(n)`` coordinates of ``Ω``:
``(ρ₁, ρ₂, θ)`` for SE(2), ``(ρ₁, ρ₂, ρ₃, ω₁, ω₂, ω₃)`` for SE(3).

Closed forms (``θ = ‖ω‖``, coefficients cancellation-free, see :mod:`liegroup.groups._coeffs`):

* ``exp(ξ) = [[exp(ω^), V ρ], [0, 1]]`` with ``V = J_l(ω)`` (SO(3) left Jacobian; for SE(2)
  ``V = [[a, −b], [b, a]]``, ``a = sinθ/θ``, ``b = (1 − cosθ)/θ``);
* ``log(g) = (V⁻¹ t, log R)``, ``V⁻¹ = J_l⁻¹(ω)`` (SE(2): ``[[h, θ/2], [−θ/2, h]]``,
  ``h = (θ/2)cot(θ/2)``);
* SE(3) Jacobians in ``(ρ, ω)`` order: ``J_l(ξ) = [[J_l(ω), Q(ρ, ω)], [0, J_l(ω)]]`` with
  ``Q = ½ρ^ + c₁(ω^ρ^ + ρ^ω^ + ω^ρ^ω^) + c₂(ω^²ρ^ + ρ^ω^² − 3ω^ρ^ω^)
  + c₃(ω^ρ^ω^² + ω^²ρ^ω^)``, ``c₁ = (θ − sinθ)/θ³``, ``c₂ = (θ²/2 + cosθ − 1)/θ⁴``,
  ``c₃ = (2θ − 3sinθ + θcosθ)/(2θ⁵)`` (Barfoot's form of ``Σ ad_ξ^k/(k+1)!``);
  ``J_r(ξ) = J_l(−ξ)``, ``J_l⁻¹ = [[J_l⁻¹(ω), −J_l⁻¹(ω) Q J_l⁻¹(ω)], [0, J_l⁻¹(ω)]]``;
* SE(2) Jacobians: ``J_r = [[a, b, ρ₁θc₁ − ρ₂(1−cosθ)/θ²], [−b, a, ρ₁(1−cosθ)/θ² + ρ₂θc₁],
  [0, 0, 1]]``, ``J_l(ξ) = J_r(−ξ)``, inverses by the block formula.

For ``n ≥ 4``, ``exp``/``log`` go through ``liegroup.linalg`` and the result is put exactly in
shape (bottom row ``[0, …, 0, 1]`` resp. zero, skew rotation block for ``log``).

Example:
    >>> import torch, liegroup
    >>> G = liegroup.SE(3)
    >>> xi = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    >>> G.exp(G.hat(xi))[:3, 3]  # a pure translation
    tensor([1., 0., 0.], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from liegroup._validation import check_finite
from liegroup.errors import ShapeError
from liegroup.groups._angles import half_angle_sin_cos, is_big, rotation_parts
from liegroup.groups._coeffs import coefficient
from liegroup.groups.matrix import MatrixLieGroup
from liegroup.groups.so import (
    SO,
    _big_angles,
    _check_vec,
    _cos_sin,
    _mm,
    _so3_jac,
    check_resolvable_rotation,
    so2_angle,
    so3_exp,
    so3_hat,
    so3_log,
)

__all__ = ["SE", "se3_Q", "se3_exp", "se3_log"]


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cross(*torch.broadcast_tensors(a, b), dim=-1)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """``exp`` of ``ξ = (ρ, ω)``: ``(*batch, 6) → (*batch, 4, 4)``.

    Example:
        >>> import torch
        >>> se3_exp(torch.zeros(6)).diagonal()
        tensor([1., 1., 1., 1.])
    """
    _check_vec(xi, 6, "xi")
    rho, w = xi[..., :3], xi[..., 3:]
    big = _big_angles(w)
    if big is None:
        return _assemble(so3_exp(w), _se3_translation(rho, w))
    bm = big[..., None]
    t_small = _se3_translation(rho, torch.where(bm, torch.zeros_like(w), w))
    # θ above BIG_ANGLE: V ρ = ρ + ((1 − cosθ)/θ)(ω̂ × ρ) + (1 − sinθ/θ)(ω̂ × (ω̂ × ρ)) with
    # the angle reduced mod 2π (liegroup.groups._angles)
    axis, s, omc, theta = rotation_parts(torch.where(bm, w, torch.ones_like(w)))
    r64 = rho.to(torch.float64)
    ar = _cross(axis, r64)
    t_big = r64 + (omc / theta)[..., None] * ar + (1 - s / theta)[..., None] * _cross(axis, ar)
    t = torch.where(bm, t_big.to(xi.dtype), t_small)
    return _assemble(so3_exp(w), t)


def _se2_coefficients(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = sinθ/θ``, ``b = (1 − cosθ)/θ`` at ``θ = hi + lo`` (SE(2)'s ``V``).

    Closed forms of :mod:`~liegroup.groups._coeffs` up to ``BIG_ANGLE``; above, in float64
    from the exact angle (``θ²`` would overflow float32 from ``θ ≈ 1.8·10¹⁹``, and the rounded
    ``sqrt(θ²)`` is not ``θ``).
    """
    z = hi * hi
    big = is_big(z)
    if torch.compiler.is_compiling() or bool(big.any()):
        th = torch.where(big, torch.zeros_like(hi), hi)
        zs = th * th
        a, b = coefficient("sinc", zs), th * coefficient("cosc", zs)
        hb = torch.where(big, hi, torch.ones_like(hi)).double()
        lb = torch.where(big, lo, torch.zeros_like(lo)).double()
        sh, ch = half_angle_sin_cos(hb, lb)
        a_big, b_big = (2 * sh * ch / hb).to(hi.dtype), (2 * sh * sh / hb).to(hi.dtype)
        return torch.where(big, a_big, a), torch.where(big, b_big, b)
    return coefficient("sinc", z), hi * coefficient("cosc", z)


def _se3_translation(rho: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``V(ω) ρ = ρ + ((1−cosθ)/θ²) ω × ρ + ((θ−sinθ)/θ³) ω × (ω × ρ)`` (closed forms)."""
    z = (w * w).sum(-1)[..., None]
    wr = _cross(w, rho)
    return rho + coefficient("cosc", z) * wr + coefficient("sinc3", z) * _cross(w, wr)


def _assemble(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = R.shape[-1]
    top = torch.cat([R, t[..., None]], dim=-1)
    bottom = torch.zeros(*top.shape[:-2], 1, n + 1, dtype=R.dtype, device=R.device)
    bottom[..., 0, n] = 1
    return torch.cat([top, bottom], dim=-2)


def _assemble_algebra(Om: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    n = Om.shape[-1]
    top = torch.cat([Om, rho[..., None]], dim=-1)
    bottom = torch.zeros(*top.shape[:-2], 1, n + 1, dtype=Om.dtype, device=Om.device)
    return torch.cat([top, bottom], dim=-2)


def se3_log(g: torch.Tensor) -> torch.Tensor:
    """Principal ``log`` of a rigid motion: ``(*batch, 4, 4) → (*batch, 6)`` ``(ρ, ω)``.

    Example:
        >>> import torch
        >>> xi = torch.tensor([1.0, 2.0, 3.0, 0.1, 0.2, 3.0], dtype=torch.float64)
        >>> torch.allclose(se3_log(se3_exp(xi)), xi)
        True
    """
    R, t = g[..., :3, :3], g[..., :3, 3]
    w = so3_log(R)
    z = (w * w).sum(-1)[..., None]
    wt = _cross(w, t)
    rho = t - 0.5 * wt + coefficient("dinv", z) * _cross(w, wt)
    return torch.cat([rho, w], dim=-1)


def se3_Q(rho: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper-right block ``Q(ρ, ω)`` of the SE(3) left Jacobian, ``(*batch, 3, 3)``.

    Example:
        >>> import torch
        >>> se3_Q(torch.tensor([2.0, 0.0, 0.0]), torch.zeros(3))  # ½ρ^ at ω = 0
        tensor([[ 0.,  0.,  0.],
                [ 0.,  0., -1.],
                [ 0.,  1.,  0.]])
    """
    z = (w * w).sum(-1)[..., None, None]
    P, W = so3_hat(rho), so3_hat(w)
    WP, PW = _mm(W, P), _mm(P, W)
    WPW = _mm(WP, W)
    c1 = coefficient("sinc3", z)
    c2 = coefficient("cosc4", z)
    c3 = coefficient("q3", z)
    return (
        0.5 * P
        + c1 * (WP + PW + WPW)
        + c2 * (_mm(W, WP) + _mm(PW, W) - 3 * WPW)
        + c3 * (_mm(WPW, W) + _mm(W, WPW))
    )


def _se3_jac(xi: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor:
    if not left:
        xi = -xi
    rho, w = xi[..., :3], xi[..., 3:]
    Q = se3_Q(rho, w)
    J = _so3_jac(w, True, inverse)
    if inverse:
        Q = -_mm(_mm(J, Q), J)
    zero = torch.zeros_like(J)
    return torch.cat([torch.cat([J, Q], -1), torch.cat([zero, J], -1)], -2)


def _se2_jac(xi: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor:
    if left:
        xi = -xi
    r1, r2, th = xi.unbind(-1)
    z = th * th
    a = coefficient("sinc", z)
    cc = coefficient("cosc", z)
    b = th * cc
    s3 = th * coefficient("sinc3", z)
    u1 = r1 * s3 - r2 * cc
    u2 = r1 * cc + r2 * s3
    o, one = torch.zeros_like(a), torch.ones_like(a)
    if inverse:
        # [[M, u], [0, 1]]⁻¹ = [[M⁻¹, −M⁻¹u], [0, 1]], M = [[a, b], [−b, a]], M⁻¹ = Mᵀ/(a²+b²)
        det = a * a + b * b  # = 2(1 − cosθ)/θ² = 2·cosc > 0 for θ < 2π
        ia, ib = a / det, b / det
        v1 = -(ia * u1 - ib * u2)
        v2 = -(ib * u1 + ia * u2)
        rows = [ia, -ib, v1, ib, ia, v2, o, o, one]
    else:
        rows = [a, b, u1, -b, a, u2, o, o, one]
    return torch.stack(rows, -1).reshape(*a.shape, 3, 3)


class SE(MatrixLieGroup):
    """Special Euclidean group ``SE(n)``, ``n >= 2`` (closed forms for n = 2, 3).

    Points ``(*batch, n+1, n+1)`` homogeneous matrices; ``vee`` order ``(ρ, ω)``.

    Example:
        >>> import torch, liegroup
        >>> G = liegroup.SE(2)
        >>> g = G.exp(G.hat(torch.tensor([1.0, 0.0, torch.pi / 2], dtype=torch.float64)))
        >>> G.vee(G.log(g))
        tensor([1.0000, 0.0000, 1.5708], dtype=torch.float64)
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ShapeError(f"SE(n) needs an int n >= 2, got {n!r}")
        super().__init__(n + 1)
        self.k = n
        self.rot = SO(n)
        self.dim = n * (n + 1) // 2

    def _arg(self) -> int:
        return self.k

    # ------------------------------------------------------------------ coordinates
    def hat(self, v: torch.Tensor) -> torch.Tensor:
        """``(*batch, dim) → (*batch, n+1, n+1)``: ``(ρ, ω) ↦ [[ω^, ρ], [0, 0]]``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SE(2).hat(torch.tensor([1.0, 2.0, 3.0]))
            tensor([[ 0., -3.,  1.],
                    [ 3.,  0.,  2.],
                    [ 0.,  0.,  0.]])
        """
        self._check_vector(v)
        return _assemble_algebra(self.rot.hat(v[..., self.k :]), v[..., : self.k])

    def vee(self, X: torch.Tensor) -> torch.Tensor:
        """Coordinates ``(ρ, ω)``, ``ω`` those of the skew part of ``Ω`` (``(*batch, dim)``).

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SE(3)
            >>> G.vee(G.hat(torch.arange(6.0)))
            tensor([0., 1., 2., 3., 4., 5.])
        """
        self.check_algebra(X, "X")
        k = self.k
        return torch.cat([X[..., :k, k], self.rot.vee(X[..., :k, :k])], dim=-1)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Rotation block projected onto SO(n), translation kept, bottom row set to ``[0, 1]``.

        Raises:
            NonFiniteError: ``g`` has NaN or infinite entries.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SE(2)
            >>> bool(G.contains(G.project(torch.eye(3) + 1e-3)))
            True
        """
        self.check_point(g, "g")
        check_finite(g, "g")
        k = self.k
        return _assemble(self.rot.project(g[..., :k, :k]), g[..., :k, k])

    def project_algebra(self, X: torch.Tensor) -> torch.Tensor:
        """Skew part of the rotation block, translation kept, bottom row zero.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SE(2).project_algebra(torch.ones(3, 3))
            tensor([[0., 0., 1.],
                    [0., 0., 1.],
                    [0., 0., 0.]])
        """
        self.check_algebra(X, "X")
        k = self.k
        return _assemble_algebra(self.rot.project_algebra(X[..., :k, :k]), X[..., :k, k])

    def _residual(self, g: torch.Tensor) -> torch.Tensor:
        k = self.k
        err_r = self.rot._residual(g[..., :k, :k])
        last = torch.zeros(k + 1, dtype=g.dtype, device=g.device)
        last[k] = 1
        err_b = (g[..., k, :] - last).abs().amax(-1)
        return torch.maximum(err_r, err_b)

    def _algebra_residual(self, X: torch.Tensor) -> torch.Tensor:
        k = self.k
        return torch.maximum(
            self.rot._algebra_residual(X[..., :k, :k]), X[..., k, :].abs().amax(-1)
        )

    # ------------------------------------------------------------------ structure
    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Closed-form inverse ``[[Rᵀ, −Rᵀt], [0, 1]]``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SE(2)
            >>> g = G.random(dtype=torch.float64)
            >>> torch.allclose(G.compose(g, G.inverse(g)), G.identity(dtype=torch.float64))
            True
        """
        self.check_point(g, "g")
        k = self.k
        Rt = g[..., :k, :k].mT
        return _assemble(Rt, -(Rt @ g[..., :k, k : k + 1]).squeeze(-1))

    def _exp(self, X: torch.Tensor) -> torch.Tensor:
        k = self.k
        if k == 3:
            return se3_exp(self.vee(X))
        if k == 2:
            hi, lo = so2_angle(X)
            rho = X[..., :2, 2]
            a, b = _se2_coefficients(hi, lo)
            t = torch.stack(
                [a * rho[..., 0] - b * rho[..., 1], b * rho[..., 0] + a * rho[..., 1]], -1
            )
            c, s = _cos_sin(hi, lo)
            R = torch.stack([c, -s, s, c], -1).reshape(*hi.shape, 2, 2)
            return _assemble(R, t)
        from liegroup.linalg import expm

        check_resolvable_rotation(X[..., :k, :k], self)
        E = expm(X)
        return _assemble(E[..., :k, :k], E[..., :k, k])

    def _log(self, g: torch.Tensor) -> torch.Tensor:
        k = self.k
        if k == 3:
            xi = se3_log(g)
            return _assemble_algebra(so3_hat(xi[..., 3:]), xi[..., :3])
        if k == 2:
            th = torch.atan2(g[..., 1, 0] - g[..., 0, 1], g[..., 0, 0] + g[..., 1, 1])
            z = th * th
            h = coefficient("sinc", z) / (2 * coefficient("cosc", z))
            t1, t2 = g[..., 0, 2], g[..., 1, 2]
            rho = torch.stack([h * t1 + 0.5 * th * t2, -0.5 * th * t1 + h * t2], -1)
            return self.hat(torch.cat([rho, th[..., None]], -1))
        return super()._log(g)

    def random(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Haar rotation and standard-normal translation.

        Example:
            >>> import liegroup
            >>> G = liegroup.SE(3)
            >>> bool(G.contains(G.random(4)).all())
            True
        """
        R = self.rot.random(*batch, dtype=dtype, device=device, generator=generator)
        t = torch.randn(*batch, self.k, dtype=R.dtype, device=device, generator=generator)
        return _assemble(R, t)

    # ------------------------------------------------------------------ Jacobians
    def adjoint_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """``Ad_g`` in ``(ρ, ω)`` coordinates; SE(3): ``[[R, t^ R], [0, R]]``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SE(3)
            >>> G.adjoint_matrix(G.identity()).shape
            torch.Size([6, 6])
        """
        self.check_point(g, "g")
        if self.k != 3:
            return super().adjoint_matrix(g)
        R, t = g[..., :3, :3], g[..., :3, 3]
        zero = torch.zeros_like(R)
        return torch.cat([torch.cat([R, _mm(so3_hat(t), R)], -1), torch.cat([zero, R], -1)], -2)

    def _closed_jac(self, X: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor | None:
        if self.k == 3:
            return _se3_jac(self.vee(X), left, inverse)
        if self.k == 2:
            return _se2_jac(self.vee(X), left, inverse)
        return None
