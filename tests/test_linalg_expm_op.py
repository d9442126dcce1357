"""linalg.expm as torch.library operators (torch.ops.liegroup.expm / expm_backward /
expm_frechet).

* the operators validate their operands before any data pointer is read: dtype, shape,
  matching operands, the (m, s) table of the backward; each failure is a typed error of
  liegroup.errors;
* negative and conjugate view bits are resolved (``.conj().imag`` of a complex tensor is a
  real view whose raw data holds the un-negated values);
* non-contiguous operands give the values of their contiguous copies;
* eager CPU calls that skip the dispatcher (expm._direct) give the operator's bits;
* ``torch.library.opcheck`` passes (schema, fake tensors, autograd registration, AOT dispatch);
* ``torch.compile(expm, fullgraph=True)`` traces without a graph break and gives eager's
  values and gradients, float64 and float32.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from liegroup.errors import DomainError, DTypeError, NonFiniteError, ShapeError
from liegroup.linalg import expm, expm_frechet
from tests.test_linalg_ckernel import ExpmPath

EXPM = importlib.import_module("liegroup.linalg._expm_ops")
DTYPES = [torch.float64, torch.float32]
OPS = torch.ops.liegroup


def _rand(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.6 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _neg_view(X: torch.Tensor) -> torch.Tensor:
    """``-X`` as a view with the negative bit set (its raw data holds ``X``)."""
    V = torch.complex(torch.zeros_like(X), X).conj().imag
    assert V.is_neg()
    return V


# --------------------------------------------------------------------------- view bits
def test_negative_view_of_one_by_one(expm_path: ExpmPath) -> None:
    a = torch.tensor([[1 + 2j]]).conj().imag  # -2, stored as 2 with the negative bit
    assert a.is_neg()
    assert float(expm(a)) == pytest.approx(math.exp(-2.0), rel=2 * torch.finfo(torch.float32).eps)
    assert float(OPS.expm(a)[0]) == float(expm(a))
    # the operators' own check, whatever the dispatcher did before it
    r = EXPM._operand(a, "A", "liegroup::expm")
    assert not r.is_neg() and float(r) == -2.0
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_views_give_the_negated_values(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    A, E = _rand(2, 3, 4, 4, dtype=dtype, seed=1), _rand(2, 3, 4, 4, dtype=dtype, seed=2)
    An, En = _neg_view(A), _neg_view(E)
    torch.testing.assert_close(expm(An), expm(-A), rtol=0, atol=0)
    X, L = expm_frechet(An, En, return_expm=True)
    X2, L2 = expm_frechet(-A, -E, return_expm=True)
    torch.testing.assert_close((X, L), (X2, L2), rtol=0, atol=0)
    # through the operators themselves (the dispatcher path)
    torch.testing.assert_close(OPS.expm(An)[0], OPS.expm(-A)[0], rtol=0, atol=0)
    ms = OPS.expm(-A)[1]
    torch.testing.assert_close(
        OPS.expm_backward(An, En, ms), OPS.expm_backward(-A, -E, ms), rtol=0, atol=0
    )
    # and a negative-view incoming gradient
    Ar = A.clone().requires_grad_()
    (g1,) = torch.autograd.grad(expm(Ar), Ar, En)
    (g2,) = torch.autograd.grad(expm(Ar), Ar, -E)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_operands_read_as_their_values(
    dtype: torch.dtype, expm_path: ExpmPath
) -> None:
    A = _rand(3, 5, 5, dtype=dtype, seed=3)
    T = A.mT.contiguous().mT
    S = torch.zeros(3, 7, 8, dtype=dtype)
    S[:, 1:6, 2:7] = A
    for V in (T, S[:, 1:6, 2:7]):
        assert not V.is_contiguous()
        torch.testing.assert_close(OPS.expm(V)[0], OPS.expm(A)[0], rtol=0, atol=0)
        X, L = OPS.expm_frechet(V, V)
        torch.testing.assert_close((X, L), OPS.expm_frechet(A, A), rtol=0, atol=0)
    expm_path.check_used()


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_have_the_strides_their_fakes_promise(dtype: torch.dtype,
                                                      expm_path: ExpmPath) -> None:
    """A compiled graph lays out what follows an operator by its fake's strides; operands
    that are contiguous with other strides (a size-1 dimension's stride is free) must not
    pass those strides on to the real outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    A = _rand(3, 3, 3, dtype=dtype, seed=5)
    operands = [
        A[:1].as_strided((1, 3, 3), (100, 3, 1)),  # a size-1 batch with a free stride
        A.unsqueeze(1).permute(1, 0, 2, 3),  # (1, 3, 3, 3), strides (9, 9, 3, 1)
        A.mT,  # not contiguous
    ]
    for V in operands:
        X, ms = OPS.expm(V)
        real = {"expm": X, "expm_backward": OPS.expm_backward(V, V, ms)}
        real["frechet X"], real["frechet L"] = OPS.expm_frechet(V, V)
        with FakeTensorMode() as mode:
            F, fms = OPS.expm(mode.from_tensor(V))
            fake = {"expm": F, "expm_backward": OPS.expm_backward(mode.from_tensor(V), F, fms)}
            fake["frechet X"], fake["frechet L"] = OPS.expm_frechet(mode.from_tensor(V), F)
        for name, t in real.items():
            assert t.stride() == fake[name].stride(), (name, V.stride(), t.stride())
    expm_path.check_used()


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("bad", "err"),
    [
        (torch.ones(3, 3, dtype=torch.int32), DTypeError),
        (torch.ones(3, 3, dtype=torch.float16), DTypeError),
        (torch.ones(3, 3, dtype=torch.complex128), DTypeError),
        (torch.ones(3), ShapeError),
        (torch.ones(2, 3, 4), ShapeError),
    ],
)
def test_expm_op_refuses_bad_operands(bad: torch.Tensor, err: type[Exception]) -> None:
    with pytest.raises(err, match="liegroup::expm"):
        OPS.expm(bad)
    with pytest.raises(err, match="liegroup::expm_frechet"):
        OPS.expm_frechet(bad, bad)


