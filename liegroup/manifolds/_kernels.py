"""Per-group kernels behind :class:`LieGroupManifold` (private).

Each ``_Ops`` subclass knows how to translate, project and re-project points of one kind of
group cheaply, with no host synchronisation on the optimiser's hot path.
"""


from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from liegroup._validation import check_tensor, offending
from liegroup.errors import DomainError, DTypeError
from liegroup.groups.base import LieGroup
from liegroup.groups.hadamard import refuse_zeros
from liegroup.groups.matrix import default_atol

_METRICS = ("left-invariant", "bi-invariant")
# torch.linalg's error for a singular operand (a RuntimeError; not re-exported in its stubs)
_LinAlgError: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)
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


def step_tolerance(dtype: torch.dtype) -> float:
    """How far ``x·exp(X)`` may be from the group before ``expmap`` refuses to re-project it.

    ``sqrt(default_atol)``: one Newton–Schulz step maps an orthogonality error ``E`` to
    ``¾E²``, so below this a single clean-up lands within ``default_atol``; a point further
    off was not on the group to begin with (``1e-6`` in float64, ``2.4e-2`` in float32).
    """
    return math.sqrt(default_atol(dtype))


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


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
        try:
            return torch.linalg.solve(x, u)
        except _LinAlgError:
            raise DomainError(
                f"x is singular, so it is not a point of {self.group!r}; the maps of the "
                "manifold are defined only on the group (check how x was built or loaded)"
            ) from None

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

    def clean_checked(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``clean(y)`` and a per-point mask of where ``y`` was too far off the group for it.

        The mask (``None`` where nothing is checked, e.g. open groups) has ``y``'s batch shape
        and marks points further than :func:`step_tolerance` from the group's equations.
        """
        return self.clean(y), None

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
        return torch.exp(X)  # checked by the caller (expmap's single step check)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        refuse_zeros(x, "projx", "x")
        return x

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

    def clean_checked(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _newton_schulz_checked(y)

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

    def clean_checked(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.n
        R, off = _newton_schulz_checked(y[..., :n, :n])
        bottom = y[..., n, :].clone()
        bottom[..., n] -= 1
        off = off | (bottom.abs().amax(-1) > step_tolerance(y.dtype))
        return self._assemble(R, y[..., :n, n:]), off

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

    def clean_checked(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = torch.linalg.det(y)
        off = ~((d - 1).abs() <= step_tolerance(y.dtype))  # NaN counts as off
        return y / d.abs().pow(1.0 / self.n)[..., None, None], off

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        sign, logabs = torch.linalg.slogdet(x)  # no overflow for large n
        ok = (sign > 0) & torch.isfinite(logabs)
        hit = offending(~ok)
        if hit is not None:
            bad = hit[1]
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

    def clean_checked(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts, off = [], None
        for f, p in zip(self.factors, self.split(y), strict=True):
            c, o = f.clean_checked(p)
            parts.append(c)
            off = _or(off, o)
        return self.join(parts), off

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


def _newton_schulz_checked(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_newton_schulz` (the same operations) and the mask ``‖I − yᵀy‖_max > tol``.

    ``tol`` is :func:`step_tolerance`; the mask reuses ``I − yᵀy`` and costs no matmul.
    """
    E = _eye_like(y) - _mT(y) @ y
    off = ~(E.abs().amax((-2, -1)) <= step_tolerance(y.dtype))  # NaN counts as off
    return y + 0.5 * (y @ E), off


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


