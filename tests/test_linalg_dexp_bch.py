"""dexp / dexp_inv conventions and accuracy; BCH coefficients (sympy) and numerics."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import pytest
import sympy
import torch

from liegroup.errors import ConfigError, DomainError, DTypeError, ShapeError
from liegroup.linalg import MAX_BCH_ORDER, bch, dexp, dexp_inv, expm, expm_frechet, logm
from liegroup.linalg.bch import bch_terms

GEN = torch.Generator().manual_seed(11)


def _rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=GEN, dtype=torch.float64)


def _ad_series(X: torch.Tensor, Y: torch.Tensor, coef: list[float]) -> torch.Tensor:
    out = torch.zeros_like(Y)
    term = Y
    for c in coef:
        out = out + c * term
        term = X @ term - term @ X
    return out


# --------------------------------------------------------------------------- dexp
@pytest.mark.parametrize("scale", [1e-6, 0.5, 3.0])
def test_dexp_convention(scale: float) -> None:
    X, Y = _rand(5, 4, 4, scale=scale), _rand(5, 4, 4)
    L = expm_frechet(X, Y)
    diff = (expm(X) @ dexp(X, Y) - L).norm(dim=(-2, -1))
    # dexp = L(-X, Y) e^X: undoing e^{-X} costs the conditioning of e^X
    nrm = lambda M: M.norm(dim=(-2, -1))  # noqa: E731
    bound = 1e-14 * nrm(expm(X)) * nrm(expm(-X)) * nrm(L)
    assert bool((diff <= bound).all()), (diff, bound)


def test_dexp_matches_series_small_x() -> None:
    X, Y = _rand(3, 3, 3, scale=0.3), _rand(3, 3, 3)
    coef = [(-1) ** k / math.factorial(k + 1) for k in range(25)]
    torch.testing.assert_close(dexp(X, Y), _ad_series(X, Y, coef), rtol=1e-13, atol=1e-14)


def _bernoulli_coefs(k: int) -> list[float]:
    # ad/(1 - e^{-ad}) = Σ B_k^+ ad^k / k!  (B_1^+ = +1/2)
    out = []
    for j in range(k):
        b = sympy.bernoulli(j)
        if j == 1:
            b = sympy.Rational(1, 2)
        out.append(float(b) / math.factorial(j))
    return out


def test_dexp_inv_matches_series_small_x() -> None:
    X, Z = _rand(3, 3, 3, scale=0.2), _rand(3, 3, 3)
    torch.testing.assert_close(
        dexp_inv(X, Z), _ad_series(X, Z, _bernoulli_coefs(30)), rtol=1e-12, atol=1e-13
    )


@pytest.mark.parametrize(("n", "scale"), [(1, 2.0), (2, 4.0), (3, 5.0), (4, 1.0), (17, 0.4)])
def test_dexp_inv_round_trip(n: int, scale: float) -> None:
    X, Y = _rand(2, n, n, scale=scale / math.sqrt(n)), _rand(2, n, n)
    Z = dexp(X, Y)
    torch.testing.assert_close(dexp_inv(X, Z), Y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dexp(X, dexp_inv(X, Y)), Y, rtol=1e-9, atol=1e-9)


def test_dexp_inv_se3_large_translation() -> None:
    X = torch.zeros(4, 4, dtype=torch.float64)
    X[:3, :3] = torch.tensor([[0.0, -0.5, 0.2], [0.5, 0.0, -0.3], [-0.2, 0.3, 0.0]])
    X[:3, 3] = torch.tensor([1e3, -2e3, 5e2])
    Y = torch.zeros(4, 4, dtype=torch.float64)
    Y[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    Y[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(dexp_inv(X, dexp(X, Y)), Y, rtol=1e-10, atol=1e-9)


def test_dexp_inv_large_n_outside_strip_raises() -> None:
    n = 17
    X = torch.zeros(n, n, dtype=torch.float64)
    X[0, 1], X[1, 0] = -4.0, 4.0  # eigenvalues ±4i, |Im| > π
    with pytest.raises(DomainError):
        dexp_inv(X, torch.eye(n, dtype=torch.float64))


def test_dexp_gradcheck() -> None:
    X = _rand(2, 3, 3, scale=0.7).requires_grad_()
    Y = _rand(2, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(dexp, (X, Y))
    assert torch.autograd.gradcheck(dexp_inv, (X, Y))


def test_dexp_validation() -> None:
    with pytest.raises(ShapeError):
        dexp(torch.zeros(3, 3), torch.zeros(2, 2))
    with pytest.raises(DTypeError):
        dexp_inv(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 3))


def test_dexp_float32_and_broadcast() -> None:
    X, Y = _rand(4, 3, 3, scale=0.8), _rand(3, 3)
    out = dexp(X.float(), Y.float())
    assert out.dtype == torch.float32 and out.shape == (4, 3, 3)
    torch.testing.assert_close(out.double(), dexp(X, Y), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- BCH
def _nc_truncated_log_exp_exp(order: int) -> tuple[sympy.Expr, sympy.Symbol, sympy.Symbol]:
    """Σ_k t^k Z_k of log(exp(tX) exp(tY)) in non-commuting X, Y, truncated at t^order."""
    X, Y = sympy.symbols("X Y", commutative=False)
    t = sympy.Symbol("t")

    def trunc(e: sympy.Expr) -> sympy.Expr:
        e = sympy.expand(e)
        return sympy.Add(*[a for a in sympy.Add.make_args(e) if a.as_coeff_exponent(t)[1] <= order])

    def exp_series(A: sympy.Expr) -> sympy.Expr:
        return sympy.Add(*[(t * A) ** k / sympy.factorial(k) for k in range(order + 1)])

    P = trunc(exp_series(X) * exp_series(Y) - 1)
    log = sympy.Integer(0)
    Pk = sympy.Integer(1)
    for k in range(1, order + 1):
        Pk = trunc(Pk * P)
        log += sympy.Rational((-1) ** (k + 1), k) * Pk
    return sympy.expand(log), X, Y


def test_bch_coefficients_match_sympy() -> None:
    order = 5
    log_series, X, Y = _nc_truncated_log_exp_exp(order)
    t = sympy.Symbol("t")

    def bracket(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        return sympy.expand(a * b - b * a)

    def add(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        return a + b

    def scale(c: Fraction, a: sympy.Expr) -> sympy.Expr:
        return sympy.Rational(c.numerator, c.denominator) * a

    terms = bch_terms(X, Y, order, bracket, add, scale)
    ours = sympy.expand(sum(t ** (k + 1) * z for k, z in enumerate(terms)))
    assert sympy.expand(ours - log_series) == 0
    # a known coefficient, for readability: Z_4 = -[Y, [X, [X, Y]]]/24
    XY = bracket(X, Y)
    assert sympy.expand(terms[3] + sympy.Rational(1, 24) * bracket(Y, bracket(X, XY))) == 0


@pytest.mark.slow
def test_bch_coefficients_match_sympy_order_7() -> None:
    order = 7
    log_series, X, Y = _nc_truncated_log_exp_exp(order)
    t = sympy.Symbol("t")
    terms = bch_terms(
        X,
        Y,
        order,
        lambda a, b: sympy.expand(a * b - b * a),
        lambda a, b: a + b,
        lambda c, a: sympy.Rational(c.numerator, c.denominator) * a,
    )
    ours = sympy.expand(sum(t ** (k + 1) * z for k, z in enumerate(terms)))
    assert sympy.expand(ours - log_series) == 0


@pytest.mark.parametrize("order", [1, 2, 3, 5, 8, 12])
def test_bch_numeric_vs_logm(order: int) -> None:
    eps_ = 0.02
    X, Y = _rand(3, 4, 4, scale=eps_), _rand(3, 4, 4, scale=eps_)
    exact = logm(expm(X) @ expm(Y))
    err = float((bch(X, Y, order=order) - exact).norm(dim=(-2, -1)).max())
    size = float((X.norm(dim=(-2, -1)) + Y.norm(dim=(-2, -1))).max())
    assert err <= max(size ** (order + 1), 1e-15), (order, err, size ** (order + 1))


def test_bch_stays_in_so3_and_grad() -> None:
    A, B = _rand(3, 3, scale=0.1), _rand(3, 3, scale=0.1)
    X, Y = A - A.T, B - B.T
    Z = bch(X, Y, order=6)
    torch.testing.assert_close(Z, -Z.T, rtol=0, atol=1e-17)
    assert torch.autograd.gradcheck(
        lambda a, b: bch(a, b, order=4), (X.clone().requires_grad_(), Y.clone().requires_grad_())
    )


def test_bch_errors() -> None:
    X = torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="order"):
        bch(X, X, order=0)
    with pytest.raises(ConfigError, match="order"):
        bch(X, X, order=MAX_BCH_ORDER + 1)
    with pytest.raises(DTypeError):
        bch(X, X, order=True)
    with pytest.raises(ShapeError):
        bch(X, torch.zeros(3, 3))


def test_bch_max_order_cost_reasonable() -> None:
    X, Y = _rand(8, 8, scale=0.01), _rand(8, 8, scale=0.01)
    t0 = time.perf_counter()
    bch(X, Y, order=MAX_BCH_ORDER)
    assert time.perf_counter() - t0 < 5.0
    assert np.isfinite(bch(X, Y, order=MAX_BCH_ORDER).numpy()).all()
