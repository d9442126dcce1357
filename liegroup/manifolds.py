"""Every :mod:`liegroup` group as a :class:`geoopt.Manifold`, for Riemannian optimisation.

``LieGroupManifold(G)`` lets ``geoopt.ManifoldParameter`` + ``RiemannianSGD`` /
``RiemannianAdam`` optimise directly on ``SO(n)``, ``SE(n)``, ``SL(n)``, ``GL(n)``, direct
products and the Hadamard group. Points are stored in ambient coordinates (matrices for matrix
groups, the tensor itself for the Hadamard group); a tangent vector at ``x`` is stored in the
same coordinates as ``u = x·X`` with ``X`` in the Lie algebra (``x @ X`` for matrices, ``x ⊙ X``
for the Hadamard group).

Metric. With ``⟨·,·⟩_F`` the Frobenius inner product on the algebra,

* ``"left-invariant"`` (default, every group): ``⟨x·X, x·Y⟩_x = ⟨X, Y⟩_F``;
* ``"bi-invariant"``: the same formula, accepted only where it is also right-invariant
  (``Ad``-invariant): ``SO(n)``, abelian groups (the Hadamard group, ``SO(2)``, ``GL(1)``,
  ``SE(1)``) and products of those. ``GL(n)``, ``SL(n)``, ``SE(n)`` (n ≥ 2) have no
  bi-invariant metric; asking for one raises :class:`~liegroup.errors.DomainError`.

Maps (``P`` the Frobenius-orthogonal projection of ambient matrices onto the algebra):

* ``proju(x, u) = x·P(x⁻¹u)`` (orthogonal in the metric at ``x``), idempotent;
* ``egrad2rgrad(x, G) = x·P(xᵀG)`` (``x ⊙ x ⊙ G`` for the Hadamard group): the Riemannian
  gradient, i.e. the tangent ``r`` with ``⟨r, v⟩_x = ⟨G, v⟩_F`` for every tangent ``v``;
* ``expmap(x, u) = retr(x, u) = x·exp(P(x⁻¹u))``, the *group* exponential of the
  left-translated direction, followed by a cheap re-projection onto the group that changes a
  point already on the group only at rounding level (``SO``/``SE``: one Newton–Schulz step on
  the rotation block and an exact bottom row; ``SL``: ``det`` rescaling), so that hundreds of
  steps accumulate no drift. For the bi-invariant metric this *is* the Riemannian exponential;
  for a left-invariant metric on ``GL``/``SL``/``SE`` it is a retraction, not the geodesic;
* ``logmap(x, y) = x·log(x⁻¹y)`` (principal log; it inverts ``expmap`` where that is
  injective). ``x⁻¹y`` gets the same rounding-level clean-up as ``retr``, then the group's
  ``log``, which accepts points on the group to ``1e4·u`` of their dtype and raises
  :class:`~liegroup.errors.DomainError` for points further off (``projx`` them first);
* ``dist(x, y) = ‖log(x⁻¹y)‖_F``: the length of the one-parameter-subgroup curve
  ``t ↦ x·exp(t·log(x⁻¹y))``. With the bi-invariant metric it is the geodesic distance; with a
  left-invariant metric on a non-compact group it is an upper bound on the Riemannian distance
  (symmetric and left-invariant, but the triangle inequality is not guaranteed);
* ``transp(x, y, v) = y·P(x⁻¹v)``: left translation (an isometry of both metrics), after
  projecting ``v`` on the tangent space at ``x``; ``retr``/``expmap`` project their direction
  too, because ``RiemannianSGD`` seeds its momentum buffer with a raw Euclidean gradient;
* ``projx``: projection onto the group, exact identity on points already there
  (``SO``: polar factor; ``SE``: polar factor of the rotation block, exact bottom row; ``SL``:
  ``x / det(x)^{1/n}``; ``GL`` and the Hadamard group are open sets: identity).

The Hadamard group's manifold is the whole group (tensors without zero entries); every
connected component (sign pattern) is preserved exactly by ``retr``, and ``random``/``origin``
give points of the identity component (all entries positive). ``logmap``/``dist`` between
points with different sign patterns raise :class:`~liegroup.errors.DomainError`.

geoopt's ``RiemannianAdam`` keeps one second-moment scalar per point (``component_inner``),
not one per coordinate: its ``lr`` is a step length in the algebra's Frobenius norm.

A direct product ``Product(G1, G2, ...)`` is packed as geoopt's own product manifold does: a
point is the flat concatenation of its factors' points, shape ``(*batch, D)`` with ``D`` the sum
of their sizes; :meth:`LieGroupManifold.pack_point` / :meth:`LieGroupManifold.unpack_tensor`
convert.

Saving. ``module.state_dict()`` already holds plain tensors (``Module.state_dict`` detaches,
and a detached ``ManifoldParameter`` is a plain ``torch.Tensor``), and optimizer state dicts of
``RiemannianSGD``/``RiemannianAdam`` hold plain tensors too, so both round-trip under
``torch.load(..., weights_only=True)``. What does *not* is pickling a ``ManifoldTensor`` or
``ManifoldParameter`` itself (``torch.save(param)``, ``state_dict(keep_vars=True)``, a custom dict
of parameters): use :func:`plain_state_dict` on such objects, and
:func:`check_manifold_parameters` after ``load_state_dict`` to verify that every loaded point is
on its group.

Example:
    >>> import torch, geoopt, liegroup
    >>> from liegroup.manifolds import LieGroupManifold
    >>> M = LieGroupManifold(liegroup.Hadamard((3,)))
    >>> x = geoopt.ManifoldParameter(M.origin(3, dtype=torch.float64), manifold=M)
    >>> opt = geoopt.optim.RiemannianAdam([x], lr=0.1)
    >>> target = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    >>> for _ in range(300):
    ...     opt.zero_grad()
    ...     loss = ((x - target) ** 2).sum()
    ...     loss.backward()
    ...     opt.step()
    >>> torch.allclose(x.detach(), target, atol=1e-3)
    True
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from typing import Any

import geoopt
import torch

from liegroup._validation import check_tensor
from liegroup.errors import DomainError, DTypeError, ShapeError
from liegroup.groups.base import LieGroup

__all__ = [
    "LieGroupManifold",
    "check_manifold_parameters",
    "load_optimizer_state_dict",
    "plain_state_dict",
]

_METRICS = ("left-invariant", "bi-invariant")
# Newton–Schulz sweeps allowed in SO/SE projx before falling back to the SVD polar factor.
_NS_MAX_SWEEPS = 8


def _sq_sum(X: torch.Tensor, ndim: int, keepdim: bool) -> torch.Tensor:
    """Sum of squares over the trailing ``ndim`` dimensions."""
    return (X * X).sum(dim=tuple(range(-ndim, 0)), keepdim=keepdim)


def _mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------------- kernels
class _Ops:
    """The kernels a manifold needs from one group (private; one subclass per group family).

    ``translate(x, X) = x·X``; ``untranslate(x, u) = x⁻¹u``; ``adjoint(x, G)`` is the Frobenius
    adjoint of ``X ↦ x·X`` (``xᵀG``); ``proj_alg`` the Frobenius-orthogonal projection onto
    the algebra; ``clean`` a cheap re-projection of a point that is on the group up to
    accumulated rounding; ``projx`` the projection onto the group; ``on_group`` a check with a
    reason.
    """

    point_shape: tuple[int, ...]
    bi_invariant: bool

    def __init__(self, group: LieGroup) -> None:
        self.group = group
        self.point_shape = tuple(group.point_shape)

    # defaults for matrix groups
    def translate(self, x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return x @ X

    def untranslate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(x, u)

    def adjoint(self, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return _mT(x) @ G

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exp(self, X: torch.Tensor) -> torch.Tensor:
        return self.group.exp(X)

    def log(self, g: torch.Tensor) -> torch.Tensor:
        return self.group.log(g)

    def clean(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        raise NotImplementedError

    def identity(
        self, batch: tuple[int, ...], dtype: torch.dtype | None, device: Any
    ) -> torch.Tensor:
        return self.group.identity(*batch, dtype=dtype, device=device)

    def random(
        self,
        batch: tuple[int, ...],
        dtype: torch.dtype | None,
        device: Any,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return self.group.random(*batch, dtype=dtype, device=device, generator=generator)


class _HadamardOps(_Ops):
    bi_invariant = True  # abelian

    def translate(self, x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return x * X

    def untranslate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u / x

    def adjoint(self, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return x * G

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def exp(self, X: torch.Tensor) -> torch.Tensor:
        return torch.exp(X)

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        if not bool(torch.isfinite(x).all()):
            return False, "the point has NaN or infinite entries"
        if bool((x == 0).any()):
            return False, "the point has zero entries (the Hadamard group excludes them)"
        return True, None


class _SOOps(_Ops):
    def __init__(self, group: LieGroup) -> None:
        super().__init__(group)
        self.n = self.point_shape[-1]
        self.bi_invariant = True

    def untranslate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _mT(x) @ u

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        return 0.5 * (X - _mT(X))

    def clean(self, y: torch.Tensor) -> torch.Tensor:
        return _newton_schulz(y)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return _project_so(x)

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        return _check_rotation(x, atol, rtol)


class _SEOps(_Ops):
    """SE(n) as ``(n+1)×(n+1)`` matrices ``[[R, t], [0, 1]]``."""

    def __init__(self, group: LieGroup) -> None:
        super().__init__(group)
        self.n = self.point_shape[-1] - 1
        self.bi_invariant = self.n == 1  # SE(1) ≅ (R, +) is abelian

    def untranslate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n = self.n
        R, t = x[..., :n, :n], x[..., :n, n:]
        Rt = _mT(R)
        top = torch.cat([Rt, -(Rt @ t)], dim=-1)
        bottom = torch.zeros_like(x[..., n:, :])
        bottom[..., 0, n] = 1
        return torch.cat([top, bottom], dim=-2) @ u

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        n = self.n
        W = X[..., :n, :n]
        top = torch.cat([0.5 * (W - _mT(W)), X[..., :n, n:]], dim=-1)
        return torch.cat([top, torch.zeros_like(X[..., n:, :])], dim=-2)

    def _assemble(self, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = self.n
        bottom = torch.zeros(*R.shape[:-2], 1, n + 1, dtype=R.dtype, device=R.device)
        bottom[..., 0, n] = 1
        return torch.cat([torch.cat([R, t], dim=-1), bottom], dim=-2)

    def clean(self, y: torch.Tensor) -> torch.Tensor:
        n = self.n
        return self._assemble(_newton_schulz(y[..., :n, :n]), y[..., :n, n:])

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n
        return self._assemble(_project_so(x[..., :n, :n]), x[..., :n, n:])

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        n = self.n
        bottom = x[..., n, :]
        want = torch.zeros_like(bottom)
        want[..., n] = 1
        if not torch.allclose(bottom, want, atol=atol, rtol=rtol):
            return False, f"the bottom row is not (0, ..., 0, 1) with atol={atol}, rtol={rtol}"
        return _check_rotation(x[..., :n, :n], atol, rtol)


class _SLOps(_Ops):
    def __init__(self, group: LieGroup) -> None:
        super().__init__(group)
        self.n = self.point_shape[-1]
        self.bi_invariant = self.n == 1

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        tr = torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)
        return X - (tr / self.n)[..., None, None] * _eye_like(X)

    def clean(self, y: torch.Tensor) -> torch.Tensor:
        # det(y) = 1 + O(u) here, so the positive real root is the right one.
        d = torch.linalg.det(y)
        return y / d.abs().pow(1.0 / self.n)[..., None, None]

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        sign, logabs = torch.linalg.slogdet(x)  # no overflow for large n
        ok = (sign > 0) & torch.isfinite(logabs)
        if not bool(ok.all()):
            bad = (~ok).nonzero()[:5].tolist()
            raise DomainError(
                f"cannot project onto SL({self.n}): det <= 0 (or NaN) at batch indices {bad}; "
                "rescaling by a positive number cannot make the determinant 1 there"
            )
        return x * torch.exp(-logabs / self.n)[..., None, None]

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        d = torch.linalg.det(x)
        if not torch.allclose(d, torch.ones_like(d), atol=atol, rtol=rtol):
            return False, f"det(x) != 1 with atol={atol}, rtol={rtol}"
        return True, None


class _GLOps(_Ops):
    def __init__(self, group: LieGroup) -> None:
        super().__init__(group)
        self.n = self.point_shape[-1]
        self.bi_invariant = self.n == 1

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        if not bool(torch.isfinite(x).all()):
            return False, "the point has NaN or infinite entries"
        s = torch.linalg.svdvals(x)
        if not bool((s[..., -1] > atol * s[..., 0]).all()):
            return False, f"x is singular (smallest singular value <= {atol}·largest)"
        return True, None


class _ProductOps(_Ops):
    """A direct product, packed flat: ``(*batch, D)`` with ``D = Σ numel(point_shape_i)``."""

    def __init__(self, group: LieGroup, factors: list[LieGroup]) -> None:
        self.group = group
        self.factors = [_ops_for(g) for g in factors]
        self.sizes = [math.prod(f.point_shape) for f in self.factors]
        self.point_shape = (sum(self.sizes),)
        self.bi_invariant = all(f.bi_invariant for f in self.factors)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = torch.split(x, self.sizes, dim=-1)
        return [
            p.reshape(*p.shape[:-1], *f.point_shape)
            for p, f in zip(parts, self.factors, strict=True)
        ]

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.broadcast_shapes(
            *(p.shape[: p.dim() - len(f.point_shape)] for p, f in zip(parts, self.factors,
                                                                     strict=True))
        )
        flat = [
            p.expand(*batch, *f.point_shape).reshape(*batch, -1)
            for p, f in zip(parts, self.factors, strict=True)
        ]
        return torch.cat(flat, dim=-1)

    def _map1(self, fn: Callable[[_Ops, torch.Tensor], torch.Tensor], x: torch.Tensor
              ) -> torch.Tensor:
        return self.join([fn(f, p) for f, p in zip(self.factors, self.split(x), strict=True)])

    def _map2(
        self,
        fn: Callable[[_Ops, torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        return self.join(
            [fn(f, a, b) for f, a, b in zip(self.factors, self.split(x), self.split(y),
                                             strict=True)]
        )

    def translate(self, x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return self._map2(lambda f, a, b: f.translate(a, b), x, X)

    def untranslate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._map2(lambda f, a, b: f.untranslate(a, b), x, u)

    def adjoint(self, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return self._map2(lambda f, a, b: f.adjoint(a, b), x, G)

    def proj_alg(self, X: torch.Tensor) -> torch.Tensor:
        return self._map1(lambda f, a: f.proj_alg(a), X)

    def exp(self, X: torch.Tensor) -> torch.Tensor:
        return self._map1(lambda f, a: f.exp(a), X)

    def log(self, g: torch.Tensor) -> torch.Tensor:
        return self._map1(lambda f, a: f.log(a), g)

    def clean(self, y: torch.Tensor) -> torch.Tensor:
        return self._map1(lambda f, a: f.clean(a), y)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return self._map1(lambda f, a: f.projx(a), x)

    def on_group(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        for i, (f, p) in enumerate(zip(self.factors, self.split(x), strict=True)):
            ok, reason = f.on_group(p, atol, rtol)
            if not ok:
                return False, f"factor {i} ({f.group!r}): {reason}"
        return True, None

    def identity(
        self, batch: tuple[int, ...], dtype: torch.dtype | None, device: Any
    ) -> torch.Tensor:
        return self.join([f.identity(batch, dtype, device) for f in self.factors])

    def random(
        self,
        batch: tuple[int, ...],
        dtype: torch.dtype | None,
        device: Any,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return self.join([f.random(batch, dtype, device, generator) for f in self.factors])


def _newton_schulz(y: torch.Tensor) -> torch.Tensor:
    """One Newton–Schulz step towards the orthogonal polar factor: ``y + y(I − yᵀy)/2``.

    For ``yᵀy = I + E`` the result has ``(·)ᵀ(·) = I − ¾E² + O(E³)``: rounding-level errors stay
    at rounding level, so repeated retractions do not drift.
    """
    return y + 0.5 * (y @ (_eye_like(y) - _mT(y) @ y))


def _project_so(x: torch.Tensor) -> torch.Tensor:
    """Nearest rotation: Newton–Schulz sweeps when ``x`` is close to ``SO(n)``, else SVD.

    A point already orthogonal to ``8n·u`` is returned unchanged (exactly idempotent there).
    """
    check_tensor(x, "x")
    u = _unit_roundoff(x.dtype)
    n = x.shape[-1]
    tol = 8 * n * u
    eye = _eye_like(x)
    err = (_mT(x) @ x - eye).abs().amax() if x.numel() else torch.zeros(())
    if float(err) <= tol:
        return x
    if float(err) < 0.5 and bool((torch.linalg.det(x) > 0).all()):
        y = x
        for _ in range(_NS_MAX_SWEEPS):
            y = _newton_schulz(y)
            if float((_mT(y) @ y - eye).abs().amax()) <= tol:
                return y
    U, _, Vh = torch.linalg.svd(x)
    d = torch.linalg.det(U @ Vh)
    # flip the last singular direction where U Vᵀ is a reflection
    sign = torch.ones(*d.shape, n, dtype=x.dtype, device=x.device)
    sign[..., -1] = torch.where(d < 0, -1.0, 1.0).to(x.dtype)
    return (U * sign[..., None, :]) @ Vh


def _check_rotation(x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
    xtx = _mT(x) @ x
    if not torch.allclose(xtx, _eye_like(x).expand_as(xtx), atol=atol, rtol=rtol):
        return False, f"xᵀx != I with atol={atol}, rtol={rtol}"
    if not bool((torch.linalg.det(x) > 0).all()):
        return False, "det(x) < 0: a reflection, not a rotation"
    return True, None


def _ops_for(group: LieGroup) -> _Ops:
    """Pick the kernel set for ``group`` by its class (matrix groups are imported lazily)."""
    import liegroup

    if not isinstance(group, LieGroup):
        raise DTypeError(
            f"LieGroupManifold needs a liegroup.LieGroup (e.g. liegroup.SO(3)), "
            f"got {type(group).__name__}"
        )
    if isinstance(group, liegroup.Hadamard):
        return _HadamardOps(group)
    table: list[tuple[str, type[_Ops]]] = [
        ("SO", _SOOps),
        ("SE", _SEOps),
        ("SL", _SLOps),
        ("GL", _GLOps),
    ]
    for name, ops in table:
        cls = getattr(liegroup, name, None)
        if cls is not None and isinstance(group, cls):
            return ops(group)
    product = getattr(liegroup, "Product", None)
    if product is not None and isinstance(group, product):
        return _ProductOps(group, list(_product_factors(group)))
    raise DTypeError(
        f"no manifold kernels for {type(group).__name__}; supported: Hadamard, SO, SE, SL, GL "
        "and Product of those"
    )


def _product_factors(group: LieGroup) -> tuple[LieGroup, ...]:
    for attr in ("groups", "factors"):
        val = getattr(group, attr, None)
        if val is not None:
            return tuple(val)
    raise DTypeError(f"cannot find the factors of {group!r} (expected .groups or .factors)")


# ---------------------------------------------------------------------------------- manifold
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
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
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

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(2))
            >>> M.projx(torch.tensor([1.0, -2.0]))
            tensor([ 1., -2.])
        """
        self._check(x, "x")
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

        Example:
            >>> import torch, liegroup
            >>> M = LieGroupManifold(liegroup.Hadamard(1))
            >>> M.expmap(torch.tensor([2.0]), torch.tensor([0.0]))
            tensor([2.])
        """
        X = self.algebra_part(x, u)
        return self._ops.clean(self._ops.translate(x, self._ops.exp(X)))

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
                raise ValueError(f"1 tensor expected for {self!r}, got {len(tensors)}")
            return tensors[0]
        ops = self._ops
        if len(tensors) != len(ops.factors):
            raise ValueError(f"{len(ops.factors)} tensors expected, got {len(tensors)}")
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


# ---------------------------------------------------------------------------------- saving
def plain_state_dict(obj: Any) -> Any:
    """Copy of a (nested) state dict with every tensor subclass turned into a plain tensor.

    ``ManifoldTensor``/``ManifoldParameter`` pickle through a ``functools.partial`` that
    ``torch.load(..., weights_only=True)`` refuses; after this conversion the object loads
    there. Dicts, lists and tuples are rebuilt; other values are returned as they are.

    Example:
        >>> import io, torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.Hadamard(2))
        >>> p = geoopt.ManifoldParameter(M.origin(2), manifold=M)
        >>> buf = io.BytesIO()
        >>> torch.save(plain_state_dict({"p": p}), buf)
        >>> _ = buf.seek(0)
        >>> torch.load(buf, weights_only=True)
        {'p': tensor([1., 1.])}
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
        return t
    if isinstance(obj, Mapping):
        out = {k: plain_state_dict(v) for k, v in obj.items()}
        if isinstance(obj, collections.OrderedDict):
            return collections.OrderedDict(out)
        return out
    if isinstance(obj, list):
        return [plain_state_dict(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain_state_dict(v) for v in obj)
    return obj


def check_manifold_parameters(
    module: torch.nn.Module, *, atol: float | None = None, rtol: float = 0.0
) -> None:
    """Raise :class:`~liegroup.errors.DomainError` unless every group parameter is on its group.

    Checks every ``ManifoldParameter`` of ``module`` whose manifold is a
    :class:`LieGroupManifold`.

    Meant for after ``module.load_state_dict(torch.load(path, weights_only=True))``: the
    checkpoint holds bare tensors and nothing else verifies them. ``atol`` defaults to
    ``1000·u`` of each parameter's dtype.

    Example:
        >>> import torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.Hadamard(2))
        >>> m = torch.nn.Module()
        >>> m.w = geoopt.ManifoldParameter(M.origin(2), manifold=M)
        >>> check_manifold_parameters(m)
        >>> _ = m.load_state_dict({"w": torch.tensor([1.0, 0.0])})
        >>> try:
        ...     check_manifold_parameters(m)
        ... except ValueError as e:
        ...     print(type(e).__name__)
        DomainError
    """
    for name, p in module.named_parameters():
        manifold = getattr(p, "manifold", None)
        if not isinstance(manifold, LieGroupManifold):
            continue
        tol = 1000 * _unit_roundoff(p.dtype) if atol is None else atol
        with torch.no_grad():
            ok, reason = manifold._check_point_on_manifold(p.detach(), atol=tol, rtol=rtol)
        if not ok:
            raise DomainError(f"parameter {name!r} is not on {manifold!r}: {reason}")


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """``optimizer.load_state_dict(state_dict)``, keeping geoopt's integer step counters.

    ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns every per-parameter
    ``"step"`` into a float32 tensor. ``RiemannianAdam`` computes its bias corrections as
    ``beta ** state["step"]`` and so, after a reload, in float32 instead of Python floats: a
    resumed run differs from an uninterrupted one (about 1e-8 relative), and a float32 step count
    stops increasing at 2^24. This helper restores the ints, so resuming is bit-identical.

    Example:
        >>> import torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.SO(2))
        >>> p = geoopt.ManifoldParameter(M.origin(2, 2), manifold=M)
        >>> opt = geoopt.optim.RiemannianAdam([p], lr=0.1)
        >>> p.sum().backward(); opt.step()
        >>> load_optimizer_state_dict(opt, opt.state_dict())
        >>> opt.state[p]["step"]
        1
    """
    optimizer.load_state_dict(state_dict)
    if not isinstance(optimizer, geoopt.optim.mixin.OptimMixin):
        return
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = int(step.item())
