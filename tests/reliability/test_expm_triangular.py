"""Triangular matrices of huge norm: expm, expm_frechet and the gradient keep their digits.

A triangular ``A`` whose diagonal spans many orders of magnitude needs dozens of squarings;
one rounding of a unit diagonal entry of the Padé result to ``1 − u``, squared ``s`` times,
becomes ``e^{−2^s u}``: 0 for ``s ≈ 65``. Both paths set the exact diagonal and superdiagonal
(and zero strictly lower part) of every squared iterate of an upper-triangular ``A``; an ``A``
that a symmetric permutation makes upper triangular (lower-triangular ones among them) is
computed permuted (``exp(A) = P exp(PᵀAP) Pᵀ``, ``L(A, E) = P L(PᵀAP, PᵀEP) Pᵀ``), which is
also what the backward pass ``L(Aᵀ, G)`` of an upper-triangular ``A`` needs.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from liegroup.linalg import expm, expm_frechet
from tests.conftest import eps
from tests.linalg_cases import rel_err
from tests.test_linalg_ckernel import ExpmPath

DTYPES = (torch.float32, torch.float64)


def _orient(a: list[list[float]], lower: bool) -> list[list[float]]:
    return [list(r) for r in zip(*a, strict=True)] if lower else a


@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_triangular_2x2_matches_its_closed_form(
    dtype: torch.dtype, lower: bool, expm_path: ExpmPath
) -> None:
    # A = [[−b, b], [0, 0]]: exp(A) = [[e^{−b}, 1 − e^{−b}], [0, 1]] = [[0, 1], [0, 1]];
    # L(A, I) = d/dt exp(A + tI) = exp(A); the gradient of Σ exp(A) is L(Aᵀ, 1) =
    # [[1/b, 1/b], [2 − 1/b, 2 − 1/b]] up to O(e^{−b}) (differentiate the closed form of
    # exp([[a, b], [c, d]]) at c = 0, a = −b, d = 0)
    big = 1e20 if dtype == torch.float64 else 1e30
    A = torch.tensor(_orient([[-big, big], [0.0, 0.0]], lower), dtype=dtype)
    want = torch.tensor(_orient([[0.0, 1.0], [0.0, 1.0]], lower), dtype=dtype)
    tol = {"rtol": 4 * eps(dtype), "atol": 0.0}
    # the same matrix with its diagonal the other way round (the torch path's pivoted LU left
    # -4e-9 in the zero corner of float32 [[0, b], [0, -b]], and the result was refused)
    flipped = torch.tensor(_orient([[0.0, big], [0.0, -big]], lower), dtype=dtype)
    want_flipped = torch.tensor(_orient([[1.0, 1.0], [0.0, 0.0]], lower), dtype=dtype)
    torch.testing.assert_close(expm(flipped), want_flipped, **tol)
    torch.testing.assert_close(expm(A), want, **tol)
    X, L = expm_frechet(A, torch.eye(2, dtype=dtype), return_expm=True)
    torch.testing.assert_close(X, want, **tol)
    torch.testing.assert_close(L, want, **tol)
    Ag = A.clone().requires_grad_()
    expm(Ag).sum().backward()
    assert Ag.grad is not None
    g = _orient([[1 / big, 1 / big], [2 - 1 / big, 2 - 1 / big]], lower)
    torch.testing.assert_close(Ag.grad, torch.tensor(g, dtype=dtype), rtol=8 * eps(dtype), atol=0.0)
    expm_path.check_used()


@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_diagonal_frechet_is_the_divided_difference(
    dtype: torch.dtype, lower: bool, expm_path: ExpmPath
) -> None:
    # A = diag(a): L(A, E)_ij = E_ij (e^{a_i} − e^{a_j})/(a_i − a_j), L_ii = e^{a_i} E_ii
    big = 1e20 if dtype == torch.float64 else 1e30
    a = [-big, 0.0]
    A = torch.diag(torch.tensor(a, dtype=dtype))
    E = torch.tensor(_orient([[2.0, 3.0], [0.0, 5.0]], lower), dtype=dtype)
    want = torch.tensor(_orient([[0.0, 3.0 / big], [0.0, 5.0]], lower), dtype=dtype)
    X, L = expm_frechet(A, E, return_expm=True)
    torch.testing.assert_close(X, torch.diag(torch.tensor([0.0, 1.0], dtype=dtype)), rtol=0, atol=0)
    torch.testing.assert_close(L, want, rtol=4 * eps(dtype), atol=0.0)
    expm_path.check_used()


def _permuted_triangular(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A triangular matrix with a huge spread of diagonal entries: upper, lower or permuted."""
    n = int(rng.integers(2, 5))
    A = np.triu(rng.standard_normal((n, n)))
    A[np.diag_indices(n)] = rng.choice([-1e20, -1e10, -1e3, -3.0, 0.0, 2.0], size=n)
    if kind == "lower":
        return A.T.copy()
    if kind == "permuted":
        p = rng.permutation(n)
        return A[p][:, p].copy()
    return A


