"""The rotation groups ``SO(n) = {R : RᵀR = I, det R = 1}``, closed forms for n = 2, 3.

Algebra ``so(n)``: skew-symmetric matrices, ``dim = n(n−1)/2``. ``hat``/``vee`` coordinates:

* ``n = 3``: the cross-product convention ``hat(ω) v = ω × v``, i.e.
  ``hat(ω) = [[0, −ω₃, ω₂], [ω₃, 0, −ω₁], [−ω₂, ω₁, 0]]``;
* ``n = 2`` and ``n ≥ 4``: the strictly lower triangle in row-major order,
  ``v = (X₁₀, X₂₀, X₂₁, X₃₀, X₃₁, X₃₂, …)`` (``X_ij = −X_ji``); for ``n = 2``, ``v = (θ,)``.

Closed forms (``θ = ‖ω‖``; coefficients from :mod:`liegroup.groups._coeffs`, series below the
per-dtype switches of :mod:`liegroup.groups._thresholds`):

* Rodrigues: ``exp(ω^) = I + (sinθ/θ)·ω^ + ((1−cosθ)/θ²)·ω^²``, with
  ``(1−cosθ)/θ² = ½·sinc²(θ/2)`` (no cancellation);
* log: ``c = (tr R − 1)/2``, ``v = vee((R − Rᵀ)/2)`` (``‖v‖ = sinθ``), ``θ = atan2(‖v‖, c)``;
  for ``θ ≤ π/2`` ``ω = (θ/‖v‖)·v`` (``asin(x)/x`` series near 0); for ``θ > π/2`` the axis is
  the largest column of ``(R + Rᵀ)/2 − c·I = (1 − c)·n nᵀ``, normalised, signed by ``v``;
* Jacobians: ``J_l(ω) = I + ((1−cosθ)/θ²)·ω^ + ((θ − sinθ)/θ³)·ω^²``, ``J_r(ω) = J_l(−ω)``,
  ``J_l⁻¹(ω) = I − ½ω^ + ((1 − (θ/2)cot(θ/2))/θ²)·ω^²``;
* SO(2): ``exp = [[cosθ, −sinθ], [sinθ, cosθ]]``, ``θ = atan2(R₁₀ − R₀₁, R₀₀ + R₁₁)``,
  Jacobians ``1``.

``SO(n).log`` returns an exactly skew-symmetric matrix (``½(L − Lᵀ)`` of the principal
``liegroup.linalg.logm`` for ``n ≥ 4``).

Example:
    >>> import torch, liegroup
    >>> G = liegroup.SO(3)
    >>> w = torch.tensor([0.0, 0.0, torch.pi / 2], dtype=torch.float64)
    >>> y = G.exp(G.hat(w)) @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    >>> torch.allclose(y, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    True
"""

from __future__ import annotations

import torch

from liegroup._validation import check_finite, check_tensor, offending
from liegroup.errors import DomainError, ShapeError
from liegroup.groups._angles import is_big, rotation_parts, two_sum
from liegroup.groups._coeffs import coefficient, series
from liegroup.groups._thresholds import switch
from liegroup.groups.base import check_batch, where_batch
from liegroup.groups.matrix import _HALF, MatrixLieGroup

__all__ = [
    "SO",
    "so3_exp",
    "so3_hat",
    "so3_left_jacobian",
    "so3_left_jacobian_inv",
    "so3_log",
    "so3_vee",
]


