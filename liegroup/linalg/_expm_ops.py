"""``torch.ops.liegroup.expm`` / ``expm_backward`` / ``expm_frechet`` and the compiled kernel.

The operators' default implementation is the torch path (:mod:`._expm_pade`,
:mod:`._expm_frechet`) on every device; where the compiled kernel
(``liegroup/linalg/_cexpm.c``) is loaded, their CPU implementation runs it for
``0 < n ≤ N_MAX`` and falls back to the torch path otherwise. Each operator checks its
operands (dtype, shape, the ``(m, s)`` table) and resolves negative/conjugate view bits
before any pointer is read; fake implementations let ``torch.compile`` trace them, and
``expm``'s autograd formula is registered on its operator. Eager calls on plain CPU tensors
that the kernel takes skip the dispatcher (:func:`_direct`).
"""

from __future__ import annotations

import array
import math
import threading
from typing import Any

import numpy as np
import torch

from liegroup._kernels import load_extension
from liegroup._validation import check_finite
from liegroup.errors import DomainError, DTypeError, OverflowResultError, ShapeError
from liegroup.linalg._expm_decide import _CONSTS, _decide
from liegroup.linalg._expm_frechet import _frechet_core
from liegroup.linalg._expm_pade import _expm_core

_ckernel: Any = load_extension("liegroup.linalg._cexpm")


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


# The resolution check (see _check_resolved). A matrix whose scaling and squaring takes
# s ≥ _S_CHECK[dtype] squarings (2^s·u ≥ 2^-10: the rounding errors of the squarings, amplified
# about 2^s-fold, may reach O(1)) has its result compared with det exp(A) = e^{tr A}; below
# that no check runs.
_S_CHECK = {torch.float64: 43, torch.float32: 14}
_S_CHECK_MIN = min(_S_CHECK.values())
# The check raises where the result provably differs from exp(A) by more than this fraction
# of ‖exp(A)‖₂ (a spectral-norm relative error) ...
_RESOLVE_DELTA = 1.0 / 16
# ... or where κ_exp(A)·u is certified to be at least this (no correct digit to promise).
_KAPPA_U_MAX = 1.0


