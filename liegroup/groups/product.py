"""Direct products ``G₁ × G₂ × ⋯`` of groups, acting mode-wise on tensors (Tucker form).

Points and algebra elements of ``Product(G₁, …, G_m)`` are **tuples of tensors**
``(g₁, …, g_m)`` (lists are accepted as input), one per factor, each with that factor's shape
and a common (broadcastable) batch shape. Every operation is component-wise: ``compose``,
``inverse``, ``exp``, ``log``, ``bracket``, ``Ad`` apply each factor's method to its own
component; ``contains`` is the conjunction; ``hat``/``vee`` concatenate the factors' coordinate
vectors in order.

The action on a tensor ``T`` applies factor ``i`` (a matrix group) to mode ``modes[i]``
(default ``i``): ``act(g, T) = T ×_{m₁} g₁ ×_{m₂} g₂ ⋯`` (see
:func:`liegroup.tensor.multi_mode_product`).
A product of ``SO(I_k)`` acting on every mode of ``T`` changes neither the singular values of
any unfolding nor the Frobenius norm (orthogonal fine-tuning of tensors).

Example:
    >>> import torch, liegroup
    >>> P = liegroup.Product(liegroup.SO(2), liegroup.SO(3))
    >>> g = P.random(dtype=torch.float64)
    >>> T = torch.randn(2, 3, dtype=torch.float64)
    >>> bool(torch.allclose(torch.linalg.svdvals(P.act(g, T)), torch.linalg.svdvals(T)))
    True
"""

from __future__ import annotations

import torch

from liegroup import tensor as _tensor
from liegroup._validation import check_tensor
from liegroup.errors import DTypeError, ShapeError
from liegroup.groups.base import LieGroup

__all__ = ["Product"]

Point = tuple[torch.Tensor, ...]


