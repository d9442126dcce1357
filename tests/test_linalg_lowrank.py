"""liegroup.linalg.lowrank: φ₁ and exp(L Rᵀ) = I + L φ₁(RᵀL) Rᵀ against mpmath and dense expm."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup.errors import DTypeError, NonFiniteError, OverflowResultError, ShapeError
from liegroup.linalg import expm
from liegroup.linalg.lowrank import (
    expm_lowrank,
    expm_lowrank_apply,
    expm_lowrank_factor,
    eye_plus_lowrank_mode_product,
    eye_plus_lowrank_two_sided,
    phi1,
)
from liegroup.tensor import mode_product
from tests.conftest import eps

F64 = torch.float64


def _n1(A: torch.Tensor) -> float:
    """Spectral norm (every bound below holds in any consistent norm; this one is tightest)."""
    return float(torch.linalg.matrix_norm(A.double(), ord=2))


def _kappa_bound(A: torch.Tensor) -> float:
    """Upper bound of exp's relative condition number: ‖A‖ e^{‖A‖} / ‖e^A‖, ≥ 1."""
    a = _n1(A)
    return max(1.0, a * math.exp(a) / _n1(expm(A.double())))


def _phi1_tol(M: torch.Tensor) -> float:
    """Error of the φ₁ block of expm([[M, I], [0, 0]]): (size)·u·κ·‖e^aug‖."""
    m = M.shape[-1]
    aug = torch.zeros(2 * m, 2 * m, dtype=F64)
    aug[:m, :m] = M.double()
    aug[:m, m:] = torch.eye(m, dtype=F64)
    return 10 * (2 * m) * eps(M.dtype) * _kappa_bound(aug) * _n1(expm(aug))


def _lowrank_tol(L: torch.Tensor, R: torch.Tensor) -> float:
    """φ₁'s error carried through the products, plus their own rounding, plus dense expm's."""
    n, m = L.shape
    Ld, Rd = L.double(), R.double()
    P = phi1(Rd.T @ Ld)
    prod = _n1(Ld) * _n1(P) * _n1(Rd.T)
    carried = _n1(Ld) * _phi1_tol(R.T @ L) * _n1(Rd.T)
    dense = 10 * n * eps(L.dtype) * _kappa_bound(Ld @ Rd.T) * _n1(expm(Ld @ Rd.T))
    return carried + 10 * (n + m) * eps(L.dtype) * (1 + prod) + dense


def _mp_phi1(M: torch.Tensor, dps: int = 40) -> torch.Tensor:
    """Σ M^k/(k+1)! summed in mpmath until the terms drop below 10^-dps (independent of expm)."""
    with mpmath.workdps(dps):
        A = mpmath.matrix(M.tolist())
        m = A.rows
        term = mpmath.eye(m)
        S = mpmath.eye(m)
        k = 1
        while True:
            term = term * A / (k + 1)
            S += term
            k += 1
            if mpmath.mnorm(term, 1) < mpmath.mpf(10) ** (-dps) and k > 5:
                break
        return torch.tensor([[float(S[i, j]) for j in range(m)] for i in range(m)], dtype=F64)


def _mp_expm(A: torch.Tensor, dps: int = 40) -> torch.Tensor:
    with mpmath.workdps(dps):
        E = mpmath.expm(mpmath.matrix(A.tolist()))
        n = E.rows
        return torch.tensor([[float(E[i, j]) for j in range(n)] for i in range(n)], dtype=F64)


def _rand(*shape: int, scale: float = 1.0, seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, dtype=F64, generator=g).to(dtype)


def _so_like(n: int, r: int, s: float, seed: int) -> torch.Tensor:
    a, b = _rand(n, r, seed=seed), s * _rand(n, r, seed=seed + 1)
    L, R = torch.cat([b, a], 1) / 2, torch.cat([a, -b], 1)
    return R.T @ L


