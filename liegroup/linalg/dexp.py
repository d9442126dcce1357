"""Left-trivialised derivative of the matrix exponential and its inverse.

Convention (left trivialisation): ``expm(X) @ dexp(X, Y) == expm_frechet(X, Y)``, i.e.

``dexp(X, Y) = ∫₀¹ e^{−tX} Y e^{tX} dt = Σ_k (−1)^k/(k+1)! ad_X^k(Y) = ((1 − e^{−ad_X})/ad_X)(Y)``,

and ``dexp_inv(X, ·)`` is the inverse map (``(ad_X/(1 − e^{−ad_X}))``: ``Y − [X, Y]/2 + …``).
Neither is evaluated by a truncated series:

* ``dexp(X, Y) = L(−X, Y) · e^{X}`` (substitute ``t → 1 − t`` in the integral form of the
  Fréchet derivative ``L``), which uses :func:`~liegroup.linalg.expm_frechet` and
  :func:`~liegroup.linalg.expm` and needs no solve;
* ``dexp_inv`` for ``n ≤ 16`` solves the ``n² × n²`` linear system of ``Y ↦ dexp(X, Y)``
  (built from ``n²`` batched Fréchet derivatives; valid for any ``X`` whose ``ad_X`` has no
  eigenvalue ``2πik``, ``k ≠ 0``); for ``n > 16`` it uses
  ``dexp_inv(X, Z) = L_log(e^X, e^X Z)``, the Fréchet derivative of the principal logarithm,
  from the block identity ``log [[M, E], [0, M]] = [[log M, L_log(M, E)], [0, log M]]``,
  which requires the eigenvalues of ``X`` to have imaginary parts in ``(−π, π)``
  (:class:`~liegroup.errors.DomainError` otherwise).

Example:
    >>> import torch
    >>> from liegroup.linalg import dexp, dexp_inv, expm, expm_frechet
    >>> X = torch.tensor([[0.0, -0.7], [0.7, 0.1]], dtype=torch.float64)
    >>> Y = torch.tensor([[0.3, 0.2], [-0.1, 0.5]], dtype=torch.float64)
    >>> torch.allclose(expm(X) @ dexp(X, Y), expm_frechet(X, Y))
    True
    >>> torch.allclose(dexp_inv(X, dexp(X, Y)), Y)
    True
"""

from __future__ import annotations

import math

import torch

from liegroup.errors import DomainError, ShapeError
from liegroup.linalg._common import check_batches, check_square, solve, working_dtype
from liegroup.linalg.expm import expm, expm_frechet
from liegroup.linalg.logm import logm

__all__ = ["dexp", "dexp_inv"]

_KRON_MAX_N = 16


