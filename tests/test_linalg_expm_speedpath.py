"""The speed paths of linalg.expm keep its guarantees.

* n ≤ 8: every matrix is evaluated in the top degree's form with its own coefficients (zeros
  for the terms its degree lacks) — the same approximant r_m as the per-degree evaluation;
* a matrix alone and in any batch: the same bits on the compiled kernel's path (one matrix at
  a time in C); on the torch path, whose batched BLAS products may round differently for
  different batch sizes, agreement within twice its accuracy bound
  (tests.linalg_cases.assert_rounding_close);
* the exact guard norms for n ≤ 4 (elementwise row-vector walk) agree with the BLAS walk;
* triangular inputs: the exact superdiagonal uses sinh(x)/x by expm1, because torch.sinh
  rounds differently in its vectorised loop and its scalar tail (a matrix's result would
  depend on its place in the batch); the exact diagonal and superdiagonal are elementwise
  functions of the matrix's own entries, the same bits at any place in the batch on both
  paths.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from liegroup.linalg import _expm_decide as EX  # noqa: N812
from liegroup.linalg import expm
from tests.conftest import eps
from tests.linalg_cases import assert_rounding_close
from tests.test_linalg_ckernel import ExpmPath, representable

PADE = importlib.import_module("liegroup.linalg._expm_pade")
DTYPES = [torch.float64, torch.float32]


def _mixed(n: int, count: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-6, 1.3, count, dtype=torch.float64)
    A = torch.randn(count, n, n, generator=gen, dtype=torch.float64) * scales[:, None, None]
    A[::4] = torch.triu(A[::4])
    return representable(A[torch.randperm(count, generator=gen)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_small_path_equals_per_degree_pade(dtype: torch.dtype, n: int) -> None:
    A = _mixed(n, 200, seed=n, dtype=dtype)
    A = A[~(A.tril(-1) == 0).all((-2, -1))]  # no triangular fix in this comparison
    buf, m, s, s0, _ = EX._decide(A)
    assert (s0 == 0).all() and len(set(m.tolist())) >= 2
    ref = torch.empty_like(A)
    for d in sorted(set(m.tolist())):
        idx = np.flatnonzero(m == d)
        ti = torch.as_tensor(idx)
        ref[ti] = PADE._pade(d, s[idx], buf.index_select(1, ti))
    got = PADE._pade_small(m, s, buf.clone())
    # same r_m, different rounding: agree to a few ulp of the (well-conditioned) quotient
    u = torch.finfo(dtype).eps
    err = ((got - ref).abs().amax((-2, -1)) / ref.abs().amax((-2, -1))).max()
    assert float(err) <= 64 * u


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 9])
def test_small_and_grouped_paths_batch_invariant(
    dtype: torch.dtype, n: int, expm_path: ExpmPath
) -> None:
    A = _mixed(n, 90, seed=10 + n, dtype=dtype)
    _, m, s, _, _ = EX._decide(A)
    assert len(set(m.tolist())) >= 2 and s.max() > 0
    full = expm(A)
    alone = torch.stack([expm(A[i]) for i in range(A.shape[0])])
    # and in a reversed batch of a different size
    part = expm(A[5:].flip(0)).flip(0)
    if expm_path.kernel:  # one matrix at a time in C: the same bits by construction
        torch.testing.assert_close(alone, full, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(part, full[5:], rtol=0, atol=0, equal_nan=True)
        expm_path.check_used()
    else:
        assert assert_rounding_close(alone, full, A, eps(dtype)) >= A.shape[0] // 2
        assert_rounding_close(part, full[5:], A[5:], eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triangular_superdiagonal_batch_invariant(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    # diagonals close together (|μ − λ|/2 in [1e-2, 1)): the sinh(x)/x branch of the exact
    # superdiagonal, for members at every position of the vector loop and its tail
    gen = torch.Generator().manual_seed(2)
    A = torch.triu(torch.randn(67, 4, 4, generator=gen, dtype=torch.float64))
    d = torch.randn(67, 1, generator=gen, dtype=torch.float64)
    A.diagonal(dim1=-2, dim2=-1).copy_(d + 0.3 * torch.rand(67, 4, generator=gen))
    A = A.to(dtype)
    full = expm(A)
    alone = torch.stack([expm(A[i]) for i in range(A.shape[0])])
    if expm_path.kernel:
        torch.testing.assert_close(alone, full, rtol=0, atol=0)
    else:
        assert_rounding_close(alone, full, A, eps(dtype))
    # the exact diagonal and superdiagonal: elementwise in the matrix's own entries
    for k in (0, 1):
        d_alone = alone.diagonal(offset=k, dim1=-2, dim2=-1)
        torch.testing.assert_close(d_alone, full.diagonal(offset=k, dim1=-2, dim2=-1), rtol=0,
                                   atol=0)


def test_sinhc_accurate() -> None:
    x = torch.linspace(-3, 3, 2001, dtype=torch.float64)
    x = x[x != 0]
    ref = torch.sinh(x) / x
    got = PADE._sinhc(x)
    assert float(((got - ref) / ref).abs().max()) <= 8 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_tiny_guard_norms_match_blas_walk(dtype: torch.dtype, n: int) -> None:
    A = _mixed(n, 120, seed=20 + n, dtype=dtype).numpy()
    e = np.frexp(np.abs(A).sum(-2).max(-1))[1].astype(np.int64)
    ps = EX._CONSTS[dtype].ps
    got = EX._abs_power_norms_np(A, e, ps)
    B = np.abs(A.astype(np.float64)) * np.ldexp(1.0, -e)[:, None, None]
    want = np.stack([np.abs(np.linalg.matrix_power(B, p)).sum(-2).max(-1) for p in ps], axis=1)
    u = float(torch.finfo(dtype).eps)
    np.testing.assert_allclose(got, want, rtol=60 * u, atol=0)


# --------------------------------------------------------------------------- small batches
# Batches up to EX._NP_BATCH run the elementwise steps (norms, Padé combinations) in numpy,
# larger ones in torch: the same IEEE operations in the same order, so the same bits.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 16])
def test_stats_numpy_and_torch_paths_bitwise_equal(dtype: torch.dtype, n: int) -> None:
    A = _mixed(n, 100, seed=30 + n, dtype=dtype)
    A[3] = torch.triu(A[3]) if n > 1 else A[3]
    buf = torch.empty((5, A.shape[0], n, n), dtype=dtype)
    EX._fill_powers(A, buf)
    st, tri = EX._stats(buf)  # the torch path (batch > _NP_BATCH)
    assert A.shape[0] > EX._NP_BATCH
    # independent reference: column sums of |X| added row by row, in float64 only at the end
    Y = buf[:4].abs().numpy()
    ref = Y[..., 0, :].copy()
    for i in range(1, n):
        ref += Y[..., i, :]
    if n <= EX._TINY_SUM_N:
        np.testing.assert_array_equal(st, ref.max(-1).astype(np.float64))
    want_tri = (A.tril(-1) == 0).all((-2, -1)).numpy()
    np.testing.assert_array_equal(tri, want_tri)
    for lo, hi in [(0, 1), (3, 4), (10, 17), (40, 40 + EX._NP_BATCH)]:
        st1, tri1 = EX._stats(buf[:, lo:hi].clone())  # the numpy path for small batches
        np.testing.assert_array_equal(st1, st[:, lo:hi])
        np.testing.assert_array_equal(tri1, tri[lo:hi])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 6, 8])
def test_pade_small_numpy_and_torch_paths_bitwise_equal(
    dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    A = _mixed(n, 30, seed=40 + n, dtype=dtype)
    buf, m, s, _, _ = EX._decide(A)
    assert len(set(m.tolist())) >= 2 and s.max() > 0 and A.shape[0] <= EX._NP_BATCH
    got = PADE._pade_small(m, s, buf.clone())  # numpy elementwise steps
    monkeypatch.setattr(PADE, "_NP_BATCH", 0)
    want = PADE._pade_small(m, s, buf.clone())  # torch elementwise steps
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    one = PADE._pade_small(m[:1], s[:1], buf[:, :1].clone())
    torch.testing.assert_close(one[0], want[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 5, 16, 33])
def test_small_batches_equal_to_large(dtype: torch.dtype, n: int, expm_path: ExpmPath) -> None:
    # batch sizes on both sides of _NP_BATCH (and a single matrix), mixed degrees, scalings
    # and triangular members; n = 16, 33 also check the one-call solve above n = 8. The
    # kernel: the same bits; the torch path: within twice its accuracy bound.
    A = _mixed(n, 70, seed=50 + n, dtype=dtype)
    full = expm(A)
    for lo, hi in [(0, 1), (5, 6), (2, 9), (20, 20 + EX._NP_BATCH), (1, 70)]:
        if expm_path.kernel:
            torch.testing.assert_close(
                expm(A[lo:hi]), full[lo:hi], rtol=0, atol=0, equal_nan=True
            )
        else:
            assert_rounding_close(expm(A[lo:hi]), full[lo:hi], A[lo:hi], eps(dtype))


def test_cdiv_exact_against_integer_division() -> None:
    a = np.concatenate(
        [np.arange(-3000, 3001), EX._NEG + np.arange(-30000, 30001, 7), [2**41, -(2**41)]]
    ).astype(np.int64)
    for k in (1, 2, 6, 8, 10, 14, 18, 26):
        np.testing.assert_array_equal(EX._cdiv(a, k), -((-a) // k))
    k_col = np.array([[6], [10], [26]], dtype=np.int64)
    np.testing.assert_array_equal(EX._cdiv(a[None], k_col), -((-a[None]) // k_col))
