"""Exponentials of low-rank matrices without forming them: ``exp(L Rᵀ) = I + L φ₁(Rᵀ L) Rᵀ``.

For ``L, R ∈ R^{n×m}`` every power ``(L Rᵀ)^k = L (Rᵀ L)^{k−1} Rᵀ`` (``k ≥ 1``), so

    exp(L Rᵀ) = I + Σ_{k≥1} L (RᵀL)^{k−1} Rᵀ / k! = I + L · φ₁(Rᵀ L) · Rᵀ,
    φ₁(M) = Σ_{k≥0} M^k / (k+1)!  (= (e^M − I) M⁻¹ when M is invertible),

an exact identity (no truncation): the ``n × n`` exponential becomes an ``m × m`` function.
``φ₁(M)`` is evaluated without the division, which is undefined for singular ``M`` and
cancels badly for small ``M``, as the top-right block of one exponential of size ``2m``
(Van Loan 1978; Higham, *Functions of Matrices*, 2008, §10.7.4):

    exp([[M, I], [0, 0]]) = [[e^M, φ₁(M)], [0, I]],

with :func:`liegroup.linalg.expm` (scaling and squaring, accurate to its conditioning,
differentiable through its Fréchet derivative).

Acting on mode ``k`` of a tensor ``T`` (``unfold(T ×_k g, k) = g · unfold(T, k)``):

    T ×_k exp(L Rᵀ) = T + fold_k( (L φ₁(RᵀL)) · (Rᵀ · unfold(T, k)) ),

``O(n·m·|T|/n + n·m²)`` work and no ``n × n`` matrix, instead of the ``O(n³)`` exponential
and the ``O(n·|T|)`` dense mode product. The inverse is the same map with ``−L``
(``exp(−L Rᵀ)``). Accuracy: the error of the product is about
``u·(m + n)·‖L‖‖φ₁(RᵀL)‖‖R‖`` on top of ``expm``'s ``κ·u`` for the ``2m × 2m`` block, the
same order as the dense exponential's ``κ_exp(LRᵀ)·u`` for moderate ``‖L Rᵀ‖``.

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

import torch

from liegroup._validation import check_tensor, normalize_mode
from liegroup.errors import DTypeError, ShapeError
from liegroup.linalg._common import check_square
from liegroup.linalg.expm import expm

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

    Computed as the top-right block of ``expm([[M, I], [0, 0]])`` (size ``2m``): no division,
    so singular ``M`` (``φ₁(0) = I``) and tiny ``M`` are as accurate as large ones.
    Differentiable (through :func:`liegroup.linalg.expm`'s Fréchet derivative).

    Args:
        M: real tensor ``(..., m, m)`` (float32/float64; float16/bfloat16 computed in
            float32, as :func:`~liegroup.linalg.expm`).

    Returns:
        ``φ₁(M)``, same shape, dtype and device.

    Raises:
        DTypeError: ``M`` is not a real floating tensor.
        ShapeError: ``M`` is not a batch of square matrices.
        NonFiniteError: ``M`` has NaN or infinite entries.

    Example:
        >>> import torch
        >>> phi1(torch.zeros(2, 2, dtype=torch.float64))
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
        >>> x = torch.tensor([[1e-9]], dtype=torch.float64)   # (e^x − 1)/x = 1 + x/2 + ⋯
        >>> phi1(x).item() == 1 + 5e-10
        True
    """
    M = check_square(M, "M")
    m = M.shape[-1]
    eye = torch.eye(m, dtype=M.dtype, device=M.device).expand(M.shape)
    zeros = torch.zeros((*M.shape[:-2], m, 2 * m), dtype=M.dtype, device=M.device)
    aug = torch.cat([torch.cat([M, eye], dim=-1), zeros], dim=-2)
    return expm(aug)[..., :m, m:]


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
        NonFiniteError: non-finite entries in ``Rᵀ L``.

    Example:
        >>> import torch
        >>> u = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
        >>> v = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        >>> expm_lowrank(torch.cat([u, -v], 1), torch.cat([v, u], 1))   # rotation by 1 rad
        tensor([[ 0.5403,  0.8415],
                [-0.8415,  0.5403]], dtype=torch.float64)
    """
    L, R = _check_factors(L, R)
    P = phi1(R.mT @ L)
    eye = torch.eye(L.shape[-2], dtype=L.dtype, device=L.device)
    return eye + (L @ P) @ R.mT


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
        NonFiniteError: non-finite entries in ``Rᵀ L``.

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
    L, R = _check_factors(L, R)
    T = check_tensor(T, "T")
    if L.dim() != 2:
        raise ShapeError(f"L and R must be matrices (n, m), got {tuple(L.shape)}")
    if T.dtype != L.dtype or T.device != L.device:
        raise DTypeError(
            f"T ({T.dtype}, {T.device}) must match L and R ({L.dtype}, {L.device})"
        )
    if T.dim() == 0:
        raise ShapeError("T must have at least one mode")
    k = normalize_mode(mode, T.dim())
    n = L.shape[0]
    if T.shape[k] != n:
        raise ShapeError(
            f"exp(L Rᵀ) is {n} × {n} but mode {k} of T {tuple(T.shape)} has size {T.shape[k]}"
        )
    return _eye_plus_apply(T, L @ phi1(R.mT @ L), R, k)


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
        DTypeError, ShapeError, NonFiniteError: as :func:`expm_lowrank`.

    Example:
        >>> import torch
        >>> L = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
        >>> R = torch.tensor([[1.0], [0.0]], dtype=torch.float64)   # RᵀL = 0: nilpotent
        >>> expm_lowrank_factor(L, R).flatten().tolist()
        [0.0, 2.0]
    """
    L, R = _check_factors(L, R)
    return L @ phi1(R.mT @ L)


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
    return _eye_plus_apply(T, K, R, k)


