"""Private helpers of :mod:`liegroup.linalg`: validation, batching, norms, safe solves."""

from __future__ import annotations

import math

import torch

from liegroup._validation import check_device_has_values, check_finite, check_tensor
from liegroup.errors import ShapeError

# Above this size a batched LU is run one matrix at a time: (1) batched LU with several
# threads hits an MKL DLASWP parameter error for n >= ~200 on torch 2.13 CPU builds, and
# (2) a single LU may then use a threaded LAPACK whose rounding differs from the batched
# one, which would break batch invariance. At that size the per-call overhead is negligible.
_LOOP_SOLVE_N = 128

LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_square(A: object, name: str, finite: bool = True) -> torch.Tensor:
    """Validate a real floating ``(..., n, n)`` tensor with finite entries; return it.

    With ``finite=False`` the (full-size) finiteness scan is left to the caller, which must
    then detect non-finite entries some other way (e.g. a non-finite norm) and call
    :func:`liegroup._validation.check_finite`. With ``finite=True`` a ``meta`` tensor (no
    values) raises :class:`~liegroup.errors.DeviceError`.
    """
    A = check_tensor(A, name)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ShapeError(
            f"{name} must have shape (*batch, n, n) (square matrices in the last two "
            f"dimensions), got {tuple(A.shape)}"
        )
    if finite:
        check_device_has_values(A, f"{name}'s finiteness check")
        if A.numel() and not bool(torch.isfinite(A).all()):
            check_finite(A, name)
    return A


def check_batches(A: torch.Tensor, B: torch.Tensor, na: str, nb: str, op: str) -> None:
    """Raise :class:`ShapeError` unless the batch shapes of ``A`` and ``B`` broadcast."""
    try:
        torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ShapeError(
            f"{op}: the batch shapes of {na} {tuple(A.shape[:-2])} and {nb} "
            f"{tuple(B.shape[:-2])} do not broadcast; give one matrix per batch entry (same "
            "batch shape), or a single (n, n) matrix for all of them"
        ) from None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 in themselves."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` (half the machine epsilon) of a floating dtype."""
    return torch.finfo(dtype).eps / 2


def norm1(X: torch.Tensor) -> torch.Tensor:
    """Matrix 1-norm (max column sum) of each matrix of ``(..., n, n)``, shape ``(...)``.

    For small ``n`` the column sums are accumulated row by row (torch's reduction over a short
    strided dimension is several times slower); the order of the sum is fixed per matrix.
    """
    Y = X.abs()
    n = X.shape[-1]
    if n <= 8 and n > 0:
        c = Y[..., 0, :].clone()
        for i in range(1, n):
            c.add_(Y[..., i, :])
    else:
        c = Y.sum(-2)
    return c.amax(-1)


def eye_like(X: torch.Tensor) -> torch.Tensor:
    """Identity of the trailing matrix size of ``X`` with its dtype and device."""
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)


def solve(Q: torch.Tensor, P: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``Q⁻¹ P`` for batches ``(B, n, n)``; per matrix identical whatever the batch.

    ``check=False`` skips LAPACK's singularity check (a host sync on GPU): only for ``Q``
    that are nonsingular by construction, e.g. Padé denominators within their ``θ``.
    """
    n = Q.shape[-1]
    if n <= _LOOP_SOLVE_N or Q.shape[0] <= 1:
        if check:
            return torch.linalg.solve(Q, P)
        return torch.linalg.solve_ex(Q, P, check_errors=False)[0]
    if check:
        return torch.stack([torch.linalg.solve(Q[i], P[i]) for i in range(Q.shape[0])])
    return torch.stack(
        [torch.linalg.solve_ex(Q[i], P[i], check_errors=False)[0] for i in range(Q.shape[0])]
    )


def lu_factor(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched LU factorisation with the same per-matrix guarantee as :func:`solve`."""
    n = Q.shape[-1]
    if n <= _LOOP_SOLVE_N or Q.shape[0] <= 1:
        LU, piv = torch.linalg.lu_factor(Q)
        return LU, piv
    parts = [torch.linalg.lu_factor(Q[i]) for i in range(Q.shape[0])]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def lu_solve(LU: torch.Tensor, piv: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Batched ``lu_solve`` with the same per-matrix guarantee as :func:`solve`."""
    if LU.shape[-1] <= _LOOP_SOLVE_N or LU.shape[0] <= 1:
        return torch.linalg.lu_solve(LU, piv, B)
    return torch.stack([torch.linalg.lu_solve(LU[i], piv[i], B[i]) for i in range(LU.shape[0])])


def flat(A: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Reshape ``(..., n, n)`` to ``(B, n, n)``; also return the batch shape."""
    batch = tuple(A.shape[:-2])
    n = A.shape[-1]
    return A.reshape(math.prod(batch), n, n), batch
