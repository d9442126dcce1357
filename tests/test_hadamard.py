"""The Hadamard group (LieRA's): axioms, exp/log, Taylor maps and their error bound, errors."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup import Hadamard
from liegroup.errors import (
    ConfigError,
    DomainError,
    DTypeError,
    NonFiniteError,
    OverflowResultError,
    ShapeError,
)
from liegroup.groups import taylor_exp, taylor_remainder_bound
from tests.conftest import eps

DTYPES = [torch.float32, torch.float64]
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _points(G, batch, dtype, seed, negative=True):
    gen = torch.Generator().manual_seed(seed)
    g = G.random(*batch, dtype=dtype, generator=gen)
    if negative:  # the whole group, not only the identity component
        sign = torch.randint(0, 2, g.shape, generator=gen).to(dtype) * 2 - 1
        g = g * sign
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_group_axioms(dtype, shape, seed):
    G = Hadamard(shape)
    g, h, k = (_points(G, (3,), dtype, seed + i) for i in range(3))
    e = G.identity(dtype=dtype)
    rtol = 4 * eps(dtype)
    assert bool(G.contains(G.compose(g, h)).all())  # closure
    torch.testing.assert_close(
        G.compose(G.compose(g, h), k), G.compose(g, G.compose(h, k)), rtol=rtol, atol=0
    )
    assert torch.equal(G.compose(g, e), g) and torch.equal(G.compose(e, g), g)
    torch.testing.assert_close(G.compose(g, G.inverse(g)), G.identity(3, dtype=dtype),
                               rtol=rtol, atol=0)
    assert torch.equal(G.compose(g, h), G.compose(h, g))  # abelian
    X, Y = G.random_algebra(2, dtype=dtype), G.random_algebra(2, dtype=dtype)
    assert torch.equal(G.bracket(X, Y), torch.zeros_like(X))
    assert torch.equal(G.Ad(g[:2], X), X)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e-2, 1.0, 30.0])
def test_exp_log_inverse_pairs(dtype, scale):
    G = Hadamard((4, 5))
    gen = torch.Generator().manual_seed(0)
    X = G.random_algebra(3, dtype=dtype, generator=gen) * scale
    # log∘exp: relative error of exp is u, so |log(exp X) − X| <= ~u (absolute) + u|X|
    u = eps(dtype)
    err = (G.log(G.exp(X)) - X).abs()
    assert bool((err <= 2 * u * (1 + X.abs())).all()), err.max()
    g = G.random(3, dtype=dtype, generator=gen) ** max(scale, 1e-3)
    rel = ((G.exp(G.log(g)) - g) / g).abs()
    assert bool((rel <= 4 * u * (1 + G.log(g).abs())).all()), rel.max()


def test_exp_matches_mpmath():
    xs = [-700.0, -30.0, -1.0, -1e-9, 0.0, 1e-300, 1e-8, 0.5, 1.0, 20.0, 700.0]
    X = torch.tensor(xs, dtype=torch.float64)
    got = Hadamard((len(xs),)).exp(X)
    with mpmath.workdps(50):
        for x, y in zip(xs, got.tolist(), strict=True):
            ref = mpmath.exp(mpmath.mpf(x))
            assert abs(mpmath.mpf(y) - ref) <= 2 * eps(torch.float64) * abs(ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_is_a_homomorphism(dtype):
    G = Hadamard((3, 4))
    X, Y = G.random_algebra(5, dtype=dtype), G.random_algebra(5, dtype=dtype)
    torch.testing.assert_close(G.exp(X + Y), G.compose(G.exp(X), G.exp(Y)),
                               rtol=8 * eps(dtype) * (1 + (X + Y).abs().max().item()), atol=0)


def test_exp_is_onto_identity_component_and_act_preserves_structure():
    G = Hadamard((2, 3))
    W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -0.5]], dtype=torch.float64)
    X = G.random_algebra(dtype=torch.float64) * 3
    g = G.exp(X)
    assert bool(G.in_identity_component(g))
    W2 = G.act(g, W)
    assert torch.equal(torch.sign(W2), torch.sign(W))  # zeros stay zero, signs never flip
    torch.testing.assert_close(W2, W * torch.exp(X))


@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_taylor_exp_matches_partial_sum(order):
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    ref = sum(x**j / math.factorial(j) for j in range(order + 1))
    torch.testing.assert_close(taylor_exp(x, order), ref, rtol=1e-14, atol=1e-14)
    assert torch.equal(taylor_exp(x, 1), 1 + x)
    assert torch.equal(Hadamard((61,)).exp(x, order=order), taylor_exp(x, order))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [1, 2, 3, 5])
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-4, 0.1, 0.9, 1.0, 1.5, 4.0]))
def test_taylor_error_bound_holds_entrywise(dtype, order, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 7, dtype=dtype, generator=gen)
    X = torch.randn(6, 7, dtype=dtype, generator=gen) * scale
    err = (W * (torch.exp(X) - taylor_exp(X, order))).abs()
    bound = taylor_remainder_bound(X, order, W)
    # slack: rounding of the two evaluated sides, a few ulp of |W|·e^|X|
    slack = 8 * eps(dtype) * W.abs() * torch.exp(X.abs())
    assert bool((err <= bound + slack).all())
    # and the bound is tight: it is the error for X >= 0 (all Taylor terms positive)
    err_pos = (W * (torch.exp(X.abs()) - taylor_exp(X.abs(), order))).abs()
    torch.testing.assert_close(bound, err_pos, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                               atol=float(slack.max()))


def test_taylor_remainder_bound_matches_mpmath_without_cancellation():
    xs = [1e-8, 1e-3, 0.3, 0.999, 1.0, 1.001, 2.5]
    X = torch.tensor(xs, dtype=torch.float64)
    for order in (1, 2, 4):
        got = taylor_remainder_bound(X, order)
        with mpmath.workdps(60):
            for x, y in zip(xs, got.tolist(), strict=True):
                xm = mpmath.mpf(x)
                ref = mpmath.exp(xm) - sum(xm**j / mpmath.factorial(j) for j in range(order + 1))
                assert abs(mpmath.mpf(y) - ref) <= 1e-13 * ref, (order, x)


def test_batched_shapes_and_broadcasting():
    G = Hadamard((2, 3))
    g = G.random(4, 1)
    h = G.random(5)
    assert G.compose(g, h).shape == (4, 5, 2, 3)
    assert G.contains(g).shape == (4, 1)
    assert G.identity(2, 3).shape == (2, 3, 2, 3)
    assert G.act(G.random(), torch.randn(7, 2, 3)).shape == (7, 2, 3)
    assert G.dim == 6 and G.point_shape == (2, 3)


def test_gradients_flow():
    G = Hadamard((3,))
    X = torch.randn(3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: G.act(G.exp(x), W), (X,))
    assert torch.autograd.gradcheck(lambda x: G.exp(x, order=3), (X,))
    g = G.random(dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(G.log, (g,))


def test_dtype_and_device_are_kept():
    G = Hadamard((2,))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        X = torch.zeros(2, dtype=dtype)
        assert G.exp(X).dtype == dtype and G.identity(dtype=dtype).dtype == dtype


def test_errors():
    G = Hadamard((2, 2))
    with pytest.raises(DomainError, match=r"\[\[0, 1\]\].*-1\.0"):
        G.log(torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
    with pytest.raises(DomainError, match="2 entries"):
        G.log(torch.tensor([[0.0, float("nan")], [2.0, 3.0]]))
    with pytest.raises(ValueError):  # DomainError is a ValueError
        G.log(torch.tensor([[1.0, float("inf")], [2.0, 3.0]]))
    with pytest.raises(ShapeError, match=r"\(\*batch, 2, 2\)"):
        G.exp(torch.zeros(2, 3))
    with pytest.raises(ShapeError):
        G.compose(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ShapeError):
        G.act(torch.ones(2, 2), torch.ones(3, 2))
    with pytest.raises(DTypeError, match="floating"):
        G.exp(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(DTypeError):
        G.exp([[0.0, 0.0], [0.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=">= 1"):
        taylor_exp(torch.zeros(2), 0)
    with pytest.raises(DTypeError):
        taylor_exp(torch.zeros(2), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="positive ints"):
        Hadamard((2, 0))
    with pytest.raises(DTypeError, match="no options"):
        G.act(torch.ones(2, 2), torch.ones(2, 2), mode=1)
    assert not bool(G.contains(torch.tensor([[1.0, 0.0], [1.0, 1.0]])))
    assert not bool(G.contains(torch.tensor([[1.0, float("nan")], [1.0, 1.0]])))
    assert not bool(G.contains(torch.tensor([[1.0, 1e-9], [1.0, 1.0]]), atol=1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exp_refuses_non_finite_input_and_unrepresentable_results(dtype):
    G = Hadamard((2,))
    fi = torch.finfo(dtype)
    with pytest.raises(NonFiniteError, match="non-finite"):
        G.exp(torch.tensor([float("nan"), 0.0], dtype=dtype))
    with pytest.raises(NonFiniteError):
        G.exp(torch.tensor([-float("inf"), 0.0], dtype=dtype))  # exp(-inf) = 0: not in G
    with pytest.raises(NonFiniteError):
        G.exp(torch.tensor([float("nan"), 0.0], dtype=dtype), order=1)
    over = torch.tensor([math.log(fi.max) + 1, 0.0], dtype=dtype)
    with pytest.raises(OverflowResultError, match=r"overflows.*\[\[0\]\]"):
        G.exp(over)
    # a finite X whose exp underflows to 0: 0 is not in the group either
    under = torch.tensor([0.0, math.log(fi.tiny) + math.log(fi.eps) - 2], dtype=dtype)
    assert torch.exp(under)[1] == 0
    with pytest.raises(OverflowResultError, match=r"underflows to 0.*\[\[1\]\]"):
        G.exp(under)
    # the Taylor maps may be zero or negative (they are not group exponentials), but not inf
    assert G.exp(torch.tensor([-1.0, 0.0], dtype=dtype), order=1)[0] == 0
    with pytest.raises(OverflowResultError, match="order-2 Taylor"):
        G.exp(torch.tensor([fi.max, 0.0], dtype=dtype), order=2)
    # in range, both ends
    lo, hi = math.log(fi.tiny), math.log(fi.max) - 1
    y = G.exp(torch.tensor([lo, hi], dtype=dtype))
    assert bool(G.contains(y))


def test_inverse_refuses_points_off_the_group():
    G = Hadamard((2,))
    with pytest.raises(DomainError, match=r"zero entries, e\.g\. at \[\[0\]\]"):
        G.inverse(torch.tensor([0.0, 1.0]))
    with pytest.raises(DomainError):
        G.inverse(torch.tensor([-0.0, 1.0]))
    with pytest.raises(NonFiniteError):
        G.inverse(torch.tensor([float("inf"), 1.0]))
    with pytest.raises(NonFiniteError):
        G.inverse(torch.tensor([float("nan"), 1.0]))
    sub = torch.finfo(torch.float32).tiny / 8  # a subnormal: 1/sub overflows float32
    with pytest.raises(OverflowResultError, match="1/g exceeds"):
        G.inverse(torch.tensor([sub, 1.0]))
    g = torch.tensor([[2.0, -0.25], [1e-30, -1e30]])
    assert torch.equal(G.inverse(g), torch.reciprocal(g))


def test_non_broadcastable_batches_and_bad_batch_sizes_raise_shape_error():
    G = Hadamard((2,))
    a, b = torch.ones(3, 2), torch.ones(4, 2)
    with pytest.raises(ShapeError, match=r"g \(3,\) and h \(4,\) do not broadcast"):
        G.compose(a, b)
    with pytest.raises(ShapeError, match="do not broadcast"):
        G.Ad(a, b)
    with pytest.raises(ShapeError, match="do not broadcast"):
        G.bracket(a, b)
    with pytest.raises(ShapeError, match="do not broadcast"):
        G.act(a, b)
    assert G.compose(torch.ones(3, 1, 2), b).shape == (3, 4, 2)
    assert G.bracket(torch.ones(3, 1, 2), b).shape == (3, 4, 2)
    for make in (G.identity, G.random, G.random_algebra):
        with pytest.raises(ShapeError, match="non-negative"):
            make(-1)
        with pytest.raises(DTypeError, match="ints"):
            make(2.5)  # type: ignore[arg-type]
        assert make(0, 3).shape == (0, 3, 2)
