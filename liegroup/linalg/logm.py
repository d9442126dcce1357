"""Principal matrix logarithm by inverse scaling and squaring, batched and differentiable.

For ``A`` with no eigenvalue on the closed negative real axis, ``log A`` is the unique real
logarithm whose eigenvalues have imaginary parts in ``(−π, π)``. The algorithm is the
transformation-free inverse scaling and squaring method of Al-Mohy & Higham (SIAM J. Sci.
Comput. 34(4), 2012, §5), in real arithmetic (torch has no Schur decomposition):

1. take square roots ``A_k = A_{k−1}^{1/2}`` by the product form of the Denman–Beavers
   iteration with determinantal scaling, until ``α₃(A_s − I) = max(‖Z³‖₁^{1/3}, ‖Z⁴‖₁^{1/4})``
   (``Z = A_s − I``) is at most ``θ_max``. ``Z`` itself is never formed by the cancelling
   subtraction ``A_s − I``: it is updated exactly through ``A_{k−1} − I = (A_k − I)(A_k + I)``,
   i.e. ``Z_k = (A_k + I)⁻¹ Z_{k−1}``, starting from ``Z_0 = A − I``, which keeps relative
   accuracy near the identity;
2. choose the smallest degree ``m`` with ``α₃ ≤ θ_m``, where ``θ_m`` is the largest ``θ`` with
   ``|r_m(−θ) − log(1 − θ)| ≤ u`` (the Kenney–Laub bound on ``‖r_m(Z) − log(I + Z)‖``, computed
   with mpmath for ``u = 2⁻⁵³`` and ``2⁻²⁴``);
3. evaluate the ``[m/m]`` Padé approximant of ``log(I + Z)`` in partial fractions,
   ``r_m(Z) = Σ_j w_j (I + x_j Z)⁻¹ Z`` (Gauss–Legendre nodes ``x_j`` and weights ``w_j`` on
   ``[0, 1]``; all ``m`` solves in one batched call), and return ``2^s r_m(Z)``.

The domain is checked first from the eigenvalues: one with real part ``≤ 0`` and
``|imaginary part| ≤ n·u·‖A‖₁`` (on the negative real axis or within rounding of it) or one of
modulus below ``n·u·‖A‖₁`` (numerically singular) raises
:class:`~liegroup.errors.DomainError` naming the batch index. Matrices with an eigenvalue
within 0.1 rad of the branch cut take their first square root by the coupled Denman–Beavers
iteration, whose iterates stay nonsingular there (the product form's do not).

Gradients: autograd differentiates the algorithm itself (square-root iterations, solves and
Padé sum) with every discrete choice (``s``, ``m``, iteration counts, scalings ``μ``) frozen;
at convergence the derivative of the iteration is the Fréchet derivative of the square root,
so the backward pass computes ``L_log(A, ·)*`` to working accuracy (tests compare it with
the inverse of the Fréchet derivative of ``exp``).

Example:
    >>> import torch
    >>> from liegroup.linalg import logm
    >>> logm(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)).diagonal()
    tensor([0.6931, 1.0986], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from liegroup.errors import DomainError
from liegroup.linalg._common import (
    _LOOP_SOLVE_N,
    check_square,
    eye_like,
    flat,
    lu_solve,
    norm1,
    solve,
    unit_roundoff,
    working_dtype,
)

__all__ = ["logm"]

# θ_m, m = 1, 2, ...: largest θ with |r_m(−θ) − log(1 − θ)| <= u (mpmath, 50 digits).
_THETA: dict[torch.dtype, tuple[float, ...]] = {
    torch.float64: (
        1.1e-5,
        1.819e-3,
        1.621e-2,
        5.387e-2,
        1.135e-1,
        1.866e-1,
        2.643e-1,
        3.402e-1,
        4.108e-1,
        4.746e-1,
        5.311e-1,
        5.807e-1,
        6.24e-1,
        6.618e-1,
        6.948e-1,
        7.236e-1,
    ),
    torch.float32: (
        8.903e-3,
        9.646e-2,
        2.511e-1,
        4.053e-1,
        5.314e-1,
        6.279e-1,
        7.005e-1,
        7.552e-1,
    ),
}
_MAX_ROOTS = 80
_MAX_DB_ITERS = 60
# Matrices with an eigenvalue of |arg| > π − _NEAR_PI take their first square root by the
# coupled Denman–Beavers iteration (see _sqrtm_db_coupled).
_NEAR_PI = 0.1


@lru_cache(maxsize=64)
def _gauss_legendre(m: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the m-point Gauss–Legendre rule on ``[0, 1]``."""
    x, w = np.polynomial.legendre.leggauss(m)
    return tuple(((x + 1) / 2).tolist()), tuple((w / 2).tolist())


