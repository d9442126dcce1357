"""expm/expm_frechet whose result overflows or cannot be resolved: a typed error, never
inf/NaN or garbage (issue 17).

Decision (documented in ``liegroup.linalg.expm``): a finite ``A`` whose exponential is not
finite in the working dtype raises :class:`OverflowResultError` (a ``NonFiniteError`` and an
``OverflowError``), on the compiled kernel and on the torch path alike; so does a matrix of
huge norm whose many squarings leave nothing of a bounded exponential (a skew-symmetric
``A`` with ``‖A‖·u ≳ 1``). Results that fit are unchanged (exact zeros of a triangular input
stay exact zeros; triangular and truly underflowing results of huge norm come back exactly).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup.errors import NonFiniteError, OverflowResultError
from liegroup.linalg import expm, expm_frechet
from tests.conftest import eps
from tests.test_linalg_ckernel import ExpmPath

DTYPES = (torch.float32, torch.float64)


def _log_max(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).max)


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflowing_diagonal_raises_typed_error(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    big = _log_max(dtype) + 1
    A = torch.diag(torch.tensor([big, 0.0], dtype=dtype))
    with pytest.raises(OverflowResultError, match="not finite"):
        expm(A)
    with pytest.raises(NonFiniteError):  # the base class catches it too
        expm(A[None].expand(3, 2, 2))
    with pytest.raises(OverflowError):
        expm(torch.tensor([[big]], dtype=dtype))  # 1 x 1
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_in_one_matrix_of_a_batch_names_it(
    dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    A = torch.zeros(4, 3, 3, dtype=dtype)
    A[2, 0, 0] = _log_max(dtype) + 5
    with pytest.raises(OverflowResultError, match="matrix 2 of"):
        expm(A)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frechet_overflow_raises_typed_error(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    A = torch.diag(torch.tensor([_log_max(dtype) + 1, 0.0], dtype=dtype))
    E = torch.ones(2, 2, dtype=dtype)
    with pytest.raises(OverflowResultError):
        expm_frechet(A, E)
    with pytest.raises(OverflowResultError):
        expm_frechet(A.requires_grad_(), E)  # the differentiable route too


@given(
    d=st.lists(st.floats(-800.0, 800.0, allow_nan=False), min_size=2, max_size=5),
    path=st.sampled_from(["kernel", "torch"]),
)
def test_diagonal_result_is_finite_and_keeps_exact_zeros_or_raises(
    d: list[float], path: str
) -> None:
    """exp of a diagonal matrix: the off-diagonal zeros stay exact zeros (no 0·inf = NaN), the
    diagonal is exp(d_i) rounded once; where any exp(d_i) overflows float64, it raises."""
    from tests.test_linalg_ckernel import use_path

    with pytest.MonkeyPatch.context() as mp:
        use_path(path, mp) if path == "torch" else _kernel_or_skip(mp)
        n = len(d)
        A = torch.diag(torch.tensor(d, dtype=torch.float64))
        if max(d) > _log_max(torch.float64):
            with pytest.raises(OverflowResultError):
                expm(A)
            return
        X = expm(A)
        assert torch.isfinite(X).all()
        zero = torch.ones(n, n, dtype=torch.bool)
        zero.diagonal().fill_(False)
        assert torch.equal(X[zero], torch.zeros_like(X[zero]))
        want = torch.exp(torch.tensor(d, dtype=torch.float64))
        # the diagonal is set exactly (libm exp, rounded once)
        torch.testing.assert_close(X.diagonal(), want, rtol=4 * 2.0**-53, atol=1e-300)


def _kernel_or_skip(mp: pytest.MonkeyPatch) -> None:
    from tests.test_linalg_ckernel import EXPM

    if EXPM._ckernel is None:
        mp.setattr(EXPM, "_USE_KERNEL", False)
    else:
        mp.setattr(EXPM, "_USE_KERNEL", True)


def test_low_precision_cast_overflow_still_follows_torch(expm_path: ExpmPath) -> None:
    # float16 is computed in float32 (finite there) and rounded: beyond float16's range an
    # entry becomes inf as any float16 cast does (documented), NOT an error
    A = torch.diag(torch.tensor([12.0, 0.0], dtype=torch.float16))
    X = expm(A)
    assert X[0, 0] == math.inf and X[1, 1] == 1 and X[0, 1] == 0 and X[1, 0] == 0


# --------------------------------------------------------------------------- huge norm, bounded
# exp(A) of a skew-symmetric A is a rotation, whatever the norm; past κ_exp(A)·u ~ ‖A‖·u ≥ 1
# the squarings' rounding errors leave nothing of it (zeros, or entries of 1e13): a typed error.
# Every θ here has u·‖A‖₁ ≥ 1.2·n^{3/2}, where the raise is guaranteed whatever the BLAS
# rounds (docs/linalg.md); nearer 1/u it depends on it (θ = 1e16, 3×3, float64: raised on
# x86-64, returned on aarch64).
HUGE_THETA = {
    torch.float64: [1e17, 1e20, 1e30, 1e38, 1e50, 1e100, 1e200, 1e300],
    torch.float32: [1e8, 1e10, 1e20, 1e30, 1e38],
}


def _skew(theta: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    if n == 2:
        return torch.tensor([[0.0, theta], [-theta, 0.0]], dtype=dtype)
    w = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    w = w / w.norm() * theta
    K = torch.zeros(3, 3, dtype=torch.float64)
    K[0, 1], K[0, 2], K[1, 2] = -w[2], w[1], -w[0]
    return (K - K.mT).to(dtype)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_norm_skew_raises_instead_of_garbage(
    n: int, dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    for theta in HUGE_THETA[dtype]:
        A = _skew(theta, n, dtype)
        with pytest.raises(OverflowResultError, match=r"cannot be resolved|not finite"):
            expm(A)
        with pytest.raises(OverflowResultError):
            expm_frechet(A, torch.ones_like(A))
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_skew_matrices_past_the_guaranteed_norm_raise_whatever_their_axes(
    dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    """docs/linalg.md: a skew A raises once u·‖A‖₁ ≥ 1.2·n^{3/2}, for every rounding.

    The logarithmic-norm check's rounding allowance was scaled by ‖A‖ instead of ‖H‖: for a
    skew A (H = 0) it allowed singular values of e^{±8n·u·‖A‖}, and results with singular
    values 6.2 and 0.56 came back (float64: 6-10 of these 80 matrices).
    """
    gen = torch.Generator().manual_seed(0)
    u = torch.finfo(dtype).eps / 2
    for n in (2, 3, 4, 5):
        for _ in range(20):
            K = torch.randn(n, n, generator=gen, dtype=torch.float64)
            K = K - K.mT
            A = (K / K.abs().sum(-2).amax() * (1.2 * n**1.5 / u)).to(dtype)
            with pytest.raises(OverflowResultError):
                expm(A)
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_norm_skew_raises_alone_iff_in_a_batch(
    dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    # batch invariance of the decision: the benign members pass alone and in the batch, the
    # unresolvable one raises alone and names its index in the batch
    gen = torch.Generator().manual_seed(0)
    benign = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64).to(dtype)
    bad = _skew(HUGE_THETA[dtype][1], 3, dtype)
    for i in range(4):
        expm(benign[i])
    with pytest.raises(OverflowResultError):
        expm(bad)
    batch = torch.cat([benign[:2], bad[None], benign[2:]])
    with pytest.raises(OverflowResultError, match="matrix 2 of"):
        expm(batch)
    with pytest.raises(OverflowResultError, match="matrix 2 of"):
        expm(batch.requires_grad_())  # the autograd route


def test_huge_norm_skew_raises_on_the_differentiable_frechet_route(expm_path: ExpmPath) -> None:
    A = _skew(1e20, 2, torch.float64).requires_grad_()
    with pytest.raises(OverflowResultError):
        expm_frechet(A, torch.ones(2, 2, dtype=torch.float64))


def _rotation_oracle(theta: float, dtype: torch.dtype) -> torch.Tensor:
    """exp([[0, t], [-t, 0]]) for the t stored in ``dtype``, by mpmath at 60 digits."""
    import mpmath as mp

    t = float(torch.tensor(theta, dtype=dtype))
    with mp.workdps(60):
        c, s = float(mp.cos(mp.mpf(t))), float(mp.sin(mp.mpf(t)))
    return torch.tensor([[c, s], [-s, c]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("dtype", "theta"),
    [(torch.float64, 1e13), (torch.float64, 3e14), (torch.float32, 1e5), (torch.float32, 3e6)],
)
def test_large_skew_below_the_resolution_limit_is_returned_within_its_conditioning(
    dtype: torch.dtype, theta: float, expm_path: ExpmPath
) -> None:
    # many squarings (the check runs), but κ_exp·u = θu < 1: the rotation comes back, with the
    # accuracy its condition number allows (relative error ≲ θ·u)
    A = torch.tensor([[0.0, theta], [-theta, 0.0]], dtype=dtype)
    X = expm(A).double()
    assert float((X - _rotation_oracle(theta, dtype)).abs().max()) <= 4 * theta * eps(dtype)
    expm_path.check_used()


def _exact_cases(dtype: torch.dtype) -> dict[str, tuple[list[list[float]], list[list[float]]]]:
    big = 1e20 if dtype == torch.float64 else 1e30
    return {
        # nilpotent: exp = I + A (no squarings)
        "nilpotent": ([[0.0, big], [0.0, 0.0]], [[1.0, big], [0.0, 1.0]]),
        # triangular with a decaying and a neutral eigenvalue: exact through the triangular fix
        "diag": ([[-big, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]),
        # (e^{-b} − 1)/(−b)·b = 1 in the corner
        "triangular": ([[-big, big], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]),
        # every eigenvalue ≈ −10²⁰: the exact result underflows to zero
        "underflow": ([[-big, 3.0], [5.0, -big]], [[0.0, 0.0], [0.0, 0.0]]),
    }


@pytest.mark.parametrize("name", ["nilpotent", "diag", "triangular", "underflow"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_norm_triangular_and_underflowing_results_are_returned_exactly(
    name: str, dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    a, want = _exact_cases(dtype)[name]
    A = torch.tensor(a, dtype=dtype)
    X = expm(A)
    torch.testing.assert_close(X, torch.tensor(want, dtype=dtype), rtol=4 * eps(dtype), atol=0)
    expm_path.check_used()


def test_resolution_check_runs_only_for_many_squarings(
    expm_path: ExpmPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the common path costs nothing extra: matrices of ordinary norm never reach the check
    from tests.test_linalg_ckernel import EXPM

    def never(*args: object) -> None:
        raise AssertionError("the resolution check ran for an ordinary matrix")

    monkeypatch.setattr(EXPM, "_unresolved", never)
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        A = 8 * torch.randn(64, 4, 4, generator=gen, dtype=torch.float64).to(dtype)
        expm(A)
        expm(A[0])
        expm_frechet(A, A)
    expm_path.check_used()
