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

import torch

from liegroup.errors import ShapeError
from liegroup.linalg._common import (
    check_square,
    eye_like,
    flat,
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
def _log2_abs_power_norm(A: torch.Tensor, nA: torch.Tensor, p: int) -> torch.Tensor:
    """``log₂ ‖ |A|^p ‖₁`` per matrix (float64), overflow-free (``|A|`` normalised first)."""
    B = A.abs() / nA.clamp_min(torch.finfo(A.dtype).tiny).to(A.dtype)[:, None, None]
    v = torch.ones(A.shape[0], 1, A.shape[-1], dtype=A.dtype, device=A.device)
    P = B
    q = p
    while True:
        if q & 1:
            v = v @ P
        q >>= 1
        if not q:
            break
        P = P @ P
    nb = v.amax(-1).squeeze(-1).double()
    return p * torch.log2(nA) + torch.log2(nb)


def _ell(
    A: torch.Tensor, nA: torch.Tensor, m: int, s: torch.Tensor, log2u: float
) -> torch.Tensor:
    """``ℓ(2^{-s}A, m)`` per matrix (int64), computing ``‖|A|^{2m+1}‖`` only where needed.

    ``α(2^{-s}A) = 2^{-2ms} |c_{2m+1}| ‖|A|^{2m+1}‖₁/‖A‖₁``; since ``‖|A|^p‖₁ ≤ ‖A‖₁^p`` the
    exact power is formed only for the matrices whose upper bound does not already give 0.
    """
    p = 2 * m + 1
    lognA = torch.log2(nA)
    shift = -_LOG2_C_RECIP[m] - log2u - 2 * m * s.double()
    ub = (p - 1) * lognA + shift  # log2(alpha/u) upper bound
    out = torch.zeros_like(s)
    need = (ub > 0) & (nA > 0)
    if bool(need.any()):
        idx = need.nonzero().squeeze(-1)
        l2 = _log2_abs_power_norm(A[idx], nA[idx], p) - lognA[idx] + shift[idx]
        val = torch.ceil(l2 / (2 * m)).clamp_min(0)
        val = torch.nan_to_num(val, nan=0.0, neginf=0.0)
        out[idx] = val.long()
    return out


def _choose(
    A: torch.Tensor, A2: torch.Tensor, A4: torch.Tensor, A6: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degree ``m`` and scaling ``s`` (int64, shape ``(B,)``) of each matrix."""
    dt = A.dtype
    log2u = math.log2(unit_roundoff(dt))
    nA = norm1(A).double()
    n2, n4, n6 = norm1(A2).double(), norm1(A4).double(), norm1(A6).double()
    d4, d6 = n4 ** (1 / 4), n6 ** (1 / 6)
    d8 = torch.minimum(n4 * n4, n2 * n6) ** (1 / 8)  # upper bounds of ||A^8||^(1/8), ...
    d10 = torch.minimum(n4 * n6, n2 * n4 * n4) ** (1 / 10)
    B = A.shape[0]
    m = torch.zeros(B, dtype=torch.long, device=A.device)
    s = torch.zeros(B, dtype=torch.long, device=A.device)
    zero = torch.zeros_like(s)
    for deg, theta in _CANDIDATES[dt]:
        eta = torch.maximum(d4, d6) if deg <= 5 else torch.maximum(d6, d8)
        cand = (m == 0) & (eta <= theta)
        if bool(cand.any()):
            idx = cand.nonzero().squeeze(-1)
            ok = _ell(A[idx], nA[idx], deg, zero[idx], log2u) == 0
            m[idx[ok]] = deg
    rest = m == 0
    if not bool(rest.any()):
        return m, s
    top, theta = _TOP[dt]
    idx = rest.nonzero().squeeze(-1)
    eta5 = torch.minimum(torch.maximum(d6, d8), torch.maximum(d8, d10))[idx]
    s_r = torch.ceil(torch.log2(eta5 / theta)).clamp_min(0)
    s_r = torch.nan_to_num(s_r, nan=0.0, neginf=0.0).long()
    # Where the bound-based s is positive, exact ||A^8||, ||A^10|| may lower it.
    pos = s_r > 0
    if bool(pos.any()):
        j = idx[pos]
        P = A4[j] @ torch.cat([A4[j], A6[j]], dim=-1)
        n = A.shape[-1]
        e8 = norm1(P[..., :n]).double() ** (1 / 8)
        e10 = norm1(P[..., n:]).double() ** (1 / 10)
        e6 = d6[j]
        e5 = torch.minimum(torch.maximum(e6, e8), torch.maximum(e8, e10))
        st = torch.ceil(torch.log2(e5 / theta)).clamp_min(0)
        s_r[pos] = torch.nan_to_num(st, nan=0.0, neginf=0.0).long()
    s_r = s_r + _ell(A[idx], nA[idx], top, s_r, log2u)
    m[idx] = top
    s[idx] = s_r
    return m, s


# --------------------------------------------------------------------------- Padé
def _add_diag(X: torch.Tensor, c: float) -> torch.Tensor:
    X.diagonal(dim1=-2, dim2=-1).add_(c)
    return X


def _pade_uv(
    m: int, A: torch.Tensor, A2: torch.Tensor, A4: torch.Tensor, A6: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Odd and even parts ``U, V`` of ``p_m(A) = V + U`` (in-place friendly, no autograd)."""
    b = _B[m]
    if m == 3:
        U = A @ _add_diag(b[3] * A2, b[1])
        V = _add_diag(b[2] * A2, b[0])
    elif m == 5:
        U = A @ _add_diag(b[5] * A4 + b[3] * A2, b[1])
        V = _add_diag(b[4] * A4 + b[2] * A2, b[0])
    elif m == 7:
        U = A @ _add_diag(b[7] * A6 + b[5] * A4 + b[3] * A2, b[1])
        V = _add_diag(b[6] * A6 + b[4] * A4 + b[2] * A2, b[0])
    elif m == 9:
        A8 = A4 @ A4
        U = A @ _add_diag(b[9] * A8 + b[7] * A6 + b[5] * A4 + b[3] * A2, b[1])
        V = _add_diag(b[8] * A8 + b[6] * A6 + b[4] * A4 + b[2] * A2, b[0])
    else:
        n = A.shape[-1]
        W1 = b[13] * A6 + b[11] * A4 + b[9] * A2
        Z1 = b[12] * A6 + b[10] * A4 + b[8] * A2
        T = A6 @ torch.cat([W1, Z1], dim=-1)
        W = _add_diag(T[..., :n] + b[7] * A6 + b[5] * A4 + b[3] * A2, b[1])
        U = A @ W
        V = _add_diag(T[..., n:] + b[6] * A6 + b[4] * A4 + b[2] * A2, b[0])
    return U, V


def _sinhc(x: torch.Tensor) -> torch.Tensor:
    """``sinh(x)/x`` without cancellation (series below |x| = 1e-2, error < u)."""
    small = x.abs() < 1e-2
    xs = torch.where(small, x, torch.ones_like(x))
    x2 = x * x
    return torch.where(small, 1 + x2 / 6 * (1 + x2 / 20), torch.sinh(xs) / xs)


def _fix_triangular(X: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Exact diagonal and superdiagonal of ``exp(scale·A)`` for upper-triangular ``A``."""
    a = A.diagonal(dim1=-2, dim2=-1) * scale[:, None]
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.exp(a))
    if A.shape[-1] > 1:
        lam, mu = a[:, :-1], a[:, 1:]
        t = A.diagonal(offset=1, dim1=-2, dim2=-1) * scale[:, None]
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
    m: int,
    s: torch.Tensor,
    A: torch.Tensor,
    A2: torch.Tensor,
    A4: torch.Tensor,
    A6: torch.Tensor,
    tri: torch.Tensor,
) -> torch.Tensor:
    """``r_m(2^{-s}A)^{2^s}`` for a group of matrices sharing the degree ``m``."""
    scaled = bool((s > 0).any())
    if scaled:
        c = _pow2(s, A.dtype)
        A, A2, A4, A6 = A * c, A2 * c * c, A4 * (c * c) ** 2, A6 * (c * c) ** 3
    U, V = _pade_uv(m, A, A2, A4, A6)
    X = solve(V - U, V + U)
    any_tri = bool(tri.any())
    if any_tri:
        ti = tri.nonzero().squeeze(-1)
        ones = torch.ones(ti.shape[0], dtype=A.dtype, device=A.device)
        X[ti] = _fix_triangular(X[ti], A[ti], ones)
    smax = int(s.max()) if s.numel() else 0
    for k in range(smax):
        act = s > k
        if bool(act.all()):
            X = X @ X
            idx = None
        else:
            idx = act.nonzero().squeeze(-1)
            Xi = X[idx]
            X[idx] = Xi @ Xi
        if any_tri:
            ta = tri & act
            if bool(ta.any()):
                ti = ta.nonzero().squeeze(-1)
                # X[ti] is now exp(2^{k+1} · (2^{-s} A)) for the scaled A.
                sc = torch.ldexp(torch.ones(ti.shape[0], dtype=A.dtype, device=A.device),
                                 torch.full_like(ti, k + 1))
                X[ti] = _fix_triangular(X[ti], A[ti], sc)
    return X


def _powers(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A2 = A @ A
    A4 = A2 @ A2
    A6 = A4 @ A2
    return A2, A4, A6


def _expm_core(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp`` of a ``(B, n, n)`` batch in its own dtype; also the chosen ``(m, s)``."""
    A2, A4, A6 = _powers(A)
    m, s = _choose(A, A2, A4, A6)
    n = A.shape[-1]
    tri = (
        (torch.tril(A, -1) == 0).flatten(1).all(-1)
        if n > 1
        else torch.ones(A.shape[0], dtype=torch.bool, device=A.device)
    )
    degs = torch.unique(m).tolist()
    if len(degs) == 1:
        return _expm_group(degs[0], s, A, A2, A4, A6, tri), m, s
    X = torch.empty_like(A)
    for d in degs:
        idx = (m == d).nonzero().squeeze(-1)
        X[idx] = _expm_group(d, s[idx], A[idx], A2[idx], A4[idx], A6[idx], tri[idx])
    return X, m, s


# --------------------------------------------------------------------------- Fréchet
def _frechet_group(
    deg: int, s: torch.Tensor, A: torch.Tensor, E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` for matrices sharing the degree; plain (differentiable) ops."""
    b = _B[deg]
    I = eye_like(A)  # noqa: E741
    if bool((s > 0).any()):
        c = _pow2(s, A.dtype)
        A, E = A * c, E * c
    A2 = A @ A
    M2 = A @ E + E @ A
    pw = [I, A2]
    Ms = [torch.zeros_like(A), M2]
    if deg >= 5:
        pw.append(A2 @ A2)
        Ms.append(A2 @ M2 + M2 @ A2)
    if deg >= 7:
        pw.append(pw[2] @ A2)
        Ms.append(pw[2] @ M2 + Ms[2] @ A2)
    if deg == 9:
        pw.append(pw[2] @ pw[2])
        Ms.append(pw[2] @ Ms[2] + Ms[2] @ pw[2])
    if deg == 13:
        A4, A6, M4, M6 = pw[2], pw[3], Ms[2], Ms[3]
        W1 = b[13] * A6 + b[11] * A4 + b[9] * A2
        W2 = b[7] * A6 + b[5] * A4 + b[3] * A2 + b[1] * I
        Z1 = b[12] * A6 + b[10] * A4 + b[8] * A2
        Z2 = b[6] * A6 + b[4] * A4 + b[2] * A2 + b[0] * I
        W = A6 @ W1 + W2
        U = A @ W
        V = A6 @ Z1 + Z2
        Lw1 = b[13] * M6 + b[11] * M4 + b[9] * M2
        Lw2 = b[7] * M6 + b[5] * M4 + b[3] * M2
        Lz1 = b[12] * M6 + b[10] * M4 + b[8] * M2
        Lz2 = b[6] * M6 + b[4] * M4 + b[2] * M2
        Lw = A6 @ Lw1 + M6 @ W1 + Lw2
        Lu = A @ Lw + E @ W
        Lv = A6 @ Lz1 + M6 @ Z1 + Lz2
    else:
        k = len(pw)
        W = sum((b[2 * j + 1] * pw[j] for j in range(k)), torch.zeros_like(A))
        V = sum((b[2 * j] * pw[j] for j in range(k)), torch.zeros_like(A))
        Lw = sum((b[2 * j + 1] * Ms[j] for j in range(1, k)), torch.zeros_like(A))
        Lv = sum((b[2 * j] * Ms[j] for j in range(1, k)), torch.zeros_like(A))
        U = A @ W
        Lu = A @ Lw + E @ W
    Q = V - U
    RL = solve(Q, torch.cat([U + V, Lu + Lv], dim=-1))
    n = A.shape[-1]
    R = RL[..., :n]
    L = RL[..., n:] + solve(Q, (Lu - Lv) @ R)
    smax = int(s.max()) if s.numel() else 0
    for k in range(smax):
        act = (s > k)[:, None, None]
        RLn = R @ torch.cat([L, R], dim=-1)
        Ln = RLn[..., :n] + L @ R
        Rn = RLn[..., n:]
        if bool(act.all()):
            R, L = Rn, Ln
        else:
            R, L = torch.where(act, Rn, R), torch.where(act, Ln, L)
    return R, L


def _frechet_core(
    A: torch.Tensor, E: torch.Tensor, m: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    degs = torch.unique(m).tolist()
    if len(degs) == 1:
        return _frechet_group(degs[0], s, A, E)
    R = torch.zeros_like(A)
    L = torch.zeros_like(A)
    for d in degs:
        idx = (m == d).nonzero().squeeze(-1)
        Rd, Ld = _frechet_group(d, s[idx], A[idx], E[idx])
        R = R.index_copy(0, idx, Rd)
        L = L.index_copy(0, idx, Ld)
    return R, L


# --------------------------------------------------------------------------- autograd
class _Expm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, A: torch.Tensor) -> torch.Tensor:
        X, m, s = _expm_core(A)
        ctx.save_for_backward(A, m, s)
        return X

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> torch.Tensor:
        A, m, s = ctx.saved_tensors
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
        A2, A4, A6 = _powers(Af.detach())
        m, s = _choose(Af.detach(), A2, A4, A6)
    X, L = _frechet_core(Af, Ef, m, s)
    L = L.reshape(*batch, n, n).to(dtype)
    if return_expm:
        return X.reshape(*batch, n, n).to(dtype), L
    return L
