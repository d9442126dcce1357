"""Closed-form groups SO(2), SO(3), SE(2), SE(3): coefficients and maps against mpmath, both
sides of every switch of the per-dtype table, Jacobians, gradients, batch invariance, errors.

Tolerances are in units of the dtype's unit roundoff ``u`` and derived in each test's comment.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup.errors import DomainError, DTypeError, NonFiniteError, ShapeError
from liegroup.groups._coeffs import coefficient
from liegroup.groups._thresholds import SERIES, THRESHOLDS
from liegroup.groups.se import se3_exp, se3_log
from liegroup.groups.so import so3_exp, so3_hat, so3_log
from tests.conftest import eps

DTYPES = [torch.float32, torch.float64]
CLOSED = [liegroup.SO(2), liegroup.SO(3), liegroup.SE(2), liegroup.SE(3)]
mp = mpmath.mp


# ---------------------------------------------------------------------------- mpmath oracles
def _mp_coef(name: str, x: mpmath.mpf) -> mpmath.mpf:
    s, c = mpmath.sin(x), mpmath.cos(x)
    return {
        "sinc": lambda: s / x,
        "cosc": lambda: (1 - c) / x**2,
        "sinc3": lambda: (x - s) / x**3,
        "cosc4": lambda: (x**2 / 2 + c - 1) / x**4,
        "q3": lambda: (2 * x - 3 * s + x * c) / (2 * x**5),
        "dinv": lambda: (1 - (x / 2) * mpmath.cot(x / 2)) / x**2,
        "asinc": lambda: mpmath.asin(x) / x,
    }[name]()


def _mp_hat(w):
    return mpmath.matrix([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def _mp_so3_exp(w):
    """Rodrigues at 80 digits from the exact (float) components of ω."""
    th = mpmath.sqrt(sum(x * x for x in w))
    K = _mp_hat(w)
    if th == 0:
        return mpmath.eye(3)
    return mpmath.eye(3) + (mpmath.sin(th) / th) * K + ((1 - mpmath.cos(th)) / th**2) * (K * K)


def _mp_se3_exp(xi):
    rho, w = xi[:3], xi[3:]
    th = mpmath.sqrt(sum(x * x for x in w))
    K = _mp_hat(w)
    R = _mp_so3_exp(w)
    if th == 0:
        V = mpmath.eye(3)
    else:
        V = (
            mpmath.eye(3)
            + ((1 - mpmath.cos(th)) / th**2) * K
            + ((th - mpmath.sin(th)) / th**3) * (K * K)
        )
    t = V * mpmath.matrix(rho)
    out = mpmath.eye(4)
    for i in range(3):
        for j in range(3):
            out[i, j] = R[i, j]
        out[i, 3] = t[i]
    return out


def _to_mp(x: torch.Tensor) -> list:
    return [mpmath.mpf(float(v)) for v in x.double().tolist()]


def _axis(seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(3, generator=g, dtype=torch.float64)
    return (n / n.norm()).tolist()


# ---------------------------------------------------------------------------- the table
SWITCHES = [(d, name) for d in DTYPES for name in THRESHOLDS[d] if name != "log_pi"]


@pytest.mark.parametrize(("dtype", "name"), SWITCHES)
def test_coefficients_both_sides_of_each_switch_match_mpmath(dtype, name):
    # Relative error budget (16 + 2κ)u: series truncation <= u/4 (derived in the table),
    # Horner and closed-form rounding a few u, the closed form's cancellation <= 8u at the
    # switch; and the rounding of θ = sqrt(z), amplified by the condition number
    # κ = |θ f'(θ)/f(θ)| of what follows it. torch's sqrt is faithful, not correctly rounded,
    # on every CPU (measured up to 0.75 ulp in float32 with AVX-512): <= 1 ulp <= 2u relative,
    # hence 2κu. (κ is large only for sinθ/θ near π, which is evaluated from z there and is
    # checked without the κ term by test_sinc_near_pi_accurate_for_any_kappa.)
    thr = THRESHOLDS[dtype][name].threshold
    pts = [0.0, 1e-8, 1e-4, thr * (1 - 1e-3), thr * (1 + 1e-3), 0.5 * thr, 2 * thr]
    hi = 0.99 if name == "asinc" else math.pi - 1e-6
    pts += [hi * k / 60 for k in range(1, 61)]  # a sweep of the whole range
    if name == "asinc":
        pts = [p for p in pts if p < 0.995]
    z = torch.tensor([p * p for p in pts], dtype=dtype)
    got = coefficient(name, z).tolist()
    u = eps(dtype)
    with mpmath.workdps(80):
        for zi, gi in zip(z.tolist(), got, strict=True):
            x = mpmath.sqrt(mpmath.mpf(zi))
            ref = float(SERIES[name][0]) if x == 0 else _mp_coef(name, x)
            err = abs(mpmath.mpf(gi) - ref) / abs(ref)
            kappa = 0 if x == 0 else abs(x * mpmath.diff(lambda t: _mp_coef(name, t), x) / ref)
            assert err <= (16 + 2 * kappa) * u, (name, zi, float(err / u))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinc_near_pi_accurate_for_any_kappa(dtype):
    # sinθ/θ vanishes at θ = π (κ = |θ f'/f| ≈ π/|π − θ|, 10⁶ at π − θ = 10⁻⁶ in float32); it is
    # evaluated as sin(d)/θ with d = π − θ = ((π²_hi − z) + π²_lo)/(π + θ), so the rounding of
    # θ = sqrt(z) is not amplified. Relative budget 16u, κ-free: π²_hi − z exact (Sterbenz),
    # + π²_lo and the division by π + θ: 2u; π + θ: π's rounding, θ's (<= 2u, a faithful
    # sqrt), halved by the sum, and its own: 2.5u; sin (<= 1 ulp, 2u) at |d| <= π/2, where
    # its condition number |d·cot d| <= 1 carries d's 4.5u; the division by θ: 3u. ≈ 12u.
    hi = torch.tensor(math.pi**2, dtype=dtype)
    zs = [hi]
    for direction in (0.0, 20.0):
        z = hi
        for _ in range(40):  # the 40 floats on either side of π²
            z = torch.nextafter(z, torch.tensor(direction, dtype=dtype))
            zs.append(z)
    for k in range(1, 8):
        zs += [torch.tensor((math.pi - 10.0**-k) ** 2, dtype=dtype),
               torch.tensor((math.pi + 10.0**-k) ** 2, dtype=dtype)]
    z = torch.stack(zs)
    got = coefficient("sinc", z).tolist()
    u = eps(dtype)
    worst = 0.0
    with mpmath.workdps(80):
        for zi, gi in zip(z.tolist(), got, strict=True):
            x = mpmath.sqrt(mpmath.mpf(zi))
            ref = mpmath.sin(x) / x
            err = float(abs(mpmath.mpf(gi) - ref) / abs(ref))
            kappa = float(abs(x * mpmath.diff(lambda t: _mp_coef("sinc", t), x) / ref))
            worst = max(worst, kappa)
            assert err <= 16 * u, (zi, err / u, kappa)
    assert worst > 1e5  # the sweep reaches the ill-conditioned points


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sinc", "cosc", "sinc3", "cosc4", "q3", "dinv"])
def test_coefficient_gradients_finite_and_match_mpmath(dtype, name):
    # d f / d z on both sides of the switch and at 0; relative budget 64u·(1 + C/θ^p) is not
    # needed: the series side is a polynomial, the closed side is checked away from 0.
    thr = THRESHOLDS[dtype][name].threshold
    pts = [0.0, thr * (1 - 1e-3), thr * (1 + 1e-3), 2.0]
    z = torch.tensor([p * p for p in pts], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(coefficient(name, z).sum(), z)
    assert torch.isfinite(g).all()
    with mpmath.workdps(80):
        for zi, gi in zip(z.tolist(), g.tolist(), strict=True):
            if zi == 0:
                ref = mpmath.mpf(SERIES[name][1].numerator) / SERIES[name][1].denominator
            else:
                ref = mpmath.diff(lambda s: _mp_coef(name, mpmath.sqrt(s)), mpmath.mpf(zi))
            tol = (1e-3 if dtype == torch.float32 else 1e-9) * abs(ref)
            assert abs(gi - ref) <= tol, (name, zi, gi, float(ref))


# ---------------------------------------------------------------------------- SO(3) vs mpmath
def _angles(dtype):
    t = THRESHOLDS[dtype]
    a = t["asinc"].threshold
    return [
        0.0, 1e-8, 1e-4, t["sinc"].threshold * (1 - 1e-3), t["sinc"].threshold * (1 + 1e-3),
        math.asin(a * (1 - 1e-3)), math.asin(a * (1 + 1e-3)), 0.5, 1.0, 2.0,
        math.pi / 2 - 1e-3, math.pi / 2 + 1e-3, 3.0, math.pi - 1e-3, math.pi - 1e-6,
    ]  # fmt: skip


def _check_so3_exp_log_mpmath(w: torch.Tensor, R: torch.Tensor, th: float, dps: int) -> None:
    """``R = exp(ŵ)`` and ``so3_log`` of the correctly rounded ``exp(ŵ)`` against mpmath."""
    u = eps(w.dtype)
    with mpmath.workdps(dps):
        wm = _to_mp(w)
        Rm = _mp_so3_exp(wm)
        # exp: ‖J_l‖ <= 1, so rounding the input contributes <= u·θ; the evaluation (z,
        # coefficients within 16u relative, two 3-term products) a few u: budget 4u(2 + θ).
        err = max(abs(mpmath.mpf(float(R[a, b])) - Rm[a, b]) for a in range(3) for b in range(3))
        assert err <= 4 * u * (2 + th), (th, float(err / u))
        # log of the correctly rounded rotation: its entries carry <= u absolute error, and
        # ‖J_l⁻¹(ω)‖ <= θ/2·cot-bounded <= 1 + θ²/8... on [0, π]; the skew/symmetric axis
        # estimates lose <= u/sinθ resp. u/(1−cosθ) <= √2·u relative, times θ: 8u·(θ + θ²).
        Rr = torch.tensor([[float(Rm[a, b]) for b in range(3)] for a in range(3)], dtype=w.dtype)
        lw = so3_log(Rr)
        err = max(abs(mpmath.mpf(float(lw[k])) - wm[k]) for k in range(3))
        assert err <= 8 * u * (th + th * th) + (4 * u if th == 0 else 0), (th, float(err / u))


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_exp_and_log_match_mpmath(dtype):
    G = liegroup.SO(3)
    for i, th in enumerate(_angles(dtype)):
        w = torch.tensor(_axis(i), dtype=torch.float64) * th
        w = w.to(dtype)
        R = G.exp(G.hat(w))
        _check_so3_exp_log_mpmath(w, R, th, 60)
        # the group log is exactly skew
        L = G.log(R)
        assert torch.equal(L, -L.mT)


@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_exp_log_match_mpmath_large_translation(dtype):
    # Translations of size 1e3 next to rotations near 0 and π: the translation error is
    # relative to ‖ρ‖ (V = J_l(ω) has norm <= 1 and V⁻¹ norm <= π/2·(1 + ...)), budget 16u(1+θ).
    u = eps(dtype)
    for i, th in enumerate(_angles(dtype)):
        xi = torch.tensor([1e3, -2e3, 5e2, *(torch.tensor(_axis(i)) * th).tolist()], dtype=dtype)
        g = se3_exp(xi)
        with mpmath.workdps(60):
            xm = _to_mp(xi)
            gm = _mp_se3_exp(xm)
            scale = 1 + max(abs(x) for x in xm[:3])
            err = max(abs(mpmath.mpf(float(g[a, 3])) - gm[a, 3]) for a in range(3))
            assert err <= 16 * u * (1 + th) * scale, (th, float(err / u / scale))
            gr = torch.tensor([[float(gm[a, b]) for b in range(4)] for a in range(4)], dtype=dtype)
            lx = se3_log(gr)
            err = max(abs(mpmath.mpf(float(lx[k])) - xm[k]) for k in range(3))
            assert err <= 16 * u * (1 + th) ** 2 * scale, (th, float(err / u / scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_so2_se2_match_mpmath(dtype):
    u = eps(dtype)
    G = liegroup.SE(2)
    for th in [0.0, 1e-8, 1e-4, 0.02, 0.04, 1.0, 3.0, math.pi - 1e-6]:
        xi = torch.tensor([3.0, -4.0, th], dtype=dtype)
        g = G.exp(G.hat(xi))
        with mpmath.workdps(50):
            t = mpmath.mpf(float(xi[2]))
            a = mpmath.sinc(t) if t != 0 else mpmath.mpf(1)
            b = (1 - mpmath.cos(t)) / t if t != 0 else mpmath.mpf(0)
            ref = [a * 3 - b * -4, b * 3 + a * -4, mpmath.cos(t), mpmath.sin(t)]
            got = [g[0, 2], g[1, 2], g[0, 0], g[1, 0]]
            for r, v in zip(ref, got, strict=True):
                assert abs(mpmath.mpf(float(v)) - r) <= 8 * u * 5 * (1 + th), (th, float(r))
        torch.testing.assert_close(G.vee(G.log(g)), xi, rtol=0, atol=16 * u * 5 * (1 + th))


# ---------------------------------------------------------------------------- properties
def _scaled_algebra(G, batch, dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(*batch, G.dim, dtype=torch.float64, generator=gen)
    k = G.dim - (G.k * (G.k - 1) // 2 if isinstance(G, liegroup.SE) else 0)
    rot = v[..., -k:] if isinstance(G, liegroup.SE) else v
    if scale == "near_pi":
        n = rot / rot.norm(dim=-1, keepdim=True)
        # stay 1e-5 below π: float32 rounding of the components must not cross π (a wrap)
        off = 1e-5 + torch.rand(*batch, 1, dtype=torch.float64, generator=gen) * 1e-3
        rot = n * (math.pi - off)
    elif scale == "generic":
        n = rot / rot.norm(dim=-1, keepdim=True)
        rot = n * torch.rand(*batch, 1, dtype=torch.float64, generator=gen) * (math.pi - 1e-2)
    else:
        rot = rot * scale
    v = torch.cat([v[..., : G.dim - k], rot], -1) if isinstance(G, liegroup.SE) else rot
    return G.hat(v.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", CLOSED, ids=repr)
@pytest.mark.parametrize("scale", [1e-7, 1e-2, "generic", "near_pi"])
@given(seed=st.integers(0, 2**31 - 1))
def test_log_exp_roundtrips(dtype, G, scale, seed):
    X = _scaled_algebra(G, (4,), dtype, seed, scale)
    u = eps(dtype)
    g = G.exp(X)
    assert bool(G.contains(g).all())
    # log∘exp = id on the principal domain: error <= c·u·|X|·(1 + θ)² (conditioning of log).
    nx = X.abs().flatten(-2).amax(-1).clamp(min=1e-30)[..., None, None]
    err = (G.log(g) - X).abs()
    assert bool((err <= 64 * u * nx * (1 + nx) ** 2).all()), float((err / nx).max() / u)
    # exp∘log = id on the group
    torch.testing.assert_close(G.exp(G.log(g)), g, rtol=0, atol=64 * u * float((1 + nx).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", CLOSED, ids=repr)
@given(seed=st.integers(0, 2**31 - 1))
def test_group_axioms_and_adjoint(dtype, G, seed):
    gen = torch.Generator().manual_seed(seed)
    g, h, k = (G.random(3, dtype=dtype, generator=gen) for _ in range(3))
    u = eps(dtype)
    tol = 64 * u * 10  # translations of SE(n) are standard normal: |t| <~ 5
    assert bool(G.contains(G.compose(g, h)).all())
    torch.testing.assert_close(
        G.compose(G.compose(g, h), k), G.compose(g, G.compose(h, k)), rtol=0, atol=tol
    )
    e = G.identity(dtype=dtype)
    assert torch.equal(G.compose(e, g), g)
    torch.testing.assert_close(
        G.compose(g, G.inverse(g)), G.identity(3, dtype=dtype), rtol=0, atol=tol
    )
    X = _scaled_algebra(G, (3,), dtype, seed, "generic")
    # exp(Ad_g X) = g exp(X) g⁻¹
    torch.testing.assert_close(
        G.exp(G.Ad(g, X)), G.compose(G.compose(g, G.exp(X)), G.inverse(g)), rtol=0, atol=tol
    )
    # Ad in coordinates
    torch.testing.assert_close(
        G.vee(G.Ad(g, X)), (G.adjoint_matrix(g) @ G.vee(X)[..., None])[..., 0], rtol=0, atol=tol
    )


@pytest.mark.parametrize("G", CLOSED, ids=repr)
@given(seed=st.integers(0, 2**31 - 1))
def test_bracket_properties(G, seed):
    gen = torch.Generator().manual_seed(seed)
    X, Y, Z = (G.random_algebra(2, dtype=torch.float64, generator=gen) for _ in range(3))
    a, b = 0.7, -1.3
    br = G.bracket
    torch.testing.assert_close(br(X, Y), -br(Y, X), rtol=0, atol=1e-14)
    jac = br(X, br(Y, Z)) + br(Y, br(Z, X)) + br(Z, br(X, Y))
    torch.testing.assert_close(jac, torch.zeros_like(jac), rtol=0, atol=1e-13)
    torch.testing.assert_close(
        br(a * X + b * Y, Z), a * br(X, Z) + b * br(Y, Z), rtol=0, atol=1e-13
    )
    assert bool(G.contains_algebra(br(X, Y)).all())


# ---------------------------------------------------------------------------- Jacobians
def _autograd_jacobians(G, X):
    v = G.vee(X)
    g = G.exp(X)
    gi = G.inverse(g)

    def right(d):
        return G.vee(G.log(G.compose(gi, G.exp(G.hat(v + d)))))

    def left(d):
        return G.vee(G.log(G.compose(G.exp(G.hat(v + d)), gi)))

    z = torch.zeros(G.dim, dtype=X.dtype)
    return (
        torch.autograd.functional.jacobian(left, z),
        torch.autograd.functional.jacobian(right, z),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", CLOSED, ids=repr)
@pytest.mark.parametrize("scale", [0.0, 1e-9, 0.03, 0.5, "generic", "near_pi"])
def test_jacobians(dtype, G, scale):
    X = (
        _scaled_algebra(G, (), dtype, 7, scale)
        if scale != 0.0
        else G.hat(torch.zeros(G.dim, dtype=dtype))
    )
    u = eps(dtype)
    Jl, Jr = G.left_jacobian(X), G.right_jacobian(X)
    Jli, Jri = G.left_jacobian_inv(X), G.right_jacobian_inv(X)
    eye = torch.eye(G.dim, dtype=dtype)
    nx = float(X.abs().max()) + 1
    # near π, J_l⁻¹ has norm ~ π²/4·(1 + |ρ|): products lose that factor
    tol = 64 * u * nx**3
    torch.testing.assert_close(Jl @ Jli, eye, rtol=0, atol=tol)
    torch.testing.assert_close(Jr @ Jri, eye, rtol=0, atol=tol)
    # J_l(ξ) = Ad_{exp ξ} J_r(ξ)
    torch.testing.assert_close(Jl, G.adjoint_matrix(G.exp(X)) @ Jr, rtol=0, atol=tol)
    # against autograd through exp and log (float64; the near-π log is differentiable there)
    if dtype == torch.float64:
        Al, Ar = _autograd_jacobians(G, X)
        torch.testing.assert_close(Jl, Al, rtol=0, atol=1e-9 * nx**3)
        torch.testing.assert_close(Jr, Ar, rtol=0, atol=1e-9 * nx**3)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("G", CLOSED, ids=repr)
@pytest.mark.parametrize("scale", [0.0, 1e-9, 0.03, 1.0, 2.0])
def test_gradcheck_float64(G, scale):
    v = torch.randn(G.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = (v * scale if scale else torch.zeros_like(v)).requires_grad_()
    if isinstance(G, liegroup.SE):
        v = (v + torch.cat([torch.ones(G.k), torch.zeros(G.dim - G.k)]).double()).detach()
        v.requires_grad_()

    def f(w):
        X = G.hat(w)
        g = G.exp(X)
        return g, G.vee(G._log(g)), G.left_jacobian(X), G.right_jacobian_inv(X)

    assert torch.autograd.gradcheck(f, (v,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("th", [0.0, 1e-12, math.pi - 1e-9, math.pi - 1e-5])
def test_gradients_finite_at_singular_points(dtype, th):
    w = (torch.tensor(_axis(1), dtype=torch.float64) * th).to(dtype).requires_grad_()
    R = so3_exp(w)
    out = so3_log(R).sum() + R.sum()
    xi = torch.cat([torch.tensor([1.0, 2.0, 3.0], dtype=dtype), w])
    g = se3_exp(xi)
    out = out + se3_log(g).sum() + g.sum()
    G = liegroup.SE(3)
    out = out + G.left_jacobian_inv(G.hat(xi)).sum() + G.right_jacobian(G.hat(xi)).sum()
    (grad,) = torch.autograd.grad(out, w)
    assert torch.isfinite(grad).all(), grad
    # log∘exp is the identity on (0, π): its gradient is all ones (not testable in float32 at
    # π − 1e-9: that angle is not distinguishable from π at float32 resolution)
    if dtype == torch.float32 and th == math.pi - 1e-9:
        return
    w2 = w.detach().requires_grad_()
    (gr,) = torch.autograd.grad(so3_log(so3_exp(w2)).sum(), w2)
    torch.testing.assert_close(
        gr, torch.ones_like(gr), rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-6
    )


# ---------------------------------------------------------------------------- batches
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", CLOSED, ids=repr)
def test_batch_invariance(dtype, G):
    # an element alone and inside a batch (of mixed regimes) gives the same values to a few
    # ulps: products are element-wise (no BLAS kernel chosen by batch size), but PyTorch's CPU
    # kernels evaluate sin/cos/atan2 by vectorised code in full lanes and by scalar libm in
    # the tail, each within 1 ulp, so the bits of one element may depend on its position
    # (seen for atan2 with AVX2 kernels). The closed forms apply about ten operations after
    # them to O(1) values (θ ≤ π, away from 2π): 32·u, absolute and relative.
    u = torch.finfo(dtype).eps / 2
    Xs = torch.cat([_scaled_algebra(G, (3,), dtype, 5, s) for s in [1e-9, 0.5, "near_pi"]])
    g = G.exp(Xs)
    L = G.log(g)
    J = G.left_jacobian_inv(Xs)
    for i in range(Xs.shape[0]):
        for alone, in_batch in ((G.exp(Xs[i]), g[i]), (G.log(g[i]), L[i]),
                                (G.left_jacobian_inv(Xs[i]), J[i])):
            torch.testing.assert_close(alone, in_batch, rtol=32 * u, atol=32 * u)
    # broadcasting batch shapes
    a, b = G.random(2, 1, dtype=dtype), G.random(3, dtype=dtype)
    assert G.compose(a, b).shape == (2, 3, *G.point_shape)


def test_se_log_exactly_shaped_and_hat_vee():
    for G in [liegroup.SE(2), liegroup.SE(3)]:
        g = G.random(10, dtype=torch.float64)
        L = G.log(g)
        k = G.k
        assert torch.equal(L[..., k, :], torch.zeros_like(L[..., k, :]))
        assert torch.equal(L[..., :k, :k], -L[..., :k, :k].mT)
        v = torch.randn(5, G.dim, dtype=torch.float64)
        assert torch.equal(G.vee(G.hat(v)), v)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(
        so3_hat(w) @ torch.tensor([4.0, 5.0, 6.0]),
        torch.linalg.cross(w, torch.tensor([4.0, 5.0, 6.0])),
    )


def test_projections():
    G = liegroup.SO(3)
    R = G.random(4, dtype=torch.float64)
    noisy = R + 1e-4 * torch.randn(4, 3, 3, dtype=torch.float64)
    P = G.project(noisy)
    assert bool(G.contains(P).all())
    assert float((P - R).abs().max()) < 1e-3
    assert torch.equal(
        G.project(G.project(noisy)).sub(P).abs().lt(1e-14), torch.ones_like(P, dtype=torch.bool)
    )
    refl = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))  # det −1
    assert bool(G.contains(G.project(refl)))
    H = liegroup.SE(3)
    g = H.random(2, dtype=torch.float64)
    gn = g + 1e-5
    assert bool(H.contains(H.project(gn)).all())
    X = torch.randn(2, 4, 4, dtype=torch.float64)
    assert bool(H.contains_algebra(H.project_algebra(X)).all())


# ---------------------------------------------------------------------------- errors
def test_error_paths():
    G = liegroup.SO(3)
    with pytest.raises(ShapeError):
        G.exp(torch.zeros(4, 4))
    with pytest.raises(ShapeError):
        G.hat(torch.zeros(4))
    with pytest.raises(DTypeError):
        G.exp(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(NonFiniteError):
        G.exp(torch.full((3, 3), float("nan")))
    with pytest.raises(DomainError, match="project_algebra"):
        G.exp(torch.ones(3, 3))  # not skew
    with pytest.raises(DomainError, match="not on"):
        G.log(2 * torch.eye(3))
    with pytest.raises(DomainError):
        G.log(torch.diag(torch.tensor([1.0, 1.0, -1.0])))  # det −1
    with pytest.raises(NonFiniteError):
        G.log(torch.full((3, 3), float("inf")))
    with pytest.raises(ShapeError):
        liegroup.SO(1)
    with pytest.raises(ShapeError):
        liegroup.SE(1)
    with pytest.raises(ShapeError):
        G.act(G.identity(), torch.zeros(2, 4), mode=1)
    with pytest.raises(DTypeError, match="mode=k"):
        G.act(G.identity(), torch.zeros(3), axis=0)
    H = liegroup.SE(3)
    with pytest.raises(DomainError):
        H.exp(torch.ones(4, 4))  # bottom row not zero
    with pytest.raises(ShapeError):
        H.hat(torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", CLOSED, ids=repr)
def test_half_precision_computes_in_float32_and_rounds_once(dtype, G):
    X32 = _scaled_algebra(G, (5,), torch.float32, 2, "generic")
    X = X32.to(dtype)
    g = G.exp(X)
    assert g.dtype == dtype
    assert torch.equal(g, G.exp(X.float()).to(dtype))
    assert bool(G.contains(g).all())
    L = G.log(g)
    assert L.dtype == dtype
    assert torch.equal(L, G._log(g.float()).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("G", CLOSED, ids=repr)
def test_cuda_matches_cpu(G):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for dtype in DTYPES:
        X = torch.cat(
            [_scaled_algebra(G, (50,), dtype, 4, s) for s in [1e-9, "generic", "near_pi"]]
        )
        u = eps(dtype)
        Xc = X.cuda()
        g, gc = G.exp(X), G.exp(Xc)
        assert gc.device.type == "cuda"
        torch.testing.assert_close(gc.cpu(), g, rtol=0, atol=64 * u * 10)
        torch.testing.assert_close(G.log(gc).cpu(), G.log(g), rtol=0, atol=256 * u * 10)
        torch.testing.assert_close(
            G.left_jacobian_inv(Xc).cpu(), G.left_jacobian_inv(X), rtol=0, atol=256 * u * 100
        )
        # batch invariance on the device too
        for i in [0, 60, 149]:
            assert torch.equal(G.exp(Xc[i]), gc[i])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_dense_angle_sweep_against_mpmath(dtype):
    # the budgets of test_so3_exp_and_log_match_mpmath, on 600 angles spread over (0, π)
    # (log-spaced near 0 and near π, uniform in between)
    angles = [10.0**-k for k in range(1, 9)]
    angles += [math.pi * k / 200 for k in range(1, 200)]
    angles += [math.pi - 10.0 ** (-k / 4) for k in range(4, 24)]
    for i, th in enumerate(angles * 2):
        w = (torch.tensor(_axis(1000 + i), dtype=torch.float64) * th).to(dtype)
        _check_so3_exp_log_mpmath(w, so3_exp(w), th, 50)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [liegroup.SO(2), liegroup.SO(3), liegroup.SO(5), liegroup.SE(3)],
                         ids=repr)
def test_random_in_half_precision_is_the_float32_draw_rounded_once(dtype, G):
    g = G.random(7, dtype=dtype, generator=torch.Generator().manual_seed(3))
    assert g.dtype == dtype and g.shape == (7, *G.point_shape)
    assert bool(G.contains(g).all())
    if isinstance(G, liegroup.SO):
        ref = G.random(7, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
        assert torch.equal(g, ref.to(dtype))