PHI1_CASES = {
    "zero": torch.zeros(2, 2, dtype=F64),
    "nilpotent": torch.tensor([[0.0, 3.0], [0.0, 0.0]], dtype=F64),
    "rank1_singular": torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=F64),
    "tiny": 1e-9 * _rand(3, 3, seed=1),
    "moderate": _rand(3, 3, seed=2),
    "rotation_generator": torch.tensor([[0.0, -2.5], [2.5, 0.0]], dtype=F64),
    "larger_norm": 2.0 * _rand(4, 4, seed=3),
    # RᵀL of an SO mode adapter early in training ([[sbᵀa, aᵀa], [−s²bᵀb, −saᵀb]]/2): ‖·‖₁ ≈ 25,
    # six doubling steps of phi1's Taylor evaluation
    "so_adapter_like": _so_like(40, 3, 0.01, seed=4),
    "larger_nonnormal": 6.0 * _rand(5, 5, seed=5) + torch.diag(torch.arange(5.0, dtype=F64)),
}


@pytest.mark.parametrize("name", list(PHI1_CASES))
def test_phi1_vs_mpmath_series(name):
    M = PHI1_CASES[name]
    got = phi1(M)
    want = _mp_phi1(M)
    assert (got - want).abs().max().item() <= _phi1_tol(M)


def test_phi1_batched_matches_single_and_float32():
    Ms = torch.stack([PHI1_CASES["moderate"], PHI1_CASES["tiny"], torch.zeros(3, 3, dtype=F64)])
    P = phi1(Ms)
    for i in range(3):
        assert torch.equal(P[i], phi1(Ms[i]))  # expm is batch-invariant
    P32 = phi1(Ms.float())
    for i in range(3):
        assert (P32[i].double() - P[i]).abs().max().item() <= _phi1_tol(Ms[i].float())


@pytest.mark.parametrize(("n", "m", "scale", "seed"), [(5, 1, 1.0, 0), (6, 2, 0.7, 1),
                                                       (7, 3, 0.4, 2), (4, 2, 1e-6, 3)])
def test_expm_lowrank_vs_mpmath(n, m, scale, seed):
    L, R = _rand(n, m, scale=scale, seed=seed), _rand(n, m, seed=seed + 10)
    want = _mp_expm(L @ R.T)
    tol = _lowrank_tol(L, R)
    assert (expm_lowrank(L, R) - want).abs().max().item() <= tol
    T = _rand(3, n, 2, seed=seed + 20)
    got = expm_lowrank_apply(L, R, T, 1)
    assert (got - mode_product(T, want, 1)).abs().max().item() <= tol * n * _n1(T.reshape(-1, 1))


