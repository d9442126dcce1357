"""The fused low-rank node under autocast (CPU bf16 here; the same code path runs on CUDA).

Reference: what autocast does to the plain path — ``op(x, W')`` with ``W'`` formed in the
weight's dtype (float32) and autocast casting ``x``, ``W'`` and the bias to bfloat16 for the
op. The node must give the same forward bit for bit, the same gradients (its ``∂L/∂W'`` is
the same bfloat16 product, then everything in float32), gradients in the dtypes of ``x`` and
the bias, and keep nothing weight-sized for the backward: no float32 ``W'`` and no bfloat16
copy of it (plain autocast keeps the bfloat16 ``W'`` from the forward to the backward).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import liegroup.peft._engine as engine
from liegroup.peft import LieRAConfig, adapted_weight_lowrank, get_peft_model
from liegroup.peft._engine import base_op, ledger, ops
from liegroup.peft._engine.geometry import autocast_dtype, op_input, weights_outside_autocast
from liegroup.peft._engine.ledger import StepLedger
from liegroup.peft.layer import LieRALayer

BF16 = torch.bfloat16
CASES = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 17)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    "conv2d_grouped_reflect": (
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"), (2, 8, 8, 8)
    ),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False), (1, 4, 5, 6, 5)),
}
MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("additive", "exact")]
NODE = "LowRankAdaptedOpFunctionBackward"


@pytest.fixture
def fresh_ledger(monkeypatch: pytest.MonkeyPatch) -> StepLedger:
    """This thread's CPU ledger, new for the test (no credit or workspace from earlier tests)."""
    lg = StepLedger()
    monkeypatch.setattr(ledger._local, "ledger", lg, raising=False)
    assert ledger.current(torch.device("cpu")) is lg
    return lg


def _layer(case: str, group: str, exp_map: str, generator: str = "lora") -> LieRALayer:
    torch.manual_seed(0)
    layer = LieRALayer(CASES[case][0](), case)
    layer.add_adapter("default", LieRAConfig(rank=2, alpha=3.0, target_modules=["x"],
                                             exp_map=exp_map, update=group, generator=generator))
    with torch.no_grad():
        for p in layer.generators["default"].parameters():
            p.add_(0.2 * torch.randn_like(p))
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    return layer


def _params(layer: LieRALayer) -> list[torch.Tensor]:
    ps = list(layer.generators["default"].parameters())
    return ps + ([layer.bias] if layer.bias is not None else [])


def _reference(layer: LieRALayer, x: torch.Tensor) -> torch.Tensor:
    """Plain autocast: W' formed in float32, the op cast by autocast."""
    L, R = layer.generators["default"].factors()
    Wp = adapted_weight_lowrank(layer.weight, L, R, layer.updates["default"])
    with torch.autocast("cpu", dtype=BF16):
        return base_op(layer.base_layer, x, Wp)


@pytest.mark.parametrize("x_dtype", [torch.float32, BF16])
@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_node_under_autocast_matches_plain_autocast(case, group, exp_map, x_dtype):
    layer = _layer(case, group, exp_map)
    x = torch.randn(CASES[case][1]).to(x_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        assert op_input(layer.base_layer, x) is not None
        y = layer(x)
    assert type(y.grad_fn).__name__ == NODE  # the node runs, not the plain path
    y_ref = _reference(layer, x)
    assert y.dtype == BF16 and torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    wrt = [x, *_params(layer)]
    got = torch.autograd.grad(y, wrt, gy)
    want = torch.autograd.grad(y_ref, wrt, gy)
    for g, w, t in zip(got, want, wrt, strict=True):
        assert g.dtype == t.dtype
        # same bf16 ∂L/∂W' and ∂L/∂x; float32 after that (different summation orders only)
        scale = w.float().abs().max().clamp_min(1e-30)
        assert float((g.float() - w.float()).abs().max() / scale) <= 1e-5, (case, t.shape)


@pytest.mark.parametrize("generator", ["lora", "tucker"])
def test_model_under_autocast_uses_the_ledger_and_matches(generator, fresh_ledger, monkeypatch):
    """A model (this thread's ledger: credit, the float32 workspace) against the plain path."""
    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 36, 5))

    cfg = LieRAConfig(rank=4, target_modules=["0", "2", "4", "6"], generator=generator)
    fused, plain = get_peft_model(net(), cfg), get_peft_model(net(), cfg)
    for m in (fused, plain):
        torch.manual_seed(2)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    sizes = sum(layer.weight.numel() for _, layer in fused.lie_layers())
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):  # the second step runs with the credit of the first
        outs = []
        for m in (fused, plain):
            m.zero_grad(set_to_none=True)
            with monkeypatch.context() as mp:
                if m is plain:  # no op geometry: every layer takes the plain autograd path
                    mp.setattr(engine, "op_input", lambda base, x: None)
                with torch.autocast("cpu", dtype=BF16):
                    y = m(x)
                assert (type(y.grad_fn).__name__ == "AddmmBackward0") is (m is plain)
                y.float().square().sum().backward()
            outs.append((y, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
            if m is fused:  # the fused layers ran on this thread's ledger
                assert fresh_ledger.credit == sizes and fresh_ledger.in_backward
                assert fresh_ledger.held(torch.float32) > 0  # W' formed in float32
                assert fresh_ledger.held(BF16) == 0  # the op's bf16 copy is its own
        (y1, g1), (y2, g2) = outs
        assert torch.equal(y1, y2)
        for n in g1:
            scale = g2[n].abs().max().clamp_min(1e-30)
            assert float((g1[n] - g2[n]).abs().max() / scale) <= 1e-4, n


def test_saves_only_the_ops_low_precision_weight_under_autocast():
    """Saved for the backward: x and W' in bf16 (the op's operands) and the frozen W — no
    float32 W' or exp(ΔW). Full fine-tuning under autocast keeps the same bf16 copy of its
    weight (autocast's weight cache), so the kept W' costs nothing beyond it."""
    layer = _layer("conv2d", "hadamard", "exact")
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=BF16), torch.autograd.graph.saved_tensors_hooks(
        pack, lambda t: t
    ):
        layer(x)
    big = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert sorted(str(t.dtype) for t in big) == ["torch.bfloat16"] * 2 + ["torch.float32"]
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in big)
    (Wc,) = [t for t in big if t.shape == layer.weight.shape and t.dtype == BF16]
    assert torch.equal(Wc, layer.adapted_weight().to(BF16))
    # nothing needs a gradient: nothing weight-sized beyond W is kept
    saved.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        layer(x)
    assert saved == []


