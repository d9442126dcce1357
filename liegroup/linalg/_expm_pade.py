"""The torch path of :func:`liegroup.linalg.expm`: Padé evaluation, triangular fix, squarings.

:func:`_expm_core` computes ``exp`` of a ``(B, n, n)`` batch with each matrix's degree and
scaling as :mod:`liegroup.linalg._expm_decide` chooses them, sending every matrix through the
same calls alone or in a batch. The algorithm and what it guarantees are described in
:mod:`liegroup.linalg.expm`.
"""

from __future__ import annotations

import numpy as np
import torch

from liegroup.linalg._common import _LOOP_SOLVE_N
from liegroup.linalg._expm_decide import _B, _CONSTS, _NP_BATCH, _decide

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
    """``sinh(x)/x`` without cancellation (series below |x| = 1e-2, error < u).

    Above, ``expm1(x)·(1 + e^{−x})/(2x)`` (a few ulp): ``torch.sinh`` on CPU rounds
    differently in its vectorised loop and its scalar tail, so its value for one entry
    depends on where the entry sits in the batch; ``exp``/``expm1`` do not (tested).
    """
    small = x.abs() < 1e-2
    xs = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    big = torch.expm1(xs) * (1 + torch.exp(-xs)) / (2 * xs)
    return torch.where(small, 1 + x2 / 6 * (1 + x2 / 20), big)


