"""How :func:`liegroup.linalg.expm` chooses the Padé degree and the scaling, per matrix.

Al-Mohy & Higham 2009, Algorithm 5.1, made batch-invariant: the statistics of every matrix
(1-norms of ``A, A², A⁴, A⁶`` and of its strictly lower part) come to the host in one transfer,
and the degree ``m`` and scaling ``s`` are chosen by exact arithmetic only (comparisons with
precomputed ``θ^k``, ``⌈log₂⌉`` from ``frexp``, integer ceilings), vectorised over the batch in
numpy or, for a single matrix, by a scalar twin doing the same IEEE operations in the same
order. The exact guard norms ``‖|A|^p‖₁`` and the norms of ``A⁸, A¹⁰`` are computed only for
the matrices that need them. See the module docstring of :mod:`liegroup.linalg.expm`.
"""


from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from liegroup._validation import check_finite
from liegroup.linalg._common import (
    norm1,
)


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
    """``⌈a / k⌉`` for int64 arrays (``⌈L/k⌉ = ⌈⌈L⌉/k⌉`` for integer ``k``).

    Computed as ``ceil(float(a) / k)``, exact here: ``|a| < 2⁴²`` and ``1 ≤ k ≤ 26``, so
    ``a`` converts exactly, a non-integer quotient lies at least ``1/k`` from an integer and
    its rounding error is below ``2⁻¹¹`` — and about three times cheaper than numpy's
    integer floor division (tested against it).
    """
    return np.ceil(a / np.asarray(k, dtype=np.float64)).astype(np.int64)


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
        self.degs_a = np.array([d for d, _ in self.cands], dtype=np.int64)
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


def _s_top_L(L: np.ndarray, c: _Consts) -> np.ndarray:
    """:func:`_s_top` from ``L = ⌈log₂(n_k/θ^k)⌉`` (rows ``k = 6, 8, 10``)."""
    s6, s8, s10 = np.maximum(_cdiv(L, c.ks), 0)
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
    """``buf[0:4] = A, A², A⁴, A⁶``; off the CPU also ``buf[4] = tril(A, −1)`` (slot 4 exists)."""
    b = buf.unbind(0)
    b[0].copy_(A)
    torch.bmm(A, A, out=b[1])
    torch.bmm(b[1], b[1], out=b[2])
    torch.bmm(b[2], b[1], out=b[3])
    if len(b) > 4 and buf.device.type != "cpu":
        # strictly lower part (a masked product: torch.tril is slow on batches); on the CPU
        # triangularity is read from the host view instead (see _stats)
        torch.mul(A, _lower_mask(A.shape[-1], A.dtype, A.device), out=buf[4])


_LOWER_IDX: dict[int, tuple[np.ndarray, np.ndarray]] = {}

# norm1 adds the rows in order up to this size (above, torch's own reduction order)
_TINY_SUM_N = 8


# Up to this batch size the elementwise steps on the host arrays run in numpy (about a third
# of torch's per-call cost); above, in torch (numpy's loops over tiny inner dimensions are
# slower). Both do the same IEEE operations in the same order, so the bits do not depend on
# which one ran (tested).
_NP_BATCH = 32


