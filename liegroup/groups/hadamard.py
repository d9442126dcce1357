"""The Hadamard group: tensors of a fixed shape with no zero entry, under the element-wise product.

This is the group of LieRA (arXiv 2504.00851). For a shape ``S``:

* group ``G = {g ∈ R^S : g_i ≠ 0}``, product ``g ⊙ h``, identity all ones, inverse ``1 / g``;
  abelian; its identity component is the set of tensors with all entries positive;
* algebra ``g = R^S`` with zero bracket; ``exp`` is the element-wise exponential, a
  diffeomorphism onto the identity component, and ``log`` the element-wise log there;
* action on a weight tensor ``W`` of shape ``S``: ``act(g, W) = W ⊙ g``. With ``g = exp(ΔW)``
  every entry moves in proportion to its own value: zero entries stay zero and signs never flip.

The truncated exponential ``T_k(X) = Σ_{j≤k} X^j / j!`` (``1 + X`` for ``k = 1``, LieRA's default
first-order map) satisfies, entry-wise and for every real ``X``,

``|W ⊙ (exp(X) − T_k(X))| ≤ |W| ⊙ (e^{|X|} − T_k(|X|))``

(the Taylor remainder of ``exp`` is dominated term by term by that of ``|X|``);
:func:`taylor_remainder_bound` evaluates the right-hand side without cancellation.

Example:
    >>> import torch
    >>> from liegroup import Hadamard
    >>> G = Hadamard((2, 2))
    >>> X = torch.tensor([[0.1, -0.2], [0.0, 0.3]], dtype=torch.float64)
    >>> torch.allclose(G.log(G.exp(X)), X)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from liegroup._validation import check_finite, check_tensor, check_trailing_shape, offending
from liegroup.errors import ConfigError, DomainError, DTypeError, OverflowResultError, ShapeError
from liegroup.groups.base import LieGroup, broadcast_batch, check_batch

__all__ = ["Hadamard", "taylor_exp", "taylor_remainder_bound"]

# Series terms used by taylor_remainder_bound for |X| <= 1: the first omitted term is below
# 1/ (k + 1 + _SERIES_TERMS)! <= 1e-50 relative, far below float64 resolution.
_SERIES_TERMS = 40


def _check_order(order: int) -> int:
    if not isinstance(order, int) or isinstance(order, bool):
        raise DTypeError(f"order must be an int >= 1, got {type(order).__name__} {order!r}")
    if order < 1:
        raise ConfigError(f"order must be >= 1 (1 is the first-order map 1 + X), got {order}")
    return order


def taylor_exp(X: torch.Tensor, order: int) -> torch.Tensor:
    """Element-wise truncated exponential ``T_k(X) = Σ_{j=0}^{k} X^j / j!``.

    Evaluated by Horner's rule, ``1 + X(1 + X/2(1 + ⋯(1 + X/k)))``; ``order=1`` gives exactly
    ``1 + X``.

    Args:
        X: real tensor of any shape.
        order: truncation order ``k >= 1``.

    Returns:
        Tensor of ``X``'s shape, dtype and device.

    Example:
        >>> import torch
        >>> taylor_exp(torch.tensor([0.5]), 2)
        tensor([1.6250])
    """
    check_tensor(X, "X")
    order = _check_order(order)
    out = torch.ones_like(X)
    for j in range(order, 0, -1):
        out = 1 + X * out / j if j > 1 else 1 + X * out
    return out


def taylor_remainder_bound(
    X: torch.Tensor, order: int, W: torch.Tensor | None = None
) -> torch.Tensor:
    """Entry-wise bound ``|W| ⊙ (e^{|X|} − T_k(|X|))`` on ``|W ⊙ (exp(X) − T_k(X))|``.

    For ``|X| ≤ 1`` the remainder is summed as a series (no cancellation); above that
    ``e^{|X|} − T_k(|X|)`` is dominated by ``e^{|X|}`` and is computed directly.

    Args:
        X: real tensor (the Lie-algebra element ``ΔW``).
        order: truncation order ``k >= 1``.
        W: optional tensor broadcastable with ``X`` (the weight); ``None`` means ones.

    Returns:
        Non-negative tensor of the broadcast shape.

    Example:
        >>> import torch
        >>> X = torch.tensor([0.1], dtype=torch.float64)
        >>> err = (torch.exp(X) - taylor_exp(X, 1)).abs()
        >>> bool((err <= taylor_remainder_bound(X, 1)).all())
        True
    """
    check_tensor(X, "X")
    order = _check_order(order)
    a = X.abs()
    small = a.clamp(max=1.0)
    # series: Σ_{j=k+1}^{k+M} a^j/j!, by Horner on the ratio a/j.
    tail = torch.zeros_like(a)
    for j in range(order + _SERIES_TERMS, order, -1):
        tail = (1 + tail) * small / j
    # tail now holds a/(k+1)·(1 + a/(k+2)·(1 + ⋯)); multiply by a^k / k! to get the remainder.
    series = tail * small.pow(order) / math.factorial(order)
    direct = torch.exp(a) - taylor_exp(a, order)
    bound = torch.where(a <= 1.0, series, direct)
    if W is not None:
        check_tensor(W, "W")
        bound = W.abs() * bound
    return bound


class Hadamard(LieGroup):
    """Tensors of shape ``shape`` with non-zero entries under the element-wise product.

    Points and algebra elements both have shape ``(*batch, *shape)``.

    Args:
        shape: the tensor shape, e.g. a conv kernel's ``(C_out, C_in/g, k_h, k_w)``.

    Example:
        >>> import torch
        >>> G = Hadamard((3,))
        >>> g = torch.tensor([2.0, 0.5, -1.0])
        >>> G.compose(g, G.inverse(g))
        tensor([1., 1., 1.])
        >>> G.act(G.exp(torch.zeros(3)), torch.tensor([1.0, 2.0, 3.0]))
        tensor([1., 2., 3.])
    """

    def __init__(self, shape: Sequence[int] | torch.Size | int) -> None:
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ShapeError(f"shape must be a sequence of positive ints, got {shape}")
        self.shape: tuple[int, ...] = shape
        self.point_shape = shape
        self.algebra_shape = shape
        self.dim = math.prod(shape)

    def __repr__(self) -> str:
        return f"Hadamard(shape={self.shape})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hadamard) and other.shape == self.shape

    def __hash__(self) -> int:
        return hash(("Hadamard", self.shape))

    # ------------------------------------------------------------------ structure
    def identity(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """All ones, shape ``(*batch, *shape)``.

        Raises:
            ShapeError: a batch size is negative.
            DTypeError: a batch size is not an int.

        Example:
            >>> Hadamard((2,)).identity(3).shape
            torch.Size([3, 2])
        """
        batch = check_batch(batch)
        return torch.ones(*batch, *self.shape, dtype=dtype, device=device)

    def compose(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Element-wise product ``g ⊙ h`` (batch shapes broadcast).

        Raises:
            ShapeError: a trailing shape is not ``shape``, or the batch shapes do not
                broadcast.

        Example:
            >>> import torch
            >>> Hadamard((2,)).compose(torch.tensor([2.0, 3.0]), torch.tensor([0.5, 2.0]))
            tensor([1., 6.])
        """
        self.check_point(g, "g")
        self.check_point(h, "h")
        broadcast_batch(g, h, len(self.shape), ("g", "h"))
        return g * h

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Element-wise reciprocal ``1 / g``.

        Raises:
            NonFiniteError: ``g`` has NaN or infinite entries.
            DomainError: ``g`` has zero entries (0 is not in the group), naming them.
            OverflowResultError: ``g`` has entries so small (subnormal) that their reciprocal
                exceeds the dtype's range.

        Example:
            >>> import torch
            >>> Hadamard((2,)).inverse(torch.tensor([2.0, -4.0]))
            tensor([ 0.5000, -0.2500])
        """
        self.check_point(g, "g")
        out = torch.reciprocal(g)
        if out.device.type == "meta":  # shapes only (model init on meta): nothing to check
            return out
        # one host synchronisation: 1/g is finite and non-zero exactly when g is on the group
        # and its reciprocal is representable
        hit = offending(~torch.isfinite(out) | (out == 0))
        if hit is not None:
            check_finite(g, "g")
            zero = offending(g == 0)
            if zero is not None:
                raise DomainError(
                    f"inverse: g has {zero[0]} zero entries, e.g. at {zero[1]}; 0 is not in the "
                    "Hadamard group and has no inverse (check how g was built, or use "
                    "G.contains(g) to filter)"
                )
            count, idx = hit
            vals = [g[tuple(i)].item() for i in idx]
            raise OverflowResultError(
                f"inverse: 1/g exceeds the range of {g.dtype} (largest finite "
                f"{torch.finfo(g.dtype).max:.3g}) in {count} entries, e.g. at {idx} (values "
                f"{vals}); compute in a wider dtype"
            )
        return out

    def exp(self, X: torch.Tensor, order: int | None = None) -> torch.Tensor:
        """Element-wise ``exp(X)``, or its Taylor truncation of ``order`` k (``1 + X`` for 1).

        The truncated map is not a group exponential (``1 + X`` can be zero or negative); it is
        LieRA's cheap approximation, with error bound :func:`taylor_remainder_bound`.

        The result is checked with one host synchronisation (as ``SO``/``SE``/``GL``'s
        ``exp``); under ``torch.compile`` the check is an in-graph assertion; on the ``meta``
        device (no values) only the shape is propagated.

        Raises:
            NonFiniteError: ``X`` has NaN or infinite entries.
            OverflowResultError: ``X`` is finite but the result is not representable: an entry
                overflows the dtype (``exp(X) > max``, i.e. ``X > ln(max)``, 88.7 in float32)
                or, for the exact map, underflows to 0 (``X`` below about −103.9 in float32,
                −745.1 in float64), which is not in the group. Nothing is returned as
                ``inf`` or 0.

        Example:
            >>> import torch
            >>> G = Hadamard((1,))
            >>> G.exp(torch.tensor([0.5])), G.exp(torch.tensor([0.5]), order=1)
            (tensor([1.6487]), tensor([1.5000]))
        """
        self.check_algebra(X, "X")
        out = torch.exp(X) if order is None else taylor_exp(X, order)
        if out.device.type == "meta":  # shapes only (model init on meta): nothing to check
            return out
        bad = ~torch.isfinite(out)
        if order is None:
            bad = bad | (out == 0)
        hit = offending(bad)
        if hit is not None:
            check_finite(X, "X")
            count, idx = hit
            vals = [X[tuple(i)].item() for i in idx]
            fi = torch.finfo(out.dtype)
            if order is None:
                lo = math.log(fi.tiny) + math.log(fi.eps / 2)  # half the least subnormal
                hi = math.log(fi.max)
                why = (
                    f"exp(X) overflows (above {fi.max:.3g}) or underflows to 0 (not in the "
                    f"group); exp is representable for X in [{lo:.5g}, {hi:.5g}] in {out.dtype}"
                )
            else:
                why = f"the order-{order} Taylor map overflows (above {fi.max:.3g})"
            raise OverflowResultError(
                f"exp: {why}; {count} entries of X give no representable result, e.g. at "
                f"{idx} (values {vals}). Nothing is returned as inf/0: compute in a wider "
                "dtype, or find what made X so large (learning rate too high?)"
            )
        return out

    def log(self, g: torch.Tensor) -> torch.Tensor:
        """Element-wise log on the identity component (all entries finite and > 0).

        Raises:
            DomainError: naming the offending entries when some are ``<= 0``, NaN or infinite.

        Example:
            >>> import torch
            >>> Hadamard((2,)).log(torch.tensor([1.0, 1.0]))
            tensor([0., 0.])
        """
        self.check_point(g, "g")
        hit = offending(~(torch.isfinite(g) & (g > 0)))
        if hit is not None:
            count, idx = hit
            vals = [g[tuple(i)].item() for i in idx]
            raise DomainError(
                f"log is defined only on the identity component (all entries finite and > 0); "
                f"{count} entries are not, e.g. at {idx} (values {vals}). A group "
                "element with negative entries has no real logarithm; take log(g / sign(g)) "
                "if you mean its magnitude."
            )
        return torch.log(g)

    def bracket(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Zero: the group is abelian.

        Example:
            >>> import torch
            >>> Hadamard((2,)).bracket(torch.ones(2), torch.ones(2))
            tensor([0., 0.])
        """
        self.check_algebra(X, "X")
        self.check_algebra(Y, "Y")
        batch = broadcast_batch(X, Y, len(self.shape), ("X", "Y"))
        dtype = torch.promote_types(X.dtype, Y.dtype)
        return torch.zeros(*batch, *self.shape, dtype=dtype, device=X.device)

    def Ad(self, g: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Identity map ``Ad_g X = X`` (abelian group), broadcast to ``g``'s batch.

        Example:
            >>> import torch
            >>> Hadamard((2,)).Ad(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]))
            tensor([ 1., -1.])
        """
        self.check_point(g, "g")
        self.check_algebra(X, "X")
        batch = broadcast_batch(g, X, len(self.shape), ("g", "X"))
        return X.expand(*batch, *self.shape)

    def act(self, g: torch.Tensor, T: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Action on a tensor of the group's shape: ``T ⊙ g``.

        Args:
            g: group element(s), ``(*batch, *shape)``.
            T: tensor(s), ``(*batch, *shape)`` (batch shapes broadcast).

        Example:
            >>> import torch
            >>> Hadamard((2,)).act(torch.tensor([2.0, -1.0]), torch.tensor([3.0, 4.0]))
            tensor([ 6., -4.])
        """
        if kwargs:
            raise DTypeError(f"Hadamard.act takes no options, got {sorted(kwargs)}")
        self.check_point(g, "g")
        check_tensor(T, "T")
        check_trailing_shape(T, self.shape, "T")
        broadcast_batch(g, T, len(self.shape), ("g", "T"))
        return T * g

    def random(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``exp`` of a standard-normal algebra element: a point of the identity component.

        Example:
            >>> bool((Hadamard((4,)).random() > 0).all())
            True
        """
        return torch.exp(
            self.random_algebra(*batch, dtype=dtype, device=device, generator=generator)
        )

    def random_algebra(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Standard-normal entries, shape ``(*batch, *shape)``.

        Example:
            >>> Hadamard((2, 3)).random_algebra(5).shape
            torch.Size([5, 2, 3])
        """
        batch = check_batch(batch)
        return torch.randn(
            *batch, *self.shape, dtype=dtype, device=device, generator=generator
        )

    def contains(self, g: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Whether every entry is finite and ``|g_i| > atol`` (default 0), per batch element.

        Example:
            >>> import torch
            >>> Hadamard((2,)).contains(torch.tensor([[1.0, -2.0], [0.0, 1.0]]))
            tensor([ True, False])
        """
        self.check_point(g, "g")
        tol = 0.0 if atol is None else float(atol)
        ok = torch.isfinite(g) & (g.abs() > tol)
        return ok.flatten(start_dim=g.dim() - len(self.shape)).all(dim=-1)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` itself when it is on the group (finite, no zero entry); no clipping.

        The group is open in the ambient space: a point on it is its own projection, and a
        zero entry has no nearest non-zero number, so it is refused rather than nudged.

        Raises:
            NonFiniteError: ``g`` has NaN or infinite entries.
            DomainError: ``g`` has exact zeros, naming them.

        Example:
            >>> import torch
            >>> Hadamard((2,)).project(torch.tensor([1.0, -2.0]))
            tensor([ 1., -2.])
        """
        self.check_point(g, "g")
        check_finite(g, "g")
        refuse_zeros(g, "project", "g")
        return g

    def in_identity_component(self, g: torch.Tensor) -> torch.Tensor:
        """Whether every entry is finite and positive (the image of ``exp``), per batch element.

        Example:
            >>> import torch
            >>> Hadamard((2,)).in_identity_component(torch.tensor([1.0, -2.0]))
            tensor(False)
        """
        self.check_point(g, "g")
        ok = torch.isfinite(g) & (g > 0)
        return ok.flatten(start_dim=g.dim() - len(self.shape)).all(dim=-1)

    def check_finite(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise :class:`~liegroup.errors.NonFiniteError` if ``x`` has NaN/inf entries."""
        check_finite(x, name)


def refuse_zeros(g: torch.Tensor, op: str, name: str) -> None:
    """Raise :class:`DomainError` naming the zero entries of ``g`` (0 is not in the group).

    Example:
        >>> import torch
        >>> refuse_zeros(torch.tensor([1.0, -2.0]), "project", "g")
    """
    hit = offending(g == 0)
    if hit is not None:
        count, idx = hit
        raise DomainError(
            f"{op}: {name} has {count} zero entries, e.g. at {idx}; the Hadamard group "
            "excludes 0 and there is no nearest non-zero number to move them to (set those "
            "entries explicitly, choosing a sign and a magnitude, e.g. ±1 or a small value)"
        )
