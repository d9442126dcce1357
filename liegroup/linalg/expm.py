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
removes the cancellation that ruins ``[[1, b], [0, −1]]``-type inputs. A matrix that a
symmetric permutation makes upper triangular (a lower-triangular one, say) is computed
permuted, ``exp(A) = P exp(PᵀAP) Pᵀ``, with ``A``'s degree and scaling (the approximant
commutes with the permutation; the 1-norms do not change); the Fréchet derivative likewise,
``L(A, E) = P L(PᵀAP, PᵀEP) Pᵀ``, so the gradient of an upper-triangular ``A`` is exact too.

Batch invariance. The compiled kernel computes one matrix at a time with a fixed
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
without the kernel, ``LIEGROUP_DISABLE_KERNELS=1``) runs the torch path.

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

Code: this module holds the public functions; the per-matrix decisions are in
:mod:`liegroup.linalg._expm_decide`, the torch path's Padé evaluation in
:mod:`liegroup.linalg._expm_pade` and its Fréchet derivative in
:mod:`liegroup.linalg._expm_frechet`, the operators and the kernel's glue in
:mod:`liegroup.linalg._expm_ops`.

Example:
    >>> import torch
    >>> from liegroup.linalg import expm
    >>> A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    >>> expm(A)
    tensor([[1., 1.],
            [0., 1.]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import overload

import torch

from liegroup.errors import ShapeError
from liegroup.linalg._common import check_batches, check_square, flat, working_dtype
from liegroup.linalg._expm_decide import _decide
from liegroup.linalg._expm_frechet import _frechet_core
from liegroup.linalg._expm_ops import (
    _check_overflow,
    _check_resolved,
    _direct,
    _expm_op,
    _ExpmKernel,
    _frechet_op,
    _kernel_expm,
    _kernel_frechet,
    _operand,
    _operands,
    compiled_kernel,
)

__all__ = ["compiled_kernel", "expm", "expm_frechet"]


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
            dtype's range (e.g. ``diag(710, 0)`` in float64), or cannot be resolved: a matrix
            whose scaling needed ``s`` squarings with ``2^s·u ≥ 2⁻¹⁰`` (for a normal ``A``,
            ``‖A‖₁ ≳ 2⁴⁵`` in float64, ``2¹⁶`` in float32) and whose result fails a check
            every exact ``exp(A)`` passes — ``u‖A·X‖₁ ≥ ‖X‖₁`` (``κ_exp(A)·u ≥ 1``), or
            ``det X`` or the singular values of ``X`` provably more than 1/16 away from
            ``det exp(A) = e^{tr A}`` and ``e^{λ(H)}``, ``H = (A + Aᵀ)/2`` (e.g. a
            skew-symmetric ``A`` of norm ``1e20``, a rotation this dtype cannot resolve).
            Triangular results (exact) and results that underflow to zero are returned. A
            subclass of :class:`NonFiniteError` and of :class:`OverflowError`. The backward
            pass does not raise: an overflowing gradient comes back as ``inf`` (what loss
            scalers detect).

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
        OverflowResultError: ``exp(A)`` or ``L(A, E)`` overflows the working dtype, or
            ``exp(A)`` cannot be resolved (as :func:`expm`).

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
                _, m, s, s0, tri = _decide(Af.detach())
            Xf, Lf = _frechet_core(Af, Ef, m, s + s0, tri)
            _check_overflow(Xf.detach(), Af.detach(), Lf.detach())
            _check_resolved(Xf.detach(), Af.detach(), s + s0)
            X, L = Xf.reshape(A.shape), Lf.reshape(A.shape)
    elif _direct(A) and _direct(E):
        X, L = _kernel_frechet(*_operands(A, E, "liegroup::expm_frechet", "E"))
    else:
        X, L = _frechet_op(A, E)
    L = L.to(dtype)
    return (X.to(dtype), L) if return_expm else L