def _stats(buf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """1-norms of ``buf[0:4]`` as ``(4, B)`` float64 and upper-triangularity of ``buf[0]``.

    On the CPU: for ``n ≤ 8`` the column sums are added row by row in order — by
    :func:`norm1` in torch, or for small batches by numpy's ``sum(-2)``, which adds the rows
    of a non-last axis in the same order (tested) at a fraction of the call cost; for
    ``n > 8`` by :func:`norm1` (torch's ``sum(-2)`` uses another order there, and numpy's
    ordered sum of a batch of 1000 16 × 16 matrices costs twice torch's). Triangularity is
    read from a zero-copy numpy view: the bottom-left entry first, the whole strictly lower
    part only where that is zero.
    Elsewhere: :func:`norm1` of the five slots (slot 4 the masked strictly lower part) and
    one transfer. Every value depends on its own matrix only.
    """
    n, Bn = buf.shape[-1], buf.shape[1]
    if buf.device.type != "cpu":
        st = _host(norm1(buf))
        return st[:4], (st[4] == 0 if n > 1 else np.ones(Bn, dtype=bool))
    bn = buf.detach().numpy()
    if n <= _TINY_SUM_N and Bn <= _NP_BATCH:
        with np.errstate(over="ignore"):  # overflowing column sums are prescaled by _decide
            st = np.abs(bn[:4]).sum(-2).max(-1).astype(np.float64)
    else:
        st = _host(norm1(buf[:4]))
    A = bn[0]
    if n == 1:
        return st, np.ones(Bn, dtype=bool)
    tri = A[:, -1, 0] == 0
    if tri.any():
        lo = _LOWER_IDX.get(n)
        if lo is None:
            lo = _LOWER_IDX[n] = np.tril_indices(n, -1)
        idx = np.flatnonzero(tri)
        tri[idx] = ~(A[idx][:, lo[0], lo[1]] != 0).any(-1)
    return st, tri


def _abs_power_norms(
    buf: torch.Tensor, idx: np.ndarray, e: np.ndarray, ps: tuple[int, ...]
) -> np.ndarray:
    """``ν_p`` (see :func:`_abs_power_norms_torch`) of the matrices ``idx`` of ``buf[0]``.

    On CPU in numpy (per-matrix BLAS calls, about three times cheaper per call than torch
    for the small products here), elsewhere in torch; either way each value is a function of
    its own matrix only, computed by the same calls whatever the batch.
    """
    if buf.device.type == "cpu":
        return _abs_power_norms_np(_rows(buf[0], idx), e, ps)
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
    n = A.shape[-1]
    if n <= _TINY_N:
        return _abs_power_norms_tiny(B1, B2, B4, ps)
    v = (np.ones((1, 1, n), dtype=A.dtype) @ B1) @ B2  # (numpy's sum(-2) is slow)
    vs = {3: v}
    for p in range(7, max(ps) + 1, 4):
        v = v @ B4
        vs[p] = v
    out = np.concatenate([vs[p] for p in ps], axis=1).max(axis=-1)
    return out.astype(np.float64)


def _abs_power_norms_tiny(
    B1: np.ndarray, B2: np.ndarray, B4: np.ndarray, ps: tuple[int, ...]
) -> np.ndarray:
    """The row-vector walk of :func:`_abs_power_norms_np` for ``n ≤ _TINY_N``.

    In a batch-last layout (``(n, n, B)``), every step is ``n`` elementwise products and sums
    of contiguous ``(n, B)`` slices in a fixed order, instead of one BLAS call per matrix.
    """
    B2t = np.ascontiguousarray(B2.transpose(1, 2, 0))
    B4t = np.ascontiguousarray(B4.transpose(1, 2, 0))
    n = B1.shape[-1]
    v = B1[:, 0, :].T.copy()  # 1ᵀB₁ as (n, B), rows added in order
    for i in range(1, n):
        v += B1[:, i, :].T
    v = _vecmat_t(v, B2t)
    vs = {3: v}
    for p in range(7, max(ps) + 1, 4):
        v = _vecmat_t(v, B4t)
        vs[p] = v
    # largest entry of each row vector (maxima are exact: any order gives the same value)
    return np.stack([vs[p] for p in ps]).max(axis=1).T.astype(np.float64)


def _vecmat_t(v: np.ndarray, Mt: np.ndarray) -> np.ndarray:
    """``vᵀM`` per matrix in the batch-last layout: ``v: (n, B)``, ``Mt: (n, n, B)``."""
    out = v[0] * Mt[0]
    for k in range(1, Mt.shape[0]):
        out += v[k] * Mt[k]
    return out


def _colmax(v: np.ndarray) -> np.ndarray:
    """Largest entry of each column of ``(n, B)`` (elementwise maxima in order)."""
    m = v[0].copy()
    for k in range(1, v.shape[0]):
        np.maximum(m, v[k], out=m)
    return m


# Up to this size, the row-vector products and column sums of the exact norms are formed by
# n elementwise steps in a fixed order instead of per-matrix BLAS calls.
_TINY_N = 4


def _rows(X: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """``X[idx]`` of a CPU tensor as a numpy array (no copy when ``idx`` is the whole batch)."""
    Xn = X.detach().numpy()
    return Xn if idx.size == Xn.shape[0] else Xn[idx]


def _e_norms(buf: torch.Tensor, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``‖A⁸‖₁, ‖A¹⁰‖₁`` (as ``A⁴·A⁴``, ``A⁴·A⁶``) of the matrices ``idx``."""
    if buf.device.type == "cpu":
        A4n = _rows(buf[2], idx)
        P = np.stack([A4n @ A4n, A4n @ _rows(buf[3], idx)])
        n = P.shape[-1]
        if n <= _TINY_N:  # column sums and maxima in the batch-last layout, in order
            Pt = np.abs(P.transpose(2, 3, 0, 1))  # (n, n, 2, B)
            cs = Pt[0].copy()
            for i in range(1, n):
                cs += Pt[i]
            e8, e10 = _colmax(cs.reshape(n, -1)).reshape(2, -1).astype(np.float64)
            return e8, e10
        cs = (np.ones((1, 1, 1, n), dtype=P.dtype) @ np.abs(P))[..., 0, :]
        e8, e10 = cs.max(axis=-1).astype(np.float64)
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

    ``e_fn(idx)`` returns the exact ``‖A⁸‖₁, ‖A¹⁰‖₁`` of the matrices ``idx`` and
    ``nu_fn(idx, e, ps)`` their ``ν_p``; each is called at most once, for the matrices whose
    decision depends on it (the scaling is refined first, so the guard norms are formed only
    where the refined scaling does not already cover them). :func:`_choose_one` is the same
    computation for one matrix in Python scalars (IEEE operations in the same order, so the
    same result; tested).
    """
    nA, n2, n4, n6 = st
    nc = len(c.cands)
    n44 = n4 * n4
    N = np.stack([n4, n6, np.minimum(n44, n2 * n6), np.minimum(n4 * n6, n2 * n44)])
    passes = (N[c.qa] <= c.ta) & (N[c.qb] <= c.tb)  # (candidates, B)
    # Guard: with ‖A‖₁ = μ·2^e (frexp) and ν_p = ‖(|A|·2^{-e})^p‖₁ (1-norm of |A|·2^{-e} is
    # μ ∈ [½, 1): no overflow), K‖|A|^p‖₁/‖A‖₁ = (Kν_p/μ)·2^{2me}. The bound ν_p ≤ μ^p gives
    # t_up ≥ t: where t_up ≤ s, ℓ = 0 without forming |A|^p.
    mu, e = np.frexp(nA)
    e = e.astype(np.int64)
    # one exact ⌈log₂⌉ pass over the guard bounds and the scaling ratios n_k/θ^k
    L = _clog2(np.concatenate([_mu_pow(mu, c.degs) * c.K, N[1:] / c.th_k]))
    nd = len(c.degs)
    t_up = _cdiv(L[:nd] + c.two_m * e, c.two_m)
    s_top = _s_top_L(L[nd:], c)
    # A candidate settles a matrix when it passes and its guard bound is ≤ 0; a matrix is
    # still open at candidate j when no earlier candidate settled it.
    settle = passes & (t_up[:nc] <= 0)
    closed = np.logical_or.accumulate(settle, axis=0)
    open_before = np.ones_like(closed)
    open_before[1:] = ~closed[:-1]
    need_g = (open_before & passes & (t_up[:nc] > 0)).any(axis=0)
    open_ = ~closed[-1]
    need_e = open_ & (s_top > 0)
    if need_e.any():
        idx = np.flatnonzero(need_e)
        e8, e10 = e_fn(idx)
        s_top[idx] = _s_top(np.stack([n6[idx], e8, e10]), c)
    need_g |= open_ & (t_up[nd - 1] > s_top)
    t = t_up
    if need_g.any():
        idx = np.flatnonzero(need_g)
        nu = nu_fn(idx, e[idx], c.ps)
        t_ex = _cdiv(_clog2((nu.T / mu[idx]) * c.K) + c.two_m * e[idx], c.two_m)
        t = t_up.copy()
        t[:, idx] = np.minimum(t_ex, t_up[:, idx])  # t ≤ t_up in exact arithmetic
    ok = passes & (t[:nc] <= 0)  # first candidate with η ≤ θ and ℓ = 0, else the top degree
    first = ok.argmax(axis=0)
    low = ok[first, np.arange(first.size)]
    m = np.where(low, c.degs_a[first], c.top)
    s = np.where(low, 0, s_top + np.maximum(t[nd - 1] - s_top, 0))
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
    numpy calls of per-call overhead. See :func:`_choose_scalar`.
    """
    nA, n2, n4, n6 = (float(v) for v in st[:, 0])
    m, s = _choose_scalar(nA, n2, n4, n6, c, nu_fn, e_fn)
    return np.array([m], dtype=np.int64), np.array([s], dtype=np.int64)


_ONE = np.zeros(1, dtype=np.int64)


def _choose_scalar(
    nA: float, n2: float, n4: float, n6: float, c: _Consts, nu_fn: _NuFn, e_fn: _EFn
) -> tuple[int, int]:
    """Degree and scaling of one matrix from its four norms, as Python ints.

    Evaluated lazily — candidates in order, each quantity only when the decision needs it —
    but every quantity is the same expression as in :func:`_choose`, so the outcome is the
    same: a candidate whose bound ``t_up`` settles it returns at once; the first unsure
    candidate fetches ``ν`` (which :func:`_choose` would then also fetch, and use for every
    candidate); the top degree's scaling and the norms of ``A⁸, A¹⁰`` only when no candidate
    settles the matrix.
    """
    n44 = n4 * n4
    N = (n4, n6, min(n44, n2 * n6), min(n4 * n6, n2 * n44))
    mu, e = math.frexp(nA)
    q2 = mu * mu
    q4 = q2 * q2
    q8 = q4 * q4
    q16 = q8 * q8
    rest = {3: q4, 5: q8, 7: q8 * q4, 9: q16, 13: q16 * q8}  # as _mu_pow
    nu: list[float] | None = None  # the exact ν_p, once fetched

    def t_up(j: int) -> int:
        tm = c.two_m_f[j]
        return _cdiv_1(_clog2_1((rest[c.degs[j]] * q2) * c.K_f[j]) + tm * e, tm)

    def t_at(j: int) -> int:
        """The guard exponent of degree j: exact (capped by t_up) once ν is fetched."""
        if nu is None:
            return t_up(j)
        tm = c.two_m_f[j]
        return min(_cdiv_1(_clog2_1((nu[j] / mu) * c.K_f[j]) + tm * e, tm), t_up(j))

    def fetch() -> list[float]:
        return [float(v) for v in nu_fn(_ONE, np.array([e], dtype=np.int64), c.ps)[0]]

    for j, (qa, ta, qb, tb) in enumerate(c.pass_f):
        if not (N[qa] <= ta and N[qb] <= tb):
            continue
        if nu is None and t_up(j) > 0:
            nu = fetch()  # unsure: _choose fetches ν too, and uses it for every degree
        if t_at(j) <= 0:
            return c.degs[j], 0
    nc = len(c.cands)
    s_top = _s_top_1(N[1], N[2], N[3], c)
    if s_top > 0:
        e8, e10 = e_fn(_ONE)
        s_top = _s_top_1(n6, float(e8[0]), float(e10[0]), c)
    if nu is None and t_up(nc) > s_top:
        nu = fetch()
    return c.top, s_top + max(t_at(nc) - s_top, 0)


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
    st, tri = _stats(buf)
    nA = st[0]
    if Bn == 1 and nA[0] <= 2.0 ** _PRESCALE[dt]:
        # one matrix, no prescaling: the scalar decisions directly (what follows would do
        # the same with more calls)
        nA1, n2, n4, n6 = st[:, 0].tolist()
        m1, s1 = _choose_scalar(
            nA1,
            n2,
            n4,
            n6,
            _CONSTS[dt],
            lambda idx, e, ps: _abs_power_norms(buf, idx, e, ps),
            lambda idx: _e_norms(buf, idx),
        )
        return buf, np.array([m1]), np.array([s1]), np.zeros(1, dtype=np.int64), tri
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
        st[:, idx], tri[idx] = _stats(sub)
        nA = st[0]

    def nu_fn(idx: np.ndarray, e: np.ndarray, ps: tuple[int, ...]) -> np.ndarray:
        return _abs_power_norms(buf, idx, e, ps)

    def e_fn(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _e_norms(buf, idx)

    choose = _choose_one if Bn == 1 else _choose
    m, s = choose(st, _CONSTS[dt], nu_fn, e_fn)
    return buf, m, s, s0, tri