def test_weights_are_formed_outside_autocast():
    """Mode-wise updates (plain path under autocast) form W' in float32, not bf16."""
    torch.manual_seed(0)
    layer = LieRALayer(nn.Conv2d(4, 4, 3, padding=1), "c")
    layer.add_adapter("default", LieRAConfig(rank=2, target_modules=["x"],
                                             generator="modewise", update="so"))
    with torch.no_grad():
        for p in layer.generators["default"].parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 4, 6, 6)
    Wp = layer.adapted_weight()
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        assert torch.equal(layer.adapted_weight(), Wp)  # float32, as outside autocast
        y_ref = base_op(layer.base_layer, x, Wp)  # autocast casts the float32 W' for the op
    assert y.dtype == BF16 and torch.equal(y, y_ref)


def test_autocast_dtype_rule():
    x, W = torch.zeros(2, 3), torch.zeros(4, 3)
    assert autocast_dtype(x, W) is None
    with torch.autocast("cpu", dtype=BF16):
        assert autocast_dtype(x, W) == BF16
        assert autocast_dtype(x.double(), W.double()) is None  # autocast leaves float64 alone
        assert autocast_dtype(x.to(BF16), W.to(BF16)) is None
        assert (W @ W.T).dtype == BF16
        with weights_outside_autocast(x):  # the adapter's W' is formed in the weight's dtype
            assert (W @ W.T).dtype == torch.float32
            assert autocast_dtype(x, W) is None
        assert (W @ W.T).dtype == BF16  # autocast is back for the op
    with weights_outside_autocast(x):  # outside autocast: nothing changes
        assert (W @ W.T).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("case", ["linear", "conv2d"])
def test_bias_only_gradient_under_autocast(case):
    """Frozen factors, x without grad: W' is not kept and ∂L/∂b still comes back (float32)."""
    layer = _layer(case, "hadamard", "exact")
    for p in layer.generators["default"].parameters():
        p.requires_grad_(False)
    x = torch.randn(CASES[case][1])
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    gy = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, [layer.bias], gy)
    (want,) = torch.autograd.grad(_reference(layer, x), [layer.bias], gy)
    assert gb.dtype == torch.float32 and torch.allclose(gb, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("case", ["linear", "conv2d"])
def test_autocast_factor_gradients_without_the_kernel(case, group, exp_map, monkeypatch):
    """The torch path of the factor gradients (the kernel off, as on CUDA) takes the bf16
    ∂L/∂W' cast to float32 once and gives the kernel path's gradients to float32 rounding."""
    if ops._k is None:
        pytest.skip("compiled kernel not built or LIEGROUP_DISABLE_KERNELS=1: nothing to compare")

    def grads(kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(ops, "_USE_KERNEL", kernel)
        layer = _layer(case, group, exp_map)
        x = torch.randn(CASES[case][1])
        with torch.autocast("cpu", dtype=BF16):
            y = layer(x)
        return list(torch.autograd.grad(y.float().square().sum(), _params(layer)))

    on, off = grads(True), grads(False)
    u = torch.finfo(torch.float32).eps
    for a, b in zip(off, on, strict=True):
        assert a.dtype == b.dtype
        assert (a - b).abs().max().item() <= 1e3 * u * (1 + b.abs().max().item())
