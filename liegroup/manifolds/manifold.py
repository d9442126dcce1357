"""The :class:`LieGroupManifold` class (see the package docstring for the maps it computes)."""

from __future__ import annotations

from typing import Any

import geoopt
import torch

from liegroup._validation import check_finite, check_tensor, offending
from liegroup.errors import ConfigError, DomainError, OverflowResultError, ShapeError
from liegroup.groups.base import LieGroup
from liegroup.manifolds._kernels import (
    _METRICS,
    _HadamardOps,
    _ops_for,
    _ProductOps,
    _sq_sum,
    step_tolerance,
)

__all__ = ["LieGroupManifold"]



def _check_step(
    M: LieGroupManifold,
    y: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    off: torch.Tensor | None,
) -> None:
    """Raise a typed error if the step ``y = expmap(x, u)`` left the group (see :meth:`expmap`).

    ``off`` marks the points whose ``x·exp(X)`` was too far from the group to re-project
    (:meth:`_Ops.clean_checked`). One host synchronisation per step (eagerly): a diverging
    step is reported at the step that diverged, not thousands of steps later as a NaN loss;
    the diagnosis below runs only on failure.
    """
    bad = ~torch.isfinite(y)
    hadamard = isinstance(M._ops, _HadamardOps)
    if hadamard:
        bad = bad | (y == 0)  # underflow: 0 is not in the group
    if off is not None:
        bad = bad | off[(...,) + (None,) * M.ndim]
    hit = offending(bad)
    if hit is None:
        return
    check_finite(x, "x")
    check_finite(u, "u")
    on, reason = M._ops.on_group(x, step_tolerance(x.dtype), 0.0)
    if not on:
        raise DomainError(
            f"expmap/retr: x is not a point of {M.group!r}: {reason}. The step is defined only "
            "from a point of the group: find where x left it (a point set or loaded by hand?) "
            "or, for a small departure, project it with M.projx(x). The point was not changed"
        )
    count, idx = hit
    if hadamard and bool(torch.isfinite(y).all()):
        raise OverflowResultError(
            f"expmap/retr: the step underflows {y.dtype} to 0 in {count} entries, e.g. at {idx} "
            f"(x·exp(X) is below the smallest positive {y.dtype}; 0 is not in the Hadamard "
            "group and could never move again): the step is far too large. Lower the learning "
            "rate, clip the gradient, or use a wider dtype. The point was not changed"
        )
    if bool(torch.isfinite(y).all()):
        raise DomainError(
            f"expmap/retr: the step lands too far from {M.group!r} to re-project "
            f"(x·exp(X) is off by more than {step_tolerance(y.dtype):.2g}), e.g. at "
            f"{idx}, although x is on the group: the step is too large for {y.dtype}. Lower "
            "the learning rate, or use a wider dtype. The point was not changed"
        )
    raise OverflowResultError(
        f"expmap/retr: the step from a finite point with a finite tangent vector overflows "
        f"{y.dtype} in {count} entries, e.g. at {idx} (the step diverged: x·exp(X) exceeds "
        f"{torch.finfo(y.dtype).max:.3g}); lower the learning rate, clip the gradient, or "
        "use a wider dtype. The point was not changed"
    )


