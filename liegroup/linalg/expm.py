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

Batch invariance. The compiled kernel (below) computes one matrix at a time with a fixed
sequence of operations, so there a matrix gives the same bits alone or in any batch, by
construction. The torch path makes the same per-matrix decisions and sends every matrix
through the same calls alone or in a batch: for ``n ≤ 8`` one pass in the top degree's form
with per-matrix coefficients (elementwise IEEE products and sums), above that one evaluation
per degree on its gathered members; squaring ``k`` on the members with ``s > k``; no sort;
``sinh(x)/x`` through ``expm1`` (``torch.sinh`` rounds differently in its vectorised loop and
its scalar tail). Batches of up to 32 matrices on the CPU run the elementwise steps (norms for
``n ≤ 8``, the ``n ≤ 8`` Padé combinations) in numpy on zero-copy views — the same IEEE
operations in the same order as torch's, at a third of the per-call cost. But its batched
``matmul`` and LU are the BLAS/LAPACK library's, which may choose other kernels, with other
rounding, for other batch sizes (MKL does on AMD Zen 4): on the torch path a matrix's result
alone and in a batch agree to rounding (both within the accuracy bound), not bit for bit.

On the CPU, float32/float64 matrices up to ``n = 64`` go through a compiled kernel
(``liegroup/linalg/_cexpm.c``, built by ``pip install`` where a C compiler is available; see
:func:`compiled_kernel`): the same algorithm and decisions, one matrix at a time in C,
forward, backward and :func:`expm_frechet`. Everything else (CUDA, larger ``n``, installs
without the kernel, ``LIEGROUP_DISABLE_KERNELS=1``) runs the torch code below.

Operators: ``torch.ops.liegroup.expm`` (``A ↦ (exp(A), ms)``, ``ms`` the per-matrix degree
and squarings), ``torch.ops.liegroup.expm_backward`` (``L(Aᵀ, G)`` with those) and
``torch.ops.liegroup.expm_frechet`` (``(exp(A), L(A, E))``) are ``torch.library`` custom
operators: the torch path is their implementation for every device, the kernel their CPU one
where it is loaded (PyTorch's dispatcher chooses), with fake implementations so that
``torch.compile(expm, fullgraph=True)`` traces without a graph break, and ``expm``'s autograd
formula registered on the operator. Each checks its operands (dtype, shape, the ``(m, s)``
table) before any data is read and resolves negative/conjugate view bits. Eager calls on plain
CPU tensors that the kernel takes run the operator's CPU implementation directly (the
dispatcher's own cost exceeds a 3 × 3 exponential's).

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
from typing import Any, overload

import numpy as np
import torch