def _lu_ex(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """:func:`~liegroup.linalg._common.lu_factor` that reports exactly singular matrices.

    Returns ``(LU, pivots, singular)``, ``singular`` a boolean per matrix (a zero pivot).
    """
    n = Q.shape[-1]
    if n <= _LOOP_SOLVE_N or Q.shape[0] <= 1:
        LU, piv, info = torch.linalg.lu_factor_ex(Q)
    else:
        parts = [torch.linalg.lu_factor_ex(Q[i]) for i in range(Q.shape[0])]
        LU = torch.stack([p[0] for p in parts])
        piv = torch.stack([p[1] for p in parts])
        info = torch.stack([p[2] for p in parts])
    return LU, piv, (info > 0).cpu().numpy()


def _branch_cut_error(count: int, first: int, why: str) -> DomainError:
    return DomainError(
        f"logm: {why} for {count} matrices (first: flattened batch index {first}): such a "
        "matrix is within rounding of having eigenvalues on the closed negative real axis, "
        "where the principal log is not defined (near it, an eigenvalue pair at angle ±(π − δ) "
        "has condition ~1/δ, infinite at rounding level); for a rotation by about π use the "
        "closed-form SO(3).log, or otherwise move the input off the branch cut"
    )


def _db_iterate(
    X: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    step: Callable[
        [tuple[torch.Tensor, torch.Tensor]],
        tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]],
    ],
) -> torch.Tensor:
    """Run a Denman–Beavers ``step`` per matrix until each started within ``√u``; ``state[0]``.

    ``step(state) → (e, singular, new_state)``: ``e`` the residual of ``state`` (float64
    numpy per matrix), ``singular`` whether an iterate it inverted is exactly singular. A
    matrix stops once the iteration started within ``√u`` (its last step still applies).

    Raises:
        DomainError: an iterate is exactly singular, or the iteration does not converge.
    """
    sqrt_u = math.sqrt(unit_roundoff(X.dtype))
    done = np.zeros(X.shape[0], dtype=bool)
    for _ in range(_MAX_DB_ITERS):
        e, singular, new = step(state)
        start_close = e <= sqrt_u
        singular = singular & ~done
        if singular.any():
            bad = np.flatnonzero(singular)
            raise _branch_cut_error(
                len(bad), int(bad[0]), "the square-root iteration met an exactly singular iterate"
            )
        if done.any():
            act = torch.as_tensor(~done, device=X.device)[:, None, None]
            state = (torch.where(act, new[0], state[0]), torch.where(act, new[1], state[1]))
        else:
            state = new
        done |= start_close
        if done.all():
            return state[0]
    bad = np.flatnonzero(~done)
    raise _branch_cut_error(len(bad), int(bad[0]), "the square-root iteration did not converge")


def _db_scale(e: np.ndarray, logdet: torch.Tensor, n: int, X: torch.Tensor) -> torch.Tensor:
    """The determinant scaling ``μ`` per matrix (1 once the residual ``e`` is ≤ 10⁻²)."""
    mu_np = np.where(e > 1e-2, np.exp(-logdet.double().cpu().numpy() / (2 * n)), 1.0)
    return torch.as_tensor(mu_np, dtype=X.dtype, device=X.device)[:, None, None]


