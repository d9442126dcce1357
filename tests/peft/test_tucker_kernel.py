"""The Tucker generator's factors operator, ``liegroup::tucker_factors`` (``_engine.ops``), and
its compiled CPU kernel (liegroup/peft/_engine/_ctucker.c).

* ``TuckerGenerator.factors`` runs the operator for a kernel mode of size > 1, and only then
  (a Linear's or 1×1 conv's ``linear`` graph is as fast); the operator reaches the kernel for
  float32 CPU operands only;
* the operator's torch implementation has a closed-form backward that matches autograd
  through the torch formulation (float64 gradcheck, two to four modes);
* ``L = s·U₀`` is bit-identical to the torch formulation's ``U₀ * s``;
* ``R`` and the gradients of the core and of every factor agree with the torch formulation
  run in float64, within ``γ_n`` times the same computation on absolute values (every
  quantity here is a sum of products, so that computation bounds the rounding error of any
  summation order: ``|fl(Σ) − Σ| ≤ γ_n Σ|terms|``, ``n`` the longest chain of roundings), over
  shapes that exercise the 16-column vector blocks, their tails, the 4-row blocks, kernel
  ranks below the kernel size, one to three kernel modes and Linear weights;
  — for the kernel and for the operator's torch implementation alike (so the two agree within
  the sum of their bounds; the torch half runs without the kernel);
* gradients are returned only for the inputs that need them; results are deterministic;
* a training step of a Tucker LieRA layer agrees with the torch path; the operator refuses
  inconsistent operands; bad raw arguments to the kernel raise.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from liegroup.errors import DTypeError, ShapeError
from liegroup.peft import GeneratorSpec, LieRAConfig, get_peft_model
from liegroup.peft._engine import ops
from liegroup.peft.generators import TuckerGenerator

U32 = 2.0**-24  # float32 unit roundoff

# (weight shape, generator options): Linear; 1-d, 2-d, 3-d kernels; C_in below 16 (tails
# only), at 16·k + tail, and at 16·k; 7×7 (K = 49); kernel ranks below the kernel size; ranks
# that are not multiples of 4 (the row blocks) and rank 1 modes
SHAPES: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((64, 48), {}),
    ((20, 12, 5), {}),
    ((16, 3, 7, 7), {}),
    ((24, 37, 3, 3), {}),
    ((32, 64, 3, 3), {}),
    ((12, 10, 3, 3), {"kernel_rank": 2}),
    ((32, 32, 3, 3, 3), {}),
    ((12, 10, 3, 2, 4), {"ranks": [3, 5, 2, 1, 3]}),
    ((9, 7, 1, 1), {"ranks": [1, 1, 1, 1]}),
]
IDS = ["x".join(map(str, s)) + ("-" + "-".join(o) if o else "") for s, o in SHAPES]
NO_KERNEL = "compiled kernel absent (not built, or LIEGROUP_DISABLE_KERNELS=1)"


def gamma(n: int) -> float:
    return n * U32 / (1.0 - n * U32)


def _need_kernel() -> None:
    if ops._k is None:
        pytest.skip(NO_KERNEL)


class TuckerSpy:
    """Stands in for ``ops._k``: records the Tucker calls that reach the kernel."""

    def __init__(self, kernel: Any) -> None:
        self._k = kernel
        self.calls: list[str] = []

    def tucker(self, *args: Any) -> Any:
        self.calls.append("f")
        return self._k.tucker(*args)

    def tucker_grads(self, *args: Any) -> Any:
        self.calls.append("b")
        return self._k.tucker_grads(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> TuckerSpy:
    """Counts kernel calls (none can happen without the kernel: then it is not installed)."""
    s = TuckerSpy(ops._k)
    if ops._k is not None:
        monkeypatch.setattr(ops, "_k", s)
    return s


@pytest.fixture(params=["kernel", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The operator's CPU kernel, or its torch implementation (as on CUDA, or other dtypes)."""
    if request.param == "kernel":
        _need_kernel()
    else:
        monkeypatch.setattr(ops, "_USE_KERNEL", False)
    return str(request.param)


def _generator(shape: tuple[int, ...], opts: dict[str, Any], seed: int = 0) -> TuckerGenerator:
    torch.manual_seed(seed)
    g = TuckerGenerator(GeneratorSpec(weight_shape=shape, rank=4, scaling=0.7, options=opts))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    return g


