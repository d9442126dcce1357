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

Batch invariance: every decision depends on one matrix only and every matrix goes through the
same calls alone or in a batch: for ``n ≤ 8`` one pass in the top degree's form with
per-matrix coefficients (elementwise IEEE products and sums), above that one evaluation per
degree on its gathered members; squaring ``k`` on the members with ``s > k``; no sort. CPU
batched ``matmul`` and LU are computed matrix by matrix (measured bit-identical for any batch
size; LU above ``n = 128`` is looped explicitly), and the elementwise functions used are
position-independent (``torch.sinh`` is not, so ``sinh(x)/x`` goes through ``expm1``).
Batches of up to 32 matrices on the CPU run the elementwise steps (norms for ``n ≤ 8``, the
``n ≤ 8`` Padé combinations) in numpy on zero-copy views — the same IEEE operations in the
same order, so the same bits at a third of the per-call cost. So a matrix gives the same
bits alone or in any batch.

On the CPU, float32/float64 matrices up to ``n = 64`` go through a compiled kernel
(``liegroup/linalg/_cexpm.c``, built by ``pip install`` where a C compiler is available; see
:func:`compiled_kernel`): the same algorithm and decisions, one matrix at a time in C (batch
invariant by construction), forward, backward and :func:`expm_frechet`. Everything else (CUDA,
larger ``n``, installs without the kernel) runs the torch code below.

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

import importlib
import itertools
from typing import Any, overload

import numpy as np
import torch

from liegroup._validation import check_finite
from liegroup.errors import NonFiniteError, ShapeError
from liegroup.linalg._common import (
    _LOOP_SOLVE_N,
    check_square,
    eye_like,
    flat,
    lu_factor,
    lu_solve,
    working_dtype,
)
from liegroup.linalg._expm_decide import (
    _B,
    _CONSTS,
    _NP_BATCH,
    _decide,
)

_ckernel: Any
try:  # built by `pip install` where a C compiler is available (setup.py, optional)
    _ckernel = importlib.import_module("liegroup.linalg._cexpm")
except ImportError:  # pragma: no cover - installs without a compiler
    _ckernel = None

__all__ = ["compiled_kernel", "expm", "expm_frechet"]

# Largest n that the compiled kernel takes (0: no kernel).
_KERNEL_N_MAX: int = int(_ckernel.N_MAX) if _ckernel is not None else 0
# Internal switch: False sends every call through the torch path (tests compare the two).
_USE_KERNEL: bool = True


def compiled_kernel() -> bool:
    """Whether :func:`expm` and :func:`expm_frechet` use the compiled CPU kernel.

    The kernel (``liegroup/linalg/_cexpm.c``, built by ``pip install`` when a C compiler is
    available) takes float32/float64 CPU matrices up to ``n = 64``; everything else (CUDA,
    larger matrices, installs without a compiler) runs the torch path, with the same
    algorithm and accuracy guarantees. See ``docs/linalg.md``.

    Example:
        >>> from liegroup.linalg import compiled_kernel
        >>> isinstance(compiled_kernel(), bool)
        True
    """
    return _ckernel is not None and _USE_KERNEL


def _kernel_takes(A: torch.Tensor) -> bool:
    """Whether ``A`` (already in its working dtype or float16/bfloat16) goes to the kernel."""
    return (
        _USE_KERNEL
        and _ckernel is not None
        and 0 < A.shape[-1] <= _KERNEL_N_MAX
        and A.device.type == "cpu"
    )


def _kernel_code(dt: torch.dtype) -> int:
    return 1 if dt == torch.float64 else 0


def _kernel_failed(bad: int, A: torch.Tensor, name: str) -> None:
    """The kernel reported non-finite entries in matrix ``bad``: raise the usual error."""
    check_finite(A, name)
    raise NonFiniteError(  # pragma: no cover - check_finite raises first
        f"{name} has non-finite entries in matrix {bad} of the batch"
    )


def _kernel_expm(A: torch.Tensor, ms: torch.Tensor | None) -> torch.Tensor:
    """``exp`` of a C-contiguous ``(B, n, n)`` CPU batch by the kernel.

    ``ms`` (``int32 (B, 2)``), when given, receives each matrix's degree and total scaling.
    """
    X = torch.empty_like(A)
    bad = _ckernel.expm(
        A.data_ptr(),
        X.data_ptr(),
        0 if ms is None else ms.data_ptr(),
        A.shape[0],
        A.shape[-1],
        _kernel_code(A.dtype),
    )
    if bad >= 0:
        _kernel_failed(bad, A, "A")
    return X