def _check_vec(w: torch.Tensor, n: int, name: str) -> None:
    check_tensor(w, name)
    if w.dim() < 1 or w.shape[-1] != n:
        raise ShapeError(f"{name} must have shape (*batch, {n}), got {tuple(w.shape)}")


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Small matrix product as element-wise multiply-adds in a fixed order.

    Unlike ``@`` (whose BLAS kernel, and so its rounding, depends on the batch size), the result
    for one matrix is the same alone or inside any batch.
    """
    out = A[..., :, 0, None] * B[..., None, 0, :]
    for k in range(1, A.shape[-1]):
        out = out + A[..., :, k, None] * B[..., None, k, :]
    return out


def _outer_minus(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``ω^² = ω ωᵀ − θ² I`` element-wise (batch invariant)."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return w[..., :, None] * w[..., None, :] - z[..., None, None] * eye


def so3_hat(w: torch.Tensor) -> torch.Tensor:
    """``(*batch, 3) → (*batch, 3, 3)``: the skew matrix with ``hat(ω) v = ω × v``.

    Example:
        >>> import torch
        >>> so3_hat(torch.tensor([1.0, 2.0, 3.0]))
        tensor([[ 0., -3.,  2.],
                [ 3.,  0., -1.],
                [-2.,  1.,  0.]])
    """
    _check_vec(w, 3, "w")
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def so3_vee(X: torch.Tensor) -> torch.Tensor:
    """``(*batch, 3, 3) → (*batch, 3)``: ``vee`` of the skew part ``(X − Xᵀ)/2``.

    Example:
        >>> import torch
        >>> so3_vee(so3_hat(torch.tensor([1.0, 2.0, 3.0])))
        tensor([1., 2., 3.])
    """
    return 0.5 * torch.stack(
        [X[..., 2, 1] - X[..., 1, 2], X[..., 0, 2] - X[..., 2, 0], X[..., 1, 0] - X[..., 0, 1]],
        dim=-1,
    )


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula ``exp(ω^)`` for rotation vectors ``(*batch, 3) → (*batch, 3, 3)``.

    Example:
        >>> import torch
        >>> R = so3_exp(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        >>> torch.allclose(R.mT @ R, torch.eye(3, dtype=torch.float64))
        True
    """
    _check_vec(w, 3, "w")
    big = _big_angles(w)
    if big is not None:
        return _so3_exp_mixed(w, big)
    return _so3_exp_closed(w)


def check_resolvable_rotation(X: torch.Tensor, group: object) -> None:
    """Refuse rotation generators (``n ≥ 4``) whose angles the dtype cannot resolve.

    ``expm`` of a skew matrix is accurate to ``≈ ‖X‖₁·u`` (its condition number is ``‖X‖``):
    above ``‖X‖₁ = u^{-1/2}`` (``6.7·10⁷`` in float64, ``4096`` in float32) more than half of
    the result's digits would be rounding noise and, a few decades further, it is no rotation
    at all (measured: orthogonality error ``0.4·‖X‖₁·u``). SO(2)/SO(3)/SE(2)/SE(3) reduce the
    angle exactly instead and take any finite size.

    Raises:
        DomainError: naming the batch entries and their norms.

    Example:
        >>> import torch, liegroup
        >>> check_resolvable_rotation(torch.zeros(4, 4), liegroup.SO(4))  # fine: no error
    """
    u = torch.finfo(X.dtype).eps / 2
    limit = u**-0.5
    nrm = X.detach().abs().sum(-2).amax(-1)
    hit = offending(nrm > limit)
    if hit is not None:
        count, idx = hit
        vals = [float(nrm[tuple(i)]) for i in idx]
        raise DomainError(
            f"exp on {group!r}: {count} generators have ‖X‖₁ above {limit:.3g} "
            f"(= u^-1/2 of {X.dtype}){where_batch(idx)} (norms {vals}); their rotation "
            f"angles cannot be resolved in {X.dtype} (error ≈ ‖X‖₁·u ≥ {limit * u:.1g}). Reduce "
            "the angles mod 2π first (e.g. X ← log(exp(X)) computed in higher precision), or "
            "compute in float64"
        )