def test_expm_op_nonfinite_names_the_entry(expm_path: ExpmPath) -> None:
    A = _rand(4, 3, 3)
    A[2, 1, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"\[\[2, 1, 0\]\]"):
        OPS.expm(A)


def _fwd(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = _rand(2, 3, 3, dtype=dtype, seed=4)
    return A, _rand(2, 3, 3, dtype=dtype, seed=5), OPS.expm(A)[1]


@pytest.mark.parametrize(
    ("change", "err"),
    [
        (lambda A, G, ms: (A, G, ms.long()), DTypeError),  # int64 table
        (lambda A, G, ms: (A, G, ms.float()), DTypeError),
        (lambda A, G, ms: (A, G, ms[:1]), ShapeError),  # one row for two matrices
        (lambda A, G, ms: (A, G, ms[:, :1]), ShapeError),
        (lambda A, G, ms: (A, G, torch.tensor([[4, 0], [3, 0]], dtype=torch.int32)), DomainError),
        (lambda A, G, ms: (A, G, torch.tensor([[3, -1], [3, 0]], dtype=torch.int32)), DomainError),
        (lambda A, G, ms: (A, G, torch.tensor([[13, 10**6], [3, 0]], dtype=torch.int32)),
         DomainError),
        (lambda A, G, ms: (A, G, torch.tensor([[-3, 0], [3, 0]], dtype=torch.int32)), DomainError),
        (lambda A, G, ms: (A, G[:1], ms), ShapeError),
        (lambda A, G, ms: (A, G.float(), ms), DTypeError),
        (lambda A, G, ms: (A[..., :2], G[..., :2], ms), ShapeError),
    ],
)
def test_expm_backward_op_refuses_bad_operands(change: object, err: type[Exception]) -> None:
    A, G, ms = change(*_fwd())  # type: ignore[operator]
    with pytest.raises(err, match="liegroup::expm_backward"):
        OPS.expm_backward(A, G, ms)


def test_expm_backward_op_refuses_float64_degrees_for_float32() -> None:
    A, G, _ = _fwd(torch.float32)
    ms = torch.tensor([[13, 0], [3, 0]], dtype=torch.int32)  # 13: a float64 degree
    with pytest.raises(DomainError):
        OPS.expm_backward(A, G, ms)


def test_expm_frechet_op_refuses_mismatched_operands() -> None:
    A = _rand(2, 3, 3)
    with pytest.raises(ShapeError):
        OPS.expm_frechet(A, A[:1])
    with pytest.raises(DTypeError):
        OPS.expm_frechet(A, A.float())


# --------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_direct_eager_calls_give_the_operators_bits(
    dtype: torch.dtype, n: int, expm_path: ExpmPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    A, E = _rand(5, n, n, dtype=dtype, seed=n), _rand(5, n, n, dtype=dtype, seed=n + 1)

    def run() -> tuple[torch.Tensor, ...]:
        Ar = A.clone().requires_grad_()
        X = expm(Ar)
        (g,) = torch.autograd.grad(X, Ar, E)
        return X.detach(), g, expm(A), *expm_frechet(A, E, return_expm=True)

    direct = run()
    monkeypatch.setattr(EXPM, "_EAGER_DIRECT", False)
    torch.testing.assert_close(run(), direct, rtol=0, atol=0)
    expm_path.check_used()


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    A, G, ms = _fwd(dtype)
    torch.library.opcheck(OPS.expm.default, (A.clone().requires_grad_(),))
    torch.library.opcheck(OPS.expm.default, (_rand(4, dtype=dtype).reshape(1, 2, 2),))
    torch.library.opcheck(OPS.expm_backward.default, (A, G, ms))
    torch.library.opcheck(OPS.expm_frechet.default, (A, G))
    expm_path.check_used()


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.inductor
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_expm_matches_eager(dtype: torch.dtype, expm_path: ExpmPath) -> None:
    torch._dynamo.reset()
    f = torch.compile(expm, fullgraph=True, dynamic=False)
    A = _rand(3, 4, 4, dtype=dtype, seed=7)
    G = _rand(3, 4, 4, dtype=dtype, seed=8)
    Ar, Ac = A.clone().requires_grad_(), A.clone().requires_grad_()
    X = expm(Ar)
    Xc = f(Ac)
    # the same operator implementation runs in both: the same bits
    torch.testing.assert_close(Xc, X, rtol=0, atol=0)
    (g,) = torch.autograd.grad(X, Ar, G)
    (gc,) = torch.autograd.grad(Xc, Ac, G)
    torch.testing.assert_close(gc, g, rtol=0, atol=0)
    # and a low-precision input (computed in float32 inside the compiled graph)
    H = A.to(torch.bfloat16)
    torch.testing.assert_close(f(H), expm(H), rtol=0, atol=0)
    expm_path.check_used()