from liegroup._kernels import load_extension
from liegroup._validation import check_finite
from liegroup.errors import DomainError, DTypeError, OverflowResultError, ShapeError
from liegroup.linalg._common import (
    _LOOP_SOLVE_N,
    check_batches,
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

_ckernel: Any = load_extension("liegroup.linalg._cexpm")

__all__ = ["compiled_kernel", "expm", "expm_frechet"]

# Largest n that the compiled kernel takes (0: no kernel).
_KERNEL_N_MAX: int = int(_ckernel.N_MAX) if _ckernel is not None else 0
# Internal switch: False sends every call through the torch path (tests compare the two).
_USE_KERNEL: bool = True
# Internal switch: False sends eager CPU calls through the dispatcher too (see _direct).
_EAGER_DIRECT: bool = True


def compiled_kernel() -> bool:
    """Whether :func:`expm` and :func:`expm_frechet` use the compiled CPU kernel.

    The kernel (``liegroup/linalg/_cexpm.c``, built by ``pip install`` when a C compiler is
    available) takes float32/float64 CPU matrices up to ``n = 64``; everything else (CUDA,
    larger matrices, installs without a compiler, ``LIEGROUP_DISABLE_KERNELS=1``) runs the
    torch path, with the same algorithm and accuracy guarantees. See ``docs/linalg.md``.

    Example:
        >>> from liegroup.linalg import compiled_kernel
        >>> isinstance(compiled_kernel(), bool)
        True
    """
    return _ckernel is not None and _USE_KERNEL


def _kernel_code(dt: torch.dtype) -> int:
    return 1 if dt == torch.float64 else 0


def _kernel_failed(bad: int, A: torch.Tensor, name: str, *others: torch.Tensor) -> None:
    """The kernel reported matrix ``bad``: a non-finite input, else an overflowing result."""
    check_finite(A, name)
    for i, E in enumerate(others):
        check_finite(E, "E" if i == 0 else f"operand {i + 1}")
    _raise_overflow(A.reshape(-1, A.shape[-2], A.shape[-1])[bad], bad, A.dtype)


def _raise_overflow(A: torch.Tensor, index: int, dtype: torch.dtype) -> None:
    """Raise :class:`OverflowResultError` for matrix ``index`` of a batch (``A`` that matrix)."""
    nrm = float(A.abs().sum(-2).amax()) if A.numel() else 0.0
    u = torch.finfo(dtype).eps / 2
    why = (
        "the exact result has entries beyond the dtype's range"
        if nrm * u < 2**-8
        else "either the exact result has entries beyond the dtype's range, or ‖A‖₁·u = "
        f"{nrm * u:.2g} is so large that the rounding errors of the squarings grow without "
        "bound (e.g. a skew-symmetric A of huge norm, whose exact exponential is a rotation "
        "that this dtype cannot resolve)"
    )
    raise OverflowResultError(
        f"exp(A) is not finite in {dtype} (largest finite {torch.finfo(dtype).max:.3g}) for "
        f"matrix {index} of the (flattened) batch, ‖A‖₁ = {nrm:.4g}: {why}; it is not "
        "returned as inf/NaN. Compute in float64 if this is float32, work with a shifted "
        "problem (exp(A) = e^c·exp(A − cI) for a scalar c) or its logarithm, or reduce "
        "rotation angles mod 2π before exponentiating"
    )


def _check_overflow(X: torch.Tensor, A: torch.Tensor, *more: torch.Tensor) -> None:
    """Raise :class:`OverflowResultError` if ``X`` (or ``more``) of a finite ``A`` is not finite.

    ``X``, ``A``: ``(B, n, n)``. A host synchronisation (the torch path has several already).
    """
    ok = torch.isfinite(X).flatten(1).all(-1)
    for M in more:
        ok &= torch.isfinite(M).flatten(1).all(-1)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        _raise_overflow(A[i], i, A.dtype)


def _kernel_expm(A: torch.Tensor, ms: torch.Tensor | None) -> torch.Tensor:
    """``exp`` by the kernel of a checked operand (see :func:`_operand`) with ``0 < n ≤ N_MAX``.

    ``A`` is read as C-contiguous ``(B, n, n)`` whatever its batch shape; the result has
    ``A``'s shape. ``ms`` (``int32 (B, 2)``), when given, receives each matrix's degree and
    total scaling.
    """
    n = A.shape[-1]
    X = torch.empty(A.shape, dtype=A.dtype)
    B = A.numel() // (n * n)
    if B:
        bad = _ckernel.expm(
            A.data_ptr(), X.data_ptr(), 0 if ms is None else ms.data_ptr(), B, n,
            _kernel_code(A.dtype),
        )
        if bad >= 0:
            _kernel_failed(bad, A, "A")
    return X


def _kernel_expm_backward(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """``L(Aᵀ, G)`` by the kernel with the forward's ``(m, s)``, reading ``A`` transposed.

    Checked operands (see :func:`_operand`, :func:`_check_ms`): ``A``, ``G`` C-contiguous of
    one shape, ``0 < n ≤ N_MAX``; ``ms`` valid for ``A``'s dtype.
    """
    n = A.shape[-1]
    L = torch.empty(A.shape, dtype=A.dtype)
    if ms.shape[0]:
        _ckernel.frechet(
            A.data_ptr(), G.data_ptr(), 0, L.data_ptr(), ms.data_ptr(), ms.shape[0], n,
            _kernel_code(A.dtype), 3,
        )
    return L


# The kernel takes these operands without a dispatcher round trip (see _direct): a dense CPU
# tensor with or without autograd keys, and no functorch, Python-subclass or view-bit keys.
def _plain_keys() -> tuple[Any, Any, Any]:
    with torch.inference_mode():
        inference = torch._C._dispatch_keys(torch.empty(0))
    return (
        torch._C._dispatch_keys(torch.empty(0)),
        torch._C._dispatch_keys(torch.empty(0).requires_grad_()),
        inference,
    )


_PLAIN_KEYS = _plain_keys()


def _direct(A: torch.Tensor) -> bool:
    """Whether an eager call may run the ``liegroup::expm`` CPU kernel without the dispatcher.

    Exactly the calls the dispatcher would send to that kernel with nothing else in the way:
    plain CPU float32/float64 tensors (no subclass, functorch wrapper, negative/conjugate view
    bit), ``0 < n ≤ N_MAX``, no ``TorchDispatchMode`` active, not under ``torch.compile``.
    It saves the dispatcher's per-call cost, more than a whole 3 × 3 exponential takes;
    everything else goes through ``torch.ops.liegroup.expm``.
    """
    if not (_EAGER_DIRECT and _USE_KERNEL and _ckernel is not None):
        return False
    if not (0 < A.shape[-1] <= _KERNEL_N_MAX and A.dtype in _OP_DTYPES):
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return _plain(A)


def _plain(A: torch.Tensor) -> bool:
    """Whether ``A`` is a dense CPU tensor without subclass, functorch or view-bit keys."""
    k = torch._C._dispatch_keys(A)
    return k == _PLAIN_KEYS[0] or k == _PLAIN_KEYS[1] or k == _PLAIN_KEYS[2]


class _ExpmKernel(torch.autograd.Function):
    """Eager :func:`expm` by the kernel with autograd, without the dispatcher.

    What ``torch.ops.liegroup.expm`` and its autograd formula compute, for the calls
    :func:`_direct` admits. Takes ``A`` of any batch shape and layout (read as C-contiguous
    ``(B, n, n)`` inside, so the graph holds this one node: each view node would cost a few
    µs of a single small matrix's backward).
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor) -> torch.Tensor:
        Ak = A if A.is_contiguous() else A.contiguous()
        n = A.shape[-1]
        ms = torch.empty((A.numel() // (n * n), 2), dtype=torch.int32)
        X = _kernel_expm(Ak, ms)
        ctx.save_for_backward(A)
        ctx.ms = ms
        return X

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> torch.Tensor:
        (A,) = ctx.saved_tensors
        if torch.is_grad_enabled() or not (_USE_KERNEL and _plain(G)):
            return _expm_backward(A, G, ctx.ms)
        # A passed the forward's checks, autograd gives G A's shape and dtype, and _plain
        # leaves no view bits: only the layout is left to settle
        Ak = A if A.is_contiguous() else A.contiguous()
        Gc = G if G.is_contiguous() else G.contiguous()
        return _kernel_expm_backward(Ak, Gc, ctx.ms)


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
        # an exact zero stays one (0·inf would be NaN where exp overflows); same bits else
        sup = torch.where(t == 0, t, sup)
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


# --------------------------------------------------------------------------- operators
# torch.ops.liegroup.expm / expm_backward / expm_frechet: the entry points of this module as
# torch.library operators. Their default implementation is the torch path above (every
# device); where the compiled kernel is loaded, the CPU implementation runs it (and falls back
# to the torch path for n > N_MAX or with _USE_KERNEL off). Fake implementations let
# torch.compile trace expm without a graph break; expm's autograd formula is the Fréchet
# derivative L(Aᵀ, G) with the forward's degree and scaling.
_OP_DTYPES = (torch.float32, torch.float64)
# Degrees expm chooses per dtype, and a bound on the total number of squarings (the prescaling
# of a float64 norm near 2^1024 plus the θ scaling is far below it): what expm_backward accepts.
_M_OK = {dt: np.isin(np.arange(14), _CONSTS[dt].degs) for dt in _OP_DTYPES}
_S_MAX = 4096


def _operand(A: object, name: str, op: str) -> torch.Tensor:
    """Check an operand of the ``liegroup::`` operators before any pointer is read.

    A float32/float64 tensor ``(..., n, n)``; returned C-contiguous with its negative and
    conjugate view bits resolved (the raw data of a ``.neg()``/``.conj()`` view holds the
    un-negated values).
    """
    if not isinstance(A, torch.Tensor):
        raise DTypeError(f"{op}: {name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _OP_DTYPES:
        raise DTypeError(f"{op}: {name} must be float32 or float64, got {A.dtype}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ShapeError(
            f"{op}: {name} must have shape (*batch, n, n), got {tuple(A.shape)}"
        )
    if A.is_conj():
        A = A.resolve_conj()
    if A.is_neg():
        A = A.resolve_neg()
    return A if A.is_contiguous() else A.contiguous()


def _operands(
    A: object, G: object, op: str, second: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_operand` for ``A`` and ``G``, which must agree in shape, dtype and device."""
    A = _operand(A, "A", op)
    G = _operand(G, second, op)
    if G.shape != A.shape:
        raise ShapeError(
            f"{op}: A and {second} must have the same shape, got {tuple(A.shape)} and "
            f"{tuple(G.shape)}"
        )
    if G.dtype != A.dtype or G.device != A.device:
        raise DTypeError(
            f"{op}: A and {second} must have the same dtype and device, got "
            f"{A.dtype}/{A.device} and {G.dtype}/{G.device}"
        )
    return A, G


def _batch(A: torch.Tensor) -> int:
    return math.prod(A.shape[:-2])


def _check_ms(ms: object, B: int, dt: torch.dtype, op: str) -> torch.Tensor:
    """Check the ``(m, s)`` table of :func:`expm`'s forward.

    ``int32 (B, 2)`` on the CPU, a degree that ``expm`` uses for ``dt`` and
    ``0 ≤ s ≤ _S_MAX`` in every row.
    """
    if not isinstance(ms, torch.Tensor) or ms.dtype != torch.int32 or ms.device.type != "cpu":
        what = f"{ms.dtype} on {ms.device}" if isinstance(ms, torch.Tensor) else type(ms).__name__
        raise DTypeError(f"{op}: ms must be an int32 CPU tensor, got {what}")
    if tuple(ms.shape) != (B, 2):
        raise ShapeError(f"{op}: ms must have shape ({B}, 2), got {tuple(ms.shape)}")
    ms = ms.resolve_neg().contiguous()
    if B:
        v = ms.numpy().astype(np.uint32)  # negative entries wrap to huge values
        m, s = v[:, 0], v[:, 1]
        if not ((m < 14).all() and _M_OK[dt][np.minimum(m, 13)].all() and (s <= _S_MAX).all()):
            raise DomainError(
                f"{op}: ms holds a degree or scaling that expm never chooses for {dt} "
                "(degrees " + ", ".join(map(str, _CONSTS[dt].degs)) + f", 0 ≤ s ≤ {_S_MAX})"
            )
    return ms


def _kernel_takes(A: torch.Tensor) -> bool:
    """Whether a checked CPU operand goes to the kernel (else the torch path)."""
    return _USE_KERNEL and _ckernel is not None and 0 < A.shape[-1] <= _KERNEL_N_MAX


def _expm_torch(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), ms)`` of a checked operand by the torch path."""
    n, B = A.shape[-1], _batch(A)
    if B == 0 or n == 0:
        # a valid (m, s) table for the backward (which has nothing to compute)
        ms = torch.zeros((B, 2), dtype=torch.int32)
        ms[:, 0] = _CONSTS[A.dtype].degs[0]
        return A.new_empty(A.shape), ms
    Af = A.reshape(B, n, n)
    X, m, s = _expm_core(Af)
    _check_overflow(X, Af)
    ms = torch.from_numpy(np.stack([m, s], axis=1).astype(np.int32))
    return X.reshape(A.shape).contiguous(), ms


@torch.library.custom_op(
    "liegroup::expm", mutates_args=(), schema="(Tensor A) -> (Tensor, Tensor)"
)
def _expm_op(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), ms)`` for ``A (..., n, n)`` float32/float64.

    ``ms``: ``int32 (B, 2)`` on the CPU, each matrix's Padé degree and total number of
    squarings (what the backward needs).
    """
    return _expm_torch(_operand(A, "A", "liegroup::expm"))


@_expm_op.register_fake
def _expm_fake(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _operand(A, "A", "liegroup::expm")
    return A.new_empty(A.shape), torch.empty((_batch(A), 2), dtype=torch.int32)


def _expm_backward_torch(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    n, B = A.shape[-1], _batch(A)
    if B == 0 or n == 0:
        return torch.zeros_like(A)
    v = ms.numpy().astype(np.int64)
    L = _frechet_core(A.reshape(B, n, n).mT, G.reshape(B, n, n), v[:, 0], v[:, 1])[1]
    return L.reshape(A.shape).contiguous()


@torch.library.custom_op(
    "liegroup::expm_backward", mutates_args=(), schema="(Tensor A, Tensor G, Tensor ms) -> Tensor"
)
def _expm_backward_op(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """``L(Aᵀ, G)`` per matrix with the degrees and scalings ``ms`` of ``liegroup::expm(A)``."""
    A, G = _operands(A, G, "liegroup::expm_backward", "G")
    ms = _check_ms(ms, _batch(A), A.dtype, "liegroup::expm_backward")
    return _expm_backward_torch(A, G, ms)


@_expm_backward_op.register_fake
def _expm_backward_fake(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    _operands(A, G, "liegroup::expm_backward", "G")
    return A.new_empty(A.shape)


def _traced(A: torch.Tensor) -> bool:
    """Whether ``A`` is being traced (torch.compile, fake or functional tensors, a mode)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._dispatch_keys(A).has(torch._C.DispatchKey.Python)
    )


def _expm_backward(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """``∂⟨G, exp(A)⟩/∂A = L(Aᵀ, G)`` with the forward's ``(m, s)``; ``A`` as given to expm."""
    if torch.is_grad_enabled() and not _traced(A):
        # a differentiable backward (double backward): the torch ops, same (m, s)
        n = A.shape[-1]
        v = ms.numpy().astype(np.int64)
        L = _frechet_core(A.reshape(-1, n, n).mT, G.reshape(-1, n, n), v[:, 0], v[:, 1])[1]
        return L.reshape(A.shape)
    if _direct(A) and _direct(G):
        # A passed the forward's checks; autograd gives G A's shape and dtype, and _direct
        # leaves no view bits: only the layout is left to settle
        Ak = A if A.is_contiguous() else A.contiguous()
        Gc = G if G.is_contiguous() else G.contiguous()
        return _kernel_expm_backward(Ak, Gc, ms)
    return _expm_backward_op(A, G, ms)


def _expm_setup(ctx: Any, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
    ctx.save_for_backward(inputs[0], output[1])


def _expm_grad(ctx: Any, gX: torch.Tensor | None, gms: torch.Tensor | None) -> torch.Tensor | None:
    A, ms = ctx.saved_tensors
    return None if gX is None else _expm_backward(A, gX, ms)


_expm_op.register_autograd(_expm_grad, setup_context=_expm_setup)


def _frechet_torch(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, B = A.shape[-1], _batch(A)
    if B == 0 or n == 0:
        return A.new_zeros(A.shape), A.new_zeros(A.shape)
    Af, Ef = A.reshape(B, n, n), E.reshape(B, n, n)
    _, m, s, s0, _ = _decide(Af)
    X, L = _frechet_core(Af, Ef, m, s + s0)
    _check_overflow(X, Af, L)
    return X.reshape(A.shape).contiguous(), L.reshape(A.shape).contiguous()


def _kernel_frechet(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` by the kernel (checked operands, ``0 < n ≤ N_MAX``)."""
    n = A.shape[-1]
    # contiguous strides, as the fake says, also for an A whose size-1 dims have others
    X = torch.empty_like(A, memory_format=torch.contiguous_format)
    L = torch.empty_like(A, memory_format=torch.contiguous_format)
    B = _batch(A)
    if B:
        bad = _ckernel.frechet(
            A.data_ptr(), E.data_ptr(), X.data_ptr(), L.data_ptr(), 0, B, n,
            _kernel_code(A.dtype), 0,
        )
        if bad >= 0:
            _kernel_failed(bad, A, "A", E)
    return X, L


@torch.library.custom_op(
    "liegroup::expm_frechet", mutates_args=(), schema="(Tensor A, Tensor E) -> (Tensor, Tensor)"
)
def _frechet_op(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` per matrix (no autograd: differentiable calls use torch ops)."""
    return _frechet_torch(*_operands(A, E, "liegroup::expm_frechet", "E"))


@_frechet_op.register_fake
def _frechet_fake(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _operands(A, E, "liegroup::expm_frechet", "E")
    return A.new_empty(A.shape), A.new_empty(A.shape)


if _ckernel is not None:

    @_expm_op.register_kernel("cpu")
    def _expm_cpu(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A = _operand(A, "A", "liegroup::expm")
        if not _kernel_takes(A):
            return _expm_torch(A)
        ms = torch.empty((_batch(A), 2), dtype=torch.int32)
        return _kernel_expm(A, ms), ms

    @_expm_backward_op.register_kernel("cpu")
    def _expm_backward_cpu(A: torch.Tensor, G: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        A, G = _operands(A, G, "liegroup::expm_backward", "G")
        ms = _check_ms(ms, _batch(A), A.dtype, "liegroup::expm_backward")
        if not _kernel_takes(A):
            return _expm_backward_torch(A, G, ms)
        return _kernel_expm_backward(A, G, ms)

    @_frechet_op.register_kernel("cpu")
    def _frechet_cpu(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, E = _operands(A, E, "liegroup::expm_frechet", "E")
        if not _kernel_takes(A):
            return _frechet_torch(A, E)
        return _kernel_frechet(A, E)


# --------------------------------------------------------------------------- public
def expm(A: torch.Tensor) -> torch.Tensor:
    """Matrix exponential ``exp(A) = Σ_k A^k / k!`` of each matrix of a batch.

    Accurate to the conditioning of the problem (relative error ≈ κ_exp(A)·u) and
    differentiable: the backward pass is the Fréchet derivative ``L(Aᵀ, G)`` (see the module
    docstring). Batch-invariant bit for bit where the compiled kernel runs (CPU, float32 and
    float64, ``n ≤ 64``: :func:`compiled_kernel`); on the torch path (CUDA, larger ``n``,
    installs without the kernel) a matrix's result alone and in a batch agree to rounding
    (both within the accuracy above), as the batched products of the underlying BLAS may
    round differently for different batch sizes. Traceable by ``torch.compile`` (it is the
    operator ``torch.ops.liegroup.expm``).

    Args:
        A: real tensor ``(..., n, n)`` of float32 or float64. float16/bfloat16 inputs are
            computed in float32 and the result is rounded to the input dtype (entries beyond
            the dtype's range become ``inf``, as any float16 overflow does).

    Returns:
        ``exp(A)``, same shape, dtype and device as ``A``. Always finite: a result that
        overflows the working dtype (float32/float64) raises instead of coming back as
        ``inf``/``NaN`` (where ``exp(A)`` overflows, the squarings of scaling and squaring
        turn exact zeros into ``0·inf = NaN``, so no entry-wise promise could be kept). An
        empty batch gives an empty result, differentiable like any other.

    Raises:
        DTypeError: ``A`` is not a real floating tensor.
        ShapeError: ``A`` is not a batch of square matrices.
        NonFiniteError: ``A`` has NaN or infinite entries.
        OverflowResultError: ``A`` is finite but ``exp(A)`` has entries beyond the working
            dtype's range (e.g. ``diag(710, 0)`` in float64); a subclass of
            :class:`NonFiniteError` and of :class:`OverflowError`. The backward pass does not
            raise: an overflowing gradient comes back as ``inf`` (what loss scalers detect).

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
    Aw = A if A.dtype == wd else A.to(wd)
    if _direct(Aw):
        if Aw.requires_grad and torch.is_grad_enabled():
            X = _ExpmKernel.apply(Aw)
        else:
            X = _kernel_expm(_operand(Aw, "A", "liegroup::expm"), None)
    else:
        X = _expm_op(Aw)[0]
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
        DTypeError, NonFiniteError: as :func:`expm`, for either argument.
        ShapeError: not square matrices of one size, or batch shapes that do not broadcast.
        OverflowResultError: ``exp(A)`` or ``L(A, E)`` overflows the working dtype.

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
    check_batches(A, E, "A", "E", "expm_frechet")
    dtype = torch.promote_types(A.dtype, E.dtype)
    wd = working_dtype(dtype)
    A, E = torch.broadcast_tensors(A.to(wd), E.to(wd))
    n = A.shape[-1]
    if torch.is_grad_enabled() and (A.requires_grad or E.requires_grad):
        # autograd through expm_frechet itself: the differentiable torch ops
        Af, _ = flat(A)
        Ef, _ = flat(E)
        if Af.shape[0] == 0 or n == 0:
            # empty: differentiable in A and E like any other result (empty gradients)
            X, L = A + 0 * E, E + 0 * A
        else:
            with torch.no_grad():
                _, m, s, s0, _ = _decide(Af.detach())
            Xf, Lf = _frechet_core(Af, Ef, m, s + s0)
            _check_overflow(Xf.detach(), Af.detach(), Lf.detach())
            X, L = Xf.reshape(A.shape), Lf.reshape(A.shape)
    elif _direct(A) and _direct(E):
        X, L = _kernel_frechet(*_operands(A, E, "liegroup::expm_frechet", "E"))
    else:
        X, L = _frechet_op(A, E)
    L = L.to(dtype)
    return (X.to(dtype), L) if return_expm else L
