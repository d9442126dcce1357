"""The compiled factors of the Tucker generator (liegroup/peft/_ctucker.c).

* ``TuckerGenerator.factors`` reaches the kernel for float32 CPU parameters with a kernel mode
  of size > 1, and only then (a Linear's or 1×1 conv's ``linear`` graph is as fast);
* ``L = s·U₀`` is bit-identical to the torch formulation's ``U₀ * s``;
* ``R`` and the gradients of the core and of every factor agree with the torch formulation
  run in float64, within ``γ_n`` times the same computation on absolute values (every
  quantity here is a sum of products, so that computation bounds the rounding error of any
  summation order: ``|fl(Σ) − Σ| ≤ γ_n Σ|terms|``, ``n`` the longest chain of roundings), over
  shapes that exercise the 16-column vector blocks, their tails, the 4-row blocks, kernel
  ranks below the kernel size, one to three kernel modes and Linear weights;
* gradients are returned only for the inputs that need them; results are deterministic;
* a training step of a Tucker LieRA layer agrees with the torch path; bad raw arguments raise.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft import _fused_kernel as FK  # noqa: N812
from liegroup.peft.generators import GeneratorSpec, TuckerFactorsFunction, TuckerGenerator

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


def gamma(n: int) -> float:
    return n * U32 / (1.0 - n * U32)


def _need_kernel() -> None:
    if FK._k is None:
        pytest.skip("compiled kernel not built (test_fused_kernel.test_kernel_is_built fails)")


def _generator(shape: tuple[int, ...], opts: dict[str, Any], seed: int = 0) -> TuckerGenerator:
    torch.manual_seed(seed)
    g = TuckerGenerator(GeneratorSpec(weight_shape=shape, rank=4, scaling=0.7, options=opts))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    return g


def _kernel(g: TuckerGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` by the kernel's node (whatever shape: ``factors`` keeps Linear and 1×1 on
    the torch graph, the kernel takes them too)."""
    assert FK.takes_tucker(g.core, list(g.factors_list))
    L, R = TuckerFactorsFunction.apply(g.scaling, g.core, *g.factors_list)
    return L, R


