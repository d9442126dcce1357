"""Tensor unfoldings and mode products: the actions of matrix groups on tensor modes.

Conventions (row-major, as PyTorch stores tensors): the mode-``k`` unfolding of ``T`` with
shape ``(I_0, ..., I_{N-1})`` is the matrix ``T.movedim(k, 0).reshape(I_k, -1)``; its
columns run over the remaining modes in their original order, the last fastest. For
``k = 0`` this is the plain ``reshape(I_0, -1)`` that matrix PEFT methods apply to a conv
kernel ``(C_out, C_in/g, k_h, k_w)``.

Example:
    >>> import torch
    >>> from liegroup import tensor
    >>> T = torch.arange(24.0).reshape(2, 3, 4)
    >>> tensor.unfold(T, 1).shape
    torch.Size([3, 8])
    >>> bool(torch.equal(tensor.fold(tensor.unfold(T, 1), 1, T.shape), T))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from liegroup._validation import check_tensor, normalize_mode
from liegroup.errors import DeviceError, DTypeError, ShapeError

__all__ = ["fold", "mode_product", "multi_mode_product", "unfold"]


def unfold(T: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-``k`` unfolding (matricisation) of a tensor.

    Args:
        T: tensor of shape ``(I_0, ..., I_{N-1})``, ``N >= 1``.
        k: mode, ``-N <= k < N``.

    Returns:
        Matrix of shape ``(I_k, prod_{j != k} I_j)``, equal to
        ``T.movedim(k, 0).reshape(T.shape[k], -1)`` (a view when possible).

    Example:
        >>> import torch
        >>> unfold(torch.zeros(2, 3, 4), -1).shape
        torch.Size([4, 6])
    """
    if not isinstance(T, torch.Tensor):
        raise ShapeError(f"T must be a torch.Tensor, got {type(T).__name__}")
    if T.dim() == 0:
        raise ShapeError("cannot unfold a 0-d tensor; it has no modes")
    k = normalize_mode(k, T.dim())
    return T.movedim(k, 0).reshape(T.shape[k], -1)


def fold(M: torch.Tensor, k: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: fold a mode-``k`` unfolding back into a tensor.

    Args:
        M: matrix of shape ``(shape[k], prod_{j != k} shape[j])``.
        k: mode the matrix is the unfolding of.
        shape: shape ``(I_0, ..., I_{N-1})`` of the result.

    Returns:
        Tensor ``T`` of ``shape`` with ``unfold(T, k) == M``.

    Example:
        >>> import torch
        >>> fold(torch.zeros(4, 6), 2, (2, 3, 4)).shape
        torch.Size([2, 3, 4])
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ShapeError("shape must have at least one mode")
    k = normalize_mode(k, len(shape))
    rest = [s for j, s in enumerate(shape) if j != k]
    expected = (shape[k], math.prod(rest))
    if not isinstance(M, torch.Tensor) or tuple(M.shape) != expected:
        got = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ShapeError(
            f"M must have shape {expected} to fold along mode {k} into {shape}, got {got}"
        )
    return M.reshape(shape[k], *rest).movedim(0, k)


def mode_product(T: torch.Tensor, M: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-``k`` product ``T ×_k M``: multiply every mode-``k`` fibre of ``T`` by ``M``.

    ``unfold(T ×_k M, k) == M @ unfold(T, k)``.

    Args:
        T: tensor of shape ``(I_0, ..., I_k, ..., I_{N-1})``.
        M: matrix of shape ``(J, I_k)``.
        k: mode.

    Returns:
        Tensor of shape ``(I_0, ..., J, ..., I_{N-1})``.

    Raises:
        DTypeError: ``T`` or ``M`` is not a real floating tensor, or their dtypes differ
            (no silent promotion or rounding: convert one, e.g. ``M.to(T.dtype)``).
        DeviceError: ``T`` and ``M`` are on different devices.
        ShapeError: ``M`` is not ``(J, I_k)`` or ``k`` is out of range.

    Example:
        >>> import torch
        >>> T = torch.randn(2, 3, 4)
        >>> mode_product(T, torch.eye(3), 1).allclose(T)
        True
    """
    check_tensor(T, "T")
    check_tensor(M, "M")
    if M.dtype != T.dtype:
        raise DTypeError(
            f"mode_product needs T and M of the same dtype, got T {T.dtype} and M {M.dtype}; "
            "convert one explicitly to the dtype to compute in, e.g. M.to(T.dtype)"
        )
    if M.device != T.device:
        raise DeviceError(
            f"mode_product needs T and M on the same device, got T on {T.device} and M on "
            f"{M.device}; move one, e.g. M.to(T.device)"
        )
    if T.dim() == 0:
        raise ShapeError("T must have at least one mode")
    k = normalize_mode(k, T.dim())
    if M.dim() != 2 or M.shape[1] != T.shape[k]:
        raise ShapeError(
            f"M must be a matrix of shape (J, {T.shape[k]}) to act on mode {k} of a tensor "
            f"of shape {tuple(T.shape)}, got {tuple(M.shape)}"
        )
    # tensordot contracts M's columns with mode k; the new mode lands first, move it back.
    return torch.tensordot(M, T, dims=([1], [k])).movedim(0, k)


def multi_mode_product(
    T: torch.Tensor, matrices: Sequence[torch.Tensor], modes: Sequence[int] | None = None
) -> torch.Tensor:
    """Tucker-form product ``T ×_{m_0} M_0 ×_{m_1} M_1 ⋯`` over distinct modes.

    Products over distinct modes commute, so the order of ``matrices`` does not matter.

    Args:
        T: tensor of order ``N``.
        matrices: matrices ``M_i`` of shape ``(J_i, I_{m_i})``.
        modes: the distinct modes ``m_i``; default ``0, 1, ..., len(matrices) - 1``.

    Returns:
        Tensor whose mode ``m_i`` has size ``J_i`` (other modes unchanged).

    Example:
        >>> import torch
        >>> core = torch.randn(2, 3, 4)
        >>> U = [torch.randn(5, 2), torch.randn(6, 3), torch.randn(7, 4)]
        >>> multi_mode_product(core, U).shape
        torch.Size([5, 6, 7])
    """
    check_tensor(T, "T")
    matrices = list(matrices)
    if modes is None:
        modes = list(range(len(matrices)))
    modes = [normalize_mode(m, T.dim(), "modes[i]") for m in modes]
    if len(modes) != len(matrices):
        raise ShapeError(f"got {len(matrices)} matrices but {len(modes)} modes")
    if len(set(modes)) != len(modes):
        raise ShapeError(f"modes must be distinct, got {modes}")
    out = T
    for M, k in zip(matrices, modes, strict=True):
        out = mode_product(out, M, k)
    return out
