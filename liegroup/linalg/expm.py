"""Matrix exponential and its Fréchet derivative: batched scaling and squaring in torch.

Algorithm (Al-Mohy & Higham, SIAM J. Matrix Anal. Appl. 31(3), 2009, Algorithm 5.1, here
evaluated per matrix inside a batch): ``exp(A) ≈ r_m(2^{-s} A)^{2^s}`` with ``r_m`` the
``[m/m]`` Padé approximant. The degree ``m`` and the scaling ``s`` are chosen from

* ``d_k = ‖A^k‖₁^{1/k}`` (exact 1-norms of the powers ``A², A⁴, A⁶`` that the Padé
  evaluation needs anyway, and of ``A⁸, A¹⁰`` when they can lower ``s``), which for
  non-normal matrices can be far below ``‖A‖₁`` — this is what avoids *overscaling*;
* the thresholds ``θ_m`` for which the backward error ``‖ΔA‖/‖A‖`` of ``r_m`` is at most the
  unit roundoff ``u`` of the working dtype (float64: ``m ∈ {3, 5, 7, 9}`` and ``13`` with
  scaling, ``θ₁₃ = 4.25``; float32: ``m ∈ {3, 5}`` and ``7`` with scaling, ``θ₇ = 3.9257``,
  the values of the same bound at ``u = 2⁻²⁴``);
* the guard ``ℓ(A, m) = max(⌈log₂(α/u) / (2m)⌉, 0)`` with
  ``α = |c_{2m+1}| ‖|A|^{2m+1}‖₁ / ‖A‖₁``, which adds degrees or squarings only when the
  leading term of the backward error is actually large. ``‖|A|^p‖₁`` is computed exactly
  as the largest entry of ``1ᵀ|A|^p`` (the matrix is non-negative), only for the matrices
  whose cheap bound ``‖A‖₁^p`` does not settle it.

All decisions use exact arithmetic (comparisons with precomputed ``θ^k``, ``⌈log₂⌉`` from
``frexp``, integer ceilings) on statistics fetched from the device in one transfer, so a
matrix's decisions are the same bits whatever else is in the batch (see
:mod:`liegroup.linalg._expm_decide`).

For an upper-triangular matrix the diagonal and first superdiagonal of every squared iterate
are replaced by their exact values ``e^{2^{-j}a_ii}`` and
``2^{-j}a_{i,i+1}·e^{(λ+μ)/2}·sinh((μ−λ)/2)/((μ−λ)/2)`` (Al-Mohy & Higham 2009 §5), which
removes the cancellation that ruins ``[[1, b], [0, −1]]``-type inputs.

Batch invariance: every decision depends on one matrix only, the matrices that share a degree
are evaluated by the same sequence of batched BLAS/LAPACK calls, and CPU batched ``matmul``
and LU are computed matrix by matrix (measured bit-identical for any batch size; LU above
``n = 128`` is looped explicitly). So a matrix gives the same bits alone or in any batch.

The Fréchet derivative ``L(A, E) = ∫₀¹ e^{(1−t)A} E e^{tA} dt`` is computed alongside
(Al-Mohy & Higham, SIAM J. Matrix Anal. Appl. 30(4), 2009, Algorithm 6.4), with the same
``(m, s)``: differentiate ``U, V`` of the Padé approximant, solve with the same ``V − U``, then
differentiate each squaring, ``L ← R L + L R``. The backward pass of :func:`expm` is
``L(Aᵀ, G)``: about twice the forward cost instead of the ``2n × 2n`` exponential.

Example:
    >>> import torch
    >>> from liegroup.linalg import expm
    >>> A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> expm(A)
    tensor([[1., 1.],
            [0., 1.]], dtype=torch.float64)
"""


from __future__ import annotations

import itertools
from typing import Any, overload

import numpy as np
import torch

from liegroup.errors import ShapeError
from liegroup.linalg._common import (
    check_square,
    eye_like,
    flat,
    lu_factor,
    lu_solve,
    solve,
    working_dtype,
)
from liegroup.linalg._expm_decide import (
    _B,
    _decide,
)

__all__ = ["expm", "expm_frechet"]