@given(
    n=st.integers(2, 24),
    m=st.integers(1, 6),
    scale=st.sampled_from([1e-8, 1e-3, 0.1, 1.0, 2.5]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_expm_lowrank_matches_dense_expm(n, m, scale, seed, dtype):
    L = _rand(n, m, seed=seed)
    R = _rand(n, m, seed=seed + 1)
    L = (L * (scale / (_n1(L) * _n1(R)))).to(dtype)  # ‖L Rᵀ‖₂ ≤ scale
    R = R.to(dtype)
    dense = expm((L @ R.T).double())
    tol = _lowrank_tol(L, R)
    assert (expm_lowrank(L, R).double() - dense).abs().max().item() <= tol
    for mode, shape in [(0, (n, 5)), (1, (4, n)), (1, (3, n, 2)), (-1, (2, n))]:
        T = _rand(*shape, seed=seed + 2, dtype=dtype)
        got = expm_lowrank_apply(L, R, T, mode)
        want = mode_product(T.double(), dense, mode)
        ttol = tol * n * T.abs().max().item() + 4 * n * eps(dtype) * want.abs().max().item()
        assert got.dtype == dtype and got.shape == T.shape and got.is_contiguous()
        assert (got.double() - want).abs().max().item() <= ttol
        back = expm_lowrank_apply(-L, R, got, mode)  # exp(−LRᵀ) is the inverse
        inv_tol = _lowrank_tol(-L, R) * n * got.abs().max().item() + ttol
        assert (back.double() - T.double()).abs().max().item() <= inv_tol * (
            1 + _n1(dense) * _n1(expm(-(L @ R.T).double()))
        )


def test_phi1_doubling_steps_per_matrix():
    """Matrices needing 0, 4 and 5 doubling steps in one batch equal their single calls."""
    Ms = torch.stack([PHI1_CASES["moderate"] / 8, 2.0 * PHI1_CASES["moderate"],
                      PHI1_CASES["larger_nonnormal"][:3, :3]])
    P = phi1(Ms)
    for i in range(3):
        assert torch.equal(P[i], phi1(Ms[i]))
        assert (P[i] - _mp_phi1(Ms[i])).abs().max().item() <= _phi1_tol(Ms[i])


def test_phi1_float32_large_norm_vs_mpmath():
    M = PHI1_CASES["so_adapter_like"]
    got = phi1(M.float())
    assert got.dtype == torch.float32
    assert (got.double() - _mp_phi1(M.float().double())).abs().max().item() <= _phi1_tol(
        M.float())


def test_phi1_gradient_large_norm():
    """Block-identity backward after several doubling steps (‖M‖₁ ≈ 9) vs finite differences."""
    M = _so_like(12, 2, 0.05, seed=6).requires_grad_(True)
    assert M.detach().abs().sum(0).max().item() > 4  # several doubling steps
    assert torch.autograd.gradcheck(phi1, (M,))
    assert torch.autograd.gradgradcheck(phi1, (M,))
    G = _rand(4, 4, scale=1e8, seed=7)  # a huge output gradient is scaled, not overflowed
    (g,) = torch.autograd.grad(phi1(M), M, G)
    (g1,) = torch.autograd.grad(phi1(M), M, G / 1e8)
    assert (g - 1e8 * g1).abs().max().item() <= 1e-13 * g.abs().max().item()


def test_factor_and_two_sided_match_sequential():
    W = _rand(9, 7, seed=4)
    L0, R0 = _rand(9, 2, scale=0.5, seed=5), _rand(9, 2, seed=6)
    L1, R1 = _rand(7, 3, scale=0.5, seed=7), _rand(7, 3, seed=8)
    K0, K1 = expm_lowrank_factor(L0, R0), expm_lowrank_factor(L1, R1)
    assert torch.allclose(torch.eye(9, dtype=F64) + K0 @ R0.T, expm(L0 @ R0.T), atol=1e-13)
    seq = eye_plus_lowrank_mode_product(eye_plus_lowrank_mode_product(W, K0, R0, 0), K1, R1, 1)
    two = eye_plus_lowrank_two_sided(W, K0, R0, K1, R1)
    T = _rand(9, 7, 2, 3, seed=19)  # trailing modes: same as the two mode products
    seq4 = eye_plus_lowrank_mode_product(eye_plus_lowrank_mode_product(T, K0, R0, 0), K1, R1, 1)
    two4 = eye_plus_lowrank_two_sided(T, K0, R0, K1, R1)
    assert two4.shape == T.shape and two4.is_contiguous()
    assert (two4 - seq4).abs().max().item() <= 1e-13 * (1 + seq4.abs().max().item())
    want = expm(L0 @ R0.T) @ W @ expm(L1 @ R1.T).T
    assert (two - want).abs().max().item() <= 1e-13 * (1 + want.abs().max().item())
    assert (two - seq).abs().max().item() <= 1e-13 * (1 + want.abs().max().item())
    # batched factor
    Kb = expm_lowrank_factor(torch.stack([L0, 2 * L0]), torch.stack([R0, R0]))
    assert (Kb[0] - K0).abs().max().item() <= 20 * eps(F64) * K0.abs().max().item()
    assert (Kb[1] - expm_lowrank_factor(2 * L0, R0)).abs().max().item() <= 1e-13


def test_identity_bit_exact_for_zero_factor():
    """L = 0 ⇒ exp(0) = I: the weight comes back bit for bit (adapters' identity at init)."""
    T = _rand(4, 6, 3, seed=9, dtype=torch.float32)
    R = _rand(6, 2, seed=10, dtype=torch.float32)
    assert torch.equal(expm_lowrank_apply(torch.zeros_like(R), R, T, 1), T)


def test_gradcheck():
    L, R = _rand(5, 2, scale=0.5, seed=11), _rand(5, 2, seed=12)
    T = _rand(3, 5, 2, seed=13)
    M = _rand(3, 3, scale=0.7, seed=14)
    for x in (L, R, T, M):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(phi1, (M,))
    assert torch.autograd.gradcheck(expm_lowrank, (L, R))
    assert torch.autograd.gradcheck(lambda a, b, t: expm_lowrank_apply(a, b, t, 1), (L, R, T))
    W = _rand(5, 4, seed=15).requires_grad_(True)
    K1, R1 = (_rand(4, 1, seed=s).requires_grad_(True) for s in (16, 17))
    assert torch.autograd.gradcheck(eye_plus_lowrank_two_sided, (W, L, R, K1, R1))
    assert torch.autograd.gradgradcheck(eye_plus_lowrank_two_sided, (W, L, R, K1, R1))
    T4 = _rand(5, 4, 2, 3, seed=18).requires_grad_(True)  # trailing modes (a conv kernel)
    assert torch.autograd.gradcheck(eye_plus_lowrank_two_sided, (T4, L, R, K1, R1))
    assert torch.autograd.gradgradcheck(eye_plus_lowrank_two_sided, (T4, L, R, K1, R1))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: eye_plus_lowrank_two_sided(T4.detach(), a, b, c, d), (L, R, K1, R1))
    W0 = W.detach()  # frozen weight (the adapters' case): only the factors' gradients
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: eye_plus_lowrank_two_sided(W0, a, b, c, d), (L, R, K1, R1))
    assert torch.autograd.gradcheck(
        lambda b, d: eye_plus_lowrank_two_sided(W0, L.detach(), b, K1.detach(), d), (R, R1))


