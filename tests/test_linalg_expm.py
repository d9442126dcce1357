"""Accuracy, batch invariance, gradients and validation of liegroup.linalg.expm / expm_frechet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup.errors import DTypeError, NonFiniteError, ShapeError
from liegroup.linalg import expm, expm_frechet
from tests.conftest import eps
from tests.linalg_cases import (
    DEFAULT_CASES,
    HARD,
    assert_rounding_close,
    expm_kappa,
    expm_ref,
    rel_err,
)
from tests.test_linalg_ckernel import ExpmPath, use_path

U64 = eps(torch.float64)
U32 = eps(torch.float32)

SLOW_CASES = [k for k in HARD if k not in DEFAULT_CASES]
CASES = [pytest.param(k) for k in DEFAULT_CASES] + [
    pytest.param(k, marks=pytest.mark.slow) for k in SLOW_CASES
]


def _peer_best(A: np.ndarray, ref: np.ndarray) -> float:
    """Best error of scipy.sparse.linalg.expm and batched torch.linalg.matrix_exp."""
    e_sp = rel_err(scipy.sparse.linalg.expm(A), ref)
    Ab = torch.tensor(A)[None].expand(4, *A.shape).contiguous()
    e_t = rel_err(torch.linalg.matrix_exp(Ab)[0].numpy(), ref)
    return min(e_sp, e_t)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("name", CASES)
def test_expm_hard_float64_vs_mpmath(name: str, expm_path: ExpmPath) -> None:
    A = HARD[name]
    ref = expm_ref(A)
    err = rel_err(expm(torch.tensor(A)).numpy(), ref)
    expm_path.check_used()
    tol = 10 * max(expm_kappa(A) * U64, 4 * U64)
    assert err <= max(tol, 2 * _peer_best(A, ref)), (name, err, tol)
    assert err <= tol or err <= 1e-13, (name, err, tol)


@pytest.mark.parametrize("name", CASES)
def test_expm_hard_float32_vs_mpmath(name: str, expm_path: ExpmPath) -> None:
    A32 = torch.tensor(HARD[name]).float()
    A = A32.double().numpy()  # the float32 matrix, taken as exact
    tol = 10 * max(expm_kappa(A) * U32, 4 * U32)
    if tol >= 1e-2:
        pytest.skip(f"float32 bound {tol:.1e} is not informative (kappa too large)")
    err = rel_err(expm(A32).double().numpy(), expm_ref(A))
    expm_path.check_used()
    assert err <= tol, (name, err, tol)


@pytest.mark.parametrize(
    "A",
    [
        [[1, 2], [0, 3]],
        [[0, 1], [-1, 0]],
        [[2, 1, 0], [0, 2, 1], [0, 0, 2]],
        [[0, 1, 2], [0, 0, 3], [0, 0, 0]],  # nilpotent
        [[0, 0, 0, 5], [0, 0, 0, -2], [0, 0, 0, 7], [0, 0, 0, 0]],  # nilpotent, translation-like
        [[1, 1], [1, 1]],
    ],
)
def test_expm_sympy_exact(A: list[list[int]], expm_path: ExpmPath) -> None:
    exact = sympy.Matrix(A).exp()
    ref = np.array(exact.evalf(40).tolist(), dtype=float)
    X = expm(torch.tensor(A, dtype=torch.float64)).numpy()
    assert rel_err(X, ref) <= 8 * U64 * max(1.0, expm_kappa(np.array(A, dtype=float)))


def test_expm_nilpotent_keeps_unit_triangular_structure(expm_path: ExpmPath) -> None:
    """exp(N) = I + N + N²/2 for N³ = 0: the strict lower part is exactly 0 and the diagonal
    exactly 1 (every product there has an exact-zero factor, and the Padé quotient of a unit
    triangular pair is unit triangular); the upper part is within the rounding of the Padé
    evaluation, a few u of ‖exp(N)‖ (its entries are not exact: the summation order and
    fused multiply-adds of the CPU's BLAS decide their last bits)."""
    N = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.eye(3, dtype=torch.float64) + N + N @ N / 2  # exact in float64
    X = expm(N)
    assert torch.equal(X.tril(-1), torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(X.diagonal(), torch.ones(3, dtype=torch.float64))
    kappa = max(1.0, expm_kappa(N.numpy()))
    assert rel_err(X.numpy(), expected.numpy()) <= 8 * U64 * kappa


# --------------------------------------------------------------------------- properties
def _random_matrix(kind: str, n: int, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n)) / math.sqrt(n)
    if kind == "generic":
        A = G
    elif kind == "normal":
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        D = np.diag(rng.standard_normal(n))
        if n >= 2:
            D[0, 1], D[1, 0] = 0.7, -0.7
        A = Q @ D @ Q.T
    elif kind == "triangular":
        A = np.triu(G)
    elif kind == "skew":
        A = G - G.T
    else:  # se(n-1): skew block plus translation
        A = np.zeros((n, n))
        if n > 1:
            A[:-1, :-1] = G[:-1, :-1] - G[:-1, :-1].T
            A[:-1, -1] = 10 * G[:-1, -1]
    return scale * A


KINDS = st.sampled_from(["generic", "normal", "triangular", "skew", "se"])


@pytest.mark.parametrize("path", ["kernel", "torch"])
@given(
    kind=KINDS,
    n=st.integers(1, 6),
    log_scale=st.floats(-6, 1.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_expm_property_vs_scipy(path: str, kind: str, n: int, log_scale: float, seed: int) -> None:
    A = _random_matrix(kind, n, 10.0**log_scale, seed)
    with pytest.MonkeyPatch.context() as mp:
        use_path(path, mp)
        X = expm(torch.tensor(A)).numpy()
    kappa = expm_kappa(A)
    tol = 50 * max(kappa, 4.0) * U64
    assert rel_err(X, scipy.sparse.linalg.expm(A)) <= tol
    assert rel_err(X, scipy.linalg.expm(A.astype(complex)).real) <= tol
    # real scipy.linalg.expm has a Padé-13 accuracy defect (1.15-1.17.1): compare loosely
    assert rel_err(X, scipy.linalg.expm(A)) <= max(1e-11, tol)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@given(n=st.integers(1, 5), log_scale=st.floats(-3, 1.2), seed=st.integers(0, 2**31 - 1))
def test_expm_property_float32(path: str, n: int, log_scale: float, seed: int) -> None:
    A32 = torch.tensor(_random_matrix("generic", n, 10.0**log_scale, seed)).float()
    A = A32.double().numpy()
    tol = 50 * max(expm_kappa(A), 4.0) * U32
    with pytest.MonkeyPatch.context() as mp:
        use_path(path, mp)
        X = expm(A32)
    assert rel_err(X.double().numpy(), scipy.linalg.expm(A.astype(complex)).real) <= tol


# --------------------------------------------------------------------------- batch invariance
def _same(got: torch.Tensor, want: torch.Tensor, A: torch.Tensor, path: ExpmPath) -> None:
    """Alone/other batch vs the full batch: the same bits on the kernel (one matrix at a time
    in C); within twice the accuracy bound on the torch path (batched BLAS products may round
    differently for different batch sizes)."""
    if path.kernel:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        n = A.shape[-1]
        assert_rounding_close(
            got.reshape(-1, n, n), want.reshape(-1, n, n), A.reshape(-1, n, n),
            eps(A.dtype),
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expm_batch_invariance(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    n = 3
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-8, 1.5, 1000, dtype=torch.float64)
    batch = torch.randn(1000, n, n, generator=gen, dtype=torch.float64) * scales[:, None, None]
    batch[::7] = torch.triu(batch[::7])
    batch[1::11] = batch[1::11] - batch[1::11].mT
    picks = [HARD[k] for k in HARD if HARD[k].shape == (n, n)]
    for j, P in enumerate(picks[:9]):
        batch[100 * j + 5] = torch.tensor(P)
    batch = batch.to(dtype)
    full = expm(batch)
    for i in [0, 5, 7, 12, 105, 205, 305, 405, 505, 999]:
        _same(expm(batch[i]), full[i], batch[i], expm_path)
        _same(expm(batch[i : i + 3]), full[i : i + 3], batch[i : i + 3], expm_path)
    _same(expm(batch.flip(0)).flip(0), full, batch, expm_path)
    # leading batch shapes do not matter either
    _same(expm(batch.reshape(10, 100, n, n)).reshape(1000, n, n), full, batch, expm_path)


def test_expm_large_n_loop_path() -> None:
    # n above the per-matrix LU threshold (128)
    A = torch.randn(2, 130, 130, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = A / 130**0.5
    X = expm(A)
    for i in range(2):
        ref = scipy.linalg.expm(A[i].numpy().astype(complex)).real
        assert rel_err(X[i].numpy(), ref) <= 1e-12
    assert_rounding_close(expm(A[1:2]), X[1:2], A[1:2], U64)  # torch path (n > N_MAX)


# --------------------------------------------------------------------------- gradients
def test_expm_gradcheck(expm_path: ExpmPath) -> None:
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-3, 0.5, 4.0):
        A = (scale * torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(expm, (A,))
    T = torch.triu(torch.randn(3, 3, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    assert torch.autograd.gradcheck(expm, (T,))


@pytest.mark.parametrize("n", [4, 6])
def test_expm_backward_is_frechet_adjoint(expm_path: ExpmPath, n: int) -> None:
    gen = torch.Generator().manual_seed(4)
    A = 3 * torch.randn(5, n, n, generator=gen, dtype=torch.float64)
    G = torch.randn(5, n, n, generator=gen, dtype=torch.float64)
    E = torch.randn(5, n, n, generator=gen, dtype=torch.float64)
    Ar = A.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expm(Ar), Ar, G)
    lhs = (grad * E).sum((-2, -1))
    rhs = (G * expm_frechet(A, E)).sum((-2, -1))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    expm_path.check_used()


def test_expm_double_backward_runs(expm_path: ExpmPath) -> None:
    A = (0.5 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(expm, (A,))


# --------------------------------------------------------------------------- Fréchet
def _frechet_ref(A: np.ndarray, E: np.ndarray) -> np.ndarray:
    n = A.shape[0]
    big = np.block([[A, E], [np.zeros_like(A), A]])
    return expm_ref(big)[:n, n:]


@pytest.mark.parametrize("scale", [1e-4, 0.3, 2.0, 8.0])
def test_expm_frechet_vs_mpmath(scale: float, expm_path: ExpmPath) -> None:
    rng = np.random.default_rng(int(scale * 1000))
    A = scale * rng.standard_normal((4, 4))
    E = rng.standard_normal((4, 4))
    ref = _frechet_ref(A, E)
    X, L = expm_frechet(torch.tensor(A), torch.tensor(E), return_expm=True)
    err = rel_err(L.numpy(), ref)
    err_sp = rel_err(scipy.linalg.expm_frechet(A, E, compute_expm=False), ref)
    assert err <= max(10 * err_sp, 1e-13)
    assert rel_err(X.numpy(), expm_ref(A)) <= 1e-13


def test_expm_frechet_broadcast_and_grad() -> None:
    A = torch.randn(3, 2, 2, dtype=torch.float64).requires_grad_()
    E = torch.randn(2, 2, dtype=torch.float64).requires_grad_()
    L = expm_frechet(A, E)
    assert L.shape == (3, 2, 2)
    assert torch.autograd.gradcheck(expm_frechet, (A, E))


# --------------------------------------------------------------------------- dtypes, shapes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expm_low_precision_computed_in_float32(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    A = (0.7 * torch.randn(6, 3, 3)).to(dtype)
    X = expm(A)
    assert X.dtype == dtype
    assert torch.equal(X, expm(A.float()).to(dtype))
    ref = torch.tensor(
        np.stack([scipy.linalg.expm(a.astype(complex)).real for a in A.double().numpy()])
    )
    assert float(((X.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max()) <= (
        8 * torch.finfo(dtype).eps
    )


def test_expm_shapes_and_empty(expm_path: ExpmPath) -> None:
    assert expm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    assert expm(torch.zeros(2, 0, 0)).shape == (2, 0, 0)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    assert float(expm(x)) == pytest.approx(math.exp(0.5), rel=2 * U64)
    assert expm(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)


@pytest.mark.parametrize(
    ("bad", "err"),
    [
        (torch.zeros(3, 3, dtype=torch.int64), DTypeError),
        (torch.zeros(3, 3, dtype=torch.complex64), DTypeError),
        (np.zeros((3, 3)), DTypeError),
        (torch.zeros(3), ShapeError),
        (torch.zeros(2, 3), ShapeError),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), NonFiniteError),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), NonFiniteError),
    ],
)
def test_expm_validation(bad: object, err: type[Exception], expm_path: ExpmPath) -> None:
    with pytest.raises(err):
        expm(bad)  # type: ignore[arg-type]


def test_expm_frechet_validation(expm_path: ExpmPath) -> None:
    with pytest.raises(ShapeError):
        expm_frechet(torch.zeros(3, 3), torch.zeros(2, 2))
    with pytest.raises(NonFiniteError):
        expm_frechet(torch.zeros(2, 2), torch.full((2, 2), float("nan")))


def test_expm_huge_norm_skew_float32_no_overflow(expm_path: ExpmPath) -> None:
    # powers of A would overflow float32: prescaling keeps exp(skew) orthogonal
    t = 3.0e6
    A = torch.tensor([[0.0, -t], [t, 0.0]])
    X = expm(A)
    assert torch.isfinite(X).all()
    # kappa ~ ||A||: the angle itself is only known to t*u32 ~ 0.2 rad
    assert float((X @ X.T - torch.eye(2)).abs().max()) <= 10 * t * U32


@pytest.mark.gpu
def test_expm_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    A = torch.randn(50, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(expm(A.cuda()).cpu(), expm(A), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(2, 3, 3), (3, 3), (0, 4, 4), (2, 70, 70)])
def test_expm_on_meta_propagates_shapes_forward_and_backward(
    shape: tuple[int, ...], expm_path: ExpmPath
) -> None:
    # documented (docs/index.md): expm runs on meta for shape propagation (model init on meta),
    # on either path, without reading a value
    A = torch.zeros(*shape, device="meta", dtype=torch.float64, requires_grad=True)
    X = expm(A)
    assert X.device.type == "meta" and X.shape == A.shape and X.dtype == A.dtype
    X.sum().backward()
    assert A.grad is not None and A.grad.device.type == "meta" and A.grad.shape == A.shape
