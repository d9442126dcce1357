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
  as the largest entry of ``1ᵀ|A|^p`` (the matrix is non-negative), by binary powering.

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

import math
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
    norm1,
    solve,
    unit_roundoff,
    working_dtype,
)

__all__ = ["expm", "expm_frechet"]


def _pade_b(m: int) -> tuple[float, ...]:
    """Coefficients ``b_j = (2m−j)!/(j!(m−j)!)`` of ``p_m(x) = Σ b_j x^j``; ``q_m(x) = p_m(−x)``."""
    f = math.factorial
    return tuple(float(f(2 * m - j) // (f(j) * f(m - j))) for j in range(m + 1))


_B: dict[int, tuple[float, ...]] = {m: _pade_b(m) for m in (3, 5, 7, 9, 13)}

# 1/|c_{2m+1}|: the leading coefficient of the backward-error series h_{2m+1}(x) of r_m.
_LOG2_C_RECIP: dict[int, float] = {
    m: math.log2(math.comb(2 * m, m)) + math.log2(math.factorial(2 * m + 1))
    for m in (3, 5, 7, 9, 13)
}

# (degree, theta) for the unscaled candidates, then the degree used with scaling.
# The thetas are the largest θ with Σ_{k>2m} |c_k| θ^{k-1} <= u (recomputed with mpmath at
# 60 digits; float64 values agree with Al-Mohy & Higham 2009 Table 3.1, θ₁₃ = 4.25 as in
# their Algorithm 5.1).
_CANDIDATES: dict[torch.dtype, tuple[tuple[int, float], ...]] = {
    torch.float64: (
        (3, 1.495585217958292e-2),
        (5, 2.539398330063230e-1),
        (7, 9.504178996162932e-1),
        (9, 2.097847961257068e0),
    ),
    torch.float32: ((3, 4.258730034897931e-1), (5, 1.880152698533769e0)),
}
_TOP: dict[torch.dtype, tuple[int, float]] = {
    torch.float64: (13, 4.25),
    torch.float32: (7, 3.925724846433284e0),
}


# --------------------------------------------------------------------------- parameters
# Matrices with ‖A‖₁ above 2^_PRESCALE[dtype] are first divided by a power of two (their
# powers up to A¹⁰ would overflow otherwise) and squared back at the end.
_PRESCALE: dict[torch.dtype, int] = {torch.float64: 100, torch.float32: 12}


class _AbsPowerNorms:
    """Lazily computed ``log₂ ‖ |A|^p ‖₁`` for the guard degrees ``p = 2m + 1`` of a batch.

    On first use, for every matrix at once: ``B = |A|/‖A‖₁`` (overflow-free), its squares
    ``B², B⁴, B⁸, B¹⁶`` and the row vectors ``1ᵀB^p`` by binary powering with shared
    prefixes (``‖B^p‖₁`` is the largest entry of ``1ᵀB^p`` since ``B ≥ 0``). Each value is a
    function of its own matrix only.
    """

    def __init__(self, A: torch.Tensor, nA: np.ndarray) -> None:
        self.A, self.nA = A, nA
        self.values: dict[int, np.ndarray] | None = None

    def get(self, p: int) -> np.ndarray:
        if self.values is None:
            self.values = self._compute()
        return self.values[p]

    def _compute(self) -> dict[int, np.ndarray]:
        A, nA = self.A, self.nA
        scale = torch.as_tensor(np.maximum(nA, 1e-300), dtype=A.dtype, device=A.device)
        B1 = A.abs() / scale[:, None, None]
        B2 = B1 @ B1
        B4 = B2 @ B2
        B8 = B4 @ B4
        B16 = B8 @ B8
        v1 = B1.sum(-2, keepdim=True)  # 1ᵀB
        v3 = v1 @ B2
        v7 = v3 @ B4
        v11 = v3 @ B8
        v15 = v7 @ B8
        v19 = v3 @ B16
        v27 = v11 @ B16
        vs = torch.cat([v7, v11, v15, v19, v27], dim=1).amax(-1)  # (B, 5)
        nb = vs.double().cpu().numpy()
        out = {}
        with np.errstate(divide="ignore"):
            for j, q in enumerate((7, 11, 15, 19, 27)):
                out[q] = q * np.log2(nA) + np.log2(nb[:, j])
        return out


def _ell(
    pn: _AbsPowerNorms, nA: np.ndarray, idx: np.ndarray, m: int, s: np.ndarray, log2u: float
) -> np.ndarray:
    """``ℓ(2^{-s}A, m)`` for the matrices ``idx``, forming ``|A|^{2m+1}`` only if needed.

    ``α(2^{-s}A) = 2^{-2ms} |c_{2m+1}| ‖|A|^{2m+1}‖₁/‖A‖₁``; since ``‖|A|^p‖₁ ≤ ‖A‖₁^p`` the
    exact powers are formed only when some matrix's upper bound does not already give 0.
    """
    p = 2 * m + 1
    nA = nA[idx]
    with np.errstate(divide="ignore"):
        lognA = np.log2(nA)
    shift = -_LOG2_C_RECIP[m] - log2u - 2 * m * s
    out = np.zeros(s.shape, dtype=np.int64)
    need = ((p - 1) * lognA + shift > 0) & (nA > 0)
    if need.any():
        l2 = pn.get(p)[idx][need] - lognA[need] + shift[need]
        with np.errstate(invalid="ignore"):
            val = np.nan_to_num(np.ceil(l2 / (2 * m)), nan=0.0, neginf=0.0)
        out[need] = np.maximum(val, 0).astype(np.int64)
    return out


def _ceil_log2(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.ceil(np.log2(x))
    return np.maximum(np.nan_to_num(r, nan=0.0, neginf=0.0, posinf=0.0), 0).astype(np.int64)


def _choose(A: torch.Tensor, Pw: torch.Tensor, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degree ``m`` and scaling ``s`` of each matrix (int64 arrays of shape ``(B,)``).

    ``Pw`` stacks ``A², A⁴, A⁶`` (``(3, B, n, n)``); ``norms`` their 1-norms and ``A``'s
    (``(4, B)`` float64, row 0 is ``‖A‖₁``). Every decision uses one matrix's numbers only.
    """
    dt = A.dtype
    log2u = math.log2(unit_roundoff(dt))
    nA, n2, n4, n6 = norms
    d4, d6 = n4 ** (1 / 4), n6 ** (1 / 6)
    d8 = np.minimum(n4 * n4, n2 * n6) ** (1 / 8)  # upper bounds of ||A^8||^(1/8), ...
    d10 = np.minimum(n4 * n6, n2 * n4 * n4) ** (1 / 10)
    B = nA.shape[0]
    m = np.zeros(B, dtype=np.int64)
    s = np.zeros(B, dtype=np.int64)
    pn = _AbsPowerNorms(A, nA)
    for deg, theta in _CANDIDATES[dt]:
        eta = np.maximum(d4, d6) if deg <= 5 else np.maximum(d6, d8)
        cand = (m == 0) & (eta <= theta)
        if cand.any():
            idx = np.flatnonzero(cand)
            ok = _ell(pn, nA, idx, deg, s[idx], log2u) == 0
            m[idx[ok]] = deg
    rest = m == 0
    if not rest.any():
        return m, s
    top, theta = _TOP[dt]
    idx = np.flatnonzero(rest)
    eta5 = np.minimum(np.maximum(d6, d8), np.maximum(d8, d10))[idx]
    s_r = _ceil_log2(eta5 / theta)
    # Where the bound-based s is positive, the exact ||A^8||, ||A^10|| may lower it.
    pos = s_r > 0
    if pos.any():
        j = idx[pos]
        tj = torch.as_tensor(j, device=A.device)
        A4, A6 = Pw[1, tj], Pw[2, tj]
        P = A4 @ torch.cat([A4, A6], dim=-1)
        n = A.shape[-1]
        e = torch.stack([norm1(P[..., :n]), norm1(P[..., n:])]).double().cpu().numpy()
        e8, e10 = e[0] ** (1 / 8), e[1] ** (1 / 10)
        e5 = np.minimum(np.maximum(d6[j], e8), np.maximum(e8, e10))
        s_r[pos] = _ceil_log2(e5 / theta)
    s_r = s_r + _ell(pn, nA, idx, top, s_r, log2u)
    m[idx] = top
    s[idx] = s_r
    return m, s


# --------------------------------------------------------------------------- Padé
def _combo(Pw: torch.Tensor, C: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Σ_k C[i, k] Pw[k] + bias[i]·I`` for each row ``i`` in one GEMM pass, ``(r, B, n, n)``."""
    k, B, n, _ = Pw.shape
    out = (C @ Pw.reshape(k, -1)).reshape(C.shape[0], B, n, n)
    out.diagonal(dim1=-2, dim2=-1).add_(bias[:, None, None])
    return out


def _coeffs(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Coefficient matrices for :func:`_combo` on the powers ``(A², A⁴, A⁶[, A⁸])``."""
    b = _B[m]
    if m == 13:
        C = [[b[9], b[11], b[13]], [b[8], b[10], b[12]], [b[3], b[5], b[7]], [b[2], b[4], b[6]]]
        bias = [0.0, 0.0, b[1], b[0]]
    else:
        k = (m - 1) // 2
        C = [[b[2 * j + 1] for j in range(1, k + 1)], [b[2 * j] for j in range(1, k + 1)]]
        bias = [b[1], b[0]]
    return (
        torch.tensor(C, dtype=dtype, device=device),
        torch.tensor(bias, dtype=dtype, device=device),
    )


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


def _pow2(s: torch.Tensor, dtype: torch.dtype, k: int = 1) -> torch.Tensor:
    """``2^{-k s}`` per matrix as a ``(B, 1, 1)`` tensor (exact power of two)."""
    return torch.ldexp(torch.ones(s.shape, dtype=dtype, device=s.device), -k * s)[:, None, None]


def _expm_group(
    m: int, s: np.ndarray, s_sq: np.ndarray, A: torch.Tensor, Pw: torch.Tensor, tri: np.ndarray
) -> torch.Tensor:
    """``r_m(2^{-s}A)^{2^{s_sq}}`` for matrices sharing the degree ``m`` (``Pw``: A², A⁴, A⁶)."""
    dev, dt = A.device, A.dtype
    if (s > 0).any():
        st = torch.as_tensor(s, device=dev)
        c = _pow2(st, dt)
        c2 = c * c
        A = A * c
        Pw = Pw * torch.stack([c2, c2 * c2, c2 * c2 * c2])
    C, bias = _coeffs(m, dt, dev)
    if m == 13:
        W1, Z1, W2, Z2 = _combo(Pw, C, bias)
        A6 = Pw[2]
        W = torch.baddbmm(W2, A6, W1)
        V = torch.baddbmm(Z2, A6, Z1)
    else:
        P = Pw[: (m - 1) // 2]
        if m == 9:
            P = torch.cat([P, (Pw[1] @ Pw[1])[None]])
        W, V = _combo(P, C, bias)
    U = A @ W
    X = solve(V - U, V + U)
    if tri.any():
        ti = torch.as_tensor(np.flatnonzero(tri), device=dev)
        X[ti] = _fix_triangular(X[ti], A[ti], 1.0)
    smax = int(s_sq.max()) if s_sq.size else 0
    for k in range(smax):
        act = s_sq > k
        if act.all():
            X = X @ X
        else:
            idx = torch.as_tensor(np.flatnonzero(act), device=dev)
            Xi = X[idx]
            X[idx] = Xi @ Xi
        ta = tri & act
        if ta.any():
            ti = torch.as_tensor(np.flatnonzero(ta), device=dev)
            # X[ti] is now exp(2^{k+1} · A_s) with A_s the Padé argument.
            X[ti] = _fix_triangular(X[ti], A[ti], float(2 ** (k + 1)))
    return X


_Params = tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _params(A: torch.Tensor) -> _Params:
    """Decisions for a ``(B, n, n)`` batch.

    Returns the prescaled ``A``, its powers, degree ``m``, scaling ``s`` (of the prescaled
    matrix), total scaling and upper-triangularity flags of each matrix.
    """
    Bn, n = A.shape[0], A.shape[-1]
    dev, dt = A.device, A.dtype
    nA0 = norm1(A).double().cpu().numpy()
    s0 = np.zeros(Bn, dtype=np.int64)
    big = nA0 > 2.0 ** _PRESCALE[dt]
    if big.any():
        with np.errstate(divide="ignore"):
            s0[big] = np.ceil(np.log2(nA0[big])).astype(np.int64) - _PRESCALE[dt]
        A = A * _pow2(torch.as_tensor(s0, device=dev), dt)
    buf = torch.empty(4, Bn, n, n, dtype=dt, device=dev)
    buf[0].copy_(A)
    Pw = buf[1:]
    torch.bmm(A, A, out=Pw[0])
    torch.bmm(Pw[0], Pw[0], out=Pw[1])
    torch.bmm(Pw[1], Pw[0], out=Pw[2])
    norms = norm1(buf)
    if n > 1:
        lower = torch.tril(A, -1).abs().amax((-2, -1))
        stats = torch.cat([norms, lower[None]]).double().cpu().numpy()
        tri = stats[4] == 0
    else:
        stats = norms.double().cpu().numpy()
        tri = np.ones(Bn, dtype=bool)
    m, s = _choose(A, Pw, stats[:4])
    return A, Pw, m, s, s + s0, tri


def _expm_core(A: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``exp`` of a ``(B, n, n)`` batch in its own dtype; also the chosen ``m`` and total ``s``."""
    A, Pw, m, s, s_tot, tri = _params(A)
    dev = A.device
    degs = np.unique(m)
    if degs.size == 1:
        return _expm_group(int(degs[0]), s, s_tot, A, Pw, tri), m, s_tot
    X = torch.empty_like(A)
    for d in degs.tolist():
        sel = m == d
        ti = torch.as_tensor(np.flatnonzero(sel), device=dev)
        X[ti] = _expm_group(d, s[sel], s_tot[sel], A[ti], Pw[:, ti], tri[sel])
    return X, m, s_tot


# --------------------------------------------------------------------------- Fréchet
def _lincomb(mats: list[torch.Tensor], C: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_k C[i, k] mats[k]`` as one GEMM over the stacked matrices."""
    S = torch.stack(mats)
    k = S.shape[0]
    return (C @ S.reshape(k, -1)).reshape(C.shape[0], *S.shape[1:])


def _frechet_group(
    deg: int, s_np: np.ndarray, A: torch.Tensor, E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` for matrices sharing the degree; plain (differentiable) ops."""
    b = _B[deg]
    I = eye_like(A)  # noqa: E741
    dt, dev = A.dtype, A.device
    if (s_np > 0).any():
        c = _pow2(torch.as_tensor(s_np, device=dev), dt)
        A, E = A * c, E * c
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
    if deg == 13:
        A6, M6 = pw[2], Ms[2]
        C = torch.tensor(
            [[b[13], b[11], b[9]], [b[7], b[5], b[3]], [b[12], b[10], b[8]], [b[6], b[4], b[2]]],
            dtype=dt,
            device=dev,
        )
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
        k = len(pw)
        C = torch.tensor(
            [[b[2 * j + 1] for j in range(1, k + 1)], [b[2 * j] for j in range(1, k + 1)]],
            dtype=dt,
            device=dev,
        )
        W, V = _lincomb(pw, C)
        Lw, Lv = _lincomb(Ms, C)
        W = W + b[1] * I
        V = V + b[0] * I
        U = A @ W
        Lu = torch.baddbmm(A @ Lw, E, W)
    LU, piv = lu_factor(V - U)
    R = lu_solve(LU, piv, U + V)
    L = lu_solve(LU, piv, torch.baddbmm(Lu + Lv, Lu - Lv, R))
    smax = int(s_np.max()) if s_np.size else 0
    for k in range(smax):
        Ln = torch.baddbmm(R @ L, L, R)
        Rn = R @ R
        act_np = s_np > k
        if act_np.all():
            R, L = Rn, Ln
        else:
            act = torch.as_tensor(act_np, device=dev)[:, None, None]
            R, L = torch.where(act, Rn, R), torch.where(act, Ln, L)
    return R, L


def _frechet_core(
    A: torch.Tensor, E: torch.Tensor, m: np.ndarray, s: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    degs = np.unique(m).tolist()
    if len(degs) == 1:
        return _frechet_group(degs[0], s, A, E)
    R = torch.zeros_like(A)
    L = torch.zeros_like(A)
    for d in degs:
        sel = m == d
        idx = torch.as_tensor(np.flatnonzero(sel), device=A.device)
        Rd, Ld = _frechet_group(d, s[sel], A[idx], E[idx])
        R = R.index_copy(0, idx, Rd)
        L = L.index_copy(0, idx, Ld)
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
    A = check_square(A, "A")
    wd = working_dtype(A.dtype)
    Af, batch = flat(A.to(wd))
    n = A.shape[-1]
    if Af.shape[0] == 0 or n == 0:
        return torch.empty_like(A)
    X = _Expm.apply(Af)
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
    A = check_square(A, "A")
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
        m, s = _params(Af.detach())[2::2]
    X, L = _frechet_core(Af, Ef, m, s)
    L = L.reshape(*batch, n, n).to(dtype)
    if return_expm:
        return X.reshape(*batch, n, n).to(dtype), L
    return L
