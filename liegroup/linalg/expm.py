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
matrix's decisions are the same bits whatever else is in the batch (see :func:`_choose`).

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
import math
from collections.abc import Callable
from typing import Any, overload

import numpy as np
import torch

from liegroup._validation import check_finite
from liegroup.errors import ShapeError
from liegroup.linalg._common import (
    check_square,
    eye_like,
    flat,
    lu_factor,
    lu_solve,
    norm1,
    solve,
    working_dtype,
)

__all__ = ["expm", "expm_frechet"]


def _pade_b(m: int) -> tuple[float, ...]:
    """Coefficients ``b_j = (2m−j)!/(j!(m−j)!)`` of ``p_m(x) = Σ b_j x^j``; ``q_m(x) = p_m(−x)``."""
    f = math.factorial
    return tuple(float(f(2 * m - j) // (f(j) * f(m - j))) for j in range(m + 1))


_B: dict[int, tuple[float, ...]] = {m: _pade_b(m) for m in (3, 5, 7, 9, 13)}

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
# 1/u of the working dtypes (exact powers of two).
_INV_U: dict[torch.dtype, int] = {torch.float64: 2**53, torch.float32: 2**24}

# Matrices with ‖A‖₁ above 2^_PRESCALE[dtype] are first divided by a power of two (their
# powers up to A¹⁰ would overflow otherwise) and squared back at the end.
_PRESCALE: dict[torch.dtype, int] = {torch.float64: 100, torch.float32: 12}

_NEG = -(2**40)  # "log₂ 0"


# --------------------------------------------------------------------------- exact host math
# Every decision below uses only IEEE-exact operations (+, −, ×, ÷ once rounded, comparisons,
# frexp) and integer arithmetic on one matrix's own numbers, so it is reproducible bit for bit
# whatever the batch (no libm log/pow, whose vectorised and scalar variants may differ). The
# arrays are laid out (degree or power, batch) so that a whole batch costs a few dozen numpy
# calls (a single small matrix is dominated by call overhead).
def _clog2(x: np.ndarray) -> np.ndarray:
    """``⌈log₂ x⌉`` exactly (int64) for ``x > 0``; ``_NEG`` for ``x = 0``."""
    mant, ex = np.frexp(x)
    c = ex.astype(np.int64) - (mant == 0.5)
    c[x <= 0] = _NEG
    return c


def _cdiv(a: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """``⌈a / k⌉`` for int64 arrays (``⌈L/k⌉ = ⌈⌈L⌉/k⌉`` for integer ``k``)."""
    return -((-a) // k)


class _Consts:
    """Per-dtype constants of the decisions, as column arrays over the degrees.

    ``t_m = ⌈log₂(K_m ‖|A|^p‖₁/‖A‖₁)/(2m)⌉`` (``K_m = |c_{2m+1}|/u``, ``p = 2m + 1``) gives the
    Al-Mohy–Higham guard ``ℓ(2^{-s}A, m) = max(t_m − s, 0)`` (``α`` scales by ``2^{-2ms}``).
    """

    def __init__(self, dt: torch.dtype) -> None:
        self.cands = _CANDIDATES[dt]
        self.top, th = _TOP[dt]
        self.degs = (*(d for d, _ in self.cands), self.top)
        self.ps = tuple(2 * d + 1 for d in self.degs)
        f = math.factorial
        self.K = np.array([[_INV_U[dt] / (math.comb(2 * d, d) * f(2 * d + 1))] for d in self.degs])
        self.two_m = np.array([[2 * d] for d in self.degs], dtype=np.int64)
        # candidate tests on N = (n4, n6, n8): η = max(d4, d6) (m ≤ 5) or max(d6, d8) ≤ θ
        self.qa = np.array([0 if d <= 5 else 1 for d, _ in self.cands])
        self.qb = np.array([1 if d <= 5 else 2 for d, _ in self.cands])
        self.ta = np.array([[t**4 if d <= 5 else t**6] for d, t in self.cands])
        self.tb = np.array([[t**6 if d <= 5 else t**8] for d, t in self.cands])
        # top-degree scaling from n6, n8, n10: s_k = max(0, ⌈log₂(n_k/θ^k)/k⌉)
        self.th_k = np.array([[th**6], [th**8], [th**10]])
        self.ks = np.array([[6], [8], [10]], dtype=np.int64)
        # the same values as Python scalars for _choose_one
        self.th_k_f = tuple(float(v) for v in self.th_k[:, 0])
        self.K_f = tuple(float(v) for v in self.K[:, 0])
        self.two_m_f = tuple(int(v) for v in self.two_m[:, 0])
        self.pass_f = tuple(
            (int(qa), float(ta), int(qb), float(tb))
            for qa, ta, qb, tb in zip(self.qa, self.ta[:, 0], self.qb, self.tb[:, 0], strict=True)
        )


_CONSTS = {dt: _Consts(dt) for dt in (torch.float64, torch.float32)}


def _s_top(nk: np.ndarray, c: _Consts) -> np.ndarray:
    """Scaling of the top degree from (bounds of) ``‖A⁶‖, ‖A⁸‖, ‖A¹⁰‖`` (rows of ``nk``)."""
    s6, s8, s10 = np.maximum(_cdiv(_clog2(nk / c.th_k), c.ks), 0)
    return np.minimum(np.maximum(s6, s8), np.maximum(s8, s10))


def _mu_pow(mu: np.ndarray, degs: tuple[int, ...]) -> np.ndarray:
    """``μ^{2m}`` for each degree by fixed products of ``μ², μ⁴, μ⁸, μ¹⁶`` (reproducible)."""
    q2 = mu * mu
    q4 = q2 * q2
    q8 = q4 * q4
    q16 = q8 * q8
    rest = {3: q4, 5: q8, 7: q8 * q4, 9: q16, 13: q16 * q8}
    return np.stack([rest[d] for d in degs]) * q2


# --------------------------------------------------------------------------- torch stages
def _host(t: torch.Tensor) -> np.ndarray:
    """A small tensor as a float64 numpy array (the host synchronisation)."""
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


_MASKS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _lower_mask(n: int, dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """Cached ``n × n`` 0/1 matrix of the strictly lower triangle."""
    key = (n, dt, dev)
    M = _MASKS.get(key)
    if M is None:
        M = _MASKS[key] = torch.ones(n, n, dtype=dt, device=dev).tril(-1)
    return M


def _fill_powers(A: torch.Tensor, buf: torch.Tensor) -> None:
    """``buf[0:4] = A, A², A⁴, A⁶`` and ``buf[4] = tril(A, −1)`` when there is a slot 4."""
    buf[0].copy_(A)
    torch.bmm(A, A, out=buf[1])
    torch.bmm(buf[1], buf[1], out=buf[2])
    torch.bmm(buf[2], buf[1], out=buf[3])
    if buf.shape[0] > 4:  # strictly lower part (a masked product: torch.tril is slow on batches)
        torch.mul(A, _lower_mask(A.shape[-1], A.dtype, A.device), out=buf[4])


def _abs_power_norms(
    buf: torch.Tensor, idx: np.ndarray, e: np.ndarray, ps: tuple[int, ...]
) -> np.ndarray:
    """``ν_p`` (see :func:`_abs_power_norms_torch`) of the matrices ``idx`` of ``buf[0]``.

    On CPU in numpy (per-matrix BLAS calls, about three times cheaper per call than torch
    for the small products here), elsewhere in torch; either way each value is a function of
    its own matrix only, computed by the same calls whatever the batch.
    """
    if buf.device.type == "cpu":
        return _abs_power_norms_np(buf[0].detach().numpy()[idx], e, ps)
    return _abs_power_norms_torch(_take(buf[0], idx), e, ps)


def _abs_power_norms_np(A: np.ndarray, e: np.ndarray, ps: tuple[int, ...]) -> np.ndarray:
    """The numpy variant of :func:`_abs_power_norms_torch`, in ``A``'s precision.

    Only ``B²`` and ``B⁴`` are formed; the row vectors walk in steps of four,
    ``v₃ = 1ᵀB·B², v₇ = v₃B⁴, v₁₁ = v₇B⁴, …, v₂₇``: two matrix products and up to seven
    vector products instead of four and six (the vector products are memory-bound, the
    matrix products are not).
    """
    B1 = np.abs(A)
    B1 *= np.ldexp(1.0, -e).astype(A.dtype)[:, None, None]
    B2 = B1 @ B1
    B4 = B2 @ B2
    v = (np.ones((1, 1, A.shape[-1]), dtype=A.dtype) @ B1) @ B2  # (numpy's sum(-2) is slow)
    vs = {3: v}
    for p in range(7, max(ps) + 1, 4):
        v = v @ B4
        vs[p] = v
    out = np.concatenate([vs[p] for p in ps], axis=1).max(axis=-1)
    return out.astype(np.float64)


def _e_norms(buf: torch.Tensor, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``‖A⁸‖₁, ‖A¹⁰‖₁`` (as ``A⁴·A⁴``, ``A⁴·A⁶``) of the matrices ``idx``."""
    if buf.device.type == "cpu":
        A4 = buf[2].detach().numpy()[idx]
        P = np.stack([A4 @ A4, A4 @ buf[3].detach().numpy()[idx]])
        ones = np.ones((1, 1, 1, P.shape[-1]), dtype=P.dtype)
        e8, e10 = (ones @ np.abs(P))[..., 0, :].max(axis=-1).astype(np.float64)
        return e8, e10
    A4 = _take(buf[2], idx)
    E = torch.empty((2, *A4.shape), dtype=A4.dtype, device=A4.device)
    torch.bmm(A4, A4, out=E[0])
    torch.bmm(A4, _take(buf[3], idx), out=E[1])
    e8, e10 = _host(norm1(E))
    return e8, e10


def _abs_power_norms_torch(A: torch.Tensor, e: np.ndarray, ps: tuple[int, ...]) -> np.ndarray:
    """``ν_p = ‖(|A|·2^{-e})^p‖₁`` for ``p ∈ ps ⊆ {7, 11, 15, 19, 27}``; ``(B, len(ps))``.

    ``B = |A|·2^{-e}`` (exact); ``‖B^p‖₁`` is the largest entry of ``1ᵀB^p`` (``B ≥ 0``),
    formed by binary powering with shared prefixes: ``B², B⁴, B⁸(, B¹⁶)`` and row vectors
    ``v₃ = 1ᵀB·B², v₇ = v₃B⁴, v₁₁ = v₃B⁸, v₁₅ = v₇B⁸, v₁₉ = v₃B¹⁶, v₂₇ = v₁₁B¹⁶``.
    """
    dev, dt = A.device, A.dtype
    top = max(ps)
    k = 5 if top > 15 else 4
    sc = torch.as_tensor(np.ldexp(1.0, -e), dtype=dt, device=dev)[:, None, None]
    P = torch.empty((k, *A.shape), dtype=dt, device=dev)
    torch.mul(A.abs(), sc, out=P[0])
    for j in range(1, k):
        torch.bmm(P[j - 1], P[j - 1], out=P[j])
    v1 = P[0].sum(-2, keepdim=True)
    v3 = torch.bmm(v1, P[1])
    vs = {3: v3}
    # v7, v11(, v19) = v3 · (B⁴, B⁸(, B¹⁶)) in one broadcast product
    w = torch.matmul(v3[None], P[2:k])
    vs[7], vs[11] = w[0], w[1]
    if k == 5:
        vs[19] = w[2]
        w2 = torch.matmul(torch.stack([vs[7], vs[11]]), P[3:5])  # v15, v27
        vs[15], vs[27] = w2[0], w2[1]
    elif top >= 15:
        vs[15] = torch.bmm(vs[7], P[3])
    return _host(torch.cat([vs[p] for p in ps], dim=1).amax(-1))


_NuFn = Callable[[np.ndarray, np.ndarray, tuple[int, ...]], np.ndarray]
_EFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _choose(st: np.ndarray, c: _Consts, nu_fn: _NuFn, e_fn: _EFn) -> tuple[np.ndarray, np.ndarray]:
    """Degree ``m`` and scaling ``s`` of each matrix from ``st = (‖A‖₁, ‖A²‖₁, ‖A⁴‖₁, ‖A⁶‖₁)``.

    ``nu_fn(idx, e, ps)`` returns the ``ν_p`` of the matrices ``idx`` and ``e_fn(idx)`` their
    exact ``‖A⁸‖₁, ‖A¹⁰‖₁``; they are called only for the matrices that need them.
    :func:`_choose_one` is the same computation for one matrix in Python scalars (IEEE
    operations in the same order, so the same result; tested).
    """
    nA, n2, n4, n6 = st
    Bn = nA.shape[0]
    n44 = n4 * n4
    N = np.stack([n4, n6, np.minimum(n44, n2 * n6), np.minimum(n4 * n6, n2 * n44)])
    passes = (N[c.qa] <= c.ta) & (N[c.qb] <= c.tb)  # (candidates, B)
    s_top = _s_top(N[1:], c)
    # Guard: with ‖A‖₁ = μ·2^e (frexp) and ν_p = ‖(|A|·2^{-e})^p‖₁ (1-norm of |A|·2^{-e} is
    # μ ∈ [½, 1): no overflow), K‖|A|^p‖₁/‖A‖₁ = (Kν_p/μ)·2^{2me}. The bound ν_p ≤ μ^p gives
    # t_up ≥ t: where t_up ≤ s, ℓ = 0 without forming |A|^p.
    mu, e = np.frexp(nA)
    e = e.astype(np.int64)
    t_up = _cdiv(_clog2(_mu_pow(mu, c.degs) * c.K) + c.two_m * e, c.two_m)
    nc = len(c.cands)

    # Which matrices need exact ν_p (guard) or exact ‖A⁸‖, ‖A¹⁰‖ (scaling)?
    open_ = np.ones(Bn, dtype=bool)  # may still fall through to later degrees
    need_g = np.zeros(Bn, dtype=bool)
    for j in range(nc):
        here = open_ & passes[j]
        unsure = here & (t_up[j] > 0)
        need_g |= unsure
        open_ &= ~here | unsure
    need_g |= open_ & (t_up[nc] > s_top)
    need_e = open_ & (s_top > 0)

    t = t_up.copy()  # exact t where ν_p is known
    have = need_g
    if need_g.any():
        idx = np.flatnonzero(need_g)
        nu = nu_fn(idx, e[idx], c.ps)
        t_ex = _cdiv(_clog2((nu.T / mu[idx]) * c.K) + c.two_m * e[idx], c.two_m)
        t[:, idx] = np.minimum(t_ex, t_up[:, idx])  # t ≤ t_up in exact arithmetic
    if need_e.any():
        idx = np.flatnonzero(need_e)
        e8, e10 = e_fn(idx)
        s_top[idx] = _s_top(np.stack([n6[idx], e8, e10]), c)

    m = np.zeros(Bn, dtype=np.int64)
    for j, (deg, _) in enumerate(c.cands):  # first candidate with η ≤ θ and ℓ = 0
        m[(m == 0) & passes[j] & (t[j] <= 0)] = deg
    s = np.zeros(Bn, dtype=np.int64)
    rest = m == 0
    if rest.any():
        late = rest & ~have & (t_up[nc] > s_top)  # refined scaling made the guard necessary
        if late.any():
            idx = np.flatnonzero(late)
            nu = nu_fn(idx, e[idx], c.ps[-1:])
            t_ex = _cdiv(_clog2((nu.T / mu[idx]) * c.K[nc:]) + c.two_m[nc:] * e[idx], 2 * c.top)
            t[nc, idx] = np.minimum(t_ex[0], t_up[nc, idx])
        m[rest] = c.top
        s[rest] = s_top[rest] + np.maximum(t[nc, rest] - s_top[rest], 0)
    return m, s


def _clog2_1(x: float) -> int:
    """Scalar :func:`_clog2`."""
    if x <= 0:
        return _NEG
    mant, ex = math.frexp(x)
    return ex - (mant == 0.5)


def _cdiv_1(a: int, k: int) -> int:
    return -((-a) // k)


def _s_top_1(n6: float, n8: float, n10: float, c: _Consts) -> int:
    """Scalar :func:`_s_top`."""
    th = c.th_k_f
    s6 = max(_cdiv_1(_clog2_1(n6 / th[0]), 6), 0)
    s8 = max(_cdiv_1(_clog2_1(n8 / th[1]), 8), 0)
    s10 = max(_cdiv_1(_clog2_1(n10 / th[2]), 10), 0)
    return min(max(s6, s8), max(s8, s10))


def _choose_one(
    st: np.ndarray, c: _Consts, nu_fn: _NuFn, e_fn: _EFn
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_choose` for a single matrix (``st`` of shape ``(4, 1)``), in Python scalars.

    The same IEEE operations in the same order as the vectorised version (Python floats are
    float64, ``math.frexp`` is exact), so the decisions are identical; it only avoids ~100
    numpy calls of per-call overhead.
    """
    nA, n2, n4, n6 = (float(v) for v in st[:, 0])
    n44 = n4 * n4
    N = (n4, n6, min(n44, n2 * n6), min(n4 * n6, n2 * n44))
    passes = [N[qa] <= ta and N[qb] <= tb for qa, ta, qb, tb in c.pass_f]
    s_top = _s_top_1(N[1], N[2], N[3], c)
    mu, e = math.frexp(nA)
    q2 = mu * mu
    q4 = q2 * q2
    q8 = q4 * q4
    q16 = q8 * q8
    rest = {3: q4, 5: q8, 7: q8 * q4, 9: q16, 13: q16 * q8}
    t_up = [
        _cdiv_1(_clog2_1((rest[d] * q2) * k) + tm * e, tm)
        for d, k, tm in zip(c.degs, c.K_f, c.two_m_f, strict=True)
    ]
    nc = len(c.cands)
    open_, need_g = True, False
    for j in range(nc):
        here = open_ and passes[j]
        unsure = here and t_up[j] > 0
        need_g = need_g or unsure
        open_ = open_ and (not here or unsure)
    need_g = need_g or (open_ and t_up[nc] > s_top)
    need_e = open_ and s_top > 0
    one = np.zeros(1, dtype=np.int64)
    ev = np.array([e], dtype=np.int64)
    t = list(t_up)
    if need_g:
        nu = nu_fn(one, ev, c.ps)[0]
        for j, (k, tm) in enumerate(zip(c.K_f, c.two_m_f, strict=True)):
            t[j] = min(_cdiv_1(_clog2_1((float(nu[j]) / mu) * k) + tm * e, tm), t_up[j])
    if need_e:
        e8, e10 = e_fn(one)
        s_top = _s_top_1(n6, float(e8[0]), float(e10[0]), c)
    m = 0
    for j, (deg, _) in enumerate(c.cands):
        if m == 0 and passes[j] and t[j] <= 0:
            m = deg
    s = 0
    if m == 0:
        if not need_g and t_up[nc] > s_top:
            nu = nu_fn(one, ev, c.ps[-1:])[0]
            k, tm = c.K_f[nc], c.two_m_f[nc]
            t[nc] = min(_cdiv_1(_clog2_1((float(nu[0]) / mu) * k) + tm * e, tm), t_up[nc])
        m = c.top
        s = s_top + max(t[nc] - s_top, 0)
    return np.array([m], dtype=np.int64), np.array([s], dtype=np.int64)


def _take(X: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """``X[idx]`` along the batch (first) dimension; ``X`` itself when ``idx`` is all of it."""
    if idx.size == X.shape[0]:
        return X
    return X[torch.as_tensor(idx, device=X.device)]


def _decide(A: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Degree, scaling and structure of every matrix of a ``(B, n, n)`` batch.

    Returns ``buf`` (``(4 or 5, B, n, n)``: the prescaled ``A``, ``A²``, ``A⁴``, ``A⁶`` and a
    free slot), degree ``m``, scaling ``s`` of the Padé argument (relative to the prescaled
    ``A``), prescaling ``s0`` (total squarings ``s + s0``) and upper-triangularity ``tri``.
    Every decision depends on its own matrix only (see the module docstring); the batch is
    synchronised with the host once, plus once more only for matrices whose guard or scaling
    needs exact norms of higher powers.
    """
    Bn, n = A.shape[0], A.shape[-1]
    dt, dev = A.dtype, A.device
    buf = torch.empty((5 if n > 1 else 4, Bn, n, n), dtype=dt, device=dev)
    _fill_powers(A, buf)
    st = _host(norm1(buf))
    nA = st[0]
    s0 = np.zeros(Bn, dtype=np.int64)
    big = ~(nA <= 2.0 ** _PRESCALE[dt])  # also NaN/inf
    if big.any():
        nb = nA[big]
        if not np.isfinite(nb).all():
            check_finite(A, "A")  # raises for NaN/inf entries
        idx = np.flatnonzero(big)
        ti = torch.as_tensor(idx, device=dev)
        Ab = A[ti]
        cl = _clog2(np.where(np.isfinite(nb), nb, 1.0))
        over = ~np.isfinite(nb)
        if over.any():  # finite entries whose column sums overflow: measure them scaled down
            mx = _host(Ab.abs().amax((-2, -1)))
            ex = np.frexp(mx)[1].astype(np.int64)
            scl = torch.as_tensor(np.ldexp(1.0, -ex), dtype=dt, device=dev)[:, None, None]
            c2 = _clog2(_host(norm1(Ab * scl))) + ex
            cl = np.where(over, c2, cl)
        s0[idx] = cl - _PRESCALE[dt]
        Ab = Ab * torch.as_tensor(np.ldexp(1.0, -s0[idx]), dtype=dt, device=dev)[:, None, None]
        sub = torch.empty((buf.shape[0], idx.size, n, n), dtype=dt, device=dev)
        _fill_powers(Ab, sub)
        buf[:, ti] = sub
        st[:, idx] = _host(norm1(sub))
        nA = st[0]
    tri = st[4] == 0 if n > 1 else np.ones(Bn, dtype=bool)

    def nu_fn(idx: np.ndarray, e: np.ndarray, ps: tuple[int, ...]) -> np.ndarray:
        return _abs_power_norms(buf, idx, e, ps)

    def e_fn(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _e_norms(buf, idx)

    choose = _choose_one if Bn == 1 else _choose
    m, s = choose(st[:4], _CONSTS[dt], nu_fn, e_fn)
    return buf, m, s, s0, tri


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