def _unresolved(X: torch.Tensor, A: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per matrix of ``(k, n, n)`` batches: whether ``X`` cannot be trusted to hold ``exp(A)``.

    Three tests; any of them flags the matrix.

    * Sensitivity. ``exp((1 + ε)A) = exp(A) + ε·A·exp(A) + O(ε²)``: a relative change of
      ``A`` by the unit roundoff ``u`` of the working dtype moves the result by ``u‖A X‖₁``.
      Where that is at least ``‖X‖₁`` (:data:`_KAPPA_U_MAX`; then ``κ_exp(A)·u ≥ 1``, as
      ``κ_exp(A) ≥ ‖A·exp(A)‖/‖exp(A)‖``), the result has no correct digit to promise. ``A·X``
      is formed in float64 on the normalised factors and its rounding error bound
      subtracted, so the test never fires on rounding alone. (Results that decay to zero,
      and exact triangular ones like ``diag(−10²⁰, 0)``, have ``A·X`` zero or small.)
    * Determinant. With ``δ = _RESOLVE_DELTA``, ``η = n·tiny`` (the absolute error gradual
      underflow may add) and ``F = X − exp(A)`` assumed ``‖F‖₂ ≤ δ‖exp(A)‖₂ + η``:
      ``‖exp(A)‖₂ ≤ N = (σ_max(X) + η)/(1 − δ)``, ``‖F‖₂ ≤ f = δN + η`` and
      ``σ_min(exp(A)) ≥ μ = max(σ_min(X) − f, e^{tr A}/N^{n−1})`` (as
      ``det exp(A) = e^{tr A} ≤ σ_min·σ_max^{n−1}``). Where ``f/μ ≤ ½``,
      ``X = exp(A)(I + exp(A)⁻¹F)`` with ``‖exp(A)⁻¹F‖₂ ≤ f/μ``, so ``det X > 0`` and
      ``|log det X − tr A| ≤ −n·log(1 − f/μ)``; a result that breaks either (beyond the
      rounding of ``slogdet``, well-conditioned there, and of ``tr A``) is not within ``δ``
      of ``exp(A)`` (e.g. the zero matrix for a rotation). Where ``f/μ > ½`` (``e^{tr A}``
      too small, ``X`` ill-conditioned) this test concludes nothing.
    * Logarithmic norm. With ``H = (A + Aᵀ)/2``, ``e^{λ_min(H)} ≤ σ_i(exp(A)) ≤
      e^{λ_max(H)}``; under the same assumption on ``F``, ``σ_max(X) ≤ (1 + δ)e^{λ_max(H)} +
      η`` and ``σ_min(X) ≥ e^{λ_min(H)} − δe^{λ_max(H)} − η`` (the eigenvalues widened by
      their rounding error). For a skew-symmetric ``A`` (``H = 0``) this says ``X`` is within
      ``δ`` of orthogonal, whatever garbage the squarings left.

    Returns the flags, ``u‖A X‖₁/‖X‖₁`` (a lower bound of ``κ_exp(A)·u``; 0 where ``X = 0``)
    and the determinant test's ``(log|det X|, tr A)`` as a ``(k, 2)`` array.
    """
    n = X.shape[-1]
    u64 = 2.0**-53
    u = torch.finfo(X.dtype).eps / 2
    delta = _RESOLVE_DELTA
    eta = n * torch.finfo(X.dtype).tiny
    Xd = X.detach().to(torch.float64)
    Ad = A.detach().to(torch.float64)
    # sensitivity: u·‖A X‖₁/‖X‖₁ = u·‖Â X̂‖₁·‖A‖₁ with Â = A/‖A‖₁, X̂ = X/‖X‖₁ (no overflow)
    na = Ad.abs().sum(-2).amax(-1).clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]
    nx = Xd.abs().sum(-2).amax(-1).clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]
    Ah, Xh = Ad / na, Xd / nx
    prod = (Ah @ Xh).abs().sum(-2).amax(-1)
    bound = 2 * n * u64 * (Ah.abs() @ Xh.abs()).sum(-2).amax(-1)
    sens = (u * (prod - bound).clamp_min(0) * na[:, 0, 0]).cpu().numpy()
    sens = np.where(nx[:, 0, 0].cpu().numpy() > torch.finfo(torch.float64).tiny, sens, 0.0)
    # determinant
    sv = torch.linalg.svdvals(Xd).cpu().numpy()
    sign, ld = (v.cpu().numpy() for v in torch.linalg.slogdet(Xd))
    dg = Ad.diagonal(dim1=-2, dim2=-1)
    t = dg.sum(-1).cpu().numpy()
    t_err = 2 * n * u64 * dg.abs().sum(-1).cpu().numpy()
    smax, smin = sv[:, 0], sv[:, -1]
    N = (smax + eta) / (1 - delta)
    f = delta * N + eta
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        gap = smin - f
        log_mu = np.maximum(np.where(gap > 0, np.log(gap), -np.inf), t - (n - 1) * np.log(N))
        r = np.exp(np.log(f) - log_mu)
        tol = -n * np.log1p(-np.minimum(r, 0.5)) + 64 * n * u64 + t_err
        det_bad = (r <= 0.5) & ((sign <= 0) | ~(np.abs(ld - t) <= tol))
    # logarithmic norm: e^{λ_min(H)} ≤ σ_i(exp(A)) ≤ e^{λ_max(H)}, H = (A + Aᵀ)/2
    H = 0.5 * (Ad + Ad.mT)
    lam = torch.linalg.eigvalsh(H).cpu().numpy()
    l_err = 8 * n * u64 * torch.linalg.matrix_norm(H).cpu().numpy()  # H is exact to u64·|H|
    with np.errstate(over="ignore", invalid="ignore"):
        hi = np.exp(lam[:, -1] + l_err)
        lo = np.exp(lam[:, 0] - l_err)
        ln_bad = (smax > (1 + delta) * hi + eta) | (smin < lo - delta * hi - eta)
    bad = det_bad | ln_bad | (sens >= _KAPPA_U_MAX)
    return bad, sens, np.stack([np.where(sign > 0, ld, -np.inf), t], axis=1)


def _check_resolved(X: torch.Tensor, A: torch.Tensor, st: np.ndarray) -> None:
    """Raise :class:`OverflowResultError` for a result the squarings may have destroyed.

    ``X``, ``A``: ``(B, n, n)``; ``st``: each matrix's total number of squarings. Only the
    matrices with ``st ≥ _S_CHECK`` are examined (:func:`_unresolved`), in batched calls whose
    per-matrix LAPACK calls do not depend on the rest of the batch.
    """
    idx = np.flatnonzero(st >= _S_CHECK[A.dtype])
    if idx.size == 0:
        return
    ti = torch.as_tensor(idx, device=X.device)
    bad, sens, det = _unresolved(X.index_select(0, ti), A.index_select(0, ti))
    if not bad.any():
        return
    j = int(np.flatnonzero(bad)[0])
    i = int(idx[j])
    dtype = A.dtype
    nrm = float(A[i].abs().sum(-2).amax())
    u = torch.finfo(dtype).eps / 2
    if sens[j] >= _KAPPA_U_MAX:
        why = (
            f"a relative change of A by u = {u:.2g} moves exp(A) by {sens[j]:.3g} times its "
            "norm (κ_exp(A)·u is at least that), so no digit of the result can be promised"
        )
    else:
        why = (
            f"the computed result is not within {_RESOLVE_DELTA:g} (relative) of exp(A): its "
            f"log|det| is {det[j, 0]:.4g} where det exp(A) = e^(tr A) gives {det[j, 1]:.4g}, "
            "or its singular values leave the bounds e^λ(H) of the symmetric part H of A"
        )
    raise OverflowResultError(
        f"exp(A) cannot be resolved in {dtype} for matrix {i} of the (flattened) batch, "
        f"‖A‖₁ = {nrm:.4g} (‖A‖₁·u = {nrm * u:.2g}): scaling and squaring takes "
        f"{int(st[i])} squarings, whose rounding errors grow about 2^{int(st[i])}-fold, and "
        f"{why}. This is a matrix of huge norm whose exponential is bounded (e.g. a "
        "skew-symmetric A: a rotation by an angle this dtype cannot resolve); the result is "
        "not returned. Reduce rotation angles mod 2π before exponentiating, compute in "
        "float64 if this is float32, or scale the problem down"
    )


# Per-thread scratch (m, s) table for kernel calls whose caller does not want one: the
# kernel writes each matrix's degree and squarings there for the resolution check.
_SCRATCH = threading.local()
_SCRATCH_MAX = 4096

_Table = tuple["array.array[int]", int, np.ndarray]


def _scratch(B: int) -> _Table:
    """A flat ``int32`` table of at least ``2B`` entries, its address and a numpy view of it.

    Reused by this thread up to :data:`_SCRATCH_MAX` rows.
    """
    buf: _Table | None = getattr(_SCRATCH, "buf", None)
    if buf is not None and len(buf[0]) >= 2 * B:
        return buf
    a = array.array("i", bytes(8 * max(B, 64)))
    new = (a, a.buffer_info()[0], np.frombuffer(a, dtype=np.int32))
    if B <= _SCRATCH_MAX:
        _SCRATCH.buf = new
    return new


def _top_squarings(ms: array.array[int] | np.ndarray, view: np.ndarray, B: int) -> int:
    """The largest entry of a flat ``(m, s)`` table of ``B`` rows.

    At least the largest number of squarings, and below :data:`_S_CHECK_MIN` exactly when all
    of them are: the degrees (``m ≤ 13``) are below it, so the whole table is scanned,
    contiguously.
    """
    if B <= 8:
        return int(max(ms[: 2 * B]))
    return int(view[: 2 * B].max())


def _squarings(view: np.ndarray, B: int) -> np.ndarray:
    return view[1 : 2 * B : 2].astype(np.int64)


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
        msa: array.array[int] | np.ndarray
        if ms is None:
            buf = getattr(_SCRATCH, "buf", None)
            msa, ptr, view = buf if buf is not None and len(buf[0]) >= 2 * B else _scratch(B)
        else:
            view = msa = ms.numpy().reshape(-1)
            ptr = ms.data_ptr()
        bad = _ckernel.expm(A.data_ptr(), X.data_ptr(), ptr, B, n, _kernel_code(A.dtype))
        if bad >= 0:
            _kernel_failed(bad, A, "A")
        # the common case costs one read and one comparison
        top = msa[1] if B == 1 else _top_squarings(msa, view, B)
        if top >= _S_CHECK_MIN and top >= _S_CHECK[A.dtype]:
            _check_resolved(X.view(B, n, n), A.view(B, n, n), _squarings(view, B))
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

# The operators (see the module docstring).
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
    _check_resolved(X, Af, s)
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
    _, m, s, s0, tri = _decide(Af)
    X, L = _frechet_core(Af, Ef, m, s + s0, tri)
    _check_overflow(X, Af, L)
    _check_resolved(X, Af, s + s0)
    return X.reshape(A.shape).contiguous(), L.reshape(A.shape).contiguous()


def _kernel_frechet(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(A), L(A, E))`` by the kernel (checked operands, ``0 < n ≤ N_MAX``)."""
    n = A.shape[-1]
    # contiguous strides, as the fake says, also for an A whose size-1 dims have others
    X = torch.empty_like(A, memory_format=torch.contiguous_format)
    L = torch.empty_like(A, memory_format=torch.contiguous_format)
    B = _batch(A)
    if B:
        msa, ptr, view = _scratch(B)
        bad = _ckernel.frechet(
            A.data_ptr(), E.data_ptr(), X.data_ptr(), L.data_ptr(), ptr, B, n,
            _kernel_code(A.dtype), 0,
        )
        if bad >= 0:
            _kernel_failed(bad, A, "A", E)
        if _top_squarings(msa, view, B) >= _S_CHECK[A.dtype]:
            _check_resolved(X.view(B, n, n), A.view(B, n, n), _squarings(view, B))
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
