"""Exponentials of low-rank matrices without forming them: ``exp(L Rᵀ) = I + L φ₁(Rᵀ L) Rᵀ``.

For ``L, R ∈ R^{n×m}`` every power ``(L Rᵀ)^k = L (Rᵀ L)^{k−1} Rᵀ`` (``k ≥ 1``), so

    exp(L Rᵀ) = I + Σ_{k≥1} L (RᵀL)^{k−1} Rᵀ / k! = I + L · φ₁(Rᵀ L) · Rᵀ,
    φ₁(M) = Σ_{k≥0} M^k / (k+1)!  (= (e^M − I) M⁻¹ when M is invertible),

an exact identity (no truncation): the ``n × n`` exponential becomes an ``m × m`` function.
``φ₁(M)`` is evaluated without the division, which is undefined for singular ``M`` and
cancels badly for small ``M``: a Taylor polynomial of ``φ₁`` at ``‖X‖₁ ≤ 1/2`` whose degree
makes the truncation smaller than the unit roundoff, on ``X = 2^{−s}M``, followed by ``s``
doubling steps ``φ₁(2X) = φ₁(X) + ½·φ₁(X)·X·φ₁(X)`` (the φ₁ form of squaring,
from ``e^X = I + Xφ₁(X)``); the backward is the Fréchet derivative at ``Mᵀ`` by the block
identity ``φ₁([[A, E], [0, A]]) = [[φ₁(A), L_φ₁(A, E)], [0, φ₁(A)]]`` (Higham, *Functions of
Matrices*, 2008, Thm 3.6), one evaluation of size ``2m`` — several times cheaper than the
top-right block of ``expm([[M, I], [0, 0]])`` (Van Loan 1978) for the small batches of the
mode-wise adapters.

Acting on mode ``k`` of a tensor ``T`` (``unfold(T ×_k g, k) = g · unfold(T, k)``):

    T ×_k exp(L Rᵀ) = T + fold_k( (L φ₁(RᵀL)) · (Rᵀ · unfold(T, k)) ),

``O(n·m·|T|/n + n·m²)`` work and no ``n × n`` matrix, instead of the ``O(n³)`` exponential
and the ``O(n·|T|)`` dense mode product. The inverse is the same map with ``−L``
(``exp(−L Rᵀ)``). Accuracy: the error of the product is about
``u·(m + n)·‖L‖‖φ₁(RᵀL)‖‖R‖`` on top of φ₁'s own error (condition number times ``u``, as
scaling and squaring; tested against mpmath with the bound of the ``2m × 2m`` exponential
``exp([[M, I], [0, 0]])``), the same order as the dense exponential's ``κ_exp(LRᵀ)·u`` for
moderate ``‖L Rᵀ‖``.

Example:
    >>> import torch
    >>> from liegroup.linalg import expm
    >>> from liegroup.linalg.lowrank import expm_lowrank
    >>> g = torch.Generator().manual_seed(0)
    >>> L = torch.randn(6, 2, dtype=torch.float64, generator=g)
    >>> R = torch.randn(6, 2, dtype=torch.float64, generator=g)
    >>> torch.allclose(expm_lowrank(L, R), expm(L @ R.T), rtol=1e-12, atol=1e-12)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from liegroup._validation import check_device_has_values, check_finite, check_tensor, normalize_mode
from liegroup.errors import DTypeError, NonFiniteError, OverflowResultError, ShapeError
from liegroup.linalg._common import check_square, unit_roundoff, working_dtype

__all__ = [
    "expm_lowrank",
    "expm_lowrank_apply",
    "expm_lowrank_factor",
    "eye_plus_lowrank_mode_product",
    "eye_plus_lowrank_two_sided",
    "phi1",
]


def phi1(M: torch.Tensor) -> torch.Tensor:
    """``φ₁(M) = Σ_{k≥0} M^k/(k+1)!`` of each matrix of a batch (``(e^M − I)/M`` if defined).

    Taylor polynomial at ``‖2^{−s}M‖₁ ≤ 1/2`` (degree from the unit roundoff: 13 in
    float64, 7 in float32) and ``s`` doubling steps (see the module docstring); each matrix
    of a batch takes its own ``s``, so a batch equals its single calls. No division: singular
    ``M`` (``φ₁(0) = I`` exactly) and tiny ``M`` are as accurate as large ones.
    Differentiable, also twice (the backward is one evaluation of size ``2m``, the block
    identity of the Fréchet derivative, itself differentiable).

    Args:
        M: real tensor ``(..., m, m)`` (float32/float64; float16/bfloat16 computed in
            float32, as :func:`~liegroup.linalg.expm`).

    Returns:
        ``φ₁(M)``, same shape, dtype and device.

    Raises:
        DTypeError: ``M`` is not a real floating tensor.
        ShapeError: ``M`` is not a batch of square matrices.
        NonFiniteError: ``M`` has NaN or infinite entries.
        OverflowResultError: ``M`` is finite but ``φ₁(M)`` has entries beyond the working
            dtype's range (``φ₁(M) ≈ e^M M⁻¹`` grows like ``e^{‖M‖}``); a subclass of
            :class:`NonFiniteError`, as for :func:`~liegroup.linalg.expm`. The backward pass
            does not raise.

    Example:
        >>> import torch
        >>> phi1(torch.zeros(2, 2, dtype=torch.float64))
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
        >>> x = torch.tensor([[1e-9]], dtype=torch.float64)   # (e^x − 1)/x = 1 + x/2 + ⋯
        >>> phi1(x).item() == 1 + 5e-10
        True
    """
    M = check_square(M, "M", finite=False)
    if M.numel() == 0:
        return M.clone()
    wd = working_dtype(M.dtype)
    X = M.to(wd).reshape(-1, M.shape[-1], M.shape[-1])
    P: torch.Tensor = _Phi1.apply(X)
    _check_result(P, "phi1(M)", {"M": X})
    return P.to(M.dtype).reshape(M.shape)


_COMPILED_RESULT = (
    "liegroup: a low-rank exponential has a non-finite result (a non-finite input, or a "
    "result beyond the dtype's range) inside a torch.compile'd graph; run the same call "
    "eagerly for the typed error"
)


def _check_result(out: torch.Tensor, what: str, inputs: dict[str, torch.Tensor]) -> None:
    """Raise unless ``out`` is finite.

    :class:`NonFiniteError` naming a non-finite input, else :class:`OverflowResultError`.
    One reduction in float32/float64 accumulation (non-finite iff an entry is, barring a sum
    beyond the accumulator's range, which falls through to the entrywise check) and one host
    read; inside ``torch.compile`` an assertion in the graph instead.
    """
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    out = out.detach()
    total = out.sum(dtype=acc)
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(total), _COMPILED_RESULT)
        return
    check_device_has_values(out, f"the finiteness check of {what}")
    if math.isfinite(float(total)) or bool(torch.isfinite(out).all()):
        return
    for name, x in inputs.items():
        check_finite(x, name)
    big = max(float(x.detach().abs().amax()) if x.numel() else 0.0 for x in inputs.values())
    raise OverflowResultError(
        f"{what} is not finite in {out.dtype} (largest finite {torch.finfo(out.dtype).max:.3g}) "
        f"although its inputs are (largest entry {big:.4g}): the exact result has entries "
        "beyond the dtype's range; it is not returned as inf/NaN. Scale the factors down "
        "(exp(L Rᵀ) grows like e^{‖RᵀL‖}), or compute in float64 if this is float32"
    )


def _phi1_of_factors(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``φ₁(RᵀL)`` with a non-finite ``RᵀL`` blamed on ``L`` or ``R`` where they hold it."""
    try:
        return phi1(R.mT @ L)
    except OverflowResultError:
        raise
    except NonFiniteError:
        check_finite(L, "L")
        check_finite(R, "R")
        raise


# Taylor-with-doubling evaluation of φ₁ (the ``phi1`` kernel). With ‖X‖₁ ≤ θ the remainder
# of the degree-d Taylor polynomial is ‖Σ_{k>d} X^k/(k+1)!‖₁ ≤ Σ_{k>d} θ^k/(k+1)!, and d is
# the smallest degree making that ≤ u/2 (u the unit roundoff of the working precision), so
# the truncation is below rounding (float64: d = 13, float32: d = 7, at θ = 1/2; φ₁(X) is
# within a factor 2 of I there, ‖φ₁(X)‖₁ ≥ 1 − θ/2 − … ≥ 1/2). A larger ‖M‖₁ is scaled by
# 2^{−s} (exact) and undone by the doubling identity
#     φ₁(2X) = φ₁(X)·(e^X + I)/2 = φ₁(X) + ½·φ₁(X)·X·φ₁(X)      (e^X = I + X φ₁(X)),
# the analogue of squaring in scaling and squaring (errors grow like there, with the same
# ‖M‖-driven number of steps up to a constant). Each matrix of a batch takes its own s (a
# matrix that is done is left untouched), so a batched call equals the single calls bit for
# bit as long as the batched product does. No decisions beyond one norm per matrix: one host
# read of the batch's norms.
_PHI1_THETA = 0.5


def _phi1_degree(dtype: torch.dtype) -> int:
    u = unit_roundoff(dtype)
    d = 0
    while sum(_PHI1_THETA**k / math.factorial(k + 1) for k in range(d + 1, d + 40)) > u / 2:
        d += 1
    return d


_PHI1_DEGREE = {dt: _phi1_degree(dt) for dt in (torch.float32, torch.float64)}


def _pow2_scale(X: torch.Tensor, exps: list[int]) -> torch.Tensor:
    """``X[i] · 2^{exps[i]}`` (exact): a Python scalar when all are equal."""
    if all(e == exps[0] for e in exps):
        return X if exps[0] == 0 else X * math.ldexp(1.0, exps[0])
    f = torch.tensor([math.ldexp(1.0, e) for e in exps], dtype=X.dtype, device=X.device)
    return X * f.view(-1, 1, 1)


def _phi1_eval(X: torch.Tensor, norms: list[float]) -> torch.Tensor:
    """φ₁ of each ``(b, m, m)`` matrix given its (finite) 1-norms."""
    b, m = X.shape[0], X.shape[-1]
    steps = [math.ceil(math.log2(v / _PHI1_THETA)) if v > _PHI1_THETA else 0 for v in norms]
    smax = max(steps)
    Xs = _pow2_scale(X, [-s for s in steps])
    d = _PHI1_DEGREE[X.dtype]
    eye = torch.eye(m, dtype=X.dtype, device=X.device).expand(b, m, m)
    P = eye / math.factorial(d + 1)
    for k in range(d, 0, -1):  # Horner: P ← I/k! + X·P
        P = torch.baddbmm(eye, Xs, P, alpha=1.0, beta=1.0 / math.factorial(k))
    for j in range(smax):
        active = [i for i, s in enumerate(steps) if s > j]
        if len(active) == b:
            P = torch.baddbmm(P, P, torch.bmm(Xs, P), alpha=0.5)
            Xs = Xs * 2
        else:
            idx = torch.tensor(active, device=X.device)
            Pa, Xa = P[idx], Xs[idx]
            P = P.index_copy(0, idx, torch.baddbmm(Pa, Pa, torch.bmm(Xa, Pa), alpha=0.5))
            Xs = Xs.index_copy(0, idx, Xa * 2)
    return P


def _norms_checked(X: torch.Tensor, name: str) -> list[float]:
    """The 1-norm of each matrix (one host read); NonFiniteError if any entry is not finite."""
    check_device_has_values(X, f"the scaling decision of {name}")
    norms: list[float] = X.detach().abs().sum(-2).amax(-1).tolist()
    if not all(math.isfinite(v) for v in norms):
        check_finite(X, name)
    return norms


class _Phi1(torch.autograd.Function):
    """φ₁ of a ``(b, m, m)`` batch; backward by the block identity (one φ₁ of size 2m).

    For a power series with real coefficients the adjoint of the Fréchet derivative is the
    Fréchet derivative at the transpose, ``L_φ₁(M)*(G) = L_φ₁(Mᵀ, G)``, and
    ``φ₁([[A, E], [0, A]]) = [[φ₁(A), L_φ₁(A, E)], [0, φ₁(A)]]`` (Higham 2008, Thm 3.6);
    ``E`` is scaled by a power of two to ``A``'s norm first (the derivative is linear in ``E``).
    """

    @staticmethod
    def forward(ctx: Any, X: torch.Tensor) -> torch.Tensor:
        norms = _norms_checked(X, "M")
        ctx.save_for_backward(X)
        ctx.norms = norms
        return _phi1_eval(X, norms)

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> torch.Tensor:
        # differentiable (a _Phi1 of differentiable inputs): double backward works
        (X,) = ctx.saved_tensors
        m = X.shape[-1]
        gn = _norms_checked(G, "the gradient of phi1")
        # power of two bringing ‖E‖₁ to about max(‖A‖₁, θ): exact, and linear in E
        exps = [round(math.log2(g / max(a, _PHI1_THETA))) if g > 0 else 0
                for g, a in zip(gn, ctx.norms, strict=True)]
        A = X.mT
        E = _pow2_scale(G, [-e for e in exps])
        big = torch.cat([torch.cat([A, E], -1), torch.cat([torch.zeros_like(A), A], -1)], -2)
        out: torch.Tensor = _Phi1.apply(big)
        return _pow2_scale(out[:, :m, m:], exps)


def _check_factors(L: object, R: object) -> tuple[torch.Tensor, torch.Tensor]:
    L = check_tensor(L, "L")
    R = check_tensor(R, "R")
    if L.dim() < 2 or L.shape != R.shape:
        raise ShapeError(
            f"L and R must have the same shape (*batch, n, m) (exp(L @ R.mT) is n × n), got "
            f"L {tuple(L.shape)} and R {tuple(R.shape)}"
        )
    if L.dtype != R.dtype:
        raise DTypeError(f"L has dtype {L.dtype} but R has {R.dtype}; cast one of them")
    if L.device != R.device:
        raise DTypeError(f"L is on {L.device} but R is on {R.device}; move one of them")
    return L, R


def expm_lowrank(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Dense ``exp(L Rᵀ) = I + L φ₁(RᵀL) Rᵀ`` for factors of width ``m`` (batched).

    Costs an ``m × m`` :func:`phi1` and ``O(n²m)`` products instead of an ``n × n``
    exponential. To *apply* ``exp(L Rᵀ)`` to a tensor, :func:`expm_lowrank_apply` avoids the
    ``n × n`` result altogether.

    Args:
        L: real tensor ``(..., n, m)``.
        R: real tensor ``(..., n, m)``, same shape, dtype and device.

    Returns:
        ``exp(L @ R.mT)``, shape ``(..., n, n)``.

    Raises:
        DTypeError: non-float inputs, or different dtypes/devices.
        ShapeError: ``L`` and ``R`` differ in shape or are not matrices.
        NonFiniteError: non-finite entries in ``L`` or ``R`` (or in ``Rᵀ L``).
        OverflowResultError: finite ``L``, ``R`` whose ``exp(L Rᵀ)`` (or ``φ₁(RᵀL)``) has
            entries beyond the working dtype's range.

    Example:
        >>> import torch
        >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
        >>> v = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        >>> expm_lowrank(torch.cat([u, -v], 1), torch.cat([v, u], 1))   # rotation by 1 rad
        tensor([[ 0.5403,  0.8415],
                [-0.8415,  0.5403]], dtype=torch.float64)
    """
    L, R = _check_factors(L, R)
    P = _phi1_of_factors(L, R)
    eye = torch.eye(L.shape[-2], dtype=L.dtype, device=L.device)
    out = eye + (L @ P) @ R.mT
    _check_result(out, "exp(L Rᵀ)", {"L": L, "R": R})
    return out


def expm_lowrank_apply(
    L: torch.Tensor, R: torch.Tensor, T: torch.Tensor, mode: int
) -> torch.Tensor:
    """Mode-``mode`` product ``T ×_mode exp(L Rᵀ)`` without an ``n × n`` matrix.

    ``T + fold((L φ₁(RᵀL)) · (Rᵀ · unfold(T, mode)))``: ``O(m·|T|)`` work instead of the
    ``O(n·|T|)`` dense mode product plus the ``O(n³)`` exponential. Differentiable in ``L``,
    ``R`` and ``T``. The inverse map is ``expm_lowrank_apply(-L, R, ·, mode)``.

    Args:
        L: real matrix ``(n, m)``.
        R: real matrix ``(n, m)``, same dtype and device.
        T: real tensor with ``T.shape[mode] == n``, same dtype and device.
        mode: the mode acted on (negative counts from the end).

    Returns:
        ``T ×_mode exp(L Rᵀ)``, contiguous, ``T``'s shape.

    Raises:
        DTypeError: non-float inputs, different dtypes/devices, or a non-int mode.
        ShapeError: ``L``/``R`` not ``(n, m)`` matrices of the same shape, ``mode`` out of
            range, or ``T.shape[mode] != n``.
        NonFiniteError: non-finite entries in ``L``, ``R`` or ``T`` (checked where ``Rᵀ L``
            or the result is not finite).
        OverflowResultError: finite inputs whose product has entries beyond the dtype's range.

    Example:
        >>> import torch
        >>> from liegroup.linalg import expm
        >>> from liegroup.tensor import mode_product
        >>> g = torch.Generator().manual_seed(1)
        >>> L, R = (torch.randn(5, 2, dtype=torch.float64, generator=g) for _ in range(2))
        >>> T = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
        >>> Y = expm_lowrank_apply(L, R, T, 1)
        >>> torch.allclose(Y, mode_product(T, expm(L @ R.T), 1), rtol=1e-12, atol=1e-12)
        True
        >>> torch.allclose(expm_lowrank_apply(-L, R, Y, 1), T, rtol=1e-12, atol=1e-12)
        True
    """
    T, L, R = _check_eye_plus(T, L, R)
    if T.dim() == 0:
        raise ShapeError("T must have at least one mode")
    k = normalize_mode(mode, T.dim())
    n = L.shape[0]
    if T.shape[k] != n:
        raise ShapeError(
            f"exp(L Rᵀ) is {n} × {n} but mode {k} of T {tuple(T.shape)} has size {T.shape[k]}"
        )
    out = _eye_plus_apply(T, L @ _phi1_of_factors(L, R), R, k)
    _check_result(out, "T ×_mode exp(L Rᵀ)", {"T": T, "L": L, "R": R})
    return out


def _eye_plus_apply(T: torch.Tensor, K: torch.Tensor, R: torch.Tensor, k: int) -> torch.Tensor:
    n = K.shape[0]
    a = math.prod(T.shape[:k])
    b = T.numel() // max(a * n, 1)
    if b == 1:  # last mode (or only size-1 modes after it): the rows of T2 are the fibres
        T2 = T.reshape(a, n)
        out = torch.addmm(T2, T2 @ R, K.mT)
    elif a == 1:  # first mode: one GEMM each way
        T2 = T.reshape(n, b)
        out = torch.addmm(T2, K, R.mT @ T2)
    else:
        T3 = T.reshape(a, n, b)
        out = T3 + K @ (R.mT @ T3)
    return out.reshape(T.shape)


def expm_lowrank_factor(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``K = L φ₁(RᵀL)``, so that ``exp(L Rᵀ) = I + K Rᵀ`` (batched).

    Args:
        L: real tensor ``(..., n, m)``.
        R: real tensor ``(..., n, m)``, same shape, dtype and device.

    Returns:
        ``K``, shape ``(..., n, m)``.

    Raises:
        DTypeError, ShapeError, NonFiniteError, OverflowResultError: as :func:`expm_lowrank`
            (for ``K``).

    Example:
        >>> import torch
        >>> L = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
        >>> R = torch.tensor([[1.0], [0.0]], dtype=torch.float64)   # RᵀL = 0: nilpotent
        >>> expm_lowrank_factor(L, R).flatten().tolist()
        [0.0, 2.0]
    """
    L, R = _check_factors(L, R)
    K = L @ _phi1_of_factors(L, R)
    _check_result(K, "L φ₁(RᵀL)", {"L": L, "R": R})
    return K


def _check_eye_plus(T: object, K: object, R: object) -> tuple[torch.Tensor, ...]:
    K, R = _check_factors(K, R)
    T = check_tensor(T, "T")
    if K.dim() != 2:
        raise ShapeError(f"the factors must be matrices (n, m), got {tuple(K.shape)}")
    if T.dtype != K.dtype or T.device != K.device:
        raise DTypeError(
            f"T ({T.dtype}, {T.device}) must match the factors ({K.dtype}, {K.device})"
        )
    return T, K, R


def eye_plus_lowrank_mode_product(
    T: torch.Tensor, K: torch.Tensor, R: torch.Tensor, mode: int
) -> torch.Tensor:
    """``T ×_mode (I + K Rᵀ) = T + fold(K · (Rᵀ · unfold(T, mode)))``, ``O(m·|T|)``.

    With ``K`` from :func:`expm_lowrank_factor` this is ``T ×_mode exp(L Rᵀ)``.

    Args:
        T: real tensor; ``T.shape[mode] == n``.
        K: real matrix ``(n, m)``.
        R: real matrix ``(n, m)``; all three of one dtype and device.
        mode: the mode acted on (negative counts from the end).

    Returns:
        The product, contiguous, ``T``'s shape.

    Raises:
        DTypeError: non-float inputs, different dtypes/devices, or a non-int mode.
        ShapeError: ``K``/``R`` not matrices of one shape, ``mode`` out of range, or
            ``T.shape[mode] != n``.
        NonFiniteError: non-finite entries in ``T``, ``K`` or ``R`` (checked where the result
            is not finite).
        OverflowResultError: finite inputs whose product has entries beyond the dtype's range.

    Example:
        >>> import torch
        >>> T = torch.ones(2, 3)
        >>> K, R = torch.ones(3, 1), torch.tensor([[1.0], [0.0], [0.0]])
        >>> eye_plus_lowrank_mode_product(T, K, R, 1)   # T (I + K Rᵀ)ᵀ = T (I + R Kᵀ)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    T, K, R = _check_eye_plus(T, K, R)
    if T.dim() == 0:
        raise ShapeError("T must have at least one mode")
    k = normalize_mode(mode, T.dim())
    if T.shape[k] != K.shape[0]:
        raise ShapeError(
            f"I + K Rᵀ is {K.shape[0]} × {K.shape[0]} but mode {k} of T {tuple(T.shape)} has "
            f"size {T.shape[k]}"
        )
    out = _eye_plus_apply(T, K, R, k)
    _check_result(out, "T ×_mode (I + K Rᵀ)", {"T": T, "K": K, "R": R})
    return out


def eye_plus_lowrank_two_sided(
    W: torch.Tensor, K0: torch.Tensor, R0: torch.Tensor, K1: torch.Tensor, R1: torch.Tensor
) -> torch.Tensor:
    """``W ×₀ (I + K₀R₀ᵀ) ×₁ (I + K₁R₁ᵀ)`` (a matrix: ``(I + K₀R₀ᵀ) W (I + K₁R₁ᵀ)ᵀ``) in one node.

    ``= W + K₀ ×₀ (A + C K₁ᵀ) + B K₁ᵀ`` with ``A = R₀ᵀ ×₀ W``, ``B = W ×₁ R₁ᵀ``,
    ``C = A ×₁ R₁ᵀ``; for a matrix the last two terms are one ``addmm`` of rank ``m₀ + m₁``:
    three passes over ``W`` forward and four backward (two over ``∂L/∂W'``, two over ``W``),
    one autograd node. Trailing modes (a conv kernel's ``kh, kw``) are carried along: ``W``
    is laid out ``(n₀, ·, n₁)`` inside by one transposing copy each way.

    Args:
        W: real tensor ``(n₀, n₁, *rest)``.
        K0: real matrix ``(n₀, m₀)``.
        R0: real matrix ``(n₀, m₀)``.
        K1: real matrix ``(n₁, m₁)``.
        R1: real matrix ``(n₁, m₁)``; all of ``W``'s dtype and device.

    Returns:
        The product, ``W``'s shape, contiguous.

    Raises:
        DTypeError, ShapeError: as :func:`eye_plus_lowrank_mode_product`, or ``W`` of order
            < 2 or of sizes not matching the factors.
        NonFiniteError: non-finite entries in ``W`` or a factor (checked where the result is
            not finite).
        OverflowResultError: finite inputs whose product has entries beyond the dtype's range.
            The backward pass does not raise.

    Example:
        >>> import torch
        >>> from liegroup.tensor import mode_product
        >>> g = torch.Generator().manual_seed(2)
        >>> W = torch.randn(4, 5, dtype=torch.float64, generator=g)
        >>> K0, R0 = (torch.randn(4, 1, dtype=torch.float64, generator=g) for _ in range(2))
        >>> K1, R1 = (torch.randn(5, 2, dtype=torch.float64, generator=g) for _ in range(2))
        >>> seq = eye_plus_lowrank_mode_product(
        ...     eye_plus_lowrank_mode_product(W, K0, R0, 0), K1, R1, 1)
        >>> torch.allclose(eye_plus_lowrank_two_sided(W, K0, R0, K1, R1), seq)
        True
        >>> T = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=g)   # a conv kernel
        >>> seq = eye_plus_lowrank_mode_product(
        ...     eye_plus_lowrank_mode_product(T, K0, R0, 0), K1, R1, 1)
        >>> torch.allclose(eye_plus_lowrank_two_sided(T, K0, R0, K1, R1), seq)
        True
    """
    W, K0, R0 = _check_eye_plus(W, K0, R0)
    W, K1, R1 = _check_eye_plus(W, K1, R1)
    if W.dim() < 2 or W.shape[0] != K0.shape[0] or W.shape[1] != K1.shape[0]:
        raise ShapeError(
            f"W must be ({K0.shape[0]}, {K1.shape[0]}, ...) for factors K0 "
            f"{tuple(K0.shape)} and K1 {tuple(K1.shape)}, got {tuple(W.shape)}"
        )
    W3 = W.reshape(W.shape[0], W.shape[1], -1)
    out: torch.Tensor = _TwoSided.apply(W3, K0, R0, K1, R1)
    _check_result(
        out, "W ×₀ (I + K₀R₀ᵀ) ×₁ (I + K₁R₁ᵀ)", {"W": W, "K0": K0, "R0": R0, "K1": K1, "R1": R1}
    )
    return out.view(W.shape)


def _two_sided(
    W: torch.Tensor, K0: torch.Tensor, R0: torch.Tensor, K1: torch.Tensor, R1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W', right, B)`` for ``W`` laid out ``(n₀, c, n₁)`` (mode 1 last; ``c = 1``: a matrix).

    ``W' = W ×₀ (I + K₀R₀ᵀ) ×₁ (I + K₁R₁ᵀ) = W + K₀ ×₀ (A + C K₁ᵀ) + B K₁ᵀ`` with
    ``A = R₀ᵀ ×₀ W`` ``(m₀, c, n₁)``, ``B = W R₁`` ``(n₀, c, m₁)``, ``C = A R₁``;
    ``right = A + C K₁ᵀ``. For ``c = 1`` one ``addmm`` of rank ``m₀ + m₁``.
    """
    n0, c, n1 = W.shape
    m0 = K0.shape[1]
    A = R0.mT @ W.view(n0, c * n1)  # (m0, c·n1)
    B = W.view(n0 * c, n1) @ R1  # (n0·c, m1)
    right = torch.addmm(A.view(m0 * c, n1), A.view(m0 * c, n1) @ R1, K1.mT)  # (m0·c, n1)
    if c == 1:
        out = torch.addmm(W.view(n0, n1), torch.cat([K0, B], 1), torch.cat([right, K1.mT], 0))
    else:
        out = torch.addmm(W.view(n0, c * n1), K0, right.view(m0, c * n1))
        out.view(n0 * c, n1).addmm_(B, K1.mT)
    return out.view(n0, c, n1), right, B


class _TwoSided(torch.autograd.Function):
    """``W' = W ×₀ (I + K₀R₀ᵀ) ×₁ (I + K₁R₁ᵀ)`` as one node, ``W`` of shape ``(n₀, n₁, c)``.

    Inside, ``W`` is laid out ``(n₀, c, n₁)`` (one transposing copy each way when ``c > 1``)
    so that both modes are plain matrix products. With ``G = ∂L/∂W'`` in that layout,
    ``V = B + K₀ ×₀ C`` and ``P_k = I + K_kR_kᵀ``:

    * ``∂K₀ = G₍₀₎·right₍₀₎ᵀ``, ``∂K₁ = G₍₁₎ᵀ·V₍₁₎`` (``₍₀₎``: ``(n₀, c·n₁)`` views,
      ``₍₁₎``: ``(n₀·c, n₁)`` views);
    * ``∂R₀ = W₍₀₎·X̃₍₀₎ᵀ`` with ``X = K₀ᵀG₍₀₎``, ``X̃ = X P₁``-side: ``X + (X K₁) R₁ᵀ``;
    * ``∂R₁ = W₍₁₎ᵀ·Z̃`` with ``Z = G₍₁₎K₁``, ``Z̃ = Z + R₀ ×₀ (K₀ᵀ ×₀ Z)``, taken as
      ``(Z̃ᵀ W₍₁₎)ᵀ`` (a row-major ``W`` read along its rows, measured twice as fast);
    * ``∂W = G ×₀ (I + R₀K₀ᵀ) ×₁ (I + R₁K₁ᵀ)`` only when ``W`` requires it.

    For ``c = 1`` (a matrix) the products over ``G`` pair up: ``G·[right, K₁]`` and
    ``[K₀, V]ᵀ·G``. The backward is made of differentiable ops (twice differentiable).
    """

    @staticmethod
    def forward(
        ctx: Any, W: torch.Tensor, K0: torch.Tensor, R0: torch.Tensor, K1: torch.Tensor,
        R1: torch.Tensor,
    ) -> torch.Tensor:
        Wt = W.transpose(1, 2).contiguous()  # (n0, c, n1); a view when c = 1
        out, right, B = _two_sided(Wt, K0, R0, K1, R1)
        ctx.save_for_backward(W, Wt, K0, R0, K1, R1, right, B)
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        W, Wt, K0, R0, K1, R1, right, B = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: all as functions of the inputs
            Wt = W.transpose(1, 2).contiguous()
            _, right, B = _two_sided(Wt, K0, R0, K1, R1)
        need_w, need_k0, need_r0, need_k1, need_r1 = ctx.needs_input_grad[:5]
        n0, c, n1 = Wt.shape
        m0, m1 = K0.shape[1], K1.shape[1]
        Gt = G.transpose(1, 2).contiguous()
        G0, G1 = Gt.view(n0, c * n1), Gt.view(n0 * c, n1)
        gW = gK0 = gR0 = gK1 = gR1 = None
        if need_w:
            gW = _two_sided(Gt, R0, K0, R1, K1)[0].transpose(1, 2).contiguous()
        if not (need_k0 or need_r1 or need_k1 or need_r0):
            return gW, None, None, None, None
        # V = B + K₀ ×₀ C, C = R₀ᵀ ×₀ B
        V = torch.addmm(B.view(n0, c * m1), K0, R0.mT @ B.view(n0, c * m1))
        if c == 1:
            GR = G0 @ torch.cat([right, K1.mT], 0).mT  # (n0, m0 + m1): [∂K₀, G K₁]
            LG = torch.cat([K0, V], 1).mT @ G0  # (m0 + m1, n1): [K₀ᵀG; ∂K₁ᵀ]
            gK0, Z, X, gK1t = GR[:, :m0], GR[:, m0:], LG[:m0], LG[m0:]
        else:
            gK0 = G0 @ right.view(m0, c * n1).mT
            Z = G1 @ K1  # (n0·c, m1)
            X = K0.mT @ G0  # (m0, c·n1)
            gK1t = V.view(n0 * c, m1).mT @ G1  # (m1, n1)
        if need_k1:
            gK1 = gK1t.mT
        if need_r0:
            Xv = X.reshape(m0 * c, n1)
            Xt = torch.addmm(Xv, Xv @ K1, R1.mT)  # X P₁ on the n₁ side
            gR0 = Wt.view(n0, c * n1) @ Xt.view(m0, c * n1).mT
        if need_r1:
            Zv = Z.reshape(n0, c * m1)
            Zt = torch.addmm(Zv, R0, K0.mT @ Zv)  # Z ×₀ (I + R₀K₀ᵀ)
            gR1 = (Zt.view(n0 * c, m1).mT @ Wt.view(n0 * c, n1)).mT
        return gW, gK0 if need_k0 else None, gR0, gK1, gR1
