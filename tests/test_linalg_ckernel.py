"""The compiled CPU kernel of linalg.expm / expm_frechet (liegroup/linalg/_cexpm.c).

* it is built in this project's install, and every CPU float32/float64 call with n ≤ N_MAX
  goes through it (N_MAX + 1 does not);
* it makes the same degree/scaling decisions as the torch path, and agrees with the torch
  path and with scipy to tolerances derived from κ·u;
* each matrix's result is the same bits alone or in batches of 1, 7, 32, 1000 (mixed degrees,
  scalings, triangular and full members), forward, backward and Fréchet; on every
  instruction set this CPU has;
* gradients (gradcheck), double backward, expm_frechet against the torch path and finite
  differences; non-finite input raises NonFiniteError naming the batch index; strided,
  transposed and broadcast inputs; threads (the kernel runs without the GIL).

Without the kernel (no C compiler at install, or LIEGROUP_DISABLE_KERNELS=1) the tests that
need it skip with the reason, and the torch-path halves of the parametrised tests still run.
"""

from __future__ import annotations

import importlib
import math
import threading
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch

from liegroup._kernels import kernels_disabled
from liegroup.errors import NonFiniteError
from liegroup.linalg import _expm_decide as EX  # noqa: N812
from liegroup.linalg import compiled_kernel, expm, expm_frechet
from tests.linalg_cases import expm_kappa, rel_err

EXPM = importlib.import_module("liegroup.linalg._expm_ops")
PADE = importlib.import_module("liegroup.linalg._expm_pade")
DTYPES = [torch.float64, torch.float32]
# the kernel's largest n (the sizes around it are parametrised also where it is absent)
N_MAX = EXPM._KERNEL_N_MAX or 64


def _kernel_absent_reason() -> str | None:
    if EXPM._ckernel is not None:
        return None
    if kernels_disabled():
        return "compiled kernels disabled by LIEGROUP_DISABLE_KERNELS"
    return "liegroup.linalg._cexpm is not built (the KernelUnavailableWarning at import says why)"


def need_kernel() -> None:
    """Skip the calling test, with the reason, when the compiled kernel is absent."""
    reason = _kernel_absent_reason()
    if reason is not None:
        pytest.skip(reason)


# --------------------------------------------------------------------------- path switch
class KernelSpy:
    """Stands in for the kernel module and counts the calls that reach it."""

    def __init__(self, kernel: Any) -> None:
        self._k = kernel
        self.N_MAX = kernel.N_MAX
        self.calls = 0

    def expm(self, *args: Any) -> int:
        self.calls += 1
        return int(self._k.expm(*args))

    def frechet(self, *args: Any) -> int:
        self.calls += 1
        return int(self._k.frechet(*args))


class ExpmPath:
    """Which path a test runs: ``kernel`` (with a call counter) or ``torch``."""

    def __init__(self, name: str, spy: KernelSpy | None) -> None:
        self.name = name
        self.spy = spy

    @property
    def kernel(self) -> bool:
        return self.name == "kernel"

    def check_used(self) -> None:
        """For the kernel path: assert the calls of the test reached the kernel."""
        if self.spy is not None:
            assert self.spy.calls > 0, "the compiled kernel was not called"


def use_path(name: str, monkeypatch: pytest.MonkeyPatch) -> ExpmPath:
    """Route linalg.expm / expm_frechet through ``name`` ('kernel' or 'torch')."""
    if name == "torch":
        monkeypatch.setattr(EXPM, "_USE_KERNEL", False)
        return ExpmPath(name, None)
    need_kernel()
    spy = KernelSpy(EXPM._ckernel)
    monkeypatch.setattr(EXPM, "_ckernel", spy)
    return ExpmPath(name, spy)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> ExpmPath:
    return use_path("kernel", monkeypatch)


def _with_torch_path(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EXPM, "_USE_KERNEL", False)
        return fn(*args, **kwargs)


def _mixed(n: int, count: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random matrices over 11 decades of norm: several degrees and scalings, triangular,
    skew and strongly non-normal members, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-9, 1.6, count, dtype=torch.float64)
    A = torch.randn(count, n, n, generator=gen, dtype=torch.float64) * scales[:, None, None]
    A = A / math.sqrt(n)
    A[::5] = torch.triu(A[::5])
    A[1::7] = A[1::7] - A[1::7].mT
    A[2::9, 0, -1] *= 1e3
    return representable(A[torch.randperm(count, generator=gen)], dtype)


