"""The fast paths of linalg.expm: exact-integer decisions, the scalar twin, grouped evaluation.

* the degree/scaling decisions (exact ``⌈log₂⌉`` by frexp, no libm log/pow) agree with a
  textbook transcription of Al-Mohy & Higham's Algorithm 5.1 (float log2/pow) on random
  matrices;
* the single-matrix scalar decision code agrees with the vectorised one, on matrices and on
  synthetic statistics placed exactly on and next to every threshold;
* a mixed batch (several degrees, scalings, triangular members) gives the same bits as each
  matrix alone, forward and backward, on the compiled kernel's path (one matrix at a time in
  C); on the torch path, whose batched BLAS products may round differently for different
  batch sizes, the two agree within twice its accuracy bound;
* non-finite input is caught from the norms (no separate full scan), and finite input whose
  column sums overflow is prescaled instead of rejected.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from liegroup.errors import NonFiniteError
from liegroup.linalg import _expm_decide as EX  # noqa: N812
from liegroup.linalg import expm
from tests.conftest import eps
from tests.linalg_cases import assert_rounding_close
from tests.test_linalg_ckernel import ExpmPath, representable

DTYPES = [torch.float64, torch.float32]


def _mixed(n: int, count: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-9, 1.7, count, dtype=torch.float64)
    A = torch.randn(count, n, n, generator=gen, dtype=torch.float64) * scales[:, None, None]
    A[::5] = torch.triu(A[::5])
    A[1::7] = A[1::7] - A[1::7].mT
    A[2::9, 0, -1] *= 1e4  # non-normal
    return representable(A[torch.randperm(count, generator=gen)], dtype)


# --------------------------------------------------------------------------- reference
def _norm1(X: np.ndarray) -> float:
    return float(np.abs(X).sum(axis=0).max())


def _reference_choice(A: np.ndarray, dtype: torch.dtype) -> tuple[int, int]:
    """Algorithm 5.1 of Al-Mohy & Higham (2009) as the module documents it, in floats."""
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    P = {1: A}
    for k in (2, 4, 6, 8, 10):
        P[k] = np.linalg.matrix_power(A, k)
    nA, n2, n4, n6 = (_norm1(P[k]) for k in (1, 2, 4, 6))
    d4, d6 = n4 ** (1 / 4), n6 ** (1 / 6)
    d8 = min(n4 * n4, n2 * n6) ** (1 / 8)
    d10 = min(n4 * n6, n2 * n4 * n4) ** (1 / 10)

    def ell(m: int, s: int) -> int:
        if nA == 0:
            return 0
        p = 2 * m + 1
        c = 1.0 / (math.comb(2 * m, m) * math.factorial(p))
        absp = _norm1(np.linalg.matrix_power(np.abs(A), p))
        alpha = c * absp / nA * 2.0 ** (-2 * m * s)
        if alpha == 0:
            return 0
        return max(math.ceil(math.log2(alpha / u) / (2 * m)), 0)

    for deg, theta in EX._CANDIDATES[dtype]:
        eta = max(d4, d6) if deg <= 5 else max(d6, d8)
        if eta <= theta and ell(deg, 0) == 0:
            return deg, 0
    top, theta = EX._TOP[dtype]
    s = max(math.ceil(math.log2(min(max(d6, d8), max(d8, d10)) / theta)), 0)
    if s > 0:
        e8, e10 = _norm1(P[8]) ** (1 / 8), _norm1(P[10]) ** (1 / 10)
        s = max(math.ceil(math.log2(min(max(d6, e8), max(e8, e10)) / theta)), 0)
    return top, s + ell(top, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_choice_matches_textbook_algorithm(dtype: torch.dtype) -> None:
    A = _mixed(4, 300, seed=11, dtype=dtype)
    A = A[A.abs().amax((-2, -1)) < 30]  # no prescaling; |A|^27 stays finite in float64
    _, m, s, s0, _ = EX._decide(A)
    assert (s0 == 0).all()
    got = list(zip(m.tolist(), s.tolist(), strict=True))
    want = [_reference_choice(a.double().numpy(), dtype) for a in A]
    assert got == want
    assert len({d for d, _ in got}) >= 3  # the test really spans several degrees


# --------------------------------------------------------------------------- scalar twin
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_decisions_equal_vectorised_on_matrices(dtype: torch.dtype) -> None:
    A = _mixed(3, 250, seed=5, dtype=dtype)
    A[7] = 1e35 if dtype == torch.float64 else 1e5  # prescaled members
    _, m, s, s0, tri = EX._decide(A)
    for i in range(A.shape[0]):
        _, m1, s1, s01, tri1 = EX._decide(A[i : i + 1])
        assert (m1[0], s1[0], s01[0], tri1[0]) == (m[i], s[i], s0[i], tri[i]), i


def _boundary_stats(dtype: torch.dtype, rng: np.random.Generator) -> np.ndarray:
    """Statistics sitting exactly on, and one ulp either side of, every threshold."""
    c = EX._CONSTS[dtype]
    pts = [0.0, 0.5, 1.0, 2.0]
    for t in [*c.ta[:, 0], *c.tb[:, 0], *c.th_k[:, 0]]:
        for j in range(-2, 4):
            v = float(t) * 2.0**j
            pts += [v, float(np.nextafter(v, 0)), float(np.nextafter(v, np.inf))]
    pts_a = np.array(pts)
    cols = []
    for _ in range(1500):
        nA = float(rng.choice([*pts_a, *rng.uniform(0, 40, 3)]))
        n2, n4, n6 = (
            float(rng.choice(pts_a)) ** (k / 2 if rng.random() < 0.3 else 1) for k in (2, 4, 6)
        )
        cols.append([nA, n2, n4, n6])
    return np.array(cols).T


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_decisions_equal_vectorised_on_threshold_stats(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    st = _boundary_stats(dtype, rng)
    N = st.shape[1]
    c = EX._CONSTS[dtype]
    # fake exact norms, a fixed function of the matrix index (ν_p ≤ μ^p is not assumed)
    nu_tab = rng.uniform(0, 1, (N, len(c.ps))) ** rng.integers(1, 30, (N, len(c.ps)))
    e_tab = st[2] * st[2] * rng.uniform(0, 1.5, (2, N))

    def fns(offset: int) -> tuple[Any, Any]:
        def nu_fn(idx: np.ndarray, e: np.ndarray, ps: tuple[int, ...]) -> np.ndarray:
            cols = [c.ps.index(p) for p in ps]
            return nu_tab[np.ix_(idx + offset, cols)]

        def e_fn(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return e_tab[0, idx + offset], e_tab[1, idx + offset]

        return nu_fn, e_fn

    m, s = EX._choose(st, c, *fns(0))
    for i in range(N):
        m1, s1 = EX._choose_one(st[:, i : i + 1], c, *fns(i))
        assert (m1[0], s1[0]) == (m[i], s[i]), (i, st[:, i])
    assert len(set(m.tolist())) == len(c.degs)


def test_clog2_exact() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0, 0.75, 2.0**-1074, 2.0**1000, np.nextafter(4.0, 5.0)])
    assert EX._clog2(x).tolist() == [EX._NEG, 0, 1, 2, 0, -1074, 1000, 3]
    assert [EX._clog2_1(float(v)) for v in x] == EX._clog2(x).tolist()
    assert EX._cdiv(np.array([-7, -6, 0, 5, 6, 7]), 6).tolist() == [-1, -1, 0, 1, 1, 2]


# --------------------------------------------------------------------------- grouped evaluation
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_equal_to_alone(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    A = _mixed(5, 120, seed=8, dtype=dtype)
    _, m, s, s0, _ = EX._decide(A)
    assert len(set(m.tolist())) >= 3 and len(set((s + s0).tolist())) >= 3
    full = expm(A)
    assert torch.isfinite(full).all()  # overflowing members were scaled into range
    alone = torch.stack([expm(A[i]) for i in range(A.shape[0])])
    if expm_path.kernel:
        torch.testing.assert_close(alone, full, rtol=0, atol=0, equal_nan=True)
        expm_path.check_used()
    else:
        assert assert_rounding_close(alone, full, A, eps(dtype)) >= A.shape[0] // 2


def test_mixed_batch_backward_equal_to_alone(expm_path: ExpmPath) -> None:
    A = _mixed(4, 40, seed=9, dtype=torch.float64)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Ar = A.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expm(Ar), Ar, G)
    alone = []
    for i in range(A.shape[0]):
        a = A[i].clone().requires_grad_()
        alone.append(torch.autograd.grad(expm(a), a, G[i])[0])
    if expm_path.kernel:
        torch.testing.assert_close(torch.stack(alone), grad, rtol=0, atol=0, equal_nan=True)
        expm_path.check_used()
    else:
        informative = assert_rounding_close(
            torch.stack(alone), grad, A, eps(torch.float64), grad_of=G
        )
        assert informative >= A.shape[0] // 2


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_caught_from_norms(bad: float, expm_path: ExpmPath) -> None:
    A = torch.randn(50, 6, 6, dtype=torch.float64)
    A[31, 2, 4] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        expm(A)


def test_finite_input_with_overflowing_norm_is_prescaled(expm_path: ExpmPath) -> None:
    # column sums of |A| overflow float32 although every entry is finite; the exact result
    # underflows to 0 (eigenvalue -3e38)
    A = torch.tensor([[-3e38, 0.0], [-3e38, -3e38]])
    assert not math.isfinite(float(A.abs().sum(0).max()))
    X = expm(A)
    assert torch.equal(X.abs(), torch.zeros(2, 2))