class LieGroupManifold(geoopt.Manifold):  # type: ignore[misc]
    """A :mod:`liegroup` group as a :class:`geoopt.Manifold` (see the module docstring).

    Args:
        group: a group object: ``liegroup.SO(n)``, ``SE(n)``, ``SL(n)``, ``GL(n)``,
            ``Product(...)`` of those, or ``liegroup.Hadamard(shape)``.
        metric: ``"left-invariant"`` (default, every group) or ``"bi-invariant"`` (only where
            one exists; :class:`~liegroup.errors.DomainError` otherwise).

    Points have shape ``(*batch, *point_shape)`` (``point_shape`` is the group's, or
    ``(D,)`` for a product, see :meth:`pack_point`); tangent vectors the same. ``ndim`` is
    ``len(point_shape)``.

    Example:
        >>> import torch, liegroup
        >>> M = LieGroupManifold(liegroup.Hadamard((2, 2)), metric="bi-invariant")
        >>> x = M.random(4, 2, 2, dtype=torch.float64)
        >>> u = M.proju(x, torch.randn(4, 2, 2, dtype=torch.float64))
        >>> y = M.expmap(x, u)
        >>> torch.allclose(M.dist(x, y), M.norm(x, u))
        True
    """

    reversible = True

    def __init__(self, group: LieGroup, metric: str = "left-invariant") -> None:
        super().__init__()
        if metric not in _METRICS:
            raise ConfigError(f"metric must be one of {_METRICS}, got {metric!r}")
        ops = _ops_for(group)
        if metric == "bi-invariant" and not ops.bi_invariant:
            raise DomainError(
                f"{group!r} has no bi-invariant Riemannian metric (only compact groups such as "
                "SO(n), abelian groups such as the Hadamard group, and products of those do); "
                'use metric="left-invariant"'
            )
        self.group = group
        self.metric = metric
        self._ops = ops
        self.point_shape: tuple[int, ...] = ops.point_shape
        self.ndim = len(ops.point_shape)
        self.name = f"LieGroup({group!r}, {metric})"

    def extra_repr(self) -> str:
        """Group and metric, for ``repr``."""
        return f"{self.group!r}, metric={self.metric!r}"

    def __repr__(self) -> str:
        return f"LieGroupManifold({self.group!r}, metric={self.metric!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LieGroupManifold)
            and repr(other.group) == repr(self.group)
            and other.metric == self.metric
        )

    def __hash__(self) -> int:
        return hash(("LieGroupManifold", repr(self.group), self.metric))

    @property
    def is_riemannian_exp(self) -> bool:
        """Whether :meth:`expmap` is the Riemannian exponential (bi-invariant metric).

        Example:
            >>> import liegroup
            >>> LieGroupManifold(liegroup.Hadamard(2), "bi-invariant").is_riemannian_exp
            True
        """
        return self.metric == "bi-invariant"

    # ------------------------------------------------------------------ helpers
    def _dims(self) -> tuple[int, ...]:
        return tuple(range(-self.ndim, 0))

    def _check(self, x: torch.Tensor, name: str) -> None:
        check_tensor(x, name)
        shape = tuple(x.shape)
        if len(shape) < self.ndim or shape[len(shape) - self.ndim :] != self.point_shape:
            raise ShapeError(
                f"{name} must have shape (*batch, {', '.join(map(str, self.point_shape))})"
                f"{',' if self.ndim == 1 else ''} for {self!r}, got {shape}"
            )

    def _log_rel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # log(x⁻¹y), after the same rounding-level clean-up retr applies (one Newton–Schulz
        # step / det rescale), so points on the group to their dtype's rounding are accepted by
        # the group's log, whose default tolerance is 1e4·u; far-off points still raise
        return self._ops.log(self._ops.clean(self._ops.untranslate(x, y)))

    def algebra_part(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The algebra element ``P(x⁻¹u)`` of an ambient vector ``u`` at ``x``.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.algebra_part(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))
            tensor([0.5000, 0.2500])
        """
        self._check(x, "x")
        self._check(u, "u")
        return self._ops.proj_alg(self._ops.untranslate(x, u))

    # ------------------------------------------------------------------ geoopt API
    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        """Whether ``shape`` ends with the point shape (geoopt's shape check)."""
        shape = tuple(shape)
        if len(shape) < self.ndim or shape[len(shape) - self.ndim :] != self.point_shape:
            return False, (
                f"`{name}` must have shape (*batch, {', '.join(map(str, self.point_shape))}) "
                f"on {self!r}, got {shape}"
            )
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        """Whether ``x`` lies on the group to ``atol``/``rtol``, with a reason if not."""
        return self._ops.on_group(x, atol, rtol)

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        """Whether ``x⁻¹u`` lies in the Lie algebra to ``atol``/``rtol``."""
        X = self._ops.untranslate(x, u)
        P = self._ops.proj_alg(X)
        if not torch.allclose(X, P, atol=atol, rtol=rtol):
            return False, f"x⁻¹u is not in the Lie algebra with atol={atol}, rtol={rtol}"
        return True, None

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` onto the group; points already on it come back unchanged.

        Raises:
            NonFiniteError: ``x`` has NaN or infinite entries (on every group).
            DomainError: no projection exists: a zero entry on the Hadamard group (the
                nearest non-zero number would be an arbitrary choice), ``det <= 0`` on
                ``SL(n)``.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.projx(torch.tensor([1.0, -2.0]))
            tensor([ 1., -2.])
        """
        self._check(x, "x")
        check_finite(x, "x")  # no point of any group is non-finite: nothing to project to
        return self._ops.projx(x)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of an ambient ``u`` onto the tangent space: ``x·P(x⁻¹u)``.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> x = torch.tensor([2.0, 3.0])
            >>> torch.equal(M.proju(x, torch.ones(2)), torch.ones(2))
            True
        """
        return self._ops.translate(x, self.algebra_part(x, u))

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient ``x·P(xᵀ·u)`` of a Euclidean gradient ``u`` (for the metric).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.egrad2rgrad(torch.tensor([2.0, 3.0]), torch.ones(2))
            tensor([4., 9.])
        """
        self._check(x, "x")
        self._check(u, "u")
        return self._ops.translate(x, self._ops.proj_alg(self._ops.adjoint(x, u)))

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """Metric ``⟨u, v⟩_x = ⟨x⁻¹u, x⁻¹v⟩_F`` summed over the point dims (kept if ``keepdim``).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.inner(torch.tensor([2.0, 1.0]), torch.tensor([2.0, 3.0]))
            tensor(10.)
        """
        self._check(x, "x")
        self._check(u, "u")
        X = self._ops.untranslate(x, u)
        if v is None:
            return _sq_sum(X, self.ndim, keepdim)
        self._check(v, "v")
        Y = self._ops.untranslate(x, v)
        return (X * Y).sum(dim=self._dims(), keepdim=keepdim)

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``inner(x, u, v, keepdim=True)``: one number per point, as RiemannianAdam expects.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard((2, 2)))
            >>> M.component_inner(torch.ones(5, 2, 2), torch.ones(5, 2, 2)).shape
            torch.Size([5, 1, 1])
        """
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Norm ``‖x⁻¹u‖_F`` of a tangent vector.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.norm(torch.tensor([2.0, 1.0]), torch.tensor([6.0, 4.0]))
            tensor(5.)
        """
        return self.inner(x, u, keepdim=keepdim).sqrt()

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Group-exponential step ``x·exp(P(x⁻¹u))``, re-projected onto the group.

        The Riemannian exponential for the bi-invariant metric, a retraction otherwise.

        ``x`` must be a point of the group. The step is checked with one host synchronisation
        (the same check that catches a diverging step): ``x·exp(X)`` further than
        ``sqrt(default_atol)`` from the group's equations (orthogonality of the rotation
        block, the ``SE`` bottom row, ``det = 1`` for ``SL``) is refused instead of being
        re-projected into some other point. A reflection (orthogonal, ``det = −1``) passed as
        an ``SO(n)`` point is not detected here; :meth:`check_point_on_manifold` reports it.

        Raises:
            DomainError: ``x`` is not a point of the group (off its equations as above,
                singular for ``GL``/``SL``, a zero entry for the Hadamard group).
            OverflowResultError: the step leaves the dtype's range (a diverging step, e.g.
                ``x·exp(X)`` on the Hadamard group for a large ``X``, or one that underflows
                an entry to 0, which the Hadamard group excludes: the learning rate is too
                high). Nothing is returned, so an optimiser's parameter keeps its previous
                value. Under ``torch.compile`` the check is an in-graph assertion.
            NonFiniteError: ``x`` or ``u`` is not finite.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.expmap(torch.tensor([2.0]), torch.tensor([0.0]))
            tensor([2.])
        """
        X = self.algebra_part(x, u)
        y, off = self._ops.clean_checked(self._ops.translate(x, self._ops.exp(X)))
        _check_step(self, y, x, u, off)
        return y

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction: the same as :meth:`expmap` (it lands on the group to rounding).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.retr(torch.tensor([-2.0]), torch.tensor([-2.0]))
            tensor([-5.4366])
        """
        return self.expmap(x, u)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x·log(x⁻¹y)`` with the group's principal log (inverse of :meth:`expmap`).

        Raises:
            DomainError: where ``x⁻¹y`` is outside the principal log's domain.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.logmap(torch.tensor([2.0]), torch.tensor([2.0]))
            tensor([0.])
        """
        self._check(x, "x")
        self._check(y, "y")
        return self._ops.translate(x, self._log_rel(x, y))

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """``‖log(x⁻¹y)‖_F``: geodesic distance for the bi-invariant metric (see module doc).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.dist(torch.tensor([1.0]), torch.tensor([4.0]).sqrt())
            tensor(0.6931)
        """
        self._check(x, "x")
        self._check(y, "y")
        return _sq_sum(self._log_rel(x, y), self.ndim, keepdim).sqrt()

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport by left translation ``y·P(x⁻¹v)`` (projects ``v`` at ``x`` first).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.transp(torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]))
            tensor([6.])
        """
        self._check(y, "y")
        return self._ops.translate(y, self.algebra_part(x, v))

    def retr_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(retr(x, u), transp(x, retr(x, u), v))`` in one pass.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.retr_transp(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]))
            (tensor([1.]), tensor([2.]))
        """
        y = self.retr(x, u)
        return y, self._ops.translate(y, self.algebra_part(x, v))

    expmap_transp = retr_transp

    def transp_follow_retr(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Transport ``v`` from ``x`` to ``retr(x, u)``.

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.transp_follow_retr(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]))
            tensor([2.])
        """
        return self.retr_transp(x, u, v)[1]

    transp_follow_expmap = transp_follow_retr

    # ------------------------------------------------------------------ sampling
    def _batch(self, size: tuple[Any, ...]) -> tuple[int, ...]:
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        shape = tuple(int(s) for s in size)
        ok, reason = self._check_shape(shape, "size")
        if not ok:
            raise ShapeError(str(reason))
        return shape[: len(shape) - self.ndim]

    def random(
        self,
        *size: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> geoopt.ManifoldTensor:
        """Random point(s) from the group's sampler; ``size`` is the full shape (geoopt's rule).

        Example:
            >>> import liegroup
            >>> LieGroupManifold(liegroup.Hadamard(3)).random(2, 3).shape
            torch.Size([2, 3])
        """
        batch = self._batch(size)
        x = self._ops.random(batch, dtype, device, generator)
        return geoopt.ManifoldTensor(x, manifold=self)

    def origin(
        self,
        *size: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> geoopt.ManifoldTensor:
        """The identity element, repeated; ``size`` is the full shape (``seed`` is unused).

        Example:
            >>> import liegroup
            >>> LieGroupManifold(liegroup.Hadamard(2)).origin(3, 2).tolist()
            [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
        """
        del seed
        batch = self._batch(size)
        return geoopt.ManifoldTensor(self._ops.identity(batch, dtype, device), manifold=self)

    # ------------------------------------------------------------------ products
    def pack_point(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Pack one point per product factor into the flat layout (identity for other groups).

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.pack_point(torch.ones(2))
            tensor([1., 1.])
        """
        if not isinstance(self._ops, _ProductOps):
            if len(tensors) != 1:
                raise ConfigError(f"1 tensor expected for {self!r}, got {len(tensors)}")
            return tensors[0]
        ops = self._ops
        if len(tensors) != len(ops.factors):
            raise ConfigError(f"{len(ops.factors)} tensors expected, got {len(tensors)}")
        for i, (t, f) in enumerate(zip(tensors, ops.factors, strict=True)):
            check_tensor(t, f"tensors[{i}]")
            shp = tuple(t.shape)
            if shp[len(shp) - len(f.point_shape) :] != f.point_shape:
                raise ShapeError(
                    f"tensors[{i}] must have shape (*batch, *{f.point_shape}), got {shp}"
                )
        return ops.join(list(tensors))

    def unpack_tensor(self, tensor: torch.Tensor) -> Any:
        """Split a packed product point into one tensor per factor (identity otherwise).

        Example:
            >>> import torch, liegroup
            >>> LieGroupManifold(liegroup.Hadamard(2)).unpack_tensor(torch.ones(2))
            tensor([1., 1.])
        """
        if not isinstance(self._ops, _ProductOps):
            return tensor
        self._check(tensor, "tensor")
        return tuple(self._ops.split(tensor))