def representable(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A`` in ``dtype`` with every member whose exponential overflows it halved until it
    does not: expm raises OverflowResultError for those (tests/reliability) instead of
    returning inf/NaN, and the batch tests here need every member computable."""
    A = A.clone()
    for _ in range(64):
        X = PADE._expm_core(A.to(dtype).reshape(-1, *A.shape[-2:]))[0]
        bad = ~torch.isfinite(X).flatten(1).all(-1)
        if not bool(bad.any()):
            break
        A.view(-1, *A.shape[-2:])[bad] *= 0.5
    return A.to(dtype)


def _kappa(a: np.ndarray) -> float:
    """κ_exp(a) (scipy.linalg.expm_cond); inf where it is not defined (exp(a) ≈ 0)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        k = expm_kappa(a)
    return k if math.isfinite(k) else math.inf


def _count(n: int) -> int:
    """Matrices per accuracy test (κ by expm_cond costs n² Fréchet derivatives)."""
    return 24 if n <= 5 else 8


def _decisions(A: torch.Tensor) -> np.ndarray:
    """(m, total s) of each matrix as the kernel chose them."""
    ms = torch.empty((A.shape[0], 2), dtype=torch.int32)
    EXPM._kernel_expm(A.contiguous(), ms)
    return ms.numpy().astype(np.int64)


# --------------------------------------------------------------------------- build
def test_kernel_is_built() -> None:
    # the project's install (pip install -e ., as `make` runs it) compiles the kernel where a
    # C compiler is available; a failed build is reported by a KernelUnavailableWarning at
    # import (and here, as the skip reason)
    need_kernel()
    assert compiled_kernel()
    assert N_MAX >= 16
    assert EXPM._ckernel.isa() in ("baseline", "avx2", "avx512", "avx2+avx512")


def test_compiled_kernel_reports_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EXPM, "_USE_KERNEL", False)
    assert not compiled_kernel()


def test_disable_switch_turns_the_kernel_off() -> None:
    if not kernels_disabled():
        pytest.skip("runs under LIEGROUP_DISABLE_KERNELS=1")
    assert EXPM._ckernel is None and not compiled_kernel()
    # every call runs the torch path: the operator's default implementation
    A = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.equal(expm(A), EXPM._expm_torch(A)[0])


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, N_MAX])
def test_dispatch_takes_every_cpu_size_up_to_n_max(
    kernel: ExpmPath, dtype: torch.dtype, n: int
) -> None:
    A = (0.3 * torch.randn(2, n, n, dtype=torch.float64)).to(dtype)
    expm(A)
    assert kernel.spy is not None and kernel.spy.calls == 1
    expm_frechet(A, A)
    assert kernel.spy.calls == 2


def test_dispatch_above_n_max_uses_torch(kernel: ExpmPath) -> None:
    A = torch.randn(2, N_MAX + 1, N_MAX + 1, dtype=torch.float64) / (N_MAX + 1)
    X = expm(A)
    assert kernel.spy is not None and kernel.spy.calls == 0
    ref = scipy.linalg.expm(A[0].numpy().astype(complex)).real
    assert rel_err(X[0].numpy(), ref) <= 1e-13


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [N_MAX - 1, N_MAX, N_MAX + 1])
def test_switch_sizes_agree_with_torch_path(dtype: torch.dtype, n: int) -> None:
    need_kernel()
    # normal matrices (symmetric, skew): κ_exp = ‖A‖₂ (relative, 2-norm), known exactly
    gen = torch.Generator().manual_seed(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = 3 * torch.randn(n, generator=gen, dtype=torch.float64)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64) * 2 / math.sqrt(n)
    A = torch.stack([(Q * d) @ Q.T, S - S.T]).to(dtype)
    X = expm(A).double()
    Y = _with_torch_path(expm, A).double()
    u = torch.finfo(dtype).eps / 2
    for i in range(2):
        kappa = float(torch.linalg.matrix_norm(A[i].double(), ord=2))
        err = rel_err(X[i].numpy(), Y[i].numpy())
        assert err <= 50 * max(kappa, 4.0) * u * math.sqrt(n), (i, err)


