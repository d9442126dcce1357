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

import torch

from liegroup._validation import check_tensor, check_trailing_shape

__all__ = ["LieGroup"]


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