def test_errors():
    with pytest.raises(ShapeError):
        phi1(torch.zeros(2, 3))
    with pytest.raises(DTypeError):
        phi1(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(NonFiniteError):
        phi1(torch.tensor([[float("nan")]]))
    L = torch.zeros(4, 2)
    with pytest.raises(ShapeError):
        expm_lowrank(L, torch.zeros(4, 3))
    with pytest.raises(ShapeError):
        expm_lowrank(torch.zeros(4), torch.zeros(4))
    with pytest.raises(DTypeError):
        expm_lowrank(L, L.double())
    with pytest.raises(DTypeError):
        expm_lowrank(L, "R")
    with pytest.raises(ShapeError):
        expm_lowrank_apply(L, L, torch.zeros(3, 5), 1)  # mode size 5 != 4
    with pytest.raises(ShapeError):
        expm_lowrank_apply(L, L, torch.zeros(3, 4), 2)  # mode out of range
    with pytest.raises(DTypeError):
        expm_lowrank_apply(L, L, torch.zeros(3, 4), 1.0)  # type: ignore[arg-type]
    with pytest.raises(DTypeError):
        expm_lowrank_apply(L, L, torch.zeros(3, 4, dtype=F64), 1)
    with pytest.raises(ShapeError):
        expm_lowrank_apply(L[None], L[None], torch.zeros(3, 4), 1)  # batched factors
    with pytest.raises(ShapeError):
        expm_lowrank_apply(L, L, torch.zeros(()), 0)
    with pytest.raises(ShapeError):
        eye_plus_lowrank_mode_product(torch.zeros(3, 5), L, L, 1)
    with pytest.raises(ShapeError):
        eye_plus_lowrank_two_sided(torch.zeros(4, 5), L, L, L, L)  # n1 = 5 != 4
    with pytest.raises(DTypeError):
        eye_plus_lowrank_two_sided(torch.zeros(4, 4), L, L, L.double(), L.double())
    with pytest.raises(ShapeError):
        eye_plus_lowrank_two_sided(torch.zeros(4), L, L, L, L)  # order 1


# ----------------------------------------------------------------------------- non-finite
# A finite input whose exact result is beyond the dtype's range raises OverflowResultError (as
# expm does), never inf/NaN; a non-finite input raises NonFiniteError naming it.
def _overflowing(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # RᵀL = 500·ones(2, 2): φ₁ ≈ e^{1000}/1000, beyond float32 and float64
    return torch.full((5, 2), 10.0, dtype=dtype), torch.full((5, 2), 10.0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_overflowing_results_raise_overflow_result_error(dtype: torch.dtype) -> None:
    L, R = _overflowing(dtype)
    T = torch.ones(3, 5, dtype=dtype)
    calls = {
        "expm_lowrank": lambda: expm_lowrank(L, R),
        "expm_lowrank_factor": lambda: expm_lowrank_factor(L, R),
        "expm_lowrank_apply": lambda: expm_lowrank_apply(L, R, T, 1),
        "phi1": lambda: phi1(R.mT @ L),
        "phi1_batched": lambda: phi1(torch.stack([torch.zeros(2, 2, dtype=dtype), R.mT @ L])),
    }
    for name, call in calls.items():
        with pytest.raises(OverflowResultError, match="not finite"):
            call()
            pytest.fail(name)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_overflowing_products_raise_overflow_result_error(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 4
    W = torch.full((4, 5), big, dtype=dtype)
    K, R = torch.ones(4, 1, dtype=dtype), torch.ones(4, 1, dtype=dtype)  # (I + K Rᵀ) W: 5·big
    K1, R1 = torch.zeros(5, 1, dtype=dtype), torch.zeros(5, 1, dtype=dtype)
    with pytest.raises(OverflowResultError, match="not finite"):
        eye_plus_lowrank_two_sided(W, K, R, K1, R1)
    with pytest.raises(OverflowResultError, match="not finite"):
        eye_plus_lowrank_mode_product(W, K, R, 0)
    with pytest.raises(OverflowResultError, match="not finite"):
        expm_lowrank_apply(K, R, W, 0)  # exp(K Rᵀ) W, e^4-ish growth of big entries


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_non_finite_error_naming_them(bad: float) -> None:
    L, R = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    Lb = L.clone()
    Lb[3, 1] = bad
    Tb = torch.ones(3, 5, dtype=F64)
    Tb[1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"^L has"):
        expm_lowrank(Lb, R)
    with pytest.raises(NonFiniteError, match=r"^L has"):
        expm_lowrank_factor(Lb, R)
    with pytest.raises(NonFiniteError, match=r"^R has"):
        expm_lowrank_apply(L, Lb, torch.ones(3, 5, dtype=F64), 1)
    with pytest.raises(NonFiniteError, match=r"^T has"):
        expm_lowrank_apply(L, R, Tb, 1)
    with pytest.raises(NonFiniteError, match=r"^T has"):
        eye_plus_lowrank_mode_product(Tb, L, R, 1)
    with pytest.raises(NonFiniteError, match=r"^W has"):
        eye_plus_lowrank_two_sided(Tb.mT, L, R, torch.zeros(3, 1, dtype=F64),
                                   torch.zeros(3, 1, dtype=F64))
    with pytest.raises(NonFiniteError, match=r"^K1 has"):
        eye_plus_lowrank_two_sided(torch.ones(5, 3, dtype=F64), L, R,
                                   torch.full((3, 1), bad, dtype=F64),
                                   torch.ones(3, 1, dtype=F64))
