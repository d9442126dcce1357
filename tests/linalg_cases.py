"""Hard matrices for the expm/logm accuracy suites, and high-precision references.

Sources: Moler & Van Loan (1978/2003) examples, Ward (1977) test matrices, Burkardt's
``test_matrix_exponential`` collection, scipy's ``test_matfuncs.py``, Al-Mohy & Higham (2009)
overscaling examples, Pascal matrices, se(3)/so(3) generators (large translations, rotations
near 0 and π).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import mpmath
import numpy as np
import scipy.linalg

MP_DPS = 50


def _skew(w: tuple[float, float, float]) -> np.ndarray:
    return np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def _se3(w: tuple[float, float, float], t: tuple[float, float, float]) -> np.ndarray:
    A = np.zeros((4, 4))
    A[:3, :3] = _skew(w)
    A[:3, 3] = t
    return A


def _axis_angle(theta: float) -> np.ndarray:
    a = np.array([1.0, 2.0, 2.0]) / 3.0
    return _skew(tuple(theta * a))


def _ward4() -> np.ndarray:
    A = np.diag(np.ones(9), 1)
    A[9, 0] = 1e-10
    return A


def _moler_nonnormal() -> np.ndarray:
    # Al-Mohy & Higham 2009, Example 3.1-like: [[1, b], [0, -1]]
    return np.array([[1.0, 1e6], [0.0, -1.0]])


HARD: dict[str, np.ndarray] = {
    "moler_vanloan_2x2": np.array([[-49.0, 24.0], [-64.0, 31.0]]),
    "burkardt_1_diag": np.array([[1.0, 0.0], [0.0, 2.0]]),
    "burkardt_2_sym": np.array([[1.0, 3.0], [3.0, 2.0]]),
    "burkardt_3_stiff": np.array([[0.0, 1.0], [-39.0, -40.0]]),
    "burkardt_5_nilpotent": np.diag([6.0, 6.0, 6.0], 1),
    "burkardt_6_jordan": np.array([[1.0, 1.0], [0.0, 1.0]]),
    "burkardt_7_near_jordan": np.array([[1.0 + 1e-8, 1.0], [0.0, 1.0 - 1e-8]]),
    "burkardt_8": np.array([[21.0, 17.0, 6.0], [-5.0, -1.0, -6.0], [4.0, 4.0, 16.0]]),
    "burkardt_9": np.array(
        [[1.0, 2.0, 2.0, 2.0], [3.0, 1.0, 1.0, 2.0], [3.0, 2.0, 1.0, 2.0], [2.0, 1.0, 3.0, 3.0]]
    ),
    "ward_1": np.array([[4.0, 2.0, 0.0], [1.0, 4.0, 1.0], [1.0, 1.0, 4.0]]),
    "ward_2": np.array(
        [
            [29.87942128909879, 0.7815750847907159, -2.289519314033932],
            [0.7815750847907159, 25.72656945571064, 8.680737820540137],
            [-2.289519314033932, 8.680737820540137, 34.39400925519054],
        ]
    ),
    "ward_3": np.array([[-131.0, 19.0, 18.0], [-390.0, 56.0, 54.0], [-387.0, 57.0, 52.0]]),
    "ward_4_jordan10": _ward4(),
    "pascal_lower_6": scipy.linalg.pascal(6, kind="lower").astype(float),
    "pascal_sym_4": scipy.linalg.pascal(4).astype(float) / 4,
    "overscale_b1e4": np.array([[1.0, 1e4], [0.0, -1.0]]),
    "overscale_b1e6": _moler_nonnormal(),
    "overscale_b1e8_full": np.array([[1.0, 1e8, 0.0], [0.0, -1.0, 0.0], [1e-8, 0.0, 0.5]]),
    "scipy_triu_decay": np.array([[-1e-3, 1e3], [0.0, -1e-1]]),
    "scipy_large_diag_offset": np.array([[0.1, 1e4, 0.0], [0.0, -0.2, 1e4], [0.0, 0.0, 0.3]]),
    "se3_large_translation": _se3((0.3, -0.2, 0.5), (1e4, -3e3, 5e3)),
    "se3_small_rot_large_t": _se3((1e-7, 2e-7, -1e-7), (1e5, 1e5, -1e5)),
    "so3_near_zero": _axis_angle(1e-8),
    "so3_small": _axis_angle(1e-3),
    "so3_near_pi": _axis_angle(math.pi - 1e-6),
    "so3_pi": _axis_angle(math.pi),
    "so3_large": _axis_angle(30.0),
    "zero_3": np.zeros((3, 3)),
    "tiny_norm_generic": 1e-9 * np.array([[0.3, -0.7, 0.2], [0.1, 0.5, -0.4], [0.9, 0.2, 0.1]]),
}

# Cases run in the default (fast) test run; the rest are marked slow.
DEFAULT_CASES = [
    "moler_vanloan_2x2",
    "burkardt_3_stiff",
    "burkardt_5_nilpotent",
    "burkardt_8",
    "ward_2",
    "ward_3",
    "pascal_lower_6",
    "overscale_b1e6",
    "overscale_b1e8_full",
    "se3_large_translation",
    "so3_near_zero",
    "so3_near_pi",
    "tiny_norm_generic",
    "zero_3",
]


def _to_mp(A: np.ndarray) -> mpmath.matrix:
    return mpmath.matrix([[mpmath.mpf(float(x)) for x in row] for row in A])


def _from_mp(M: mpmath.matrix) -> np.ndarray:
    return np.array([[float(mpmath.re(M[i, j])) for j in range(M.cols)] for i in range(M.rows)])


@cache
def _expm_ref_cached(key: bytes, shape: tuple[int, int]) -> np.ndarray:
    A = np.frombuffer(key, dtype=np.float64).reshape(shape)
    with mpmath.workdps(MP_DPS):
        return _from_mp(mpmath.expm(_to_mp(A)))


def expm_ref(A: np.ndarray) -> np.ndarray:
    """exp(A) from mpmath at 50 digits (the float64 matrix A is taken as exact)."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    return _expm_ref_cached(A.tobytes(), A.shape)