def _log_abs_det(LU: torch.Tensor) -> torch.Tensor:
    return LU.detach().diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def _sqrtm_db(X: torch.Tensor) -> torch.Tensor:
    """Principal square root of each matrix by the scaled product-form Denman–Beavers iteration.

    ``M₀ = Y₀ = X``; ``Y ← ½ μ Y (I + μ⁻² M⁻¹)``, ``M ← ½ (I + (μ² M + μ⁻² M⁻¹)/2)`` with
    ``μ = |det M|^{−1/(2n)}`` while ``‖M − I‖₁ > 10⁻²``; ``M → I`` and ``Y → X^{1/2}``
    quadratically. A matrix stops once the iteration started within ``√u`` of ``I``.

    Raises:
        DomainError: an iterate ``M`` is exactly singular (an eigenvalue of ``X`` within
            rounding of the negative real axis), or the iteration does not converge.
    """
    n = X.shape[-1]
    I = eye_like(X)  # noqa: E741
    Ib = I.expand_as(X)

    def step(state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
        Y, M = state
        e = norm1(M.detach() - I).double().cpu().numpy()
        LU, piv, singular = _lu_ex(M)
        Minv = lu_solve(LU, piv, Ib)
        mu = _db_scale(e, _log_abs_det(LU), n, X)
        Yn = 0.5 * (mu * Y + (Y @ Minv) / mu)
        Mn = 0.5 * (I + 0.5 * (mu * mu * M + Minv / (mu * mu)))
        return e, singular, (Yn, Mn)

    return _db_iterate(X, (X, X), step)


def _sqrtm_db_coupled(X: torch.Tensor) -> torch.Tensor:
    """Principal square root by the scaled coupled Denman–Beavers iteration.

    ``Y₀ = X``, ``Z₀ = I``; ``Y ← ½(μY + μ⁻¹Z⁻¹)``, ``Z ← ½(μZ + μ⁻¹Y⁻¹)`` with
    ``μ = |det Y · det Z|^{−1/(2n)}`` while ``‖YZ − I‖₁ > 10⁻²``; ``Y → X^{1/2}``,
    ``Z → X^{−1/2}``. For eigenvalues near −1 (angle ``π − δ``) this keeps what the product
    form loses: its first step forms ``X + X⁻¹`` (for a rotation ``2cos θ·I`` in the rotation
    plane, ``−2 + O(δ²)``, rounded to −2 once ``δ ≲ √u``: an exactly singular next
    iterate), while ``Y₁ = ½(X + I)`` keeps the ``sin θ ≈ δ`` part of ``X``, so the iterates
    stay nonsingular with condition ``~1/δ``. A matrix stops once the iteration started
    within ``√u`` of ``YZ = I``.

    Raises:
        DomainError: an iterate is exactly singular, or the iteration does not converge.
    """
    n = X.shape[-1]
    I = eye_like(X)  # noqa: E741
    Ib = I.expand_as(X)

    def step(state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
        Y, Z = state
        e = norm1((Y.detach() @ Z.detach()) - I).double().cpu().numpy()
        LUy, py, sy = _lu_ex(Y)
        LUz, pz, sz = _lu_ex(Z)
        Yinv = lu_solve(LUy, py, Ib)
        Zinv = lu_solve(LUz, pz, Ib)
        mu = _db_scale(e, _log_abs_det(LUy) + _log_abs_det(LUz), n, X)
        return e, sy | sz, (0.5 * (mu * Y + Zinv / mu), 0.5 * (mu * Z + Yinv / mu))

    return _db_iterate(X, (X, Ib), step)


def _alpha3(Z: torch.Tensor) -> np.ndarray:
    """``max(‖Z³‖₁^{1/3}, ‖Z⁴‖₁^{1/4})`` per matrix (float64 numpy)."""
    Zd = Z.detach()
    Z2 = Zd @ Zd
    Z3 = Z2 @ Zd
    Z4 = Z2 @ Z2
    nn = torch.stack([norm1(Z3), norm1(Z4)]).double().cpu().numpy()
    return np.maximum(nn[0] ** (1 / 3), nn[1] ** (1 / 4))


def _pade_log(Z: torch.Tensor, m: int) -> torch.Tensor:
    """``r_m(Z) = Σ_j w_j (I + x_j Z)⁻¹ Z`` for a batch, all solves in one call."""
    x, w = _gauss_legendre(m)
    I = eye_like(Z)  # noqa: E741
    xs = torch.tensor(x, dtype=Z.dtype, device=Z.device)[:, None, None, None]
    ws = torch.tensor(w, dtype=Z.dtype, device=Z.device)[:, None, None, None]
    Q = I + xs * Z  # (m, B, n, n)
    R = Z.expand_as(Q)
    b, n = Z.shape[0], Z.shape[-1]
    S = solve(Q.reshape(m * b, n, n), R.reshape(m * b, n, n)).reshape(m, b, n, n)
    return (ws * S).sum(0)


def _check_domain(A: torch.Tensor, name: str) -> np.ndarray:
    """Raise :class:`DomainError` if a matrix has an eigenvalue on the closed negative axis.

    Returns a flag per matrix: some eigenvalue has argument within ``_NEAR_PI`` of ``±π``.
    """
    n = A.shape[-1]
    Ad = A.detach()
    if n > _LOOP_SOLVE_N:
        ev = torch.stack([torch.linalg.eigvals(Ad[i]) for i in range(Ad.shape[0])])
    else:
        ev = torch.linalg.eigvals(Ad)
    tol = (n * unit_roundoff(A.dtype) * norm1(Ad))[:, None]
    bad_axis = (ev.imag.abs() <= tol) & (ev.real <= 0)
    tiny = ev.abs() <= tol
    bad = (bad_axis | tiny).any(-1)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1).tolist()
        i = idx[0]
        evs = ev[i][(bad_axis | tiny)[i]].tolist()
        raise DomainError(
            f"logm: {name}[{i}] (flattened batch index; {len(idx)} bad matrices in all, "
            f"first indices {idx[:5]}) has eigenvalue(s) {evs[:4]} on the closed negative real "
            f"axis or within rounding of it (|imaginary part| ≤ n·u·‖A‖₁ = {float(tol[i]):.3g}), "
            "or numerically zero: the principal real logarithm does not exist there, and "
            "within rounding of the axis it is not determined by the data (an eigenvalue pair "
            "at angle ±(π − δ) has condition ~1/δ). For a rotation by about π use the "
            "closed-form SO(3).log, or otherwise move the input off the branch cut"
        )
    near = (math.pi - ev.angle().abs() < _NEAR_PI).any(-1)
    return near.cpu().numpy()


def _logm_core(A: torch.Tensor, near_pi: np.ndarray) -> torch.Tensor:
    """``log`` of a checked ``(B, n, n)`` batch in its own dtype (autograd-transparent)."""
    dt, dev = A.dtype, A.device
    theta = _THETA[dt]
    tmax = theta[-1]
    I = eye_like(A)  # noqa: E741
    X, Z = A, A - I
    b = A.shape[0]
    s = np.zeros(b, dtype=np.int64)
    alpha = _alpha3(Z)
    for _ in range(_MAX_ROOTS):
        need = alpha > tmax
        if not need.any():
            break
        idx = torch.as_tensor(np.flatnonzero(need), device=dev)
        fix = near_pi[need] & (s[need] == 0)
        if fix.any():
            # first root of a matrix with eigenvalues near −1: the coupled iteration
            fi = torch.as_tensor(np.flatnonzero(fix), device=dev)
            Xi = X[idx]
            Xr = torch.zeros_like(Xi).index_copy(0, fi, _sqrtm_db_coupled(Xi[fi]))
            if not fix.all():
                oi = torch.as_tensor(np.flatnonzero(~fix), device=dev)
                Xr = Xr.index_copy(0, oi, _sqrtm_db(Xi[oi]))
        else:
            Xr = _sqrtm_db(X[idx])
        Zr = solve(Xr + I, Z[idx])
        if need.all():
            X, Z = Xr, Zr
        else:
            X = X.index_copy(0, idx, Xr)
            Z = Z.index_copy(0, idx, Zr)
        s[need] += 1
        alpha[need] = _alpha3(Zr)
    else:
        raise RuntimeError(f"logm: more than {_MAX_ROOTS} square roots needed; please report")
    m = np.searchsorted(np.asarray(theta), alpha, side="left") + 1
    m = np.minimum(m, len(theta))
    scale = torch.as_tensor(np.ldexp(1.0, s), dtype=dt, device=dev)[:, None, None]
    degs = np.unique(m).tolist()
    if len(degs) == 1:
        return scale * _pade_log(Z, degs[0])
    out = torch.zeros_like(Z)
    for d in degs:
        idx = torch.as_tensor(np.flatnonzero(m == d), device=dev)
        out = out.index_copy(0, idx, _pade_log(Z[idx], d))
    return scale * out


def logm(A: torch.Tensor) -> torch.Tensor:
    """Principal real matrix logarithm of each matrix of a batch.

    Inverse scaling and squaring in real arithmetic (see the module docstring); accurate to
    about the conditioning of the problem, with relative accuracy kept near the identity.
    Differentiable by autograd through the algorithm (the Fréchet derivative of ``log``).

    Args:
        A: real tensor ``(..., n, n)`` of float32/float64 whose matrices have no eigenvalue on
            the closed negative real axis. float16/bfloat16 are computed in float32 and
            rounded back to the input dtype.

    Returns:
        ``log A``, same shape, dtype and device; ``expm(logm(A)) ≈ A`` and the eigenvalues of
        the result have imaginary parts in ``(−π, π)``.

    Raises:
        DomainError: a matrix has an eigenvalue on the closed negative real axis or within
            rounding of it (real part ``≤ 0``, ``|imaginary part| ≤ n·u·‖A‖₁``: e.g. a
            rotation by π, or a float32 rotation by 3.14159265), or is numerically singular;
            the message names its (flattened) batch index.
        DTypeError, ShapeError, NonFiniteError: as :func:`~liegroup.linalg.expm`.

    Example:
        >>> import torch
        >>> from liegroup.linalg import expm, logm
        >>> X = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> torch.allclose(logm(expm(X)), X)
        True
    """
    A = check_square(A, "A")
    wd = working_dtype(A.dtype)
    Af, batch = flat(A.to(wd))
    n = A.shape[-1]
    if Af.shape[0] == 0 or n == 0:
        return A.clone()  # empty: differentiable like any other result (an empty gradient)
    near_pi = _check_domain(Af, "A")
    out = _logm_core(Af, near_pi)
    return out.reshape(*batch, n, n).to(A.dtype)
