"""expm/expm_frechet whose result overflows: a typed error, never inf/NaN (issue 17).

Decision (documented in ``liegroup.linalg.expm``): a finite ``A`` whose exponential is not
finite in the working dtype raises :class:`OverflowResultError` (a ``NonFiniteError`` and an
``OverflowError``), on the compiled kernel and on the torch path alike; results that fit are
unchanged (exact zeros of a triangular input stay exact zeros).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup.errors import NonFiniteError, OverflowResultError
from liegroup.linalg import expm, expm_frechet
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
