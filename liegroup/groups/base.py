"""The :class:`LieGroup` interface every group of the library implements.

A group object describes *one* Lie group (e.g. ``SO(3)``, or the Hadamard group of tensors of
shape ``(64, 64, 3, 3)``); its elements and algebra elements are plain tensors. Every method is
batched over leading dimensions: a point has shape ``(*batch, *point_shape)`` and an algebra
element ``(*batch, *algebra_shape)``; batch shapes broadcast. Methods are differentiable with
autograd, and keep the dtype and device of their inputs.

Example:
    >>> import torch, liegroup
    >>> G = liegroup.Hadamard((2, 3))
    >>> g = G.exp(G.random_algebra(4, dtype=torch.float64))
    >>> bool(G.contains(G.compose(g, G.inverse(g))).all())
    True
"""

from __future__ import annotations

import abc
import operator

import torch

from liegroup._validation import check_tensor, check_trailing_shape
from liegroup.errors import DTypeError, ShapeError

__all__ = ["LieGroup", "broadcast_batch", "check_batch", "where_batch"]


def check_batch(batch: tuple[object, ...]) -> tuple[int, ...]:
    """Return ``batch`` as a tuple of non-negative ints, else raise a typed error.

    Raises:
        DTypeError: an entry is not an integer.
        ShapeError: an entry is negative.

    Example:
        >>> check_batch((2, 3))
        (2, 3)
    """
    out = []
    for b in batch:
        try:
            i = operator.index(b)  # type: ignore[arg-type]
        except TypeError:
            raise DTypeError(
                f"batch sizes must be ints, got {type(b).__name__} {b!r} in {batch}"
            ) from None
        if isinstance(b, bool) or i < 0:
            raise ShapeError(
                f"batch sizes must be non-negative ints, got {b!r} in {batch}; pass the batch "
                "shape as separate ints, e.g. G.identity(4, 2)"
            )
        out.append(i)
    return tuple(out)


def broadcast_batch(
    a: torch.Tensor, b: torch.Tensor, ndim: int, names: tuple[str, str]
) -> tuple[int, ...]:
    """Broadcast the batch shapes of ``a`` and ``b`` (all but their last ``ndim`` dims).

    Raises:
        ShapeError: the batch shapes do not broadcast, naming both.

    Example:
        >>> import torch
        >>> broadcast_batch(torch.ones(4, 1, 2), torch.ones(3, 2), 1, ("g", "h"))
        (4, 3)
    """
    ba, bb = a.shape[: a.dim() - ndim], b.shape[: b.dim() - ndim]
    try:
        return tuple(torch.broadcast_shapes(ba, bb))
    except RuntimeError:
        raise ShapeError(
            f"the batch shapes of {names[0]} {tuple(ba)} and {names[1]} {tuple(bb)} do not "
            "broadcast (each dimension must be equal or 1); reshape or index one of them"
        ) from None


def where_batch(idx: list[list[int]]) -> str:
    """Where the failing points are, as a phrase to append to an error message.

    ``idx`` comes from :func:`liegroup._validation.offending` on a per-point mask; for an
    unbatched input (empty indices) the phrase says so instead of printing ``[[]]``.

    Example:
        >>> where_batch([[0], [2]]), where_batch([[]])
        (', e.g. at batch index [[0], [2]]', ' (the input is unbatched)')
    """
    if all(len(i) == 0 for i in idx):
        return " (the input is unbatched)"
    return f", e.g. at batch index {idx}"


class LieGroup(abc.ABC):
    """Abstract Lie group ``G`` with Lie algebra ``g``, acting on tensors.

    Subclasses set :attr:`point_shape`, :attr:`algebra_shape` and :attr:`dim` and implement the
    abstract methods, whose docstrings state the math they compute.
    """

    #: shape of one group element (e.g. ``(n, n)`` for matrix groups)
    point_shape: tuple[int, ...]
    #: shape of one Lie-algebra element (matrix form for matrix groups)
    algebra_shape: tuple[int, ...]
    #: dimension of the group as a manifold (= dimension of the algebra as a vector space)
    dim: int

    # ------------------------------------------------------------------ structure
    @abc.abstractmethod
    def identity(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Identity element ``e``, repeated over ``batch``: shape ``(*batch, *point_shape)``."""

    @abc.abstractmethod
    def compose(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Group product ``g·h`` (batch shapes broadcast)."""

    @abc.abstractmethod
    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Group inverse ``g⁻¹`` with ``g·g⁻¹ = e``."""

    @abc.abstractmethod
    def exp(self, X: torch.Tensor) -> torch.Tensor:
        """Group exponential ``exp: g → G``, ``exp(X) = Σ_j X^j / j!`` for matrix groups."""

    @abc.abstractmethod
    def log(self, g: torch.Tensor) -> torch.Tensor:
        """Principal logarithm, the inverse of :meth:`exp` on its domain.

        Raises:
            DomainError: (a ``ValueError``) for a point outside the domain of the principal log.
        """

    @abc.abstractmethod
    def bracket(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Lie bracket ``[X, Y]`` (``XY − YX`` for matrix algebras)."""

    @abc.abstractmethod
    def Ad(self, g: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Adjoint action ``Ad_g X = d/dt (g·exp(tX)·g⁻¹)|_{t=0}`` (``g X g⁻¹`` for matrices)."""

    @abc.abstractmethod
    def act(self, g: torch.Tensor, T: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Action of ``g`` on a tensor ``T`` (element-wise product, mode-k product, ...)."""

    @abc.abstractmethod
    def random(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Random group element(s) of shape ``(*batch, *point_shape)``."""

    @abc.abstractmethod
    def random_algebra(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Random Lie-algebra element(s) of shape ``(*batch, *algebra_shape)``."""

    @abc.abstractmethod
    def contains(self, g: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Boolean tensor of shape ``batch``: whether each point lies on the group (to ``atol``)."""

    # ------------------------------------------------------------------ helpers
    def check_point(self, g: torch.Tensor, name: str = "g") -> tuple[int, ...]:
        """Validate dtype and trailing shape of a point; return its batch shape."""
        check_tensor(g, name)
        return check_trailing_shape(g, self.point_shape, name)

    def check_algebra(self, X: torch.Tensor, name: str = "X") -> tuple[int, ...]:
        """Validate dtype and trailing shape of an algebra element; return its batch shape."""
        check_tensor(X, name)
        return check_trailing_shape(X, self.algebra_shape, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(point_shape={self.point_shape}, dim={self.dim})"
