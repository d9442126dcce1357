"""The torch path of the Fréchet derivative ``L(A, E)`` of :func:`liegroup.linalg.expm`.

Differentiates the Padé approximant and each squaring with the degree and scaling of the
forward (Al-Mohy & Higham, SIAM J. Matrix Anal. Appl. 30(4), 2009, Algorithm 6.4). For an
upper-triangular ``A`` (up to a symmetric permutation) the exponential's diagonal and
superdiagonal are set exactly after the Padé step and after every squaring, as
:func:`liegroup.linalg.expm` and the compiled kernel do: without it, one rounding of
``r_m(0) = 1`` to ``1 − u`` squared ``s`` times turns ``exp(diag(−1e20, 0))`` into 0. Plain
torch ops: differentiable, so it also serves double backward and autograd through
:func:`liegroup.linalg.expm_frechet`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from liegroup.linalg._common import eye_like, lu_factor, lu_solve
from liegroup.linalg._expm_decide import _B
from liegroup.linalg._expm_pade import _fix_triangular, _permute, _scales, _triangular_order


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


def _upper(A: torch.Tensor) -> np.ndarray:
    """Upper-triangularity of every matrix of a ``(B, n, n)`` batch, on the host."""
    return (A.detach().tril(-1) == 0).flatten(1).all(1).cpu().numpy()


def _fix_rows(R: torch.Tensor, As: torch.Tensor, rows: np.ndarray, scale: float) -> torch.Tensor:
    """``R`` with the exact diagonal and superdiagonal of ``exp(scale·As)`` in ``rows``.

    Out of place (``R`` may be saved for autograd).
    """
    if rows.all():
        return _fix_triangular(R.clone(), As, scale)
    ti = torch.as_tensor(np.flatnonzero(rows), device=R.device)
    fixed = _fix_triangular(R.index_select(0, ti), As.index_select(0, ti), scale)
    return R.index_copy(0, ti, fixed)


def _frechet_group(
    deg: int, s_np: np.ndarray, A: torch.Tensor, E: torch.Tensor, tri: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` for matrices sharing the degree; plain (differentiable) ops.

    Squaring ``k`` applies to the matrices with ``s > k``; ``tri`` marks the upper-triangular
    ``A`` (exact diagonal and superdiagonal of every power of ``exp``).
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
    tri_any = bool(tri.any())
    if tri_any:
        R = _fix_rows(R, A, tri, 1.0)
    for k in range(int(s_np.max()) if s_np.size else 0):
        sel = s_np > k
        if sel.all():
            L = torch.baddbmm(R @ L, L, R)
            R = R @ R
        else:
            ti = torch.as_tensor(np.flatnonzero(sel), device=dev)
            Rc, Lc = R.index_select(0, ti), L.index_select(0, ti)
            L = L.index_copy(0, ti, torch.baddbmm(Rc @ Lc, Lc, Rc))
            R = R.index_copy(0, ti, Rc @ Rc)
        if tri_any and (sel & tri).any():
            R = _fix_rows(R, A, sel & tri, 2.0 ** (k + 1))  # R = exp(2^{k+1} A) there
    return R, L


def _frechet_core(
    A: torch.Tensor, E: torch.Tensor, m: np.ndarray, s: np.ndarray, tri: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` of a ``(B, n, n)`` batch with degrees ``m`` and squarings ``s``.

    A matrix that a symmetric permutation makes upper triangular (a lower-triangular one, or
    the backward pass's ``Aᵀ`` of an upper-triangular one) is computed permuted,
    ``L(A, E) = P L(PᵀAP, PᵀEP) Pᵀ``, so that it gets the exact triangular diagonal too.
    ``tri``: the upper-triangularity :func:`~liegroup.linalg._expm_decide._decide` reported
    for ``A``, where the caller has it (read from ``A`` otherwise).
    """
    if tri is None:
        tri = _upper(A)
    permuted, orders = _triangular_order(A, tri)
    if permuted.any():
        ti = torch.as_tensor(np.flatnonzero(permuted), device=A.device)
        P = torch.as_tensor(orders, device=A.device)
        Q = torch.as_tensor(np.argsort(orders, axis=1), device=A.device)
        Ap = A.index_copy(0, ti, _permute(A.index_select(0, ti), P))
        Ep = E.index_copy(0, ti, _permute(E.index_select(0, ti), P))
        X, L = _frechet_core(Ap, Ep, m, s)
        X = X.index_copy(0, ti, _permute(X.index_select(0, ti), Q))
        return X, L.index_copy(0, ti, _permute(L.index_select(0, ti), Q))
    if m.size <= 1 or (m == m[0]).all():
        return _frechet_group(int(m[0]), s, A, E, tri)
    order = np.argsort(m, kind="stable")
    perm = torch.as_tensor(order, device=A.device)
    inv = torch.as_tensor(np.argsort(order), device=A.device)
    Ap, Ep = A[perm], E[perm]
    mo, so, to = m[order], s[order], tri[order]
    cut = [0, *(np.flatnonzero(mo[1:] != mo[:-1]) + 1).tolist(), mo.size]
    parts = [
        _frechet_group(int(mo[a]), so[a:b], Ap[a:b], Ep[a:b], to[a:b])
        for a, b in itertools.pairwise(cut)
    ]
    R = torch.cat([p[0] for p in parts])[inv]
    L = torch.cat([p[1] for p in parts])[inv]
    return R, L
