"""The geoopt bridge: every group as a Riemannian manifold (liegroup.manifolds).

geoopt's property checks for every manifold and dtype, the metric's Riemannian gradient, batch
broadcasting, no drift over many retractions, typed errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup.errors import ConfigError, DomainError, DTypeError, OverflowResultError, ShapeError
from liegroup.manifolds import LieGroupManifold
from tests.conftest import eps

DTYPES = [torch.float32, torch.float64]


def _group(name: str, *args: object) -> Callable[[], liegroup.LieGroup]:
    def make() -> liegroup.LieGroup:
        cls = getattr(liegroup, name)
        return cls(*args)  # type: ignore[no-any-return]

    return make


def _product() -> liegroup.LieGroup:
    return liegroup.Product(liegroup.SO(3), liegroup.SE(2))  # type: ignore[attr-defined]


GROUPS: dict[str, Callable[[], liegroup.LieGroup]] = {
    "SO2": _group("SO", 2),
    "SO3": _group("SO", 3),
    "SO5": _group("SO", 5),
    "SE2": _group("SE", 2),
    "SE3": _group("SE", 3),
    "SL3": _group("SL", 3),
    "GL3": _group("GL", 3),
    "Product": _product,
    "Hadamard": _group("Hadamard", (2, 3)),
}
BI_INVARIANT = {"SO2", "SO3", "SO5", "Hadamard"}


def _manifold(name: str, metric: str = "left-invariant") -> LieGroupManifold:
    try:
        G = GROUPS[name]()
    except AttributeError as e:  # pragma: no cover - while the matrix groups land
        pytest.skip(f"group not available yet: {e}")
    return LieGroupManifold(G, metric=metric)


def _point(M: LieGroupManifold, batch: tuple[int, ...], dtype: torch.dtype, seed: int
           ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = M.random(*batch, *M.point_shape, dtype=dtype, generator=gen)
    return x.as_subclass(torch.Tensor)


def _ambient(x: torch.Tensor, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(x.shape, dtype=x.dtype, generator=gen)


def _tangent(M: LieGroupManifold, x: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """A tangent vector whose algebra part has Frobenius norm ``scale`` per point."""
    X = M.algebra_part(x, _ambient(x, seed) * x.abs().amax())
    nrm = X.flatten(x.dim() - M.ndim).norm(dim=-1)
    X = X * (scale / nrm).reshape(*nrm.shape, *([1] * M.ndim))
    return M._ops.translate(x, X)


def _cond(M: LieGroupManifold, x: torch.Tensor) -> float:
    """Condition number of left translation by ``x`` (κ(x) for matrices, max|x|/min|x|)."""
    if x.dim() >= 2 and M.ndim == 2:
        s = torch.linalg.svdvals(x.double())
        return float((s[..., 0] / s[..., -1]).max())
    return float(x.abs().amax() / x.abs().amin())


def _onb(M: LieGroupManifold, x: torch.Tensor, atol: float) -> None:
    ok, reason = M._check_point_on_manifold(x, atol=atol, rtol=0.0)
    assert ok, reason


def _tangent_ok(M: LieGroupManifold, x: torch.Tensor, u: torch.Tensor, atol: float) -> None:
    ok, reason = M._check_vector_on_tangent(x, u, atol=atol, rtol=0.0)
    assert ok, reason


NAMES = list(GROUPS)


# ---------------------------------------------------------------------------------- geoopt API
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_projx_fixes_points_and_is_idempotent(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (4,), dtype, 0)
    _onb(M, x, 100 * u)
    torch.testing.assert_close(M.projx(x), x, rtol=0, atol=20 * u * x.abs().amax().item())
    # a perturbed point comes back onto the group, and projx is idempotent there
    near = x + 1e-3 * _ambient(x, 1)
    y = M.projx(near)
    _onb(M, y, 100 * u)
    if name.startswith(("SO", "SE")):
        # Newton–Schulz sweeps converge to the polar factor: the group's SVD projection
        torch.testing.assert_close(y, M.group.project(near), rtol=0, atol=100 * u)
    torch.testing.assert_close(M.projx(y), y, rtol=0, atol=20 * u * y.abs().amax().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_proju_idempotent_and_tangent(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (3,), dtype, 2)
    k = _cond(M, x)
    v = M.proju(x, _ambient(x, 3))
    scale = v.abs().amax().item()
    _tangent_ok(M, x, v, 50 * k * u * max(1.0, scale))
    torch.testing.assert_close(M.proju(x, v), v, rtol=0, atol=50 * k * u * scale)
    # egrad2rgrad lands in the tangent space too
    _tangent_ok(M, x, M.egrad2rgrad(x, _ambient(x, 4)), 50 * k * k * u * max(1.0, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_egrad2rgrad_is_the_riemannian_gradient(name, dtype):
    # ⟨rgrad, v⟩_x = ⟨G, v⟩_F = d/dt f(x + t v) for every tangent v at x
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (3,), dtype, 5)
    G = _ambient(x, 6)
    r = M.egrad2rgrad(x, G)
    for s in range(3):
        v = _tangent(M, x, 7 + s, 1.0)
        lhs = M.inner(x, r, v)
        rhs = (G * v).flatten(x.dim() - M.ndim).sum(-1)
        k = _cond(M, x)
        tol = 100 * k * k * u * (G.abs().sum() * v.abs().amax()).item()
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_retr_and_expmap_stay_on_the_group(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (5,), dtype, 8)
    for scale in (1e-6, 0.3, 2.0):
        v = _tangent(M, x, 9, scale)
        for y in (M.retr(x, v), M.expmap(x, v)):
            _onb(M, y, 100 * u)
    # a raw ambient direction is projected first (RiemannianSGD's momentum buffer)
    _onb(M, M.retr(x, _ambient(x, 10)), 100 * u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_transp_lands_in_the_new_tangent_space_isometrically(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (4,), dtype, 11)
    v = _tangent(M, x, 12, 0.5)
    w = _tangent(M, x, 13, 1.0)
    y = M.retr(x, v)
    wt = M.transp(x, y, w)
    k = max(_cond(M, x), _cond(M, y))
    _tangent_ok(M, y, wt, 100 * k * u * max(1.0, wt.abs().amax().item()))
    torch.testing.assert_close(M.inner(y, wt), M.inner(x, w), rtol=100 * k * k * u, atol=0)
    # transp of a raw vector equals transp of its projection
    raw = _ambient(x, 14)
    torch.testing.assert_close(M.transp(x, y, raw), M.transp(x, y, M.proju(x, raw)),
                               rtol=0, atol=100 * k * k * u * raw.abs().amax().item())
    # retr_transp agrees with retr + transp
    y2, wt2 = M.retr_transp(x, v, w)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(wt2, wt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_logmap_inverts_expmap_and_dist_is_the_norm(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (4,), dtype, 15)
    for scale in (1e-4, 0.1, 1.0):
        v = _tangent(M, x, 16, scale)
        y = M.expmap(x, v)
        k = _cond(M, x)
        # compare in the algebra: x⁻¹·logmap(x, y) vs x⁻¹·v (both of norm `scale`)
        got = M.algebra_part(x, M.logmap(x, y))
        want = M.algebra_part(x, v)
        torch.testing.assert_close(got, want, rtol=0, atol=200 * k * u * (1 + scale))
        # dist = ‖log(x⁻¹y)‖_F = ‖v‖_x: the one-parameter-subgroup length (module docstring)
        torch.testing.assert_close(M.dist(x, y), M.norm(x, v), rtol=0,
                                   atol=200 * k * u * (1 + scale))


@pytest.mark.parametrize("name", NAMES)
def test_batches_broadcast_like_loops(name):
    M = _manifold(name)
    dtype = torch.float64
    x = _point(M, (3,), dtype, 17)
    v = torch.stack([_tangent(M, x[i], 18 + i, 0.4) for i in range(3)])
    w = _ambient(x, 21)
    ops: list[tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]] = [
        ("retr", lambda a, b, c: M.retr(a, b)),
        ("proju", lambda a, b, c: M.proju(a, c)),
        ("egrad2rgrad", lambda a, b, c: M.egrad2rgrad(a, c)),
        ("inner", lambda a, b, c: M.inner(a, b, M.proju(a, c))),
        ("transp", lambda a, b, c: M.transp(a, M.retr(a, b), c)),
        ("logmap", lambda a, b, c: M.logmap(a, M.expmap(a, b))),
        ("dist", lambda a, b, c: M.dist(a, M.expmap(a, b))),
    ]
    for label, fn in ops:
        batched = fn(x, v, w)
        looped = torch.stack([fn(x[i], v[i], w[i]) for i in range(3)])
        torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12, msg=label)
    # one point against a batch of directions broadcasts
    many = M.retr(x[0], v)
    torch.testing.assert_close(many, torch.stack([M.retr(x[0], v[i]) for i in range(3)]),
                               rtol=1e-12, atol=1e-12)
    # component_inner has one entry per point, keeping the point dims as size 1
    assert M.component_inner(x, v).shape == (3, *([1] * M.ndim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["SO5", "SE3", "SL3", "Product", "Hadamard"])
def test_many_retractions_do_not_drift(name, dtype):
    M = _manifold(name)
    u = eps(dtype)
    x = _point(M, (2,), dtype, 22)
    gen = torch.Generator().manual_seed(23)
    for _ in range(1000):
        # x·Z with a raw (not yet algebra) Z: retr projects it, then steps
        x = M.retr(x, M._ops.translate(x, 0.05 * torch.randn(x.shape, dtype=dtype,
                                                             generator=gen)))
    if name == "SL3":
        # a random walk on the non-compact SL(3) becomes ill-conditioned; det of the stored
        # matrix (taken in float64) is 1 up to the rescaling's own error, n·κ(x)·u
        det = torch.linalg.det(x.double())
        tol = 10 * 3 * _cond(M, x) * u
        assert (det - 1).abs().max().item() <= tol, ((det - 1).abs().max().item(), tol)
    else:
        _onb(M, x, 100 * u)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**31 - 1), logscale=st.floats(-8, 0.4))
def test_so3_expmap_is_a_geodesic_property(dtype, seed, logscale):
    # bi-invariant metric on SO(3): expmap is the Riemannian exp, dist the geodesic distance
    # θ·√2 (Frobenius norm of the skew log), logmap∘expmap = id below θ = π
    M = _manifold("SO3", "bi-invariant")
    u = eps(dtype)
    x = _point(M, (), dtype, seed)
    v = _tangent(M, x, seed + 1, 10**logscale)
    y = M.expmap(x, v)
    _onb(M, y, 100 * u)
    torch.testing.assert_close(M.dist(x, y), M.norm(x, v), rtol=50 * u, atol=50 * u)
    torch.testing.assert_close(M.logmap(x, y), v, rtol=0, atol=100 * u)


# ---------------------------------------------------------------------------------- metric
@pytest.mark.parametrize("name", NAMES)
def test_bi_invariant_only_where_it_exists(name):
    if name in BI_INVARIANT:
        M = _manifold(name, "bi-invariant")
        assert M.is_riemannian_exp
        # Ad-invariance: ⟨Ad_g X, Ad_g Y⟩ = ⟨X, Y⟩ at the identity
        e = M.origin(*M.point_shape, dtype=torch.float64).as_subclass(torch.Tensor)
        g = _point(M, (), torch.float64, 24)
        X, Y = _tangent(M, e, 25, 1.0), _tangent(M, e, 26, 1.0)
        inv = M._ops.untranslate(g, e)
        AdX = M._ops.translate(M._ops.translate(g, X), inv)
        AdY = M._ops.translate(M._ops.translate(g, Y), inv)
        torch.testing.assert_close(M.inner(e, AdX, AdY), M.inner(e, X, Y), rtol=1e-12,
                                   atol=1e-12)
    else:
        with pytest.raises(DomainError, match="no bi-invariant"):
            _manifold(name, "bi-invariant")


def test_left_invariant_metric_is_not_bi_invariant_on_gl():
    # the reason GL refuses "bi-invariant": Ad_g is not an isometry of the Frobenius metric
    M = _manifold("GL3")
    e = torch.eye(3, dtype=torch.float64)
    g = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    X = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    AdX = g @ X @ torch.linalg.inv(g)
    assert abs(M.inner(e, AdX).item() - M.inner(e, X).item()) > 0.5


# ---------------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ConfigError, match="metric must be one of"):
        LieGroupManifold(liegroup.Hadamard(2), metric="right-invariant")
    with pytest.raises(DTypeError, match=r"needs a liegroup\.LieGroup"):
        LieGroupManifold(geoopt.Stiefel())  # type: ignore[arg-type]
    M = LieGroupManifold(liegroup.Hadamard((2, 3)))
    with pytest.raises(ShapeError, match=r"\(\*batch, 2, 3\)"):
        M.proju(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(DTypeError, match="real floating"):
        M.proju(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3))
    with pytest.raises(ShapeError, match="must have shape"):
        M.random(3, 2)
    ok, reason = M._check_shape((4, 3, 2), "x")
    assert not ok and "(*batch, 2, 3)" in reason
    with pytest.raises(ValueError, match="not valid"):  # geoopt's own shape check
        geoopt.ManifoldParameter(torch.ones(3, 2), manifold=M)
    # log across sign patterns (different components) is refused
    with pytest.raises(DomainError):
        M.logmap(torch.ones(2, 3), -torch.ones(2, 3))
    ok, reason = M._check_point_on_manifold(torch.zeros(2, 3))
    assert not ok and "zero entries" in reason
    ok, reason = M._check_point_on_manifold(torch.full((2, 3), math.inf))
    assert not ok and "NaN or infinite" in reason


def test_point_and_tangent_checks_reject_off_group_input():
    M = _manifold("SO3")
    x = torch.eye(3, dtype=torch.float64)
    assert not M._check_point_on_manifold(2 * x)[0]
    assert not M._check_point_on_manifold(torch.diag(torch.tensor([1.0, 1.0, -1.0])))[0]
    assert not M._check_vector_on_tangent(x, torch.eye(3, dtype=torch.float64))[0]
    S = _manifold("SE3")
    y = torch.eye(4, dtype=torch.float64)
    y[3, 0] = 0.1
    assert "bottom row" in str(S._check_point_on_manifold(y)[1])
    L = _manifold("SL3")
    assert "det" in str(L._check_point_on_manifold(2 * x)[1])
    with pytest.raises(DomainError, match="det <= 0"):
        L.projx(-x)
    Gl = _manifold("GL3")
    assert "singular" in str(Gl._check_point_on_manifold(torch.zeros(3, 3))[1])


def test_projx_of_a_reflection_gives_a_rotation():
    M = _manifold("SO3")
    refl = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    R = M.projx(refl + 1e-3)
    _onb(M, R, 1e-12)


def test_hadamard_keeps_every_sign_pattern():
    M = LieGroupManifold(liegroup.Hadamard((4,)))
    x = torch.tensor([1.5, -0.5, 2.0, -3.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        # steps of bounded algebra part (x⁻¹u ~ N(0, 1)): an ambient N(0, 1) vector at a point
        # near 0 is a huge algebra element, and that walk diverges (to inf, which expmap now
        # reports with OverflowResultError)
        x = M.retr(x, x * torch.randn(4, dtype=torch.float64, generator=gen))
    assert torch.equal(torch.sign(x), torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))


def test_docs_manifolds_md_code_blocks_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "manifolds.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    ns: dict[str, object] = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/manifolds.md block {i}", "exec"), ns)


def test_full_pickle_and_deepcopy_keep_the_manifold():
    # geoopt's own path (weights_only=False) and copy.deepcopy also work
    import copy
    import io

    M = _manifold("SE3")
    p = geoopt.ManifoldParameter(M.random(4, 4, dtype=torch.float64), manifold=M)
    buf = io.BytesIO()
    torch.save(p, buf)
    buf.seek(0)
    q = torch.load(buf, weights_only=False)
    assert isinstance(q, geoopt.ManifoldParameter) and q.manifold == M
    assert torch.equal(q.detach(), p.detach())
    r = copy.deepcopy(p)
    assert r.manifold == M and torch.equal(r.detach(), p.detach())
    assert LieGroupManifold(liegroup.SO(3)) != LieGroupManifold(liegroup.SO(4))


def test_product_packing_and_its_errors():
    M = _manifold("Product")
    g = M.group.random(2, dtype=torch.float64)
    x = M.pack_point(*g)
    assert x.shape == (2, 18)
    assert all(torch.equal(a, b) for a, b in zip(M.unpack_tensor(x), g, strict=True))
    with pytest.raises(ConfigError, match="2 tensors expected"):
        M.pack_point(g[0])
    with pytest.raises(ShapeError, match=r"tensors\[1\]"):
        M.pack_point(g[0], torch.ones(2, 4, 4))
    with pytest.raises(ShapeError):
        M.unpack_tensor(torch.ones(2, 17))
    H = LieGroupManifold(liegroup.Hadamard(2))
    with pytest.raises(ConfigError, match="1 tensor expected"):
        H.pack_point(torch.ones(2), torch.ones(2))


# ------------------------------------------------------------------ points off the group
OFF_GROUP = {
    "SO3": lambda: 2 * torch.eye(3, dtype=torch.float64),  # the clean-up would make it −I
    "SE3": lambda: torch.block_diag(2 * torch.eye(3), torch.ones(1)).double(),
    "SL3": lambda: 2 * torch.eye(3, dtype=torch.float64),  # det 8: rescaling would hide it
    "GL3": lambda: torch.zeros(3, 3, dtype=torch.float64),  # singular
    "Hadamard": lambda: torch.tensor([[0.0, 1, 1], [1, 1, 1]], dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(OFF_GROUP))
def test_expmap_from_a_point_off_the_group_raises_domain_error(name):
    M = _manifold(name)
    x = OFF_GROUP[name]()
    assert not M.check_point_on_manifold(x)
    for step in (M.expmap, M.retr):
        with pytest.raises(DomainError, match="not a point of") as info:
            step(x, torch.zeros_like(x))
        assert "diverged" not in str(info.value)
    # a point on the group whose step is zero comes back unchanged (to the clean-up)
    y = _point(M, (), torch.float64, 0)
    torch.testing.assert_close(M.expmap(y, torch.zeros_like(y)), y, rtol=0, atol=1e-13)


def test_expmap_off_group_in_a_product_factor_and_in_a_batch():
    M = _manifold("Product")
    x = M.pack_point(2 * torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with pytest.raises(DomainError, match="factor 0"):
        M.expmap(x, torch.zeros_like(x))
    S = _manifold("SO3")
    xs = torch.stack([torch.eye(3), 2 * torch.eye(3)]).double()
    with pytest.raises(DomainError, match="not a point of SO"):
        S.expmap(xs, torch.zeros_like(xs))
    # documented: the step checks orthogonality, not the determinant's sign; a reflection is
    # reported by check_point_on_manifold
    refl = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    ok, reason = S.check_point_on_manifold(refl, explain=True)
    assert not ok and "det" in str(reason)




def test_hadamard_step_that_underflows_to_zero_raises_and_keeps_the_point():
    M = LieGroupManifold(liegroup.Hadamard((3,)))
    x = geoopt.ManifoldParameter(torch.ones(3), manifold=M)
    opt = geoopt.optim.RiemannianSGD([x], lr=1e3)
    x.grad = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(OverflowResultError, match=r"underflows.*Lower the learning rate"):
        opt.step()
    assert torch.equal(x.detach(), torch.ones(3))
    # the overflow side still reports the divergence
    x.grad = -x.grad
    with pytest.raises(OverflowResultError, match="overflows"):
        opt.step()
    assert torch.equal(x.detach(), torch.ones(3))
    # a large step that stays representable is taken
    opt = geoopt.optim.RiemannianSGD([x], lr=10.0)
    x.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert bool((x.detach() > 0).all()) and bool((x.detach() < 1e-4).all())


def test_hadamard_projx_refuses_zero_entries():
    M = LieGroupManifold(liegroup.Hadamard((3,)))
    with pytest.raises(DomainError, match=r"zero entries, e\.g\. at \[\[0\]\]"):
        M.projx(torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(DomainError):
        M.projx(torch.tensor([1.0, -0.0, 1.0]))
    x = torch.tensor([1e-30, -2.0, 1.0])
    assert torch.equal(M.projx(x), x)