def _fix_triangular(X: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact diagonal and superdiagonal of ``exp(scale·A)`` for upper-triangular ``A``.

    The strictly lower part is set to its exact value, 0, too: the Padé quotient's LU of
    ``Qᵀ`` (see :func:`_right_solve`) may pivot and leave rounding there.
    """
    X.copy_(torch.triu(X))
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
        # an exact zero stays one (0·inf would be NaN where exp overflows); same bits else
        sup = torch.where(t == 0, t, sup)
        X.diagonal(offset=1, dim1=-2, dim2=-1).copy_(sup)
    return X


def _triangular_order(A: torch.Tensor, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The matrices of a ``(B, n, n)`` batch that a symmetric permutation makes upper triangular.

    For each matrix not flagged in ``upper`` (lower-triangular ones among them): an order ``p``
    with ``A[p[a], p[b]] = 0`` for ``a > b``, by Kahn's topological sort of the graph with an
    edge ``i → j`` for every off-diagonal ``A[i, j] ≠ 0`` (the compiled kernel sorts the same
    way). Such a matrix is computed permuted, ``exp(A) = P exp(PᵀAP) Pᵀ``:
    ``r_m(PᵀAP) = Pᵀ r_m(A) P`` and the 1-norms are permutation invariant, so ``A``'s degree
    and scaling serve ``PᵀAP`` as they are, and ``PᵀAP`` gets the exact diagonal and
    superdiagonal of :func:`_fix_triangular`. Returns the ``(B,)`` flags and a ``(k, n)`` array
    of the orders of the ``k`` flagged matrices. A full matrix fails at once (no column without
    off-diagonal entries), read from the host view on the CPU, from one transfer elsewhere.
    """
    n = A.shape[-1]
    none = np.zeros(upper.shape, dtype=bool), np.zeros((0, n), dtype=np.int64)
    if n == 1 or upper.all():
        return none
    if A.device.type == "cpu":
        nz = A.detach().numpy() != 0
        # a column without off-diagonal nonzeros (the first node of the sort)
        cand = ~upper & (nz.sum(-2) == nz.diagonal(0, -2, -1)).any(-1)
    else:
        nz_t = A.detach() != 0
        cand = ~upper & (nz_t.sum(-2) == nz_t.diagonal(0, -2, -1)).any(-1).cpu().numpy()
    if not cand.any():
        return none
    idx = np.flatnonzero(cand)
    if A.device.type == "cpu":
        pats = nz[idx]
    else:
        pats = nz_t[torch.as_tensor(idx, device=A.device)].cpu().numpy()
    pats[:, np.arange(n), np.arange(n)] = False
    rows = np.zeros(upper.shape, dtype=bool)
    orders = []
    for i, g in zip(idx.tolist(), pats, strict=True):
        cnt = g.sum(0)
        order = np.flatnonzero(cnt == 0).tolist()
        head = 0
        while head < len(order):
            for j in np.flatnonzero(g[order[head]]).tolist():
                cnt[j] -= 1
                if cnt[j] == 0:
                    order.append(j)
            head += 1
        if len(order) == n:
            rows[i] = True
            orders.append(order)
    return rows, np.array(orders, dtype=np.int64).reshape(-1, n)


def _permute(X: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``X[i][P[i]][:, P[i]]`` for a ``(k, n, n)`` batch and ``(k, n)`` orders (differentiable)."""
    k = torch.arange(X.shape[0], device=X.device)[:, None, None]
    return X[k, P[:, :, None], P[:, None, :]]


def _scales(s: np.ndarray, ks: tuple[int, ...], dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """``2^{-k s}`` for ``k ∈ ks`` as a ``(len(ks), B, 1, 1)`` tensor (exact powers of two)."""
    v = np.ldexp(1.0, -np.outer(ks, s))
    return torch.as_tensor(v, dtype=dt, device=dev)[:, :, None, None]


# Matrices up to this size are evaluated in one pass whatever their degrees (see _pade_small):
# there the cost of a call is its overhead, not its flops.
_SMALL_N = 8


def _right_solve(Q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``P Q⁻¹`` for ``(B, n, n)`` batches, from the LU factors of ``Qᵀ``.

    A row-major ``Q`` is ``Qᵀ`` in LAPACK's column-major layout, so factorising ``Qᵀ`` and
    solving ``Qᵀ Yᵀ = Pᵀ`` needs no layout copies (about 1.4× cheaper than ``solve(Q, P)`` at
    n = 3 and 16, 1.9× at n = 64). For the Padé quotient ``P Q⁻¹ = Q⁻¹ P`` (``P`` and ``Q``
    are polynomials in the same matrix). No singularity check (no host sync): the Padé
    denominator is nonsingular within ``θ_m``. Per matrix identical whatever the batch (LU
    looped explicitly above ``n = 128``, as :func:`liegroup.linalg._common.lu_factor`).
    """
    n = Q.shape[-1]
    if n <= _SMALL_N or Q.shape[0] <= 1:
        # one call: the same LAPACK LU and triangular solves per matrix as lu_factor_ex +
        # lu_solve (bit-identical, tested), without lu_solve's checks (cheaper per call;
        # for batches of larger matrices the two calls are ~20 % faster)
        return torch.linalg.solve_ex(Q.mT, P.mT, check_errors=False)[0].mT
    if n <= _LOOP_SOLVE_N:
        LU, piv, _ = torch.linalg.lu_factor_ex(Q.mT, check_errors=False)
        return torch.linalg.lu_solve(LU, piv, P.mT).mT
    return torch.stack([_right_solve(Q[i : i + 1], P[i : i + 1])[0] for i in range(Q.shape[0])])


def _pade(m: int, s: np.ndarray, G: torch.Tensor) -> torch.Tensor:
    """``r_m(2^{-s}A)`` for matrices sharing the degree ``m``.

    ``G``: ``(4 or 5, B, n, n)`` holding ``A, A², A⁴, A⁶`` (and a free slot, overwritten).
    """
    dev, dt = G.device, G.dtype
    if m == 9:  # A⁸ into the free slot (n ≥ 2 here: 1×1 matrices are handled by exp)
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
    return _right_solve(V - U, V + U)


# Per dtype: degrees, and for each degree the coefficients of (A⁶, A⁴, A²) in the rows of
# the top-degree form plus the identity shifts. float64 (top 13): rows W₁, Z₁, W₂, Z₂ with
# U = A(A⁶W₁ + W₂), V = A⁶Z₁ + Z₂; float32 (top 7): rows W, V with U = AW. Lower degrees are
# the same form with zero coefficients (A⁸ of degree 9 is A⁶·A²).
_SMALL_TABLES: dict[torch.dtype, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _small_table(dt: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hit = _SMALL_TABLES.get(dt)
    if hit is not None:
        return hit
    c = _CONSTS[dt]
    degs = np.array(c.degs, dtype=np.int64)
    rows = 4 if c.top == 13 else 2
    C = np.zeros((degs.size, rows, 3))
    bias = np.zeros((degs.size, rows))
    for i, d in enumerate(c.degs):
        b = _B[d]
        coef = {k: (b[k] if k <= d else 0.0) for k in range(14)}
        if c.top == 13:
            C[i] = [
                [coef[13], coef[11], coef[9]],
                [coef[12], coef[10], coef[8]],
                [coef[7], coef[5], coef[3]],
                [coef[6], coef[4], coef[2]],
            ]
            bias[i] = [0.0, 0.0, b[1], b[0]]
        else:
            C[i] = [[coef[7], coef[5], coef[3]], [coef[6], coef[4], coef[2]]]
            bias[i] = [b[1], b[0]]
    out = (degs, C, bias)
    _SMALL_TABLES[dt] = out
    return out


_SmallKey = tuple[int, torch.dtype, torch.device]
_SMALL_COEF_CACHE: dict[_SmallKey, tuple[torch.Tensor, torch.Tensor]] = {}


def _small_coeffs(m: int, dt: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One degree's column of :func:`_small_table` as tensors ``(3, rows, 1)``, ``(rows, 1)``."""
    key = (m, dt, dev)
    hit = _SMALL_COEF_CACHE.get(key)
    if hit is None:
        degs, C, bias = _small_table(dt)
        i = int(np.searchsorted(degs, m))
        hit = (
            torch.as_tensor(C[i].T[:, :, None], dtype=dt, device=dev),
            torch.as_tensor(bias[i][:, None], dtype=dt, device=dev),
        )
        _SMALL_COEF_CACHE[key] = hit
    return hit


_TableT = tuple[np.ndarray, torch.Tensor, torch.Tensor]
_SMALL_TABLE_T: dict[tuple[torch.dtype, torch.device], _TableT] = {}


def _small_coeff_table(
    dt: torch.dtype, dev: torch.device
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """:func:`_small_table` on ``dev``: degrees, ``(degrees, 3, rows)``, ``(degrees, rows)``."""
    key = (dt, dev)
    hit = _SMALL_TABLE_T.get(key)
    if hit is None:
        degs, C, bias = _small_table(dt)
        hit = (
            degs,
            torch.as_tensor(C.transpose(0, 2, 1).copy(), dtype=dt, device=dev),
            torch.as_tensor(bias, dtype=dt, device=dev),
        )
        _SMALL_TABLE_T[key] = hit
    return hit


def _pade_small(m: np.ndarray, s: np.ndarray, G: torch.Tensor) -> torch.Tensor:
    """``r_{m_i}(2^{-s_i}A_i)`` for every matrix in one pass, each with its own degree.

    Every matrix is evaluated in the top degree's form with its own coefficients (zeros for
    the terms its degree lacks, which add exact zeros): a few elementwise products with
    per-matrix coefficient columns, two or three batched products and one solve, instead of
    one Padé evaluation per degree present. Elementwise IEEE products and sums, and batched
    products and LU computed matrix by matrix, give the same bits alone or in a batch.
    ``G``: ``(≥4, B, n, n)`` holding ``A, A², A⁴, A⁶``; the members with ``s > 0`` are
    scaled in place to ``2^{-s}A, …`` (so ``G[0]`` is the Padé argument afterwards).
    """
    dt, dev = G.dtype, G.device
    if dev.type == "cpu" and G.shape[1] <= _NP_BATCH:
        return _pade_small_cpu(m, s, G)
    if m.size == 1 or (m == m[0]).all():
        # one degree: the same coefficients, broadcast (same values, so the same bits)
        cb, bb = _small_coeffs(int(m[0]), dt, dev)
    else:
        degs, Ct, bt = _small_coeff_table(dt, dev)
        di = torch.as_tensor(np.searchsorted(degs, m), device=dev)
        cb = Ct.index_select(0, di).permute(1, 2, 0)  # (3, rows, B)
        bb = bt.index_select(0, di).T  # (rows, B)
    if s.max() > 0:
        # scale the scaled members in place (G is expm's own scratch buffer); the others
        # would be multiplied by 1
        sel = np.flatnonzero(s > 0)
        ti = torch.as_tensor(sel, device=dev)
        G4 = G[:4]
        G4.index_copy_(1, ti, G4.index_select(1, ti) * _scales(s[sel], (1, 2, 4, 6), dt, dev))
    A, A2, A4, A6 = G[0], G[1], G[2], G[3]
    cb = cb[..., None, None]  # (3, rows, B, 1, 1)
    T = cb[0] * A6 + cb[1] * A4 + cb[2] * A2  # (rows, B, n, n)
    T.diagonal(dim1=-2, dim2=-1).add_(bb[..., None])
    return _pade_quotient(A, A6, T)


def _pade_quotient(A: torch.Tensor, A6: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``(V − U)⁻¹(V + U)`` from the combinations ``T`` of the even powers (2 or 4 rows)."""
    if T.shape[0] == 4:
        W1, Z1, W2, Z2 = T
        W = torch.baddbmm(W2, A6, W1)
        V = torch.baddbmm(Z2, A6, Z1)
    else:
        W, V = T
    U = torch.bmm(A, W)
    return _right_solve(V - U, V + U)


_NpTable = tuple[np.ndarray, np.ndarray, np.ndarray]
_SMALL_TABLE_NP: dict[torch.dtype, _NpTable] = {}


def _small_table_np(dt: torch.dtype) -> _NpTable:
    """:func:`_small_table` in the working dtype, laid out ``(3, rows, degrees)``."""
    hit = _SMALL_TABLE_NP.get(dt)
    if hit is None:
        degs, C, bias = _small_table(dt)
        npdt = np.float64 if dt == torch.float64 else np.float32
        hit = (
            degs,
            np.ascontiguousarray(C.transpose(2, 1, 0)).astype(npdt),
            np.ascontiguousarray(bias.T).astype(npdt),
        )
        _SMALL_TABLE_NP[dt] = hit
    return hit


def _pade_small_cpu(m: np.ndarray, s: np.ndarray, G: torch.Tensor) -> torch.Tensor:
    """:func:`_pade_small` for small CPU batches: the elementwise steps in numpy on views.

    The same IEEE products and sums in the same order as the torch version (so the same
    bits, tested), at a third of the per-call cost; the products and the solve stay in torch.
    """
    n = G.shape[-1]
    degs, Ct, bt = _small_table_np(G.dtype)
    if m.size == 1 or (m == m[0]).all():  # one degree: its coefficients, broadcast
        i = int(np.searchsorted(degs, m[0]))
        cb, bb = Ct[:, :, i : i + 1], bt[:, i : i + 1]  # (3, rows, 1), (rows, 1)
    else:
        di = np.searchsorted(degs, m)
        cb, bb = Ct[:, :, di], bt[:, di]  # (3, rows, B), (rows, B)
    Gn = G.detach().numpy()
    if (s[0] if s.size == 1 else s.max()) > 0:
        # scale the scaled members in place (G is expm's own scratch buffer) by exact powers
        # of two; the others would be multiplied by 1
        sel = np.flatnonzero(s > 0)
        sc = np.ldexp(1.0, -np.outer((1, 2, 4, 6), s[sel])).astype(Gn.dtype)
        Gn[:4, sel] *= sc[:, :, None, None]
    cb = cb[..., None, None]  # (3, rows, B|1, 1, 1)
    T = torch.empty((cb.shape[1], *G.shape[1:]), dtype=G.dtype)
    Tn = T.numpy()
    np.multiply(cb[0], Gn[3], out=Tn)
    Tn += cb[1] * Gn[2]
    Tn += cb[2] * Gn[1]
    Tn.reshape(*Tn.shape[:2], n * n)[..., :: n + 1] += bb[..., None]
    return _pade_quotient(G[0], G[3], T)


def _index(idx: np.ndarray, dev: torch.device) -> torch.Tensor:
    return torch.as_tensor(idx, device=dev)


def _expm_core(A: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``exp`` of a ``(B, n, n)`` batch in its own dtype; also the chosen ``m`` and total ``s``.

    Each degree present is evaluated once on its members (gathered only when the batch mixes
    degrees); squaring ``k`` acts on the members with ``s > k`` (gathered only when not all
    of them). No sort of the batch: every matrix goes through the same calls alone or in a
    batch.
    """
    buf, m, s, s0, tri = _decide(A)
    s_tot = s + s0
    if A.shape[-1] == 1:
        # 1×1: the triangular treatment makes the result exp(a) exactly; the degree/scaling
        # are still chosen for the backward pass.
        return torch.exp(A), m, s_tot
    dev = A.device
    perm, orders = _triangular_order(buf[0], tri)
    if perm.any():  # computed on PᵀAP (powers PᵀAᵏP), permuted back at the end
        tl = _index(np.flatnonzero(perm), dev)
        P = torch.as_tensor(orders, device=dev)
        sub = buf.index_select(1, tl)
        S = sub.shape[0]
        sub = _permute(sub.reshape(-1, *sub.shape[2:]), P.repeat(S, 1))
        buf.index_copy_(1, tl, sub.reshape(S, -1, *sub.shape[1:]))
        tri = tri | perm
    degs = np.unique(m) if m.size > 1 else m
    if A.shape[-1] <= _SMALL_N:
        X = _pade_small(m, s, buf)
    elif degs.size == 1:
        X = _pade(int(degs[0]), s, buf)
    else:
        X = torch.empty_like(A)
        for d in degs.tolist():
            idx = np.flatnonzero(m == d)
            ti = _index(idx, dev)
            G = (buf if d == 9 else buf[:4]).index_select(1, ti)
            X.index_copy_(0, ti, _pade(d, s[idx], G))
    tri_any = bool(tri[0]) if tri.size == 1 else bool(tri.any())
    if tri_any:
        # triangular members: exact diagonal and superdiagonal of r_m(A_s) → exp(A_s), with
        # A_s = 2^{-s}A the Padé argument (the same exact product as in _pade)
        t_idx = np.flatnonzero(tri)
        tt = _index(t_idx, dev)
        As = buf[0].index_select(0, tt)
        if s[t_idx].max() > 0 and A.shape[-1] > _SMALL_N:  # (_pade_small scaled buf itself)
            As = As * _scales(s[t_idx], (1,), A.dtype, dev)[0]
        X.index_copy_(0, tt, _fix_triangular(X.index_select(0, tt), As, 1.0))
    if s_tot.size == 1:  # one matrix: every squaring applies to it
        top, every = int(s_tot[0]), True
    else:
        top, every = (int(s_tot.max()) if s_tot.size else 0), False
    for k in range(top):
        sel = s_tot > k
        if every or sel.all():
            X = torch.bmm(X, X)
        else:
            ti = _index(np.flatnonzero(sel), dev)
            Xi = X.index_select(0, ti)
            X.index_copy_(0, ti, torch.bmm(Xi, Xi))
        if tri_any:
            ts = sel & tri
            if ts.any():
                # X[tt] is now exp(2^{k+1} · A_s)
                tt = _index(np.flatnonzero(ts), dev)
                at = _index(np.flatnonzero(ts[t_idx]), dev)
                Xt = _fix_triangular(X.index_select(0, tt), As.index_select(0, at), 2.0 ** (k + 1))
                X.index_copy_(0, tt, Xt)
    if perm.any():
        X.index_copy_(0, tl, _permute(X.index_select(0, tl), torch.as_tensor(
            np.argsort(orders, axis=1), device=dev)))
    return X, m, s_tot
