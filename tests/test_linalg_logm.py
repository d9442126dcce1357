"""Accuracy, domain errors and gradients of liegroup.linalg.logm."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup.errors import DomainError, DTypeError, NonFiniteError, ShapeError
from liegroup.linalg import expm, expm_frechet, logm
from tests.conftest import eps
from tests.linalg_cases import HARD, _axis_angle, logm_ref, rel_err

U64 = eps(torch.float64)
U32 = eps(torch.float32)


def _scipy_logm(A: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.real(scipy.linalg.logm(A))


def _rng_matrix(seed: int, n: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((n, n)) / math.sqrt(n)


LOG_CASES = {
    "near_identity_1e-8": np.eye(3) + 1e-8 * _rng_matrix(1, 3, 1.0),
    "near_identity_1e-3": np.eye(4) + 1e-3 * _rng_matrix(2, 4, 1.0),
    "rotation_small": scipy.linalg.expm(HARD["so3_small"]),
    "rotation_generic": scipy.linalg.expm(_axis_angle(2.0)),
    "se3_large_translation": scipy.linalg.expm(HARD["se3_large_translation"]),
    "jordan_block": np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 2.0]]),
    "nonnormal_triangular": np.array([[1.0, 1e3], [0.0, 2.0]]),
    "pascal_5": scipy.linalg.pascal(5).astype(float),
    "ill_conditioned_diag": np.diag([1e-6, 1.0, 1e6]),
    "complex_pair": np.array([[0.5, -3.0], [3.0, 0.5]]),
    "exp_burkardt_9": scipy.linalg.expm(HARD["burkardt_9"] / 4),
}


@pytest.mark.parametrize("name", list(LOG_CASES))
def test_logm_vs_mpmath_and_scipy(name: str) -> None:
    A = LOG_CASES[name]
    ref = logm_ref(A)
    err = rel_err(logm(torch.tensor(A)).numpy(), ref)
    err_sp = rel_err(_scipy_logm(A), ref)
    assert err <= max(10 * err_sp, 1e-13), (name, err, err_sp)


@pytest.mark.parametrize("name", ["near_identity_1e-3", "rotation_generic", "pascal_5"])
def test_logm_float32(name: str) -> None:
    A32 = torch.tensor(LOG_CASES[name]).float()
    A = A32.double().numpy()
    ref = logm_ref(A)
    err = rel_err(logm(A32).double().numpy(), ref)
    assert err <= 200 * U32 * max(1.0, float(np.linalg.cond(A)) ** 0.5)


@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_logm_rotation_near_pi(delta: float) -> None:
    X = _axis_angle(math.pi - delta)
    L = logm(torch.tensor(scipy.linalg.expm(X))).numpy()
    # relative condition number of log here is ~ 1/delta
    assert rel_err(L, X) <= 100 * U64 / delta
    assert rel_err(L, X) <= 2 * max(rel_err(_scipy_logm(scipy.linalg.expm(X)), X), 1e-13)


def _log_by_mpmath(A: np.ndarray) -> np.ndarray:
    """Principal log of a diagonalisable ``A`` by an 80-digit eigendecomposition."""
    import mpmath as mp

    with mp.workdps(80):
        E, V = mp.eig(mp.matrix(A.tolist()))
        L = V * mp.diag([mp.log(e) for e in E]) * mp.inverse(V)
        return np.array([[float(mp.re(L[i, j])) for j in range(A.shape[1])]
                         for i in range(A.shape[0])])


@pytest.mark.parametrize("delta", [1e-2, 1e-4, 1e-6, 1e-7, 3e-8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logm_near_pi_is_as_accurate_as_its_conditioning(delta: float, seed: int) -> None:
    """Rotations by π − δ: the log's relative condition number is ~1/δ, and the error of the
    result against the exact log of the given matrix (mpmath) stays within a few ``u/δ``."""
    ax = np.random.default_rng(seed).standard_normal(3)
    ax /= np.linalg.norm(ax)
    K = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    A = scipy.linalg.expm((math.pi - delta) * K)
    truth = _log_by_mpmath(A)
    assert rel_err(logm(torch.tensor(A)).numpy(), truth) <= 10 * U64 / delta


@given(
    n=st.integers(1, 6),
    log_scale=st.floats(-6, math.log10(3.0)),
    kind=st.sampled_from(["generic", "skew", "triangular"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_logm_inverts_expm_in_strip(n: int, log_scale: float, kind: str, seed: int) -> None:
    X = _rng_matrix(seed, n, 10.0**log_scale)
    if kind == "skew":
        X = X - X.T
    elif kind == "triangular":
        X = np.triu(X)
    if np.abs(np.linalg.eigvals(X).imag).max(initial=0.0) > 3.0:
        X = X * (3.0 / np.abs(np.linalg.eigvals(X).imag).max())
    A = scipy.linalg.expm(X.astype(complex)).real
    L = logm(torch.tensor(A)).numpy()
    kappa = float(np.linalg.cond(A)) * max(1.0, 1 / (np.linalg.norm(X) + 1e-300))
    assert rel_err(L, X) <= max(1e-12, 100 * U64 * kappa)
    assert rel_err(L, _scipy_logm(A)) <= max(1e-10, 100 * U64 * kappa)


@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_logm_property_vs_scipy_spd(n: int, seed: int) -> None:
    G = _rng_matrix(seed, n, 1.0)
    A = G @ G.T + 0.5 * np.eye(n)
    ref = _scipy_logm(A)
    assert rel_err(logm(torch.tensor(A)).numpy(), ref) <= 1e-12 * max(1.0, np.linalg.cond(A))


def test_logm_batch_and_leading_dims() -> None:
    X = 0.4 * torch.randn(
        2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    L = logm(expm(X))
    assert L.shape == X.shape
    torch.testing.assert_close(L, X, rtol=1e-12, atol=1e-12)
    assert logm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)


# --------------------------------------------------------------------------- domain
@pytest.mark.parametrize(
    "A",
    [
        [[-1.0, 0.0], [0.0, 2.0]],  # negative eigenvalue
        [[0.0, 0.0], [0.0, 1.0]],  # zero eigenvalue
        [[-1.0, 0.0], [0.0, -1.0]],  # rotation by π
        [[1.0, 2.0], [2.0, 4.0]],  # singular
    ],
)
def test_logm_domain_error(A: list[list[float]]) -> None:
    with pytest.raises(DomainError):
        logm(torch.tensor(A, dtype=torch.float64))


def test_logm_domain_error_names_batch_index() -> None:
    good = torch.eye(3, dtype=torch.float64) * 2
    batch = torch.stack([good, good, torch.diag(torch.tensor([1.0, -3.0, 2.0]).double()), good])
    with pytest.raises(DomainError, match=r"A\[2\]"):
        logm(batch)
    assert isinstance(DomainError("x"), ValueError)


@pytest.mark.parametrize(
    ("bad", "err"),
    [
        (torch.eye(3, dtype=torch.int32), DTypeError),
        (torch.ones(2, 3), ShapeError),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), NonFiniteError),
    ],
)
def test_logm_validation(bad: torch.Tensor, err: type[Exception]) -> None:
    with pytest.raises(err):
        logm(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logm_low_precision(dtype: torch.dtype) -> None:
    A = (torch.eye(3) + 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(5))).to(
        dtype
    )
    L = logm(A)
    assert L.dtype == dtype
    assert torch.equal(L, logm(A.float()).to(dtype))


# --------------------------------------------------------------------------- gradients
def test_logm_gradcheck() -> None:
    gen = torch.Generator().manual_seed(7)
    A = torch.eye(3, dtype=torch.float64) * 2 + 0.5 * torch.randn(
        2, 3, 3, generator=gen, dtype=torch.float64
    )
    assert torch.autograd.gradcheck(logm, (A.requires_grad_(),))
    R = torch.tensor(scipy.linalg.expm(_axis_angle(2.5)), requires_grad=True)
    assert torch.autograd.gradcheck(logm, (R,))


def test_logm_derivative_inverts_expm_frechet() -> None:
    gen = torch.Generator().manual_seed(8)
    X = 1.5 * torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    A = expm(X)
    E = torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    _, dL = torch.autograd.functional.jvp(logm, A, E)
    # L_exp(log A, L_log(A, E)) = E
    torch.testing.assert_close(expm_frechet(logm(A), dL), E, rtol=1e-10, atol=1e-10)


def test_logm_gradient_finite_near_identity() -> None:
    A = (torch.eye(3, dtype=torch.float64) + 1e-9).requires_grad_()
    logm(A).sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


# ---------------------------------------------------------------- within ~1e-8 of the branch cut
def _rotation(theta: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A rotation by ``theta`` (2 × 2, or 3 × 3 about a fixed oblique axis), rounded to dtype."""
    if n == 2:
        c, s = math.cos(theta), math.sin(theta)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64).to(dtype)
    ax = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    K = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    return torch.tensor(scipy.linalg.expm(theta * K)).to(dtype)