def eye_plus_lowrank_two_sided(
    W: torch.Tensor, K0: torch.Tensor, R0: torch.Tensor, K1: torch.Tensor, R1: torch.Tensor
) -> torch.Tensor:
    """``(I + K₀R₀ᵀ) · W · (I + K₁R₁ᵀ)ᵀ`` for a matrix ``W`` as one rank-``(m₀+m₁)`` update.

    ``= W + [K₀, B] · [A + C K₁ᵀ; K₁ᵀ]`` with ``A = R₀ᵀW``, ``B = W R₁``, ``C = A R₁``: three
    passes over ``W`` forward (``A``, ``B`` and one ``addmm``) and four backward, about half
    of applying the two sides one after the other.

    Args:
        W: real matrix ``(n₀, n₁)``.
        K0, R0: real matrices ``(n₀, m₀)``.
        K1, R1: real matrices ``(n₁, m₁)``; all of ``W``'s dtype and device.

    Returns:
        The product, ``(n₀, n₁)``, contiguous.

    Raises:
        DTypeError, ShapeError: as :func:`eye_plus_lowrank_mode_product`, or ``W`` not a
            matrix of matching sizes.

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
    """
    W, K0, R0 = _check_eye_plus(W, K0, R0)
    W, K1, R1 = _check_eye_plus(W, K1, R1)
    if W.dim() != 2 or W.shape[0] != K0.shape[0] or W.shape[1] != K1.shape[0]:
        raise ShapeError(
            f"W must be a ({K0.shape[0]}, {K1.shape[0]}) matrix for factors K0 "
            f"{tuple(K0.shape)} and K1 {tuple(K1.shape)}, got {tuple(W.shape)}"
        )
    A = R0.mT @ W  # (m0, n1)
    B = W @ R1  # (n0, m1)
    right = torch.cat([torch.addmm(A, A @ R1, K1.mT), K1.mT], 0)  # [A + C K1ᵀ; K1ᵀ]
    return torch.addmm(W, torch.cat([K0, B], 1), right)