@cache
def _logm_ref_cached(key: bytes, shape: tuple[int, int]) -> np.ndarray:
    A = np.frombuffer(key, dtype=np.float64).reshape(shape)
    with mpmath.workdps(MP_DPS):
        return _from_mp(mpmath.logm(_to_mp(A)))


def logm_ref(A: np.ndarray) -> np.ndarray:
    """Principal log(A) from mpmath at 50 digits."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    return _logm_ref_cached(A.tobytes(), A.shape)


def rel_err(X: np.ndarray, ref: np.ndarray) -> float:
    """Relative Frobenius error (absolute if ref is zero)."""
    d = float(np.linalg.norm(X - ref))
    r = float(np.linalg.norm(ref))
    return d / r if r > 0 else d


def expm_kappa(A: np.ndarray) -> float:
    """Relative condition number of exp at A (Frobenius), from scipy.linalg.expm_cond."""
    if not np.any(A):
        return 1.0
    return float(scipy.linalg.expm_cond(A))


# --------------------------------------------------------------------------- rounding bounds
# The torch path of expm computes each matrix with the same decisions and the same sequence
# of calls alone or in a batch, but its batched products (BLAS) may round differently for
# different batch sizes. What it guarantees is its accuracy: relative Frobenius error
# ≤ 10·max(κ_exp(A), 4)·u for exp (the bound the hard-matrix tests check against mpmath). Two
# evaluations of one matrix therefore agree within twice that. κ_exp costs n² Fréchet
# derivatives by scipy (too slow for the batch tests), so these bounds use the upper bound
#   κ_exp(A) = ‖L(A)‖·‖A‖_F/‖e^A‖_F ≤ e^{μ₂(A)}·‖A‖_F/‖e^A‖_F,
# from ‖L(A, E)‖_F = ‖∫₀¹ e^{(1−t)A} E e^{tA} dt‖_F ≤ ∫₀¹ e^{(1−t)μ₂} e^{tμ₂} dt ‖E‖_F, where
# μ₂(A) = λ_max((A + Aᵀ)/2) is the logarithmic 2-norm (‖e^{tA}‖₂ ≤ e^{tμ₂(A)}), and e^A from
# scipy in float64. An upper bound on κ only widens the tolerance where it is loose (strongly
# non-normal matrices, whose members are then checked vacuously); most members of the test
# batches get a bound between 1e-15 and 1e-4 relative.
ACCURACY_FACTOR = 10.0


def expm_kappa_upper(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(κ̄, e^{μ₂(A)}, ‖e^A‖_F)`` per matrix of ``A (B, n, n)`` (float64; see above)."""
    A = np.asarray(A, dtype=np.float64)
    mu = np.linalg.eigvalsh((A + np.swapaxes(A, -1, -2)) / 2)[:, -1]
    with np.errstate(over="ignore", invalid="ignore"):
        emu = np.exp(mu)
        nx = np.array([np.linalg.norm(scipy.linalg.expm(a)) for a in A])
        kappa = emu * np.linalg.norm(A, axis=(-2, -1)) / nx
    kappa[~np.isfinite(kappa)] = np.inf
    return kappa, emu, nx


def assert_rounding_close(
    got: Any, want: Any, A: Any, u: float, grad_of: Any = None
) -> int:
    """Two torch-path evaluations of ``exp`` (or of its gradient) at the matrices ``A``
    agree to twice the accuracy bound; returns how many members were informative.

    ``got``, ``want``, ``A``: tensors ``(B, n, n)``. For ``exp``: per matrix
    ``‖got − want‖_F ≤ 2·10·max(κ̄, 4)·u·‖e^A‖_F``. For the gradient ``L(Aᵀ, G)`` (pass
    ``grad_of=G``): the same relative budget on the bound ``‖L(Aᵀ, G)‖_F ≤ e^{μ₂(A)}‖G‖_F``.
    Members whose exact result overflows must be non-finite at the same entries in both.
    """
    g = got.detach().double().numpy()
    w = want.detach().double().numpy()
    kappa, emu, nx = expm_kappa_upper(A.detach().double().numpy())
    if grad_of is None:
        scale = nx
    else:
        scale = emu * np.linalg.norm(grad_of.detach().double().numpy(), axis=(-2, -1))
    informative = 0
    for i in range(g.shape[0]):
        fin_g, fin_w = np.isfinite(g[i]), np.isfinite(w[i])
        np.testing.assert_array_equal(fin_g, fin_w, err_msg=f"matrix {i}")
        if not fin_g.all():
            continue
        tol = 2 * ACCURACY_FACTOR * max(kappa[i], 4.0) * u * scale[i]
        diff = float(np.linalg.norm(g[i] - w[i]))
        assert diff <= tol, (i, diff, tol)
        informative += bool(tol < 1e-2 * max(float(np.linalg.norm(w[i])), 1e-300))
    return informative