def _op(g: TuckerGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` by the operator, whatever the shape (``factors`` keeps Linear and 1×1 on the
    ``linear`` graph; the operator and its kernel take them too). With the kernel switched
    on, asserts that it takes the call."""
    us = list(g.factors_list)
    if ops.compiled_kernel():
        assert ops._tucker_kernel_takes(g.core, us)
    return ops.tucker_factors(g.core, us, g.scaling)


def _torch_path(g: TuckerGenerator, absolute: bool, gL: torch.Tensor, gR: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The torch formulation (``ops._tucker_torch``) in float64, differentiated by autograd
    (on |parameters| and |gradients| with ``absolute``): ``L``, ``R`` and the parameters'
    gradients."""
    ps = [(q.detach().abs() if absolute else q.detach()).double().requires_grad_(True)
          for q in g.parameters()]
    L, R = ops._tucker_torch(ps[0], ps[1:], g.scaling)
    gl, gr = gL.double(), gR.double()
    if absolute:
        gl, gr = gl.abs(), gr.abs()
    torch.autograd.backward((L, R), (gl, gr))
    return L.detach(), R.detach(), [p.grad for p in ps]  # type: ignore[misc]


def _chain(g: TuckerGenerator) -> dict[str, int]:
    """The longest chain of roundings per output (see the module docstring)."""
    r0, r1, *kr = g.ranks
    n1, *ks = g.weight_shape[1:]
    K, Kr, N = math.prod(ks), math.prod(kr), len(g.ranks)
    fwd = Kr + r1 + N
    grad = n1 + 16 + r0 * r1 * K + K * Kr + r0 * K + fwd
    return {"R": fwd, "grad": grad}


def test_factors_take_the_operator_for_kernel_modes_only() -> None:
    """A kernel mode of size > 1: one operator node; a Linear or 1×1 conv: the linear graph.
    (Without the kernel too: the operator's torch implementation serves then.)"""
    for shape in [(8, 6, 3, 3), (8, 6, 3), (8, 6, 1, 3), (8, 6, 3, 3, 3)]:
        for dtype in (torch.float32, torch.float64):
            L, R = _generator(shape, {}).to(dtype).factors()
            for t in (L, R):
                assert "tucker_factors" in type(t.grad_fn).__name__, (shape, dtype)
    for shape in [(8, 6), (8, 6, 1, 1), (8, 6, 1)]:
        L, R = _generator(shape, {}).factors()
        assert "tucker_factors" not in type(R.grad_fn).__name__, shape


def test_factors_reach_the_kernel_for_float32_cpu_kernel_modes_only(
    monkeypatch: pytest.MonkeyPatch, spy: TuckerSpy,
) -> None:
    """Forward and backward: one kernel call each."""
    _need_kernel()
    for shape in [(8, 6, 3, 3), (8, 6, 3), (8, 6, 1, 3), (8, 6, 3, 3, 3)]:
        g = _generator(shape, {})
        L, R = g.factors()
        (L.sum() + R.sum()).backward()
        assert spy.calls == ["f", "b"], shape
        spy.calls.clear()
    for shape in [(8, 6), (8, 6, 1, 1), (8, 6, 1)]:  # Linear, 1×1: the linear graph
        L, R = _generator(shape, {}).factors()
        (L.sum() + R.sum()).backward()
    L, R = _generator((8, 6, 3, 3), {}).double().factors()  # float64: the torch implementation
    (L.sum() + R.sum()).backward()
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    L, R = _generator((8, 6, 3, 3), {}).factors()
    (L.sum() + R.sum()).backward()
    assert spy.calls == []


@pytest.mark.parametrize("ranks", [(3, 4), (2, 3, 2), (2, 3, 2, 3)], ids=["2", "3", "4"])
def test_closed_form_backward_matches_autograd_of_the_torch_formulation(
    monkeypatch: pytest.MonkeyPatch, ranks: tuple[int, ...]
) -> None:
    """``_tucker_backward_torch`` (the operator's default backward) is the derivative of
    ``_tucker_torch``: against autograd through it in float64, and gradcheck of the operator
    (its float64 CPU call runs the torch implementation) — for two, three and four modes."""
    gen = torch.Generator().manual_seed(len(ranks))
    sizes = [5, 4, 3, 4][: len(ranks)]
    core = torch.randn(ranks, dtype=torch.float64, generator=gen)
    us = [torch.randn(n, r, dtype=torch.float64, generator=gen)
          for n, r in zip(sizes, ranks, strict=True)]
    s = 0.7
    L, R = ops._tucker_torch(core, us, s)
    gL = torch.randn(L.shape, dtype=torch.float64, generator=gen)
    gR = torch.randn(R.shape, dtype=torch.float64, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (core, *us)]
    La, Ra = ops._tucker_torch(leaves[0], leaves[1:], s)
    want = torch.autograd.grad((La, Ra), leaves, (gL, gR))
    got = ops._tucker_backward_torch(core, us, s, gL, gR)
    assert len(got) == len(want)
    u = torch.finfo(torch.float64).eps
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())
    # the operator: its autograd formula is that backward
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    assert torch.autograd.gradcheck(lambda c, *f: ops.tucker_factors(c, f, s), leaves)


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_forward_within_derived_bound_and_l_bit_identical(
    monkeypatch: pytest.MonkeyPatch, path: str, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    g = _generator(shape, opts)
    L, R = _op(g)
    with monkeypatch.context() as m:
        m.setattr(ops, "_USE_KERNEL", False)
        L32, _ = g.factors()
    assert torch.equal(L, L32)  # U₀ * s, rounded once, both ways
    zl, zr = torch.zeros_like(L), torch.zeros_like(R)
    _, R64, _ = _torch_path(g, False, zl, zr)
    _, Rabs, _ = _torch_path(g, True, zl, zr)
    err = (R.double() - R64).abs()
    bound = gamma(_chain(g)["R"]) * Rabs
    assert (err <= bound).all(), f"R: worst err/bound {(err / bound).max().item():.3g}"
    assert R.shape == (g.ranks[0], math.prod(shape[1:]))


def _grads_within_bound(g: TuckerGenerator, gL: torch.Tensor, gR: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The operator's parameter gradients from (gL, gR), each checked within its bound;
    returns them and the bounds."""
    for p in g.parameters():
        p.grad = None
    L, R = _op(g)
    torch.autograd.backward((L, R), (gL, gR))
    _, _, ref = _torch_path(g, False, gL, gR)
    _, _, absref = _torch_path(g, True, gL, gR)
    n = _chain(g)["grad"]
    names = ["core"] + [f"U{m}" for m in range(len(g.weight_shape))]
    grads, bounds = [], []
    for name, p, r64, rabs in zip(names, g.parameters(), ref, absref, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        err = (p.grad.double() - r64).abs()
        bound = gamma(n) * rabs
        assert (err <= bound).all(), f"{name}: worst err/bound {(err / bound).max().item():.3g}"
        grads.append(p.grad.clone())
        bounds.append(bound)
    return grads, bounds


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_gradients_within_derived_bound(
    path: str, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    g = _generator(shape, opts, seed=1)
    L, R = _op(g)
    gL, gR = torch.randn_like(L), torch.randn_like(R)
    _grads_within_bound(g, gL, gR)


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_kernel_matches_the_torch_implementation(
    monkeypatch: pytest.MonkeyPatch, spy: TuckerSpy, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    """float32 CPU: the kernel's forward and gradients and the torch implementation's (closed-
    form backward) each lie within the derived bound of the exact values, so within the sum
    of the two bounds of each other; L bit for bit."""
    _need_kernel()
    g = _generator(shape, opts, seed=2)
    L, R = _op(g)
    gL, gR = torch.randn_like(L), torch.randn_like(R)
    on, bounds = _grads_within_bound(g, gL, gR)
    assert spy.calls == ["f", "f", "b"]
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    L2, R2 = _op(g)
    off, _ = _grads_within_bound(g, gL, gR)
    assert spy.calls == ["f", "f", "b"]  # the torch implementation: no kernel call
    assert torch.equal(L, L2)
    zl, zr = torch.zeros_like(L), torch.zeros_like(R)
    _, Rabs, _ = _torch_path(g, True, zl, zr)
    assert ((R - R2).double().abs() <= 2 * gamma(_chain(g)["R"]) * Rabs).all()
    for a, b, bound in zip(on, off, bounds, strict=True):
        assert ((a - b).double().abs() <= 2 * bound).all()


def test_only_needed_gradients_and_deterministic(path: str) -> None:
    g = _generator((16, 20, 3, 3), {})
    g.factors_list[2].requires_grad_(False)
    g.core.requires_grad_(False)
    grads = []
    for _ in range(2):
        for p in g.parameters():
            p.grad = None
        L, R = g.factors()
        (L.square().sum() + R.square().sum()).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in g.parameters()])
    assert grads[0][0] is None and grads[0][3] is None  # core, U₂ frozen
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_no_grad_call_matches_the_training_forward(path: str) -> None:
    g = _generator((24, 37, 3, 3), {})
    L, R = g.factors()
    with torch.no_grad():
        L2, R2 = g.factors()
    assert torch.equal(L, L2) and torch.equal(R, R2)


def test_training_step_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LieRA Tucker Conv2d: one SGD step from the same state, kernel on and off."""
    _need_kernel()

    def step() -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(6, 20, 3, padding=1))
        model = get_peft_model(net, LieRAConfig(rank=4, target_modules=["0"], generator="tucker"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.1)
        x = torch.randn(2, 6, 9, 9)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).square().mean().backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    on = step()
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    off = step()
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_raw_functions_reject_bad_arguments() -> None:
    _need_kernel()
    k = ops._k
    core = torch.zeros(2, 2, 2, 2)
    us = [torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2)]
    L, R = torch.empty(4, 2), torch.empty(2, 27)
    ptrs = tuple(u.data_ptr() for u in us)
    ok = ((4, 3, 3, 3), (2, 2, 2, 2), core.data_ptr(), ptrs, 1.0, L.data_ptr(), R.data_ptr())
    assert k.tucker(*ok) is None
    bad = [
        ((4,), (2,), core.data_ptr(), ptrs[:1]),  # one mode
        ((4, 3, 3, 3), (2, 2, 2), core.data_ptr(), ptrs),  # ranks of another length
        ((4, 3, 3, 3), (2, 2, 4, 2), core.data_ptr(), ptrs),  # kernel rank above its size
        ((4, 3, 0, 3), (2, 2, 2, 2), core.data_ptr(), ptrs),  # empty mode
        ((4, 3, 3, 3), (2, 2, 2, 2), 0, ptrs),  # null core
        ((4, 3, 3, 3), (2, 2, 2, 2), core.data_ptr(), (*ptrs[:3], 0)),  # null factor
    ]
    for args in bad:
        with pytest.raises(ValueError, match="tucker"):
            k.tucker(*args, 1.0, L.data_ptr(), R.data_ptr())
    with pytest.raises(ValueError, match="tucker"):
        k.tucker(*ok[:5], 0, R.data_ptr())
    with pytest.raises(ValueError, match="tucker_grads"):
        k.tucker_grads(*ok[:5], L.data_ptr(), R.data_ptr(), core.data_ptr(), ptrs[:3])


def test_operator_validates_and_routes(spy: TuckerSpy) -> None:
    """Inconsistent operands are refused before the kernel; what the kernel does not take
    (kernel ranks above their sizes, float64) runs the torch implementation; non-contiguous
    operands are made plain and go to the kernel."""
    core = torch.randn(2, 3, 2)
    us = [torch.randn(4, 2), torch.randn(5, 3), torch.randn(3, 2)]
    with pytest.raises(DTypeError):
        ops.tucker_factors(core.double(), us, 1.0)
    with pytest.raises(ShapeError):
        ops.tucker_factors(torch.zeros(2, 2, 2), us, 1.0)  # core's r₁ is not U₁'s
    with pytest.raises(ShapeError):
        ops.tucker_factors(core, us[:2], 1.0)  # a mode short
    with pytest.raises(ShapeError):
        ops.tucker_factors(core, [us[0], us[1], us[2][0]], 1.0)  # a factor that is no matrix
    with pytest.raises(ShapeError):
        ops.tucker_factors(torch.zeros([1] * 9), [torch.zeros(2, 1)] * 9, 1.0)  # > 8 modes
    with pytest.raises(ShapeError):
        ops.tucker_factors(core, [us[0]], 1.0)  # one mode
    assert spy.calls == []
    # r₂ = 4 > n₂ = 3: valid, but not the kernel's (it needs kernel ranks ≤ their sizes)
    big = torch.randn(2, 3, 4)
    us_big = [us[0], us[1], torch.randn(3, 4)]
    assert not ops._tucker_kernel_takes(big, us_big)
    L, R = ops.tucker_factors(big, us_big, 0.5)
    L0, R0 = ops._tucker_torch(big, us_big, 0.5)
    assert torch.equal(L, L0) and torch.equal(R, R0) and spy.calls == []
    L, R = ops.tucker_factors(core.double(), [u.double() for u in us], 0.5)  # float64
    assert L.dtype == torch.float64 and spy.calls == []
    if ops._k is None:
        return
    assert ops._tucker_kernel_takes(core, us)
    want = ops.tucker_factors(core, us, 0.5)
    assert spy.calls == ["f"]
    got = ops.tucker_factors(core, [us[0], us[1], us[2].T.contiguous().T], 0.5)
    assert spy.calls == ["f", "f"]  # a non-contiguous factor: made plain, then the kernel
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