class _ExpmKernel(torch.autograd.Function):
    """:func:`expm` by the compiled kernel; backward ``L(Aᵀ, G)`` by the kernel too.

    Takes ``A`` of any batch shape and layout (reshaped inside, so the graph holds this one
    node: each view node would cost a few µs of a single small matrix's backward).
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor) -> torch.Tensor:
        n = A.shape[-1]
        Ak = A.reshape(-1, n, n).contiguous()
        ms = torch.empty((Ak.shape[0], 2), dtype=torch.int32)
        X = _kernel_expm(Ak, ms)
        ctx.save_for_backward(A)
        ctx.ms = ms
        return X.view(A.shape)

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> torch.Tensor:
        (A,) = ctx.saved_tensors
        ms = ctx.ms
        n = A.shape[-1]
        if torch.is_grad_enabled():
            # a differentiable backward (double backward): the torch ops, same (m, s)
            msn = ms.numpy().astype(np.int64)
            Ab, Gb = A.reshape(-1, n, n), G.reshape(-1, n, n)
            return _frechet_core(Ab.mT, Gb, msn[:, 0], msn[:, 1])[1].reshape(A.shape)
        # the kernel needs C-contiguous data only, not a (B, n, n) view: no reshapes for
        # contiguous operands (each op is ~1 µs of a small matrix's ~20 µs backward)
        Ak = A if A.is_contiguous() else A.contiguous()
        Gc = G if G.is_contiguous() else G.contiguous()
        L = torch.empty(A.shape, dtype=A.dtype)
        # L(Aᵀ, G) with the forward's (m, s), reading A (C-contiguous) transposed
        _ckernel.frechet(
            Ak.data_ptr(),
            Gc.data_ptr(),
            0,
            L.data_ptr(),
            ms.data_ptr(),
            ms.shape[0],
            n,
            _kernel_code(Ak.dtype),
            3,
        )
        return L


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

    Squaring ``k`` applies to the matrices with ``s > k``.
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
    return R, L


def _frechet_core(
    A: torch.Tensor, E: torch.Tensor, m: np.ndarray, s: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    if m.size <= 1 or (m == m[0]).all():
        return _frechet_group(int(m[0]), s, A, E)
    order = np.argsort(m, kind="stable")
    perm = torch.as_tensor(order, device=A.device)
    inv = torch.as_tensor(np.argsort(order), device=A.device)
    Ap, Ep = A[perm], E[perm]
    mo, so = m[order], s[order]
    cut = [0, *(np.flatnonzero(mo[1:] != mo[:-1]) + 1).tolist(), mo.size]
    parts = [
        _frechet_group(int(mo[a]), so[a:b], Ap[a:b], Ep[a:b]) for a, b in itertools.pairwise(cut)
    ]
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
    n = A.shape[-1]
    if _kernel_takes(A):
        if A.numel() == 0:
            return torch.empty_like(A)
        Aw = A if A.dtype == wd else A.to(wd)
        if Aw.requires_grad and torch.is_grad_enabled():
            Xk = _ExpmKernel.apply(Aw)
        else:
            Xk = _kernel_expm(Aw.detach().reshape(-1, n, n).contiguous(), None).view(A.shape)
        return Xk if Xk.dtype == A.dtype else Xk.to(A.dtype)
    Af, batch = flat(A if A.dtype == wd else A.to(wd))
    if Af.shape[0] == 0 or n == 0:
        return torch.empty_like(A)
    if not Af.requires_grad:
        X = _expm_core(Af)[0]
    elif torch.is_grad_enabled():
        X = _Expm.apply(Af)
    else:
        X = _expm_core(Af.detach())[0]
    X = X.reshape(*batch, n, n)
    return X if X.dtype == A.dtype else X.to(A.dtype)


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
    grad = torch.is_grad_enabled() and (Af.requires_grad or Ef.requires_grad)
    if not grad and _kernel_takes(Af):
        # the kernel (autograd through expm_frechet itself uses the torch ops below)
        Ak, Ek = Af.detach().contiguous(), Ef.detach().contiguous()
        L = torch.empty_like(Ak)
        Xk = torch.empty_like(Ak) if return_expm else None
        bad = _ckernel.frechet(
            Ak.data_ptr(),
            Ek.data_ptr(),
            0 if Xk is None else Xk.data_ptr(),
            L.data_ptr(),
            0,
            Ak.shape[0],
            n,
            _kernel_code(Ak.dtype),
            0,
        )
        if bad >= 0:
            _kernel_failed(bad, Ak, "A")
        L = L.reshape(*batch, n, n).to(dtype)
        if Xk is not None:
            return Xk.reshape(*batch, n, n).to(dtype), L
        return L
    with torch.no_grad():
        _, m, s, s0, _ = _decide(Af.detach())
    X, L = _frechet_core(Af, Ef, m, s + s0)
    L = L.reshape(*batch, n, n).to(dtype)
    if return_expm:
        return X.reshape(*batch, n, n).to(dtype), L
    return L