# --------------------------------------------------------------------------- Padé
_COEF_CACHE: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _coeffs(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficient matrix and identity shifts for the powers ``(A², A⁴, A⁶[, A⁸])``.

    Rows: degree 13: ``W₁, Z₁, W₂, Z₂`` (``U = A(A⁶W₁ + W₂)``, ``V = A⁶Z₁ + Z₂``); lower
    degrees: ``W, V`` with ``U = AW``. Cached per (degree, dtype, device).
    """
    key = (m, dtype, device)
    hit = _COEF_CACHE.get(key)
    if hit is not None:
        return hit
    b = _B[m]
    if m == 13:
        C = [[b[9], b[11], b[13]], [b[8], b[10], b[12]], [b[3], b[5], b[7]], [b[2], b[4], b[6]]]
        bias = [0.0, 0.0, b[1], b[0]]
    else:
        k = (m - 1) // 2
        C = [[b[2 * j + 1] for j in range(1, k + 1)], [b[2 * j] for j in range(1, k + 1)]]
        bias = [b[1], b[0]]
    out = (
        torch.tensor(C, dtype=dtype, device=device),
        torch.tensor(bias, dtype=dtype, device=device),
    )
    _COEF_CACHE[key] = out
    return out


def _combo(Pw: torch.Tensor, C: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Σ_k C[i, k] Pw[k] + bias[i]·I`` for each row ``i`` in one GEMM pass, ``(r, B, n, n)``."""
    k, B, n, _ = Pw.shape
    out = (C @ Pw.reshape(k, -1)).reshape(C.shape[0], B, n, n)
    out.diagonal(dim1=-2, dim2=-1).add_(bias[:, None, None])
    return out


def _sinhc(x: torch.Tensor) -> torch.Tensor:
    """``sinh(x)/x`` without cancellation (series below |x| = 1e-2, error < u)."""
    small = x.abs() < 1e-2
    xs = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    return torch.where(small, 1 + x2 / 6 * (1 + x2 / 20), torch.sinh(xs) / xs)


def _fix_triangular(X: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact diagonal and superdiagonal of ``exp(scale·A)`` for upper-triangular ``A``."""
    a = A.diagonal(dim1=-2, dim2=-1) * scale
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.exp(a))
    if A.shape[-1] > 1:
        lam, mu = a[:, :-1], a[:, 1:]
        t = A.diagonal(offset=1, dim1=-2, dim2=-1) * scale
        h = (mu - lam) / 2
        near = h.abs() < 1
        dsafe = torch.where(near, torch.ones_like(h), mu - lam)
        sup = torch.where(
            near,
            t * torch.exp((lam + mu) / 2) * _sinhc(h),
            t * (torch.exp(mu) - torch.exp(lam)) / dsafe,
        )
        X.diagonal(offset=1, dim1=-2, dim2=-1).copy_(sup)
    return X


def _scales(s: np.ndarray, ks: tuple[int, ...], dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """``2^{-k s}`` for ``k ∈ ks`` as a ``(len(ks), B, 1, 1)`` tensor (exact powers of two)."""
    v = np.ldexp(1.0, -np.outer(ks, s))
    return torch.as_tensor(v, dtype=dt, device=dev)[:, :, None, None]


def _counts(s: np.ndarray) -> list[int]:
    """For ``s`` sorted in decreasing order: how many matrices take squaring ``k = 0, 1, …``."""
    if s.size == 0 or s[0] <= 0:
        return []
    return [int(np.count_nonzero(s > k)) for k in range(int(s[0]))]


def _expm_group(
    m: int, s: np.ndarray, s_sq: np.ndarray, G: torch.Tensor, tri: np.ndarray
) -> torch.Tensor:
    """``r_m(2^{-s}A)^{2^{s_sq}}`` for matrices sharing the degree ``m``.

    ``G``: ``(4 or 5, B, n, n)`` holding ``A, A², A⁴, A⁶`` (and a free slot); ``s_sq`` sorted in
    decreasing order, so squaring ``k`` applies to a leading slice of the group.
    """
    dev, dt = G.device, G.dtype
    if m == 9:  # A⁸ into the free slot (n ≥ 2 here: for n = 1 m ≤ 7 ... or handled by exp)
        torch.bmm(G[2], G[2], out=G[4])
        P = G[1:5]
    else:
        P = G[1 : (m - 1) // 2 + 1] if m != 13 else G[1:4]
    A = G[0]
    if s.size and s.max() > 0:  # only the top degree is ever scaled
        S = G[:4] * _scales(s, (1, 2, 4, 6), dt, dev)
        A, P = S[0], S[1:4]
    C, bias = _coeffs(m, dt, dev)
    if m == 13:
        W1, Z1, W2, Z2 = _combo(P, C, bias)
        A6 = P[2]
        W = torch.baddbmm(W2, A6, W1)
        V = torch.baddbmm(Z2, A6, Z1)
    else:
        W, V = _combo(P, C, bias)
    U = torch.bmm(A, W)
    X = solve(V - U, V + U, check=False)
    fix = bool(tri.any())
    if fix:
        ti = torch.as_tensor(np.flatnonzero(tri), device=dev)
        X[ti] = _fix_triangular(X[ti], A[ti], 1.0)
    for k, c in enumerate(_counts(s_sq)):
        if c == X.shape[0]:
            X = torch.bmm(X, X)
        else:
            Xc = X[:c]
            X[:c] = torch.bmm(Xc, Xc)
        if fix:
            ta = tri[:c]
            if ta.any():
                ti = torch.as_tensor(np.flatnonzero(ta), device=dev)
                # X[ti] is now exp(2^{k+1} · A_s) with A_s the Padé argument.
                X[ti] = _fix_triangular(X[ti], A[ti], float(2 ** (k + 1)))
    return X


def _order(m: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """Permutation grouping equal degrees, each by decreasing ``s``; ``None`` if identity."""
    if m.size <= 1:
        return None
    if (m[1:] == m[:-1]).all() and (s[1:] <= s[:-1]).all():
        return None
    return np.lexsort((-s, m))


def _segments(m: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` slices of equal consecutive values of ``m``."""
    cut = np.flatnonzero(m[1:] != m[:-1]) + 1
    edges = [0, *cut.tolist(), m.size]
    return list(itertools.pairwise(edges))


def _expm_core(A: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``exp`` of a ``(B, n, n)`` batch in its own dtype; also the chosen ``m`` and total ``s``."""
    if A.shape[-1] == 1:
        # 1×1: the triangular treatment makes the result exp(a) exactly; the degree/scaling
        # are still chosen for the backward pass.
        buf, m, s, s0, _ = _decide(A)
        return torch.exp(A), m, s + s0
    buf, m, s, s0, tri = _decide(A)
    s_tot = s + s0
    order = _order(m, s_tot)
    if order is None:
        return _expm_group(int(m[0]), s, s_tot, buf, tri), m, s_tot
    dev = A.device
    perm = torch.as_tensor(order, device=dev)
    bufp = buf[:, perm]
    mo, so, sto, tro = m[order], s[order], s_tot[order], tri[order]
    outs = [
        _expm_group(int(mo[a]), so[a:b], sto[a:b], bufp[:, a:b], tro[a:b]) for a, b in _segments(mo)
    ]
    Xp = outs[0] if len(outs) == 1 else torch.cat(outs)
    X = torch.empty_like(Xp)
    X[perm] = Xp
    return X, m, s_tot


# --------------------------------------------------------------------------- Fréchet
def _lincomb(mats: list[torch.Tensor], C: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_k C[i, k] mats[k]`` as one GEMM over the stacked matrices."""
    S = torch.stack(mats)
    k = S.shape[0]
    return (C @ S.reshape(k, -1)).reshape(C.shape[0], *S.shape[1:])


_FCOEF_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _fcoeffs(deg: int, dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    key = (deg, dt, dev)
    C = _FCOEF_CACHE.get(key)
    if C is None:
        b = _B[deg]
        if deg == 13:
            rows = [
                [b[13], b[11], b[9]],
                [b[7], b[5], b[3]],
                [b[12], b[10], b[8]],
                [b[6], b[4], b[2]],
            ]
        else:
            k = (deg - 1) // 2
            rows = [[b[2 * j + 1] for j in range(1, k + 1)], [b[2 * j] for j in range(1, k + 1)]]
        C = torch.tensor(rows, dtype=dt, device=dev)
        _FCOEF_CACHE[key] = C
    return C


def _frechet_group(
    deg: int, s_np: np.ndarray, A: torch.Tensor, E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` for matrices sharing the degree; plain (differentiable) ops.

    ``s_np`` sorted in decreasing order (squaring ``k`` applies to a leading slice).
    """
    b = _B[deg]
    I = eye_like(A)  # noqa: E741
    dt, dev = A.dtype, A.device
    if s_np.size and s_np.max() > 0:
        sc = _scales(s_np, (1,), dt, dev)[0]
        A, E = A * sc, E * sc
    A2 = A @ A
    M2 = torch.baddbmm(A @ E, E, A)
    pw, Ms = [A2], [M2]
    if deg >= 5:
        pw.append(A2 @ A2)
        Ms.append(torch.baddbmm(A2 @ M2, M2, A2))
    if deg >= 7:
        pw.append(pw[1] @ A2)
        Ms.append(torch.baddbmm(pw[1] @ M2, Ms[1], A2))
    if deg == 9:
        pw.append(pw[1] @ pw[1])
        Ms.append(torch.baddbmm(pw[1] @ Ms[1], Ms[1], pw[1]))
    C = _fcoeffs(deg, dt, dev)
    if deg == 13:
        A6, M6 = pw[2], Ms[2]
        W1, W2, Z1, Z2 = _lincomb([A6, pw[1], A2], C)
        Lw1, Lw2, Lz1, Lz2 = _lincomb([M6, Ms[1], M2], C)
        W2 = W2 + b[1] * I
        Z2 = Z2 + b[0] * I
        W = torch.baddbmm(W2, A6, W1)
        U = A @ W
        V = torch.baddbmm(Z2, A6, Z1)
        Lw = torch.baddbmm(torch.baddbmm(Lw2, A6, Lw1), M6, W1)
        Lu = torch.baddbmm(A @ Lw, E, W)
        Lv = torch.baddbmm(torch.baddbmm(Lz2, A6, Lz1), M6, Z1)
    else:
        W, V = _lincomb(pw, C)
        Lw, Lv = _lincomb(Ms, C)
        W = W + b[1] * I
        V = V + b[0] * I
        U = A @ W
        Lu = torch.baddbmm(A @ Lw, E, W)
    LU, piv = lu_factor(V - U)
    R = lu_solve(LU, piv, U + V)
    L = lu_solve(LU, piv, torch.baddbmm(Lu + Lv, Lu - Lv, R))
    for c in _counts(s_np):
        if c == R.shape[0]:
            L = torch.baddbmm(R @ L, L, R)
            R = R @ R
        else:
            Rc, Lc = R[:c], L[:c]
            L = torch.cat([torch.baddbmm(Rc @ Lc, Lc, Rc), L[c:]])
            R = torch.cat([Rc @ Rc, R[c:]])
    return R, L


def _frechet_core(
    A: torch.Tensor, E: torch.Tensor, m: np.ndarray, s: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    order = _order(m, s)
    if order is None:
        return _frechet_group(int(m[0]), s, A, E)
    perm = torch.as_tensor(order, device=A.device)
    inv = torch.as_tensor(np.argsort(order), device=A.device)
    Ap, Ep = A[perm], E[perm]
    mo, so = m[order], s[order]
    parts = [_frechet_group(int(mo[a]), so[a:b], Ap[a:b], Ep[a:b]) for a, b in _segments(mo)]
    R = torch.cat([p[0] for p in parts])[inv]
    L = torch.cat([p[1] for p in parts])[inv]
    return R, L


# --------------------------------------------------------------------------- autograd
class _Expm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, A: torch.Tensor) -> torch.Tensor:
        X, m, s = _expm_core(A)
        ctx.save_for_backward(A)
        ctx.ms = (m, s)
        return X

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> torch.Tensor:
        (A,) = ctx.saved_tensors
        m, s = ctx.ms
        # <G, L(A, E)> = <L(Aᵀ, G), E>
        return _frechet_core(A.mT, G, m, s)[1]


def expm(A: torch.Tensor) -> torch.Tensor:
    """Matrix exponential ``exp(A) = Σ_k A^k / k!`` of each matrix of a batch.

    Accurate to the conditioning of the problem (relative error ≈ κ_exp(A)·u), batch-invariant
    (a matrix gives the same bits alone or in any batch) and differentiable: the backward pass
    is the Fréchet derivative ``L(Aᵀ, G)`` (see the module docstring).

    Args:
        A: real tensor ``(..., n, n)`` of float32 or float64. float16/bfloat16 inputs are
            computed in float32 and the result is rounded to the input dtype (entries beyond
            the dtype's range become ``inf``, as any float16 overflow does).

    Returns:
        ``exp(A)``, same shape, dtype and device as ``A``.

    Raises:
        DTypeError: ``A`` is not a real floating tensor.
        ShapeError: ``A`` is not a batch of square matrices.
        NonFiniteError: ``A`` has NaN or infinite entries.

    Example:
        >>> import math, torch
        >>> from liegroup.linalg import expm
        >>> t = math.pi / 2
        >>> R = expm(torch.tensor([[0.0, -t], [t, 0.0]], dtype=torch.float64))
        >>> torch.allclose(R, torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
        True
    """
    A = check_square(A, "A", finite=False)  # non-finite entries are caught from the norms
    wd = working_dtype(A.dtype)
    Af, batch = flat(A.to(wd))
    n = A.shape[-1]
    if Af.shape[0] == 0 or n == 0:
        return torch.empty_like(A)
    if Af.requires_grad and torch.is_grad_enabled():
        X = _Expm.apply(Af)
    else:
        X = _expm_core(Af.detach())[0]
    return X.reshape(*batch, n, n).to(A.dtype)


@overload
def expm_frechet(A: torch.Tensor, E: torch.Tensor) -> torch.Tensor: ...


@overload
def expm_frechet(
    A: torch.Tensor, E: torch.Tensor, return_expm: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def expm_frechet(
    A: torch.Tensor, E: torch.Tensor, return_expm: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fréchet derivative ``L(A, E) = d/dt exp(A + tE)|_{t=0} = ∫₀¹ e^{(1−t)A} E e^{tA} dt``.

    Computed by differentiating the scaling-and-squaring Padé algorithm of :func:`expm` (same
    degree and scaling), accurate to about the conditioning of ``L``. Differentiable in both
    arguments by autograd.

    Args:
        A: real tensor ``(..., n, n)`` (float32/float64; float16/bfloat16 computed in float32).
        E: direction, same shape as ``A`` (batch shapes broadcast).
        return_expm: also return ``exp(A)`` (from the same computation).

    Returns:
        ``L(A, E)``, or the pair ``(exp(A), L(A, E))`` if ``return_expm``.

    Raises:
        DTypeError, ShapeError, NonFiniteError: as :func:`expm`, for either argument.

    Example:
        >>> import torch
        >>> from liegroup.linalg import expm_frechet
        >>> A = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
        >>> E = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        >>> round(expm_frechet(A, E)[0, 1].item(), 12)   # (e^1 - e^0) / (1 - 0)
        1.718281828459
    """
    A = check_square(A, "A", finite=False)  # checked from the norms in _decide
    E = check_square(E, "E")
    if A.shape[-1] != E.shape[-1]:
        raise ShapeError(
            f"A and E must have the same matrix size, got {tuple(A.shape)} and {tuple(E.shape)}"
        )
    dtype = torch.promote_types(A.dtype, E.dtype)
    wd = working_dtype(dtype)
    A, E = torch.broadcast_tensors(A.to(wd), E.to(wd))
    n = A.shape[-1]
    Af, batch = flat(A)
    Ef, _ = flat(E)
    if Af.shape[0] == 0 or n == 0:
        z = torch.zeros(A.shape, dtype=dtype, device=A.device)
        return (z, z.clone()) if return_expm else z
    with torch.no_grad():
        _, m, s, s0, _ = _decide(Af.detach())
    X, L = _frechet_core(Af, Ef, m, s + s0)
    L = L.reshape(*batch, n, n).to(dtype)
    if return_expm:
        return X.reshape(*batch, n, n).to(dtype), L
    return L