class Product(LieGroup):
    """Direct product of groups; points are tuples of tensors, one per factor.

    ``point_shape`` and ``algebra_shape`` are tuples of the factors' shapes; ``dim`` is the sum.

    Args:
        *factors: at least one :class:`~liegroup.groups.base.LieGroup`.

    Example:
        >>> import torch, liegroup
        >>> P = liegroup.Product(liegroup.SO(3), liegroup.SE(2))
        >>> P.dim
        6
        >>> e = P.identity(dtype=torch.float64)
        >>> [x.shape for x in P.compose(e, e)]
        [torch.Size([3, 3]), torch.Size([3, 3])]
    """

    def __init__(self, *factors: LieGroup) -> None:
        if not factors:
            raise ShapeError("Product needs at least one factor group")
        for i, G in enumerate(factors):
            if not isinstance(G, LieGroup):
                raise DTypeError(f"factor {i} must be a LieGroup, got {type(G).__name__}")
        self.factors: tuple[LieGroup, ...] = tuple(factors)
        self.point_shape = tuple(G.point_shape for G in factors)  # type: ignore[misc]
        self.algebra_shape = tuple(G.algebra_shape for G in factors)  # type: ignore[misc]
        self.dim = sum(G.dim for G in factors)

    def __repr__(self) -> str:
        return f"Product({', '.join(map(repr, self.factors))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Product) and other.factors == self.factors

    def __hash__(self) -> int:
        return hash(("Product", self.factors))

    def _split(self, g: object, name: str) -> Point:
        if isinstance(g, torch.Tensor) or not isinstance(g, (tuple, list)):
            raise DTypeError(
                f"{name} must be a tuple (or list) of {len(self.factors)} tensors, one per "
                f"factor, got {type(g).__name__}"
            )
        if len(g) != len(self.factors):
            raise ShapeError(
                f"{name} has {len(g)} components but the product has {len(self.factors)} factors"
            )
        return tuple(g)

    # ------------------------------------------------------------------ structure
    def identity(  # type: ignore[override]
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Point:
        """Tuple of the factors' identities.

        Example:
            >>> import liegroup
            >>> len(liegroup.Product(liegroup.SO(2), liegroup.SO(2)).identity())
            2
        """
        return tuple(G.identity(*batch, dtype=dtype, device=device) for G in self.factors)

    def compose(self, g: Point, h: Point) -> Point:  # type: ignore[override]
        """Component-wise product ``(g_i·h_i)``."""
        g, h = self._split(g, "g"), self._split(h, "h")
        return tuple(G.compose(a, b) for G, a, b in zip(self.factors, g, h, strict=True))

    def inverse(self, g: Point) -> Point:  # type: ignore[override]
        """Component-wise inverse."""
        g = self._split(g, "g")
        return tuple(G.inverse(a) for G, a in zip(self.factors, g, strict=True))

    def exp(self, X: Point) -> Point:  # type: ignore[override]
        """Component-wise exponential."""
        X = self._split(X, "X")
        return tuple(G.exp(a) for G, a in zip(self.factors, X, strict=True))

    def log(self, g: Point) -> Point:  # type: ignore[override]
        """Component-wise principal logarithm (``DomainError`` if any factor's is undefined)."""
        g = self._split(g, "g")
        return tuple(G.log(a) for G, a in zip(self.factors, g, strict=True))

    def bracket(self, X: Point, Y: Point) -> Point:  # type: ignore[override]
        """Component-wise bracket (factors commute with each other)."""
        X, Y = self._split(X, "X"), self._split(Y, "Y")
        return tuple(G.bracket(a, b) for G, a, b in zip(self.factors, X, Y, strict=True))

    def Ad(self, g: Point, X: Point) -> Point:  # type: ignore[override]
        """Component-wise adjoint action."""
        g, X = self._split(g, "g"), self._split(X, "X")
        return tuple(G.Ad(a, b) for G, a, b in zip(self.factors, g, X, strict=True))

    def act(self, g: Point, T: torch.Tensor, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
        """Tucker-style action: factor ``i`` multiplies mode ``modes[i]`` of ``T``.

        The keyword ``modes`` gives the distinct modes (default ``0, …, m−1``).

        Args:
            g: point ``(g_1, …, g_m)``; every factor must act by a mode product (matrix groups).
            T: tensor; with batched ``g`` (batch shape ``B``), ``T`` is ``(*B', *tensor_shape)``
                with ``len(B') == len(B)``, as in :meth:`MatrixLieGroup.act`.
            **kwargs: ``modes``, as above.

        Example:
            >>> import torch, liegroup
            >>> P = liegroup.Product(liegroup.SO(2), liegroup.SO(3))
            >>> T = torch.randn(2, 3)
            >>> torch.allclose(P.act(P.identity(), T), T)
            True
        """
        modes_arg = kwargs.pop("modes", None)
        if kwargs:
            raise DTypeError(f"Product.act takes only modes=..., got {sorted(kwargs)}")
        g = self._split(g, "g")
        check_tensor(T, "T")
        modes = list(range(len(self.factors))) if modes_arg is None else list(modes_arg)  # type: ignore[call-overload]
        if len(modes) != len(self.factors):
            raise ShapeError(f"got {len(modes)} modes for {len(self.factors)} factors")
        for G, a in zip(self.factors, g, strict=True):
            G.check_point(a, "g[i]")
        if all(a.dim() == 2 for a in g):
            return _tensor.multi_mode_product(T, list(g), modes)
        nb = max(a.dim() - 2 for a in g)
        # give every component the same number of batch dims, so modes index T's tensor modes
        g = tuple(a.reshape(*([1] * (nb - a.dim() + 2)), *a.shape) for a in g)
        order = T.dim() - nb
        norm = [m % order if -order <= m < order else m for m in modes]
        if len(set(norm)) != len(norm):
            raise ShapeError(f"modes must be distinct, got {modes}")
        out = T
        for G, a, m in zip(self.factors, g, modes, strict=True):
            out = G.act(a, out, mode=m)
        return out

    def random(  # type: ignore[override]
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Point:
        """Tuple of the factors' random points."""
        return tuple(
            G.random(*batch, dtype=dtype, device=device, generator=generator) for G in self.factors
        )

    def random_algebra(  # type: ignore[override]
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Point:
        """Tuple of the factors' random algebra elements."""
        return tuple(
            G.random_algebra(*batch, dtype=dtype, device=device, generator=generator)
            for G in self.factors
        )

    def contains(self, g: Point, atol: float | None = None) -> torch.Tensor:  # type: ignore[override]
        """Conjunction of the factors' ``contains`` (broadcast over the batch)."""
        g = self._split(g, "g")
        out = [G.contains(a, atol=atol) for G, a in zip(self.factors, g, strict=True)]
        res = out[0]
        for o in out[1:]:
            res = res & o
        return res

    def check_point(self, g: Point, name: str = "g") -> tuple[int, ...]:  # type: ignore[override]
        """Validate every component; return the broadcast batch shape."""
        g = self._split(g, name)
        shapes = [
            G.check_point(a, f"{name}[{i}]")
            for i, (G, a) in enumerate(zip(self.factors, g, strict=True))
        ]
        return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))

    def check_algebra(self, X: Point, name: str = "X") -> tuple[int, ...]:  # type: ignore[override]
        """Validate every component; return the broadcast batch shape."""
        X = self._split(X, name)
        shapes = [
            G.check_algebra(a, f"{name}[{i}]")
            for i, (G, a) in enumerate(zip(self.factors, X, strict=True))
        ]
        return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))

    # ------------------------------------------------------------------ coordinates
    def hat(self, v: torch.Tensor) -> Point:
        """Split ``(*batch, dim)`` into the factors' coordinates and ``hat`` each.

        Example:
            >>> import torch, liegroup
            >>> P = liegroup.Product(liegroup.SO(2), liegroup.SO(3))
            >>> [x.shape for x in P.hat(torch.zeros(4))]
            [torch.Size([2, 2]), torch.Size([3, 3])]
        """
        check_tensor(v, "v")
        if v.dim() < 1 or v.shape[-1] != self.dim:
            raise ShapeError(f"v must have shape (*batch, {self.dim}), got {tuple(v.shape)}")
        out, i = [], 0
        for G in self.factors:
            out.append(G.hat(v[..., i : i + G.dim]))  # type: ignore[attr-defined]
            i += G.dim
        return tuple(out)

    def vee(self, X: Point) -> torch.Tensor:
        """Concatenate the factors' ``vee`` coordinates.

        Example:
            >>> import torch, liegroup
            >>> P = liegroup.Product(liegroup.SO(2), liegroup.SO(3))
            >>> P.vee(P.hat(torch.arange(4.0)))
            tensor([0., 1., 2., 3.])
        """
        X = self._split(X, "X")
        vs = [G.vee(a) for G, a in zip(self.factors, X, strict=True)]  # type: ignore[attr-defined]
        batch = torch.broadcast_shapes(*[v.shape[:-1] for v in vs])
        return torch.cat([v.expand(*batch, v.shape[-1]) for v in vs], dim=-1)

    def project(self, g: Point) -> Point:
        """Component-wise projection onto each factor."""
        g = self._split(g, "g")
        return tuple(G.project(a) for G, a in zip(self.factors, g, strict=True))  # type: ignore[attr-defined]

    def project_algebra(self, X: Point) -> Point:
        """Component-wise projection onto each factor's algebra."""
        X = self._split(X, "X")
        return tuple(
            G.project_algebra(a)  # type: ignore[attr-defined]
            for G, a in zip(self.factors, X, strict=True)
        )
