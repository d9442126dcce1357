"""Group exponentials of finite generators of huge norm are correct rotations (issue 17).

SO(2)/SE(2) take the angle from the generator exactly, SO(3)/SE(3) reduce ``θ = ‖ω‖`` mod 2π
in double-double precision (``liegroup.groups._angles``): checked against mpmath at 60 digits
from the exact (binary) input. Tolerances: a few u of the dtype for the rotation, plus the
``θ·2⁻¹⁰⁴`` of the double-double angle. SO(n)/SE(n), ``n ≥ 4``, refuse (typed) generators
whose angles the dtype cannot resolve.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup.errors import DomainError
from tests.reliability._paths import u

DTYPES = (torch.float32, torch.float64)
mpmath.mp.dps = 60


def _rodrigues_mp(w: list[float]) -> list[list[float]]:
    """exp(hat(w)) from the exact binary values of w, in 60-digit arithmetic."""
    x, y, z = (mpmath.mpf(v) for v in w)
    th = mpmath.sqrt(x * x + y * y + z * z)
    if th == 0:
        return [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    a, b, c = x / th, y / th, z / th
    s, omc = mpmath.sin(th), 1 - mpmath.cos(th)
    K = [[0, -c, b], [c, 0, -a], [-b, a, 0]]
    K2 = [[sum(K[i][k] * K[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
    return [
        [float((1 if i == j else 0) + s * K[i][j] + omc * K2[i][j]) for j in range(3)]
        for i in range(3)
    ]


def _tol(dtype: torch.dtype, theta: float) -> float:
    return 16 * u(dtype) + theta * 2.0**-100


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    mant=st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=3, max_size=3),
    exp10=st.integers(2, 37),
)
def test_so3_exp_of_huge_rotation_vector_matches_mpmath(
    dtype: torch.dtype, mant: list[float], exp10: int
) -> None:
    w = torch.tensor(mant, dtype=torch.float64) * 10.0**exp10
    w = w.to(dtype)
    if not torch.isfinite(w).all() or float(w.double().norm()) == 0:
        return
    G = liegroup.SO(3)
    R = G.exp(G.hat(w))
    assert torch.isfinite(R).all()
    want = torch.tensor(_rodrigues_mp(w.double().tolist()), dtype=torch.float64)
    theta = float(w.double().norm())
    err = float((R.double() - want).abs().max())
    assert err <= _tol(dtype, theta), (err, theta)
    assert bool(G.contains(R))


@pytest.mark.parametrize("dtype", DTYPES)
@given(theta=st.floats(1.0, 3e38, allow_nan=False), sign=st.sampled_from([-1.0, 1.0]))
def test_so2_and_se2_exp_take_the_exact_angle(
    dtype: torch.dtype, theta: float, sign: float
) -> None:
    t = torch.tensor(sign * theta, dtype=dtype)
    if not torch.isfinite(t):
        return
    th = mpmath.mpf(float(t))
    c, s = float(mpmath.cos(th)), float(mpmath.sin(th))
    G = liegroup.SO(2)
    R = G.exp(G.hat(t[None]))
    want = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    assert float((R.double() - want).abs().max()) <= 4 * u(dtype)
    H = liegroup.SE(2)
    g = H.exp(H.hat(torch.stack([torch.ones_like(t), torch.zeros_like(t), t])))
    assert torch.isfinite(g).all()
    assert float((g[:2, :2].double() - want).abs().max()) <= 4 * u(dtype)
    # V ρ for ρ = e1: (sinθ/θ, (1 − cosθ)/θ)
    tv = torch.tensor(
        [float(mpmath.sin(th) / th), float((1 - mpmath.cos(th)) / th)], dtype=torch.float64
    )
    # (subnormal results: absolute error up to the dtype's smallest normal number)
    tiny = torch.finfo(dtype).tiny
    assert torch.allclose(g[:2, 2].double(), tv, rtol=8 * u(dtype), atol=tiny)


@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_exp_of_huge_rotation_matches_mpmath(dtype: torch.dtype) -> None:
    w = [3e19, -4e19, 1.25e20]
    rho = [1.0, 2.0, -3.0]
    xi = torch.tensor(rho + w, dtype=dtype)
    G = liegroup.SE(3)
    g = G.exp(G.hat(xi))
    wv = xi[3:].double().tolist()
    R = torch.tensor(_rodrigues_mp(wv), dtype=torch.float64)
    theta = math.sqrt(sum(v * v for v in wv))
    assert float((g[:3, :3].double() - R).abs().max()) <= _tol(dtype, theta)
    # V ρ = ρ + ((1 − cosθ)/θ) â × ρ + (1 − sinθ/θ) â × (â × ρ)
    x, y, z = (mpmath.mpf(v) for v in wv)
    th = mpmath.sqrt(x * x + y * y + z * z)
    a = [x / th, y / th, z / th]
    r = [mpmath.mpf(v) for v in xi[:3].double().tolist()]

    def cross(p: list, q: list) -> list:
        return [p[1] * q[2] - p[2] * q[1], p[2] * q[0] - p[0] * q[2], p[0] * q[1] - p[1] * q[0]]

    ar = cross(a, r)
    aar = cross(a, ar)
    c1, c2 = (1 - mpmath.cos(th)) / th, 1 - mpmath.sin(th) / th
    t = [float(r[i] + c1 * ar[i] + c2 * aar[i]) for i in range(3)]
    tol = 16 * u(dtype)
    torch.testing.assert_close(
        g[:3, 3].double(), torch.tensor(t, dtype=torch.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_rotation_gradients_are_finite_and_match_the_exact_derivative(
    dtype: torch.dtype,
) -> None:
    # d/dθ of R_z(θ)[0, 0] = cos θ is −sin θ, at θ = 1e20 as well
    G = liegroup.SO(3)
    w = torch.tensor([0.0, 0.0, 1e20], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(G.exp(G.hat(w))[0, 0], w)
    want = -float(mpmath.sin(mpmath.mpf(float(w[2].detach()))))
    assert torch.isfinite(g).all()
    assert abs(float(g[2]) - want) <= 16 * u(dtype)


def test_small_angles_keep_their_closed_form_bits() -> None:
    # below BIG_ANGLE the closed form runs alone (same bits alone and next to a huge angle)
    G = liegroup.SO(3)
    w = torch.tensor([[0.3, -0.2, 0.1], [1e20, 0.0, 0.0]], dtype=torch.float64)
    both = G.exp(G.hat(w))
    alone = G.exp(G.hat(w[:1]))
    assert torch.equal(both[:1], alone)


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_son_exp_refuses_unresolvable_angles(n: int, dtype: torch.dtype) -> None:
    G = liegroup.SO(n)
    v = torch.zeros(G.dim, dtype=dtype)
    v[0] = 1.0 / math.sqrt(u(dtype)) * 4
    with pytest.raises(DomainError, match="cannot be resolved"):
        G.exp(G.hat(v))
    H = liegroup.SE(n)
    xi = torch.zeros(H.dim, dtype=dtype)
    xi[-1] = float(v[0])
    with pytest.raises(DomainError, match="cannot be resolved"):
        H.exp(H.hat(xi))
    # just below the limit: a rotation, accurate to ‖X‖·u (the problem's conditioning)
    v[0] = 0.25 / math.sqrt(u(dtype))
    R = G.exp(G.hat(v)).double()
    err = float((R.mT @ R - torch.eye(n, dtype=torch.float64)).abs().max())
    assert err <= 4 * float(v[0]) * u(dtype)
