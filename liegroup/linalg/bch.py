"""Baker–Campbell–Hausdorff series ``Z(X, Y) = log(e^X e^Y)`` truncated at a given order.

The homogeneous parts ``Z_k`` (degree ``k`` in ``X, Y``) follow Varadarajan's recursion
(Lie Groups, Lie Algebras, and Their Representations, §2.15)::

    Z_1 = X + Y,
    (k + 1) Z_{k+1} = ½ [X − Y, Z_k]
                      + Σ_{p ≥ 1, 2p ≤ k} B_{2p}/(2p)! Σ_{k_1+…+k_{2p} = k, k_i ≥ 1}
                            [Z_{k_1}, [Z_{k_2}, …, [Z_{k_{2p}}, X + Y]…]],

with the Bernoulli numbers ``B_{2p}`` (exact fractions); the inner sums are accumulated by
dynamic programming over ``(number of brackets, total degree)``. Every ``Z_k`` is a Lie
polynomial (nested commutators only), so for ``X, Y`` in a matrix Lie algebra the result
stays in it. The tests check the coefficients exactly against sympy's truncated
``log(exp X · exp Y)`` in non-commuting symbols, and numerically against
``logm(expm X · expm Y)``.

Example:
    >>> import torch
    >>> from liegroup.linalg import bch
    >>> X = torch.tensor([[0.0, 0.1], [0.0, 0.0]], dtype=torch.float64)
    >>> Y = torch.tensor([[0.0, 0.0], [0.2, 0.0]], dtype=torch.float64)
    >>> Z = bch(X, Y, order=2)   # X + Y + [X, Y]/2
    >>> torch.allclose(Z, X + Y + (X @ Y - Y @ X) / 2)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from typing import TypeVar

import torch

from liegroup.errors import ConfigError, DTypeError, ShapeError
from liegroup.linalg._common import check_batches, check_square

__all__ = ["MAX_BCH_ORDER", "bch"]

#: Highest truncation order :func:`bch` accepts (the recursion is exact at every order; the
#: cap bounds the cost, which grows roughly like 2^order brackets).
MAX_BCH_ORDER = 12

T = TypeVar("T")


@lru_cache(maxsize=1)
def _bernoulli(nmax: int = 2 * MAX_BCH_ORDER) -> tuple[Fraction, ...]:
    """Bernoulli numbers ``B_0 … B_nmax`` (``B_1 = −1/2`` convention) as exact fractions."""
    B = [Fraction(1)]
    for m in range(1, nmax + 1):
        acc = Fraction(0)
        c = 1  # binomial(m + 1, k)
        for k in range(m):
            acc += c * B[k]
            c = c * (m + 1 - k) // (k + 1)
        B.append(-acc / (m + 1))
    return tuple(B)


def bch_terms(
    X: T,
    Y: T,
    order: int,
    bracket: Callable[[T, T], T],
    add: Callable[[T, T], T],
    scale: Callable[[Fraction, T], T],
) -> list[T]:
    """Homogeneous BCH parts ``[Z_1, …, Z_order]`` in any Lie algebra (generic core).

    ``bracket``, ``add`` and ``scale`` (by an exact :class:`~fractions.Fraction`) define the
    algebra; the tests run this same code on sympy non-commutative symbols.
    """
    B = _bernoulli()
    fact = [1]
    for i in range(1, 2 * order + 2):
        fact.append(fact[-1] * i)
    XpY = add(X, Y)
    XmY = add(X, scale(Fraction(-1), Y))
    Z: list[T] = [XpY]  # Z[k-1] = Z_k
    # S[(j, k)] = Σ_{k_1+…+k_j = k} [Z_{k_1}, […, [Z_{k_j}, X + Y]…]]  (None = zero)
    S: dict[tuple[int, int], T | None] = {(0, 0): XpY}

    def get_s(j: int, k: int) -> T | None:
        if (j, k) in S:
            return S[(j, k)]
        acc: T | None = None
        if j >= 1 and k >= j:
            for k1 in range(1, k - j + 2):
                inner = get_s(j - 1, k - k1)
                if inner is None:
                    continue
                term = bracket(Z[k1 - 1], inner)
                acc = term if acc is None else add(acc, term)
        S[(j, k)] = acc
        return acc

    for k in range(1, order):
        total = scale(Fraction(1, 2), bracket(XmY, Z[k - 1]))
        for p in range(1, k // 2 + 1):
            coef = B[2 * p] / fact[2 * p]
            if coef == 0:
                continue
            sp = get_s(2 * p, k)
            if sp is not None:
                total = add(total, scale(coef, sp))
        Z.append(scale(Fraction(1, k + 1), total))
    return Z


def bch(X: torch.Tensor, Y: torch.Tensor, order: int = 5) -> torch.Tensor:
    """Baker–Campbell–Hausdorff series ``log(e^X e^Y) ≈ Σ_{k ≤ order} Z_k(X, Y)``.

    ``Z = X + Y + [X,Y]/2 + ([X,[X,Y]] − [Y,[X,Y]])/12 − [Y,[X,[X,Y]]]/24 + …``; the truncation
    error is ``O(‖(X, Y)‖^{order+1})`` and the series converges for ``‖X‖ + ‖Y‖ < log 2``.
    Use :func:`~liegroup.linalg.logm` of ``expm(X) @ expm(Y)`` for large arguments.

    Args:
        X: ``(..., n, n)`` real float tensor.
        Y: ``(..., n, n)`` real float tensor (the batch shapes of ``X`` and ``Y`` broadcast).
        order: truncation order, ``1 ≤ order ≤ MAX_BCH_ORDER`` (12).

    Returns:
        The truncated series, shape of the broadcast batch; differentiable.

    Raises:
        ConfigError: ``order`` outside ``[1, MAX_BCH_ORDER]``.
        DTypeError, ShapeError, NonFiniteError: invalid ``X`` or ``Y``.

    Example:
        >>> import torch
        >>> from liegroup.linalg import bch, expm, logm
        >>> X = 0.05 * torch.tensor([[0.0, -1.0], [1.0, 0.3]], dtype=torch.float64)
        >>> Y = 0.05 * torch.tensor([[0.2, 0.5], [0.1, 0.0]], dtype=torch.float64)
        >>> err = (bch(X, Y, order=6) - logm(expm(X) @ expm(Y))).abs().max().item()
        >>> err < 1e-12
        True
    """
    if not isinstance(order, int) or isinstance(order, bool):
        raise DTypeError(f"order must be an int, got {type(order).__name__} {order!r}")
    if not 1 <= order <= MAX_BCH_ORDER:
        raise ConfigError(
            f"bch: order must be between 1 and {MAX_BCH_ORDER}, got {order}; for larger "
            "arguments or higher accuracy use logm(expm(X) @ expm(Y))"
        )
    Xc = check_square(X, "X")
    Yc = check_square(Y, "Y")
    if Xc.shape[-1] != Yc.shape[-1]:
        raise ShapeError(
            f"X and Y must have the same matrix size, got {tuple(Xc.shape)} and {tuple(Yc.shape)}"
        )
    check_batches(Xc, Yc, "X", "Y", "bch")
    dtype = torch.promote_types(Xc.dtype, Yc.dtype)
    Xb, Yb = torch.broadcast_tensors(Xc.to(dtype), Yc.to(dtype))

    def bracket(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b - b @ a

    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def scale(c: Fraction, a: torch.Tensor) -> torch.Tensor:
        return a * float(c)

    terms = bch_terms(Xb, Yb, order, bracket, add, scale)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out