def so2_angle(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The angle ``θ = (X₁₀ − X₀₁)/2`` of a 2 × 2 generator as an exact sum ``hi + lo``.

    The halves are exact (no overflow of the difference at the top of the range) and the
    sum error-free, so a large angle keeps every bit of the input. ``lo = 0`` for an exactly
    skew ``X``.

    Example:
        >>> import torch
        >>> so2_angle(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
        (tensor(1.), tensor(0.))
    """
    return two_sum(0.5 * X[..., 1, 0], -0.5 * X[..., 0, 1])


def _cos_sin(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos θ, sin θ`` of ``θ = hi + lo`` (addition theorem; ``cos hi, sin hi`` if ``lo = 0``).

    float32 angles are evaluated in float64 (exact argument reduction whatever the libm's
    float32 one does), then rounded once.
    """
    dt = hi.dtype
    if dt == torch.float32:
        hi, lo = hi.double(), lo.double()
    ch, sh = torch.cos(hi), torch.sin(hi)
    cl, sl = torch.cos(lo), torch.sin(lo)
    c, s = ch * cl - sh * sl, sh * cl + ch * sl
    return c.to(dt), s.to(dt)


def _so3_exp_closed(w: torch.Tensor) -> torch.Tensor:
    z = (w * w).sum(-1)
    a = coefficient("sinc", z)[..., None, None]
    b = coefficient("cosc", z)[..., None, None]
    K = so3_hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + a * K + b * _outer_minus(w, z)


def _big_angles(w: torch.Tensor) -> torch.Tensor | None:
    """Mask of the rotation vectors with ``θ > BIG_ANGLE`` (see ``_angles``), ``None`` if none.

    Eagerly the mask is read on the host (one synchronisation) so that the common case keeps
    its single closed-form pass; inside ``torch.compile`` both paths are always traced.
    """
    with torch.no_grad():
        z = (w.detach() * w.detach()).sum(-1)
        big = is_big(z)
    if torch.compiler.is_compiling():
        return big
    if w.numel() == 0 or not bool(big.any()):
        return None
    return big


def _so3_exp_mixed(w: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """:func:`so3_exp` with the angles above ``BIG_ANGLE`` reduced mod 2π (``_angles``).

    Each branch sees a safe input where the other is taken, so no NaN/inf reaches a gradient.
    """
    bm = big[..., None]
    R_small = _so3_exp_closed(torch.where(bm, torch.zeros_like(w), w))
    wb = torch.where(bm, w, torch.ones_like(w))
    axis, s, omc, _ = rotation_parts(wb)
    K = so3_hat(axis)
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    K2 = axis[..., :, None] * axis[..., None, :] - eye
    R_big = (eye + s[..., None, None] * K + omc[..., None, None] * K2).to(w.dtype)
    return torch.where(big[..., None, None], R_big, R_small)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Principal rotation vector of ``R`` (``(*batch, 3, 3) → (*batch, 3)``), ``θ ∈ [0, π]``.

    Accurate near ``θ = 0`` (series) and near ``π`` (axis from the symmetric part); gradients
    are finite everywhere except at exactly ``θ = π``, where ``log`` is not differentiable.

    Example:
        >>> import torch
        >>> w = torch.tensor([0.0, 3.1, 0.0], dtype=torch.float64)
        >>> so3_log(so3_exp(w))
        tensor([0.0000, 3.1000, 0.0000], dtype=torch.float64)
    """
    v = so3_vee(R)
    c = 0.5 * (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1)
    s2 = (v * v).sum(-1)
    pos = s2 > 0
    s = torch.where(
        pos, torch.sqrt(torch.where(pos, s2, torch.ones_like(s2))), torch.zeros_like(s2)
    )
    theta = torch.atan2(s, c)
    small = (s < switch("asinc", R.dtype).threshold) & (c > 0)
    near_pi = theta > switch("log_pi", R.dtype).threshold
    # near 0 and mid-range: ω = (θ / sinθ)·v
    s_safe = torch.where(small | near_pi | ~pos, torch.ones_like(s), s)
    k = torch.where(small, series("asinc", s2), theta / s_safe)
    w_skew = k[..., None] * v
    # near π: axis from (R + Rᵀ)/2 − c·I = (1 − c) n nᵀ, its largest column
    B = 0.5 * (R + R.mT) - c[..., None, None] * torch.eye(3, dtype=R.dtype, device=R.device)
    j = B.diagonal(dim1=-2, dim2=-1).argmax(-1)
    col = torch.gather(B, -1, j[..., None, None].expand(*B.shape[:-1], 1)).squeeze(-1)
    cn2 = (col * col).sum(-1)
    cn = torch.sqrt(torch.where(near_pi, cn2, torch.ones_like(cn2)))
    n = col / cn[..., None]
    sign = torch.where((n * v).sum(-1) < 0, -torch.ones_like(s), torch.ones_like(s))
    w_pi = (sign * theta)[..., None] * n
    return torch.where(near_pi[..., None], w_pi, w_skew)


def _so3_jac(w: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor:
    z = (w * w).sum(-1)
    K = so3_hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    sgn = 1.0 if left else -1.0
    if inverse:
        b = torch.full_like(z, -0.5 * sgn)[..., None, None]
        c = coefficient("dinv", z)[..., None, None]
    else:
        b = sgn * coefficient("cosc", z)[..., None, None]
        c = coefficient("sinc3", z)[..., None, None]
    return eye + b * K + c * _outer_minus(w, z)


def so3_left_jacobian(w: torch.Tensor) -> torch.Tensor:
    """``J_l(ω) = I + ((1−cosθ)/θ²) ω^ + ((θ−sinθ)/θ³) ω^²``, ``(*batch, 3) → (*batch, 3, 3)``.

    ``J_r(ω) = J_l(−ω)``.

    Example:
        >>> import torch
        >>> so3_left_jacobian(torch.zeros(3))
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    _check_vec(w, 3, "w")
    return _so3_jac(w, True, False)


def so3_left_jacobian_inv(w: torch.Tensor) -> torch.Tensor:
    """``J_l⁻¹(ω) = I − ½ω^ + ((1 − (θ/2)cot(θ/2))/θ²) ω^²`` (singular at ``θ = 2π``).

    Example:
        >>> import torch
        >>> w = torch.tensor([0.4, 0.1, -0.3], dtype=torch.float64)
        >>> torch.allclose(so3_left_jacobian(w) @ so3_left_jacobian_inv(w),
        ...                torch.eye(3, dtype=torch.float64))
        True
    """
    _check_vec(w, 3, "w")
    return _so3_jac(w, True, True)


class SO(MatrixLieGroup):
    """Special orthogonal group ``SO(n)``, ``n >= 2`` (closed forms for n = 2, 3).

    Points: rotation matrices ``(*batch, n, n)``. Algebra: skew matrices ``(*batch, n, n)``;
    ``hat``/``vee`` as in the module docstring.

    Example:
        >>> import torch, liegroup
        >>> G = liegroup.SO(3)
        >>> R = G.random(5, dtype=torch.float64)
        >>> bool(G.contains(G.compose(R, G.inverse(R))).all())
        True
    """

    def __init__(self, n: int) -> None:
        super().__init__(n)
        if n < 2:
            raise ShapeError(f"SO(n) needs n >= 2 (SO(1) is the trivial group), got {n}")
        self.dim = n * (n - 1) // 2
        # coordinates index the strict lower triangle; hat scatters them (O(n²) memory,
        # no dense (dim, n, n) basis: SO(1024) must be cheap to construct)
        rows, cols = torch.tril_indices(n, n, offset=-1)
        self._rows, self._cols = rows, cols

    # ------------------------------------------------------------------ coordinates
    def hat(self, v: torch.Tensor) -> torch.Tensor:
        """``(*batch, n(n−1)/2) → (*batch, n, n)`` skew matrix (ordering: module docstring).

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).hat(torch.tensor([0.5]))
            tensor([[ 0.0000, -0.5000],
                    [ 0.5000,  0.0000]])
        """
        self._check_vector(v)
        if self.n == 3:
            return so3_hat(v)
        rows, cols = self._rows.to(v.device), self._cols.to(v.device)
        X = v.new_zeros(*v.shape[:-1], self.n, self.n)
        X[..., rows, cols] = v
        X[..., cols, rows] = -v
        return X

    def vee(self, X: torch.Tensor) -> torch.Tensor:
        """``(*batch, n, n) → (*batch, n(n−1)/2)``, coordinates of the skew part ``(X − Xᵀ)/2``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(4).vee(liegroup.SO(4).hat(torch.arange(6.0)))
            tensor([0., 1., 2., 3., 4., 5.])
        """
        self.check_algebra(X, "X")
        if self.n == 3:
            return so3_vee(X)
        return 0.5 * (X[..., self._rows, self._cols] - X[..., self._cols, self._rows])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Nearest rotation in Frobenius norm: polar factor ``U Vᵀ`` with a det fix.

        If ``det(U Vᵀ) < 0`` the singular vector of the smallest singular value is flipped
        (the nearest matrix of determinant +1).

        Raises:
            NonFiniteError: ``g`` has NaN or infinite entries (no nearest rotation exists).

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> R = G.project(torch.eye(3, dtype=torch.float64) + 1e-3)
            >>> bool(G.contains(R))
            True
        """
        self.check_point(g, "g")
        check_finite(g, "g")  # LAPACK's SVD would fail with an untyped error on NaN/inf
        U, _, Vh = torch.linalg.svd(g)
        d = torch.sign(torch.linalg.det(U @ Vh))
        d = torch.where(d == 0, torch.ones_like(d), d)
        flip = torch.ones(*d.shape, self.n, dtype=g.dtype, device=g.device)
        flip = torch.cat([flip[..., :-1], d[..., None]], dim=-1)
        return (U * flip[..., None, :]) @ Vh

    def project_algebra(self, X: torch.Tensor) -> torch.Tensor:
        """Skew part ``(X − Xᵀ)/2`` (exactly skew).

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).project_algebra(torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
            tensor([[ 0.,  1.],
                    [-1.,  0.]])
        """
        self.check_algebra(X, "X")
        return 0.5 * (X - X.mT)

    def _residual(self, g: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.n, dtype=g.dtype, device=g.device)
        err = (g.mT @ g - eye).abs().flatten(-2).amax(-1)
        det = torch.linalg.det(g)
        return torch.where(det > 0, err, torch.full_like(err, float("inf")))

    def _algebra_residual(self, X: torch.Tensor) -> torch.Tensor:
        return (X + X.mT).abs().flatten(-2).amax(-1)

    # ------------------------------------------------------------------ structure
    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Transpose ``Rᵀ``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).inverse(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
            tensor([[ 0.,  1.],
                    [-1.,  0.]])
        """
        self.check_point(g, "g")
        return g.mT

    def _exp(self, X: torch.Tensor) -> torch.Tensor:
        if self.n == 3:
            return so3_exp(so3_vee(X))
        if self.n == 2:
            hi, lo = so2_angle(X)
            c, s = _cos_sin(hi, lo)
            return torch.stack([c, -s, s, c], dim=-1).reshape(*hi.shape, 2, 2)
        check_resolvable_rotation(X, self)
        return super()._exp(X)

    def _log(self, g: torch.Tensor) -> torch.Tensor:
        if self.n == 3:
            return so3_hat(so3_log(g))
        if self.n == 2:
            th = torch.atan2(g[..., 1, 0] - g[..., 0, 1], g[..., 0, 0] + g[..., 1, 1])
            return self.hat(th[..., None])
        return super()._log(g)

    def random(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Haar-distributed rotations (QR of a Gaussian matrix with sign and det fix).

        float16/bfloat16 rotations are drawn in float32 and rounded once.

        Raises:
            ShapeError: a batch size is negative.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(4)
            >>> bool(G.contains(G.random(3, dtype=torch.float64)).all())
            True
        """
        batch = check_batch(batch)
        out_dtype = torch.get_default_dtype() if dtype is None else dtype
        work = torch.float32 if out_dtype in _HALF else out_dtype
        A = torch.randn(*batch, self.n, self.n, dtype=work, device=device, generator=generator)
        Q, Rr = torch.linalg.qr(A)
        Q = Q * torch.sign(Rr.diagonal(dim1=-2, dim2=-1))[..., None, :]
        d = torch.sign(torch.linalg.det(Q))
        first = Q[..., :, :1] * d[..., None, None]
        return torch.cat([first, Q[..., :, 1:]], dim=-1).to(out_dtype)

    # ------------------------------------------------------------------ Jacobians
    def adjoint_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """``Ad_R`` in vee coordinates: ``R`` for SO(3), ``1`` for SO(2), generic otherwise.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).adjoint_matrix(liegroup.SO(2).identity())
            tensor([[1.]])
        """
        self.check_point(g, "g")
        if self.n == 3:
            return g
        if self.n == 2:
            return torch.ones(*g.shape[:-2], 1, 1, dtype=g.dtype, device=g.device)
        return super().adjoint_matrix(g)

    def _closed_jac(self, X: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor | None:
        if self.n == 3:
            return _so3_jac(so3_vee(X), left, inverse)
        if self.n == 2:
            return torch.ones(*X.shape[:-2], 1, 1, dtype=X.dtype, device=X.device)
        return None