def _angle_gap(A: np.ndarray) -> float:
    """π − the largest |argument| of an eigenvalue of ``A`` (mpmath, 80 digits)."""
    import mpmath as mp

    with mp.workdps(80):
        E, _ = mp.eig(mp.matrix(A.tolist()))
        return float(mp.pi - max(abs(mp.arg(e)) for e in E))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("delta", [1e-8, 1e-9, 3.58979e-9, 1e-11, 1e-13])
def test_logm_within_1e8_of_pi_is_computed_to_its_conditioning(n: int, delta: float) -> None:
    # the product-form square-root iteration met an exactly singular iterate here (raw
    # "lu_factor: U[1,1] is zero"); the principal log exists and is computed to ~u/δ
    A = _rotation(math.pi - delta, n, torch.float64)
    An = A.numpy()
    gap = _angle_gap(An)
    L = logm(A)
    assert rel_err(L.numpy(), _log_by_mpmath(An)) <= 10 * U64 / gap


def test_logm_rotation_by_3_14159265_float64() -> None:
    A = _rotation(3.14159265, 2, torch.float64)
    L = logm(A)
    want = math.atan2(float(A[1, 0]), float(A[0, 0]))  # the exact angle of the stored matrix
    assert abs(float(L[1, 0]) - want) <= 10 * U64 / _angle_gap(A.numpy())
    assert abs(float(L[0, 0])) <= 10 * U64 / _angle_gap(A.numpy())