def _torch_path(g: TuckerGenerator, monkeypatch: pytest.MonkeyPatch, absolute: bool,
                gL: torch.Tensor, gR: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The torch formulation in float64 (on |parameters| and |gradients| with ``absolute``):
    ``L``, ``R`` and the parameters' gradients."""
    ref = TuckerGenerator(GeneratorSpec(weight_shape=g.weight_shape, rank=4, scaling=0.7,
                                        options=g.spec.options, dtype=torch.float64))
    with torch.no_grad():
        for p, q in zip(ref.parameters(), g.parameters(), strict=True):
            p.copy_(q.abs() if absolute else q)
    with monkeypatch.context() as m:
        m.setattr(FK, "_USE_KERNEL", False)
        L, R = ref.factors()
    gl, gr = gL.double(), gR.double()
    if absolute:
        gl, gr = gl.abs(), gr.abs()
    torch.autograd.backward((L, R), (gl, gr))
    return L.detach(), R.detach(), [p.grad for p in ref.parameters()]  # type: ignore[misc]


def _chain(g: TuckerGenerator) -> dict[str, int]:
    """The longest chain of roundings per output (see the module docstring)."""
    r0, r1, *kr = g.ranks
    n1, *ks = g.weight_shape[1:]
    K, Kr, N = math.prod(ks), math.prod(kr), len(g.ranks)
    fwd = Kr + r1 + N
    grad = n1 + 16 + r0 * r1 * K + K * Kr + r0 * K + fwd
    return {"R": fwd, "grad": grad}


def test_factors_reach_the_kernel_for_float32_cpu_kernel_modes_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _need_kernel()
    calls: list[str] = []
    real_fwd, real_bwd = FK.tucker, FK.tucker_grads
    monkeypatch.setattr(FK, "tucker", lambda *a: calls.append("f") or real_fwd(*a))
    monkeypatch.setattr(FK, "tucker_grads", lambda *a: calls.append("b") or real_bwd(*a))
    for shape in [(8, 6, 3, 3), (8, 6, 3), (8, 6, 1, 3), (8, 6, 3, 3, 3)]:
        g = _generator(shape, {})
        L, R = g.factors()
        (L.sum() + R.sum()).backward()
        assert calls == ["f", "b"], shape
        assert type(L.grad_fn).__name__ == "TuckerFactorsFunctionBackward"
        calls.clear()
    for shape in [(8, 6), (8, 6, 1, 1), (8, 6, 1)]:  # Linear, 1×1: the linear graph
        L, R = _generator(shape, {}).factors()
        (L.sum() + R.sum()).backward()
    _generator((8, 6, 3, 3), {}).double().factors()
    monkeypatch.setattr(FK, "_USE_KERNEL", False)
    _generator((8, 6, 3, 3), {}).factors()
    assert calls == []


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_forward_within_derived_bound_and_l_bit_identical(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    _need_kernel()
    g = _generator(shape, opts)
    L, R = _kernel(g)
    with monkeypatch.context() as m:
        m.setattr(FK, "_USE_KERNEL", False)
        L32, _ = g.factors()
    assert torch.equal(L, L32)  # U₀ * s, rounded once, both ways
    zl, zr = torch.zeros_like(L), torch.zeros_like(R)
    _, R64, _ = _torch_path(g, monkeypatch, False, zl, zr)
    _, Rabs, _ = _torch_path(g, monkeypatch, True, zl, zr)
    err = (R.double() - R64).abs()
    bound = gamma(_chain(g)["R"]) * Rabs
    assert (err <= bound).all(), f"R: worst err/bound {(err / bound).max().item():.3g}"
    assert R.shape == (g.ranks[0], math.prod(shape[1:]))


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_gradients_within_derived_bound(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    _need_kernel()
    g = _generator(shape, opts, seed=1)
    L, R = _kernel(g)
    gL, gR = torch.randn_like(L), torch.randn_like(R)
    torch.autograd.backward((L, R), (gL, gR))
    _, _, ref = _torch_path(g, monkeypatch, False, gL, gR)
    _, _, absref = _torch_path(g, monkeypatch, True, gL, gR)
    n = _chain(g)["grad"]
    names = ["core"] + [f"U{m}" for m in range(len(shape))]
    for name, p, r64, rabs in zip(names, g.parameters(), ref, absref, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        err = (p.grad.double() - r64).abs()
        bound = gamma(n) * rabs
        assert (err <= bound).all(), f"{name}: worst err/bound {(err / bound).max().item():.3g}"


def test_only_needed_gradients_and_deterministic() -> None:
    _need_kernel()
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


def test_no_grad_call_matches_the_training_forward() -> None:
    _need_kernel()
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
    monkeypatch.setattr(FK, "_USE_KERNEL", False)
    off = step()
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_raw_functions_reject_bad_arguments() -> None:
    _need_kernel()
    k = FK._k
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


def test_takes_tucker_only_consistent_float32_cpu_contiguous() -> None:
    _need_kernel()
    core = torch.zeros(2, 3, 2)
    us = [torch.zeros(4, 2), torch.zeros(5, 3), torch.zeros(3, 2)]
    assert FK.takes_tucker(core, us)
    assert not FK.takes_tucker(core.double(), us)
    assert not FK.takes_tucker(core, [us[0], us[1], torch.zeros(2, 3).T])  # non-contiguous
    assert not FK.takes_tucker(torch.zeros(2, 2, 2), us)  # core's r₁ is not U₁'s
    assert not FK.takes_tucker(core, us[:2])  # a mode short
    assert not FK.takes_tucker(torch.zeros(2, 3, 4), [*us[:2], torch.zeros(3, 4)])  # r₂ > n₂
    many = [torch.zeros(2, 1)] * 9
    assert not FK.takes_tucker(torch.zeros([1] * 9), many)  # more than 8 modes
    with pytest.MonkeyPatch.context() as m:
        m.setattr(FK, "_USE_KERNEL", False)
        assert not FK.takes_tucker(core, us)
