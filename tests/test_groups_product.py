"""Product(G1, G2, ...): component-wise structure, the Tucker-style mode-wise action, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup import tensor
from liegroup.errors import DTypeError, ShapeError
from tests.conftest import eps

DTYPES = [torch.float32, torch.float64]


def _close(a, b, atol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**31 - 1))
def test_componentwise_group_structure(dtype, seed):
    P = liegroup.Product(liegroup.SO(3), liegroup.SE(2), liegroup.Hadamard((2,)))
    gen = torch.Generator().manual_seed(seed)
    g, h, k = (P.random(3, dtype=dtype, generator=gen) for _ in range(3))
    tol = 256 * eps(dtype)
    assert bool(P.contains(P.compose(g, h)).all())
    _close(P.compose(P.compose(g, h), k), P.compose(g, P.compose(h, k)), tol * 10)
    _close(P.compose(g, P.inverse(g)), P.identity(3, dtype=dtype), tol * 10)
    X = P.random_algebra(3, dtype=dtype, generator=gen)
    X = (X[0] * 0.3, X[1] * 0.3, X[2])
    _close(P.log(P.exp(X)), X, tol)
    _close(P.exp(P.Ad(g, X)), P.compose(P.compose(g, P.exp(X)), P.inverse(g)), tol * 10)
    # each component equals the factor's own result
    for G, a, b in zip(P.factors, P.exp(X), X, strict=True):
        assert torch.equal(a, G.exp(b))
    Y = P.random_algebra(3, dtype=dtype, generator=gen)
    for a, b in zip(P.bracket(X, Y), P.bracket(Y, X), strict=True):
        torch.testing.assert_close(a, -b, rtol=0, atol=tol)


def test_hat_vee_and_shapes():
    P = liegroup.Product(liegroup.SO(2), liegroup.SO(3), liegroup.SE(3))
    assert P.dim == 1 + 3 + 6
    assert P.point_shape == ((2, 2), (3, 3), (4, 4))
    v = torch.randn(5, P.dim, dtype=torch.float64)
    assert torch.equal(P.vee(P.hat(v)), v)
    X = P.hat(v)
    assert [x.shape for x in X] == [(5, 2, 2), (5, 3, 3), (5, 4, 4)]
    g = P.project(P.exp(X))
    assert bool(P.contains(g).all())
    assert P.check_point(P.identity(4, 1)) == (4, 1)
    assert repr(P).startswith("Product(SO(2)")
    assert liegroup.Product(liegroup.SO(2), liegroup.SO(3), liegroup.SE(3)) == P


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_tucker_action_preserves_every_mode_spectrum(dtype):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 3)
    T = torch.randn(*shape, dtype=dtype, generator=gen)
    P = liegroup.Product(*(liegroup.SO(n) for n in shape))
    g = P.random(dtype=dtype, generator=gen)
    out = P.act(g, T)
    # unfold(T ×_0 g_0 ⋯, k) = g_k · unfold(T, k) · (orthogonal): singular values unchanged;
    # svdvals is backward stable, so the difference is <= a few u·σ_max·sqrt(size).
    for k in range(len(shape)):
        s0 = torch.linalg.svdvals(tensor.unfold(T, k))
        s1 = torch.linalg.svdvals(tensor.unfold(out, k))
        torch.testing.assert_close(s1, s0, rtol=0, atol=64 * eps(dtype) * float(s0[0]))
    torch.testing.assert_close(out.norm(), T.norm(), rtol=16 * eps(dtype), atol=0)
    # equals the sequential mode products, in any order of modes
    ref = T
    for k in reversed(range(len(shape))):
        ref = tensor.mode_product(ref, g[k], k)
    torch.testing.assert_close(out, ref, rtol=0, atol=64 * eps(dtype))
    # and the identity acts trivially
    assert torch.equal(P.act(P.identity(dtype=dtype), T), T)


def test_action_with_modes_and_batches():
    gen = torch.Generator().manual_seed(1)
    T = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen)
    P = liegroup.Product(liegroup.SO(2), liegroup.SO(4))
    g = P.random(dtype=torch.float64, generator=gen)
    out = P.act(g, T, modes=[2, 0])
    ref = tensor.multi_mode_product(T, list(g), [2, 0])
    assert torch.equal(out, ref)
    # a batch of group elements acting on a batch of tensors: element i alone == in the batch
    gb = P.random(5, dtype=torch.float64, generator=gen)
    Tb = torch.randn(5, 4, 3, 2, dtype=torch.float64, generator=gen)
    outb = P.act(gb, Tb, modes=[-1, 0])
    for i in range(5):
        single = P.act((gb[0][i], gb[1][i]), Tb[i], modes=[2, 0])
        torch.testing.assert_close(outb[i], single, rtol=0, atol=1e-14)
    # a batched factor next to an unbatched one: modes still index the tensor's own modes
    mixed = P.act((gb[0], g[1]), Tb, modes=[2, 0])
    for i in range(5):
        single = P.act((gb[0][i], g[1]), Tb[i], modes=[2, 0])
        torch.testing.assert_close(mixed[i], single, rtol=0, atol=1e-14)


def test_product_error_paths():
    P = liegroup.Product(liegroup.SO(2), liegroup.SO(3))
    with pytest.raises(ShapeError):
        liegroup.Product()
    with pytest.raises(DTypeError):
        liegroup.Product(liegroup.SO(2), "SO(3)")  # type: ignore[arg-type]
    with pytest.raises(DTypeError):
        P.compose(torch.eye(2), torch.eye(2))  # a tensor, not a tuple
    with pytest.raises(ShapeError):
        P.inverse((torch.eye(2),))  # one component missing
    with pytest.raises(ShapeError):
        P.compose((torch.eye(2), torch.eye(2)), P.identity())  # wrong component shape
    with pytest.raises(ShapeError):
        P.act(P.identity(), torch.zeros(2, 3), modes=[0, 0])
    with pytest.raises(ShapeError):
        P.act(P.identity(), torch.zeros(2, 3), modes=[0])
    with pytest.raises(ShapeError):
        P.act(P.identity(), torch.zeros(3, 2))  # mode sizes do not match
    with pytest.raises(DTypeError, match="modes"):
        P.act(P.identity(), torch.zeros(2, 3), mode=0)
    with pytest.raises(ShapeError):
        P.hat(torch.zeros(5))