def _pair(X: object, Y: object, nx: str, ny: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    Xc = check_square(X, nx)
    Yc = check_square(Y, ny)
    if Xc.shape[-1] != Yc.shape[-1]:
        raise ShapeError(
            f"{nx} and {ny} must have the same matrix size, got {tuple(Xc.shape)} and "
            f"{tuple(Yc.shape)}"
        )
    check_batches(Xc, Yc, nx, ny, "dexp" if ny == "Y" else "dexp_inv")
    dtype = torch.promote_types(Xc.dtype, Yc.dtype)
    wd = working_dtype(dtype)
    Xb, Yb = torch.broadcast_tensors(Xc.to(wd), Yc.to(wd))
    return Xb, Yb, dtype


def dexp(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Left-trivialised differential of ``exp``: ``dexp(X, Y) = e^{−X} L(X, Y)``.

    Args:
        X: base point in the algebra, ``(..., n, n)`` real float tensor.
        Y: tangent direction, ``(..., n, n)`` (batch shapes broadcast).

    Returns:
        ``Σ_k (−1)^k/(k+1)! ad_X^k(Y)``, computed as ``L(−X, Y) e^X`` (no truncated series);
        differentiable in ``X`` and ``Y``.

    Example:
        >>> import torch
        >>> from liegroup.linalg import dexp
        >>> X = torch.zeros(3, 3, dtype=torch.float64)
        >>> Y = torch.randn(3, 3, dtype=torch.float64)
        >>> torch.allclose(dexp(X, Y), Y)
        True
    """
    Xb, Yb, dtype = _pair(X, Y, "X", "Y")
    out = expm_frechet(-Xb, Yb) @ expm(Xb)
    return out.to(dtype)


def _dexp_matrix(X: torch.Tensor) -> torch.Tensor:
    """``(B, n², n²)`` matrix of ``vec(Y) ↦ vec(dexp(X, Y))`` (row-major vec)."""
    b, n = X.shape[0], X.shape[-1]
    N = n * n
    basis = torch.eye(N, dtype=X.dtype, device=X.device).reshape(N, n, n)
    Xr = X[:, None].expand(b, N, n, n)
    cols = expm_frechet(-Xr, basis.expand(b, N, n, n)) @ expm(X)[:, None]
    return cols.reshape(b, N, N).mT


def dexp_inv(X: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dexp` in its second argument: solves ``dexp(X, Y) = Z`` for ``Y``.

    Args:
        X: base point in the algebra, ``(..., n, n)``.
        Z: ``(..., n, n)`` (batch shapes broadcast).

    Returns:
        ``(ad_X / (1 − e^{−ad_X}))(Z) = Z + [X, Z]/2 + [X, [X, Z]]/12 + …`` for any norm of
        ``X`` (see the module docstring for the method); differentiable.

    Raises:
        DomainError: ``dexp(X, ·)`` is exactly singular (``ad_X`` has an eigenvalue ``2πik``,
            ``k ≠ 0``), or ``n > 16`` and an eigenvalue of ``X`` has ``|Im| ≥ π``.
        ShapeError: the batch shapes of ``X`` and ``Z`` do not broadcast.

    Example:
        >>> import torch
        >>> from liegroup.linalg import dexp_inv
        >>> X = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        >>> Z = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
        >>> dexp_inv(X, Z)   # Z + [X, Z]/2 + [X, [X, Z]]/12
        tensor([[ 0.5000, -0.1667],
                [ 1.0000, -0.5000]], dtype=torch.float64)
    """
    Xb, Zb, dtype = _pair(X, Z, "X", "Z")
    batch = Xb.shape[:-2]
    n = Xb.shape[-1]
    Xf = Xb.reshape(-1, n, n)
    Zf = Zb.reshape(-1, n, n)
    if Xf.shape[0] == 0 or n == 0:
        # empty: differentiable in X and Z like any other result (empty gradients)
        return (Xb + Zb).to(dtype)
    if n <= _KRON_MAX_N:
        D = _dexp_matrix(Xf)
        try:
            y = solve(D, Zf.reshape(-1, n * n, 1))
        except RuntimeError:  # torch.linalg.LinAlgError: exactly singular
            info = torch.linalg.solve_ex(D.detach(), Zf.detach().reshape(-1, n * n, 1))[1]
            bad = (info != 0).nonzero().flatten()[:5].tolist()
            raise DomainError(
                f"dexp_inv: dexp(X, ·) is singular for X at (flattened) batch indices {bad}: "
                "ad_X has an eigenvalue 2πik, k ≠ 0 (e.g. a rotation generator of angle 2π), "
                "where exp is not a local diffeomorphism and no inverse exists. Move X off the "
                "singularity, or use the principal representative log(exp(X)) instead of X"
            ) from None
        return y.reshape(*batch, n, n).to(dtype)
    ev = torch.linalg.eigvals(Xf.detach())
    bad = (ev.imag.abs() >= math.pi).any(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise DomainError(
            f"dexp_inv: X[{i}] (flattened batch index) has an eigenvalue with |Im| >= π; for "
            f"n > {_KRON_MAX_N} only X in the principal strip is supported"
        )
    M = expm(Xf)
    E = M @ Zf
    t = (
        M.detach().abs().sum(-2).amax(-1)
        / E.detach().abs().sum(-2).amax(-1).clamp_min(torch.finfo(Xf.dtype).tiny)
    )[:, None, None]
    top = torch.cat([M, t * E], dim=-1)
    bottom = torch.cat([torch.zeros_like(M), M], dim=-1)
    Lg = logm(torch.cat([top, bottom], dim=-2))
    return (Lg[..., :n, n:] / t).reshape(*batch, n, n).to(dtype)