def _mp_expm(A: np.ndarray) -> np.ndarray:
    """exp(A) at 100 digits (A's float64 entries taken as exact)."""
    with mpmath.workdps(100):
        X = mpmath.expm(mpmath.matrix(A.tolist()))
        return np.array(X.tolist(), dtype=float)


def _mp_frechet(A: np.ndarray, E: np.ndarray) -> np.ndarray:
    n = A.shape[0]
    return _mp_expm(np.block([[A, E], [np.zeros_like(A), A]]))[:n, n:]


@pytest.mark.parametrize("kind", ["upper", "lower", "permuted"])
def test_random_triangular_with_huge_spread_vs_mpmath(kind: str, expm_path: ExpmPath) -> None:
    # A regression bound, not a theorem: with the exact diagonal and superdiagonal only the
    # entries two or more off the diagonal carry the squarings' rounding. Measured worst over
    # these draws: 13 u (x86-64, both paths); without the treatment the lower-triangular and
    # permuted results (and the gradients of upper-triangular ones) were off by 0.2 to 19
    # times their norm, returned without an error.
    rng = np.random.default_rng(["upper", "lower", "permuted"].index(kind) + 7)
    u = eps(torch.float64)
    for _ in range(12):
        A = _permuted_triangular(rng, kind)
        n = A.shape[0]
        E, G = rng.standard_normal((2, n, n))
        tol = 64 * n * u
        X, L = expm_frechet(torch.tensor(A), torch.tensor(E), return_expm=True)
        ref = _mp_expm(A)
        assert rel_err(expm(torch.tensor(A)).numpy(), ref) <= tol, A
        assert rel_err(X.numpy(), ref) <= tol, A
        assert rel_err(L.numpy(), _mp_frechet(A, E)) <= tol, A
        At = torch.tensor(A, requires_grad=True)
        (expm(At) * torch.tensor(G)).sum().backward()
        assert At.grad is not None
        assert rel_err(At.grad.numpy(), _mp_frechet(A.T.copy(), G)) <= tol, A
    expm_path.check_used()


def test_permuted_matrices_alone_and_in_a_batch(expm_path: ExpmPath) -> None:
    # the permutation is chosen per matrix and applied exactly (a gather), so it adds no
    # dependence on the neighbours: the kernel's results are the same bits alone or in a
    # batch; the torch path's batched BLAS calls agree to rounding (docs/linalg.md), here
    # within twice the accuracy bound of the test above
    rng = np.random.default_rng(3)
    mats = []
    for kind in ["permuted", "upper", "lower", "full"] * 3:
        A = _permuted_triangular(rng, kind) if kind != "full" else rng.standard_normal((3, 3))
        while A.shape[0] != 3:
            A = _permuted_triangular(rng, kind)
        mats.append(A)
    A = torch.tensor(np.stack(mats))
    E = torch.tensor(rng.standard_normal(A.shape))
    X = expm(A)
    Xf, Lf = expm_frechet(A, E, return_expm=True)
    tol = 2 * 64 * 3 * eps(torch.float64)
    for i in range(A.shape[0]):
        Xi, Li = expm_frechet(A[i], E[i], return_expm=True)
        pairs = [(X[i], expm(A[i])), (Xf[i], Xi), (Lf[i], Li)]
        for got, alone in pairs:
            if expm_path.kernel:
                assert torch.equal(got, alone), i
            else:
                assert rel_err(got.numpy(), alone.numpy()) <= tol, i
    expm_path.check_used()