# --------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 9, 16, 33])
def test_decisions_match_torch_path(dtype: torch.dtype, n: int) -> None:
    # the same algorithm (θ tables, guard, exact ⌈log₂⌉): the same degree and scaling
    need_kernel()
    A = _mixed(n, 150, seed=60 + n, dtype=dtype)
    big = 2.0**105 if dtype == torch.float64 else 2.0**14  # above the prescaling threshold
    # a norm above the prescaling threshold whose exponential is representable (a random
    # one overflows, and expm raises OverflowResultError for it): I + N for N = big·e₁eₙᵀ,
    # exp(−big) = 0 for n = 1
    A[7] = 0
    A[7, 0, -1] = big if n > 1 else -big
    got = _decisions(A)
    _, m, s, s0, _ = EX._decide(A)
    assert len(set(m.tolist())) >= 2 and (s0 > 0).any()
    np.testing.assert_array_equal(got[:, 0], m)
    np.testing.assert_array_equal(got[:, 1], s + s0)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 16])
def test_kernel_agrees_with_torch_path_and_scipy(
    kernel: ExpmPath, dtype: torch.dtype, n: int
) -> None:
    A = _mixed(n, _count(n), seed=n, dtype=dtype)
    X = expm(A).double().numpy()
    Y = _with_torch_path(expm, A).double().numpy()
    u = torch.finfo(dtype).eps / 2
    for i in range(A.shape[0]):
        a = A[i].double().numpy()
        ref = scipy.linalg.expm(a.astype(complex)).real
        tol = 50 * max(_kappa(a), 4.0) * u
        if not np.isfinite(ref).all() or not tol <= 1e-2:
            continue
        assert rel_err(X[i], ref) <= max(tol, 1e-13 if dtype == torch.float64 else 0.0), i
        assert rel_err(X[i], Y[i]) <= 2 * tol, i
    kernel.check_used()


def test_one_by_one_is_exp(kernel: ExpmPath) -> None:
    a = torch.tensor([-700.0, -3.0, 0.0, 1e-12, 0.5, 30.0, 700.0], dtype=torch.float64)
    X = expm(a[:, None, None])[:, 0, 0]
    assert torch.equal(X, torch.exp(a))
    E = torch.full_like(a, 0.25)[:, None, None]
    L = expm_frechet(a[:, None, None], E)[:, 0, 0]
    torch.testing.assert_close(L, 0.25 * torch.exp(a), rtol=2e-16, atol=0)
    kernel.check_used()


