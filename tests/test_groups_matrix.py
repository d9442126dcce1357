"""Generic matrix groups GL(n), SL(n), SO(n), SE(n) through ``liegroup.linalg``, and every
group's exp/log against ``linalg.expm``/``logm``; BCH; generic Jacobians via ``dexp``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import liegroup
from liegroup.errors import DomainError, DTypeError, NonFiniteError, OverflowResultError, ShapeError
from liegroup.groups.matrix import MatrixLieGroup
from tests.conftest import eps

linalg = pytest.importorskip("liegroup.linalg")

DTYPES = [torch.float32, torch.float64]
GENERIC = [liegroup.GL(3), liegroup.SL(3), liegroup.SO(4), liegroup.SO(5), liegroup.SE(4)]
CLOSED = [liegroup.SO(2), liegroup.SO(3), liegroup.SE(2), liegroup.SE(3)]
ALL = GENERIC + CLOSED + [liegroup.GL(2), liegroup.SL(2)]


def _algebra(G, batch, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(*batch, G.dim, dtype=torch.float64, generator=gen)
    if isinstance(G, (liegroup.GL,)):
        v = v / math.sqrt(G.n)
    X = G.hat(v)
    # keep the spectrum inside the principal log's strip |Im λ| < π: operator norm <= 2.5
    norm = torch.linalg.matrix_norm(X, ord=2)[..., None, None]
    X = X * (2.5 / norm).clamp(max=1.0)
    return (X * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", ALL, ids=repr)
@pytest.mark.parametrize("scale", [1e-6, 0.3, 1.0])
def test_exp_log_agree_with_linalg(dtype, G, scale):
    # Both sides are accurate to κ·u with κ = O(1) for these well-conditioned inputs (|X| <~ 3,
    # eigenvalues off the negative axis); budget 64u·(1 + |X|)².
    X = _algebra(G, (6,), dtype, 11, scale)
    u = eps(dtype)
    nx = float(X.abs().max())
    g = G.exp(X)
    torch.testing.assert_close(g, linalg.expm(X), rtol=0, atol=64 * u * (1 + nx) ** 2)
    L = G.log(g)
    torch.testing.assert_close(
        L, G.project_algebra(linalg.logm(g)), rtol=0, atol=64 * u * (1 + nx) ** 2
    )
    torch.testing.assert_close(L, X, rtol=0, atol=256 * u * (1 + nx) ** 3)
    assert bool(G.contains_algebra(L).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GENERIC, ids=repr)
@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1))
def test_generic_group_axioms(dtype, G, seed):
    gen = torch.Generator().manual_seed(seed)
    g, h, k = (G.random(2, dtype=dtype, generator=gen) for _ in range(3))
    u = eps(dtype)
    scale = float(max(x.abs().max() for x in (g, h, k))) ** 3
    tol = 256 * u * scale
    # GL's contains is a conditioning test (σ_min > atol·σ_max), the others' a residual one
    atol = None if type(G) is liegroup.GL else 1e4 * u * scale
    assert bool(G.contains(G.compose(g, h), atol=atol).all())
    torch.testing.assert_close(
        G.compose(G.compose(g, h), k), G.compose(g, G.compose(h, k)), rtol=0, atol=tol
    )
    torch.testing.assert_close(
        G.compose(g, G.inverse(g)), G.identity(2, dtype=dtype), rtol=0, atol=tol
    )
    X = _algebra(G, (2,), dtype, seed % 1000, 0.5)
    lhs = G.exp(G.Ad(g, X))
    rhs = G.compose(G.compose(g, G.exp(X)), G.inverse(g))
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=tol * 16)
    torch.testing.assert_close(
        G.vee(G.Ad(g, X)),
        (G.adjoint_matrix(g) @ G.vee(X)[..., None])[..., 0],
        rtol=0,
        atol=tol * 16,
    )


@pytest.mark.parametrize("G", GENERIC + CLOSED, ids=repr)
@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1))
def test_bracket_and_bch(G, seed):
    X, Y, Z = (_algebra(G, (2,), torch.float64, seed + i) for i in range(3))
    br = G.bracket
    torch.testing.assert_close(br(X, Y), -br(Y, X), rtol=0, atol=1e-13)
    jac = br(X, br(Y, Z)) + br(Y, br(Z, X)) + br(Z, br(X, Y))
    torch.testing.assert_close(jac, torch.zeros_like(jac), rtol=0, atol=1e-12)
    torch.testing.assert_close(br(2 * X - Y, Z), 2 * br(X, Z) - br(Y, Z), rtol=0, atol=1e-12)
    # BCH to order 5 for |X|, |Y| ~ 1e-2: the remainder is O(|X|^6) ~ 1e-12 relative
    x, y = 1e-2 * X, 1e-2 * Y
    lhs = G.log(G.compose(G.exp(x), G.exp(y)))
    rhs = linalg.bch(x, y, order=5)
    scale = float(max(x.abs().max(), y.abs().max()))
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=50 * scale**6 + 1e-15)


@pytest.mark.parametrize("G", GENERIC, ids=repr)
def test_generic_jacobians(G):
    X = _algebra(G, (), torch.float64, 3, 0.5)
    Jl, Jr = G.left_jacobian(X), G.right_jacobian(X)
    eye = torch.eye(G.dim, dtype=torch.float64)
    torch.testing.assert_close(Jl @ G.left_jacobian_inv(X), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Jr @ G.right_jacobian_inv(X), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Jl, G.adjoint_matrix(G.exp(X)) @ Jr, rtol=0, atol=1e-12)
    # against finite differences of exp: exp(X + εE_i) ≈ exp(X)·exp(ε·hat(J_r e_i))
    v = G.vee(X)
    g_inv = G.inverse(G.exp(X))
    cols = []
    for i in range(G.dim):
        e = torch.zeros(G.dim, dtype=torch.float64)
        e[i] = 1e-6
        fp = G.vee(G.log(G.compose(g_inv, G.exp(G.hat(v + e)))))
        fm = G.vee(G.log(G.compose(g_inv, G.exp(G.hat(v - e)))))
        cols.append((fp - fm) / 2e-6)
    torch.testing.assert_close(Jr, torch.stack(cols, -1), rtol=0, atol=1e-8)


@pytest.mark.parametrize("G", CLOSED, ids=repr)
def test_closed_form_jacobians_match_generic_dexp(G):
    X = _algebra(G, (3,), torch.float64, 5, 1.0)
    for name in ["left_jacobian", "right_jacobian", "left_jacobian_inv", "right_jacobian_inv"]:
        closed = getattr(G, name)(X)
        generic = getattr(MatrixLieGroup, name)(G, X)
        torch.testing.assert_close(closed, generic, rtol=0, atol=1e-12)


@pytest.mark.parametrize("G", [liegroup.GL(3), liegroup.SL(3), liegroup.SO(4)], ids=repr)
def test_gradcheck_generic(G):
    X = _algebra(G, (), torch.float64, 9, 0.5).requires_grad_()

    def f(A):
        A = G.project_algebra(A)
        return G._log(G.exp(A)) + G.exp(A)

    assert torch.autograd.gradcheck(f, (X,), eps=1e-7, atol=1e-6)


def test_sl_and_gl_specifics():
    G = liegroup.SL(4)
    X = G.random_algebra(5, dtype=torch.float64)
    assert torch.equal(
        X.diagonal(dim1=-2, dim2=-1).sum(-1).abs().lt(1e-14), torch.ones(5, dtype=torch.bool)
    )
    g = G.exp(X)
    torch.testing.assert_close(
        torch.linalg.det(g), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-13
    )
    L = G.log(g)
    assert (
        torch.equal(G.project_algebra(L), L)
        or float(L.diagonal(dim1=-2, dim2=-1).sum(-1).abs().max()) < 1e-15
    )
    v = torch.randn(3, G.dim, dtype=torch.float64)
    assert torch.equal(G.vee(G.hat(v)), v)
    H = liegroup.SL(3)
    p = H.project(-2.0 * torch.eye(3, dtype=torch.float64) + 0.1)
    assert bool(H.contains(p))
    with pytest.raises(DomainError):
        liegroup.SL(2).project(torch.diag(torch.tensor([1.0, -1.0])))  # det < 0, n even
    with pytest.raises(DomainError):
        H.project(torch.zeros(3, 3))
    GL = liegroup.GL(2)
    with pytest.raises(DomainError):
        GL.log(torch.diag(torch.tensor([-1.0, 2.0])))  # eigenvalue on the negative axis
    with pytest.raises(DomainError):
        GL.project(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(DomainError):
        GL.log(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # singular: not on the group
    with pytest.raises(DomainError):
        H.exp(torch.eye(3))  # not traceless
    with pytest.raises(ShapeError):
        liegroup.GL(0)


def test_so_n_log_is_exactly_skew_and_contains():
    G = liegroup.SO(5)
    R = G.random(4, dtype=torch.float64)
    L = G.log(R)
    assert torch.equal(L, -L.mT)
    torch.testing.assert_close(G.exp(L), R, rtol=0, atol=1e-12)
    H = liegroup.SE(4)
    g = H.random(3, dtype=torch.float64)
    Lg = H.log(g)
    assert torch.equal(Lg[..., 4, :], torch.zeros_like(Lg[..., 4, :]))
    assert torch.equal(Lg[..., :4, :4], -Lg[..., :4, :4].mT)
    torch.testing.assert_close(H.exp(Lg), g, rtol=0, atol=1e-12)
    assert torch.equal(H.exp(Lg)[..., 4, :], H.identity(3, dtype=torch.float64)[..., 4, :])


def test_linalg_is_exported():
    from liegroup import linalg as la

    assert la is linalg


def test_docs_groups_code_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "groups.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/groups.md block {i}", "exec"), ns)
    assert torch.allclose(ns["w"], torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    assert ns["W2"].shape == ns["W"].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gl_inverse_refuses_singular_matrices(dtype):
    G = liegroup.GL(2)
    with pytest.raises(DomainError, match=r"singular, so not in GL\(2\) \(the input is unbatch"):
        G.inverse(torch.zeros(2, 2, dtype=dtype))
    batch = torch.eye(2, dtype=dtype).repeat(3, 1, 1)
    batch[1] = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=dtype)
    with pytest.raises(DomainError, match=r"batch index \[\[1\]\]"):
        G.inverse(batch)
    with pytest.raises(NonFiniteError):
        G.inverse(torch.full((2, 2), float("nan"), dtype=dtype))
    # invertible, but the inverse is beyond the dtype's range
    tiny = torch.finfo(dtype).tiny
    with pytest.raises(OverflowResultError, match="beyond the range"):
        G.inverse(torch.diag(torch.tensor([tiny / 4, 1.0], dtype=dtype)))
    g = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=dtype)
    inv = G.inverse(g)
    assert inv.dtype == dtype
    assert torch.equal(inv, torch.tensor([[0.5, -0.5], [0.0, 1.0]], dtype=dtype))
    assert bool(liegroup.SL(2).contains(liegroup.SL(2).inverse(liegroup.SL(2).random())))


@pytest.mark.parametrize("G", ALL, ids=repr)
def test_batch_sizes_and_batch_broadcasting_are_checked(G):
    for make in (G.identity, G.random, G.random_algebra):
        with pytest.raises(ShapeError, match="non-negative"):
            make(-1)
        with pytest.raises(DTypeError, match="ints"):
            make(2.0)
        assert make(0).shape == (0, *G.point_shape)
    with pytest.raises(ShapeError, match=r"g \(3,\) and h \(4,\) do not broadcast"):
        G.compose(G.identity(3), G.identity(4))
    assert G.compose(G.identity(3, 1), G.identity(4)).shape == (3, 4, *G.point_shape)


def test_domain_errors_name_no_empty_index_for_unbatched_input():
    for G, g in [
        (liegroup.SO(3), 2 * torch.eye(3)),
        (liegroup.SE(3), 2 * torch.eye(4)),
        (liegroup.SL(3), 2 * torch.eye(3)),
        (liegroup.GL(2), torch.zeros(2, 2)),
    ]:
        with pytest.raises(DomainError) as info:
            G.log(g)
        assert "[[]]" not in str(info.value)
        with pytest.raises(DomainError) as info:
            G.project(torch.zeros_like(g)) if isinstance(G, liegroup.GL) else G.exp(g)
        assert "[[]]" not in str(info.value)
        assert "unbatched" in str(info.value)
    with pytest.raises(DomainError, match="unbatched"):
        liegroup.SO(3).log(2 * torch.eye(3))
    with pytest.raises(DomainError, match=r"batch index \[\[1\]\]"):
        liegroup.SO(3).log(torch.stack([torch.eye(3), 2 * torch.eye(3)]))
    with pytest.raises(DomainError, match="unbatched"):
        liegroup.SO(4).exp(liegroup.SO(4).hat(torch.full((6,), 1e4)))  # angles too large
