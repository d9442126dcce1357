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
  ``x / det(x)^{1/n}``; ``GL`` and the Hadamard group are open sets: identity; a zero entry
  of a Hadamard point has no nearest non-zero value and raises
  :class:`~liegroup.errors.DomainError`).

``expmap``/``retr`` take ``x`` on the group: the step's single check (one host
synchronisation, shared with the divergence check) refuses a ``x·exp(X)`` further than
``sqrt(default_atol)`` from the group's equations with :class:`~liegroup.errors.DomainError`
rather than re-projecting it into another point; a Hadamard step that overflows or
underflows an entry to 0 raises :class:`~liegroup.errors.OverflowResultError`. A reflection
given as an ``SO(n)`` point is not detected by the step; ``check_point_on_manifold`` reports
it (as for geoopt's own manifolds, the full membership check is a separate call).

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

from liegroup.manifolds.manifold import LieGroupManifold
from liegroup.manifolds.saving import (
    check_manifold_parameters,
    load_optimizer_state_dict,
    plain_state_dict,
)

__all__ = [
    "LieGroupManifold",
    "check_manifold_parameters",
    "load_optimizer_state_dict",
    "plain_state_dict",
]