# --------------------------------------------------------------------------- batch invariance
def _alone_equals_batch(A: torch.Tensor, full: torch.Tensor) -> None:
    for i in range(A.shape[0]):
        torch.testing.assert_close(expm(A[i]), full[i], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_bitwise_batch_invariant(kernel: ExpmPath, dtype: torch.dtype, n: int) -> None:
    count = 1000 if n <= 5 else 200
    A = _mixed(n, count, seed=70 + n, dtype=dtype)
    ms = _decisions(A)
    assert len(set(ms[:, 0].tolist())) >= 2 and len(set(ms[:, 1].tolist())) >= 3
    full = expm(A)
    picks = list(range(0, count, max(1, count // 40)))
    _alone_equals_batch(A[picks], full[picks])
    for size in (1, 7, 32):
        for lo in (0, 13, count - size):
            torch.testing.assert_close(
                expm(A[lo : lo + size]), full[lo : lo + size], rtol=0, atol=0, equal_nan=True
            )
    torch.testing.assert_close(expm(A.flip(0)).flip(0), full, rtol=0, atol=0, equal_nan=True)
    kernel.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_and_frechet_bitwise_batch_invariant(kernel: ExpmPath, dtype: torch.dtype) -> None:
    A = _mixed(4, 40, seed=9, dtype=dtype)
    A = A[torch.isfinite(expm(A)).all((-2, -1))]
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(A.shape, dtype=torch.float64, generator=gen).to(dtype)
    Ar = A.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expm(Ar), Ar, G)
    X, L = expm_frechet(A, G, return_expm=True)
    for i in range(0, A.shape[0], 3):
        a = A[i].clone().requires_grad_()
        (g1,) = torch.autograd.grad(expm(a), a, G[i])
        torch.testing.assert_close(g1, grad[i], rtol=0, atol=0)
        x1, l1 = expm_frechet(A[i], G[i], return_expm=True)
        torch.testing.assert_close(l1, L[i], rtol=0, atol=0)
        torch.testing.assert_close(x1, X[i], rtol=0, atol=0)
    kernel.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_batch_invariant_and_close(dtype: torch.dtype) -> None:
    need_kernel()
    k = EXPM._ckernel
    A = _mixed(6, 64, seed=3, dtype=dtype)
    A = A[torch.isfinite(expm(A)).all((-2, -1))]
    results = {}
    try:
        for isa in ("baseline", "avx2", "avx512"):
            try:
                k.isa(isa)
            except ValueError:
                continue
            full = expm(A)
            _alone_equals_batch(A[::5], full[::5])
            results[isa] = full.double()
    finally:
        k.isa("auto")
    base = results["baseline"]
    u = torch.finfo(dtype).eps / 2
    for isa, X in results.items():
        err = (X - base).norm(dim=(-2, -1)) / base.norm(dim=(-2, -1))
        kap = torch.tensor([_kappa(a) for a in A.double().numpy()], dtype=torch.float64)
        assert bool((err <= 100 * kap.clamp(min=4) * u).all()), isa


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_gradcheck(kernel: ExpmPath, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for scale in (1e-3, 0.5, 4.0):
        A = (scale * torch.randn(2, n, n, generator=gen, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(expm, (A,))
    T = torch.triu(torch.randn(n, n, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    assert torch.autograd.gradcheck(expm, (T,))
    kernel.check_used()


def test_double_backward(kernel: ExpmPath) -> None:
    A = (0.7 * torch.randn(2, 3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(expm, (A,))
    kernel.check_used()


def _assert_close_per_matrix(A: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    """Kernel vs torch path, matrix by matrix, within 100·max(κ, 4)·u·n of each other (κ the
    condition number of exp at that matrix, u of A's dtype); matrices whose bound exceeds 1e-2
    are uninformative and skipped."""
    u, n = torch.finfo(A.dtype).eps / 2, A.shape[-1]
    for i in range(A.shape[0]):
        tol = 100 * max(_kappa(A[i].double().numpy()), 4.0) * u * n
        if not tol <= 1e-2:
            continue
        assert rel_err(got[i].double().numpy(), want[i].double().numpy()) <= tol, i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_backward_agrees_with_torch_path(kernel: ExpmPath, dtype: torch.dtype, n: int) -> None:
    A = _mixed(n, _count(n), seed=80 + n, dtype=dtype)
    A = A[torch.isfinite(expm(A)).all((-2, -1))]
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G = G.to(dtype)

    def grad() -> torch.Tensor:
        Ar = A.clone().requires_grad_()
        return torch.autograd.grad(expm(Ar), Ar, G)[0].double()

    _assert_close_per_matrix(A, grad(), _with_torch_path(grad))
    kernel.check_used()


@pytest.mark.parametrize("layout", ["single", "batched", "expanded", "transposed"])
def test_backward_operand_layouts(kernel: ExpmPath, layout: str) -> None:
    """The backward passes contiguous operands to the kernel as they are (no (B, n, n)
    reshape) and copies the others: single, batch-shaped, an expanded ∂L/∂X (from ``sum()``)
    and a transposed one give the torch path's gradient."""
    gen = torch.Generator().manual_seed(7)
    A = 0.7 * torch.randn((4, 4) if layout == "single" else (2, 3, 4, 4), dtype=torch.float64,
                          generator=gen)
    G = torch.randn(A.shape, dtype=torch.float64, generator=gen)
    if layout == "expanded":
        G = torch.ones((), dtype=torch.float64).expand(A.shape)
    elif layout == "transposed":
        G = G.mT.contiguous().mT
    assert G.is_contiguous() == (layout in ("single", "batched"))

    def grad() -> torch.Tensor:
        Ar = A.clone().requires_grad_()
        return torch.autograd.grad(expm(Ar), Ar, G)[0]

    got, want = grad(), _with_torch_path(grad)
    assert got.shape == A.shape
    assert rel_err(got.numpy(), want.numpy()) <= 1e-13
    kernel.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 7, 16])
def test_frechet_agrees_with_torch_path(kernel: ExpmPath, dtype: torch.dtype, n: int) -> None:
    A = _mixed(n, _count(n), seed=90 + n, dtype=dtype)
    A = A[torch.isfinite(expm(A)).all((-2, -1))]
    E = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    E = E.to(dtype)
    X, L = expm_frechet(A, E, return_expm=True)
    X2, L2 = _with_torch_path(expm_frechet, A, E, return_expm=True)
    _assert_close_per_matrix(A, L, L2)
    _assert_close_per_matrix(A, X, X2)
    torch.testing.assert_close(expm_frechet(A, E), L, rtol=0, atol=0)
    kernel.check_used()


def test_frechet_vs_finite_differences(kernel: ExpmPath) -> None:
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    E = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    h = 1e-5
    fd = (expm(A + h * E) - expm(A - h * E)) / (2 * h)
    L = expm_frechet(A, E)
    assert float(((L - fd).norm(dim=(-2, -1)) / L.norm(dim=(-2, -1))).max()) <= 1e-8
    kernel.check_used()


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_names_batch_index(kernel: ExpmPath, bad: float, dtype: torch.dtype) -> None:
    A = torch.randn(50, 6, 6, dtype=dtype)
    A[31, 2, 4] = bad
    with pytest.raises(NonFiniteError, match=r"\[\[31, 2, 4\]\]"):
        expm(A)
    with pytest.raises(NonFiniteError, match=r"\[\[31, 2, 4\]\]"):
        expm_frechet(A, torch.ones_like(A))
    Ar = A.clone().requires_grad_()
    with pytest.raises(NonFiniteError, match=r"\[\[31, 2, 4\]\]"):
        expm(Ar)
    kernel.check_used()


def test_nonfinite_in_direction_rejected(kernel: ExpmPath) -> None:
    with pytest.raises(NonFiniteError):
        expm_frechet(torch.zeros(2, 2), torch.full((2, 2), float("nan")))


def test_prescaled_and_overflowing_inputs(kernel: ExpmPath) -> None:
    # finite entries whose column sums overflow float32 (exact result underflows to 0)
    A = torch.tensor([[-3e38, 0.0], [-3e38, -3e38]])
    assert torch.equal(expm(A).abs(), torch.zeros(2, 2))
    # a huge rotation generator stays orthogonal
    t = 3.0e6
    R = expm(torch.tensor([[0.0, -t], [t, 0.0]]))
    assert float((R @ R.T - torch.eye(2)).abs().max()) <= 10 * t * 2.0**-24
    # float64 norm above 2^100 (prescaled), triangular: exact diagonal and superdiagonal
    B = torch.tensor([[1.0, 1e35], [0.0, -1.0]], dtype=torch.float64)
    want = torch.tensor([[math.e, 1e35 * math.sinh(1.0)], [0.0, 1 / math.e]], dtype=torch.float64)
    torch.testing.assert_close(expm(B), want, rtol=4e-16, atol=0)
    kernel.check_used()


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_and_broadcast_inputs(kernel: ExpmPath, dtype: torch.dtype) -> None:
    base = _mixed(5, 24, seed=11, dtype=dtype)
    ref = expm(base)
    T = base.mT.contiguous().mT  # same values, transposed strides
    assert not T.is_contiguous()
    torch.testing.assert_close(expm(T), ref, rtol=0, atol=0, equal_nan=True)
    big = torch.zeros(24, 7, 7, dtype=dtype)
    big[:, 1:6, 2:7] = base
    S = big[:, 1:6, 2:7]  # strided view
    torch.testing.assert_close(expm(S), ref, rtol=0, atol=0, equal_nan=True)
    E = base[3].expand(4, 3, 5, 5)  # broadcast batch
    X = expm(E)
    assert X.shape == (4, 3, 5, 5)
    torch.testing.assert_close(X, ref[3].expand(4, 3, 5, 5), rtol=0, atol=0, equal_nan=True)
    G = base[:2]
    L = expm_frechet(base[0], G.mT)  # broadcast A, transposed E
    torch.testing.assert_close(L, expm_frechet(base[0].expand(2, 5, 5), G.mT.contiguous()))
    kernel.check_used()


def test_low_precision_through_kernel(kernel: ExpmPath) -> None:
    A = 0.7 * torch.randn(6, 3, 3)
    for dt in (torch.float16, torch.bfloat16):
        X = expm(A.to(dt))
        assert X.dtype == dt
        assert torch.equal(X, expm(A.to(dt).float()).to(dt))
    kernel.check_used()


def test_threads_release_the_gil(kernel: ExpmPath) -> None:
    A = _mixed(8, 600, seed=12, dtype=torch.float64)
    ref = expm(A)
    out: list[torch.Tensor | None] = [None, None]

    def work(i: int) -> None:
        out[i] = expm(A)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        assert o is not None
        torch.testing.assert_close(o, ref, rtol=0, atol=0, equal_nan=True)