@pytest.mark.parametrize("n", [2, 3])
def test_logm_within_rounding_of_pi_raises_domain_error(n: int) -> None:
    # float32: π − 3.14159265 ≈ 3.6e-9 is below the rounding level n·u·‖A‖₁ ≈ 1e-7 of the
    # eigenvalues, where the principal log is not determined by the data
    for theta in [3.14159265, math.pi - 1e-9]:
        with pytest.raises(DomainError, match="within rounding"):
            logm(_rotation(theta, n, torch.float32))
    # exactly π (up to the rounding of sin π): keeps raising DomainError
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(DomainError, match="negative real"):
            logm(_rotation(math.pi, n, dtype))
        with pytest.raises(DomainError, match="negative real"):
            logm(-torch.eye(n, dtype=dtype))


@pytest.mark.parametrize("n", [2, 3])
def test_logm_gradient_within_1e8_of_pi_vs_mpmath(n: int) -> None:
    # d/dt ⟨W, log(A + tE)⟩ at t = 0 by an mpmath central difference (80 digits) against the
    # autograd gradient ⟨∇, E⟩; the Fréchet derivative's own condition is ~1/δ there
    import mpmath as mp

    delta = 1e-9
    A = _rotation(math.pi - delta, n, torch.float64)
    gen = torch.Generator().manual_seed(n)
    W = torch.randn(n, n, dtype=torch.float64, generator=gen)
    E = torch.randn(n, n, dtype=torch.float64, generator=gen)
    Ag = A.clone().requires_grad_()
    (logm(Ag) * W).sum().backward()
    assert Ag.grad is not None
    got = float((Ag.grad * E).sum())

    def f(t: mp.mpf) -> mp.mpf:
        M = mp.matrix(A.tolist()) + t * mp.matrix(E.tolist())
        ev, V = mp.eig(M)
        Lm = V * mp.diag([mp.log(e) for e in ev]) * mp.inverse(V)
        return mp.re(sum(Lm[i, j] * float(W[i, j]) for i in range(n) for j in range(n)))

    with mp.workdps(80):
        h = mp.mpf("1e-30")
        want = float((f(h) - f(-h)) / (2 * h))
    gap = _angle_gap(A.numpy())
    assert abs(got - want) <= 100 * U64 / gap * abs(want)


def test_gl_and_so4_log_near_pi_do_not_crash() -> None:
    import liegroup

    R = torch.eye(4, dtype=torch.float64)
    R[:2, :2] = _rotation(math.pi - 1e-9, 2, torch.float64)
    for G in (liegroup.SO(4), liegroup.GL(4)):
        X = G.log(R)
        assert abs(float(X[1, 0]) - (math.pi - 1e-9)) <= 100 * U64 / 1e-9
