"""The fused low-rank op path (LowRankAdaptedOpFunction) against the reference path.

Reference: ``op(x, adapted_weight_lowrank(W, L, R))`` — the op differentiated by autograd on an
explicit ``W'``. The fused node must give the same forward bit for bit, the same gradients
(x, factors, bias) to rounding, pass gradcheck in float64, and keep nothing weight-sized for
the backward beyond what the op itself keeps (x) and the frozen W.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liegroup.errors import AdapterStateError, ConfigError, ShapeError
from liegroup.peft import GeneratorSpec, LieRAConfig, adapted_weight_lowrank
from liegroup.peft._engine import adapted_forward, base_op, policy
from liegroup.peft._engine import lowrank_node as ln
from liegroup.peft._engine.geometry import OpGeometry, op_input
from liegroup.peft._engine.lowrank_node import LowRankAdaptedOpFunction, adapted_op_lowrank
from liegroup.peft.generators import LoRAGenerator
from liegroup.peft.layer import LieRALayer
from liegroup.peft.updates import Additive, HadamardExp

DT = torch.float64

CASES = {
    "linear": (lambda: nn.Linear(7, 5), (3, 4, 7)),
    "linear_nobias": (lambda: nn.Linear(6, 4, bias=False), (5, 6)),
    "conv1d_stride_dil": (lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1), (2, 3, 17)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 9, 9)),
    "conv2d_nonsquare": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), groups=2), (2, 4, 9, 8)),
    "conv2d_depthwise_reflect": (
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"), (2, 4, 8, 8)
    ),
    "conv2d_same_dilated": (lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2), (1, 3, 10, 9)),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(3, 5, 2, padding="same"), (1, 3, 7, 7)),
    "conv3d_circular": (
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 5, 6, 5)
    ),
}
MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("hadamard", 3), ("additive", "exact")]


def _layer(case: str, group: str, exp_map, seed: int = 0):
    torch.manual_seed(seed)
    factory, xshape = CASES[case]
    base = factory().to(DT)
    layer = LieRALayer(base, case)
    layer.add_adapter(
        "default",
        LieRAConfig(rank=2, alpha=3.0, target_modules=["x"], exp_map=exp_map, update=group),
    )
    with torch.no_grad():
        layer.generators["default"].B.normal_(0, 0.3)
    x = torch.randn(xshape, dtype=DT)
    return layer, x


def _reference(layer: LieRALayer, x: torch.Tensor) -> torch.Tensor:
    L, R = layer.generators["default"].factors()
    Wp = adapted_weight_lowrank(layer.weight, L, R, layer.updates["default"])
    return base_op(layer.base_layer, x, Wp)


def _force_keep(monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    """Make the keep rule (policy.keep_adapted_weight) answer ``keep`` for every layer."""
    monkeypatch.setattr(policy, "keep_adapted_weight", lambda *a, k=keep: k)


def _grads(layer: LieRALayer, x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor):
    gen = layer.generators["default"]
    wrt = [x, gen.B, gen.A] + ([layer.bias] if layer.bias is not None else [])
    return torch.autograd.grad(y, wrt, gy)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("chunk", [1 << 16, 3])
@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference(case, group, exp_map, chunk, keep, monkeypatch):
    monkeypatch.setattr(policy, "CHUNK_ENTRIES", chunk)  # 3: many row blocks in the backward
    # False: W' always recomputed in backward; True: W' always kept next to ∂L/∂W' (exact map)
    _force_keep(monkeypatch, keep)
    layer, x = _layer(case, group, exp_map)
    if layer.bias is not None:
        layer.bias.requires_grad_(True)  # the fused node also returns a bias gradient
    x.requires_grad_(True)
    fused = case != "conv2d_same_even_kernel"
    assert (op_input(layer.base_layer, x) is not None) is fused
    y = layer(x)
    assert (type(y.grad_fn).__name__ == "LowRankAdaptedOpFunctionBackward") is fused
    y_ref = _reference(layer, x)
    assert torch.equal(y, y_ref)  # forward: bit for bit
    gy = torch.randn_like(y)
    got = _grads(layer, x, y, gy)
    want = _grads(layer, x, y_ref, gy)
    u = torch.finfo(DT).eps
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("case", ["linear", "conv1d_stride_dil", "conv2d_nonsquare"])
def test_fused_gradcheck(case, group, exp_map):
    layer, x = _layer(case, group, exp_map)
    geometry = op_input(layer.base_layer, x)
    assert geometry is not None
    xin, op = geometry
    W, b = layer.weight, layer.bias
    name, order = layer.updates["default"].fused_form()
    L0, R0 = (t.detach().clone() for t in layer.generators["default"].factors())
    L0 = L0 + 0.2 * torch.randn_like(L0)
    args = (xin.clone().requires_grad_(True), L0.requires_grad_(True), R0.requires_grad_(True))
    if b is not None:
        args = (*args, b.detach().clone().requires_grad_(True))

    def f(xx, lf, rf, *bb):
        return adapted_op_lowrank(xx, W, bb[0] if bb else None, lf, rf, name, order, op, None)

    assert torch.autograd.gradcheck(f, args)


def test_fused_keeps_nothing_weight_sized():
    """Saved for backward: x and the frozen W, L, R themselves — no new weight-sized tensor."""
    layer, x = _layer("linear", "hadamard", "exact")
    x.requires_grad_(True)
    assert _saved_weight_sized(layer, x) == []
    # the reference path keeps W' (weight-sized) for the op's backward
    ref = _saved_weight_sized(layer, x, lambda xx: _reference(layer, xx))
    assert any(t.numel() == layer.weight.numel() for t in ref)
    gen = layer.generators["default"]
    layer(x).sum().backward()
    assert gen.B.grad is not None and layer.weight.grad is None


def test_fallbacks_give_the_same_forward():
    layer, x = _layer("conv2d_same_even_kernel", "hadamard", "exact")
    assert op_input(layer.base_layer, x) is None  # asymmetric "same" padding
    assert torch.equal(layer(x), _reference(layer, x))
    layer, x = _layer("conv2d", "hadamard", "exact")
    assert op_input(layer.base_layer, x[0]) is None  # unbatched conv input
    assert torch.equal(layer(x[0]), _reference(layer, x[0]))
    # dtype mismatch: the engine does not enter the fused node; the op's own error comes back
    with pytest.raises(RuntimeError) as want:
        layer.base_layer(x.float())
    with pytest.raises(RuntimeError) as got:
        layer(x.float())
    assert str(got.value) == str(want.value)


def _lora(W: torch.Tensor, rank: int = 1, seed: int = 0) -> LoRAGenerator:
    gen = LoRAGenerator(GeneratorSpec(weight_shape=tuple(W.shape), rank=rank, scaling=1.0,
                                      dtype=W.dtype))
    with torch.no_grad():
        gen.B.copy_(torch.randn(gen.B.shape, dtype=W.dtype,
                                generator=torch.Generator().manual_seed(seed)))
    return gen


def test_trainable_weight_and_custom_update_fall_back():
    """The engine's entry point runs a trainable W or an update without a fused form as plain
    autograd on W' (the fused node refuses both)."""
    lin = nn.Linear(4, 3, bias=False).to(DT)
    W = lin.weight  # trainable
    gen = _lora(W)
    x = torch.randn(2, 4, dtype=DT)
    hadamard = HadamardExp("exact")
    y = adapted_forward(lin, x, gen, hadamard)
    assert type(y.grad_fn).__name__ != "LowRankAdaptedOpFunctionBackward"
    y.sum().backward()
    assert W.grad is not None and gen.B.grad is not None  # the plain path differentiates W
    L, R = gen.factors()
    assert torch.equal(y, x @ adapted_weight_lowrank(W, L, R, hadamard).T)

    class Scaled(Additive):
        def apply_lowrank(self, W, L, R):
            return W + 2 * (L @ R).view(W.shape)

    assert Scaled().fused_form() is None  # a subclass may change apply: never fused
    lin.weight.requires_grad_(False)
    y = adapted_forward(lin, x, gen, Scaled())
    assert type(y.grad_fn).__name__ != "LowRankAdaptedOpFunctionBackward"
    L, R = gen.factors()
    assert torch.allclose(y, x @ (lin.weight + 2 * L @ R).T)
    # the shipped update on the frozen weight takes the node
    y = adapted_forward(lin, x, gen, hadamard)
    assert type(y.grad_fn).__name__ == "LowRankAdaptedOpFunctionBackward"


def test_errors():
    with pytest.raises(ConfigError, match="kind"):
        OpGeometry("pool")
    with pytest.raises(ShapeError, match="stride"):
        OpGeometry("conv", (1, 1), (0,), (1, 1))
    W = torch.randn(3, 4, dtype=DT, requires_grad=True)
    L, R = torch.randn(3, 1, dtype=DT), torch.randn(1, 4, dtype=DT)
    x = torch.randn(2, 4, dtype=DT)
    lin = OpGeometry("linear")
    with pytest.raises(AdapterStateError, match="freeze"):
        LowRankAdaptedOpFunction.apply(x, W, None, L, R, "hadamard", None, lin)
    with pytest.raises(AdapterStateError, match="freeze"):
        adapted_op_lowrank(x, W, None, L, R, "hadamard", None, lin, None)
    with pytest.raises(ConfigError, match="update"):
        LowRankAdaptedOpFunction.apply(x, W.detach(), None, L, R, "affine", None, lin)
    with pytest.raises(ConfigError, match="update"):
        adapted_op_lowrank(x, W.detach(), None, L, R, "affine", None, lin, None)
    # the factors are validated before the node runs: L @ R must unfold W
    with pytest.raises(ShapeError, match="unfold"):
        adapted_op_lowrank(x, W.detach(), None, L, R[:, :3], "hadamard", None, lin, None)
    with pytest.raises(ShapeError):
        adapted_op_lowrank(x, W.detach(), None, L, R.T, "additive", None, lin, None)
    with pytest.raises(ShapeError):  # ranks of L and R differ
        adapted_op_lowrank(x, W.detach(), None, L, torch.randn(2, 4, dtype=DT), "hadamard",
                           None, lin, None)


def _saved_weight_sized(layer: LieRALayer, x: torch.Tensor, run=None) -> list[torch.Tensor]:
    """Weight-sized tensors ``run(x)`` (default: the layer) saves, other than x, W and factors."""
    gen = layer.generators["default"]
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (run or layer)(x)
    allowed = {x.data_ptr(), layer.weight.data_ptr(), gen.B.data_ptr(), gen.A.data_ptr()}
    return [t for t in saved if t.numel() >= layer.weight.numel() and t.data_ptr() not in allowed]


def test_keeps_w_prime_only_for_small_weights():
    """W' is kept for backward iff 32·|W| ≤ |x| + |y| (≤ 3 % of the step's activations)."""
    torch.manual_seed(0)
    for hw, kept in ((4, False), (24, True)):  # W: 4·3·9 = 108 entries; x+y = 7·hw² per image
        base = nn.Conv2d(3, 4, 3, padding=1).to(DT)
        layer = LieRALayer(base, "c")
        layer.add_adapter("default", LieRAConfig(rank=2, target_modules=["x"]))
        x = torch.randn(1, 3, hw, hw, dtype=DT, requires_grad=True)
        assert (7 * hw * hw >= 108 * policy.KEEP_RATIO) is kept
        big = _saved_weight_sized(layer, x)
        assert len(big) == int(kept) and all(t.shape == layer.weight.shape for t in big)
        # no gradient for x and first order: nothing needs W' in the backward
        layer.updates["default"] = HadamardExp("first_order")
        assert _saved_weight_sized(layer, x.detach()) == []


def _saved_like_weight(layer: LieRALayer, x: torch.Tensor) -> int:
    """How many tensors of the weight's shape the layer's forward saves for its backward."""
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(s == layer.weight.shape for s in shapes)


def test_keep_rule_counts_factors_computed_from_parameters():
    """Tucker's ``R`` (and ``s·B``) are saved on top of ``W'``: the 1/32 budget covers them too.

    ``|W| = 144``; ``x + y = 8·25² = 5000``. LoRA saves ``s·B`` (8 entries):
    ``32·152 = 4864 ≤ 5000``, kept. Tucker also saves its computed ``R`` (2·4·9 = 72 entries):
    ``32·224 = 7168 > 5000``, not kept — though ``32·|W| = 4608`` alone would have been.
    """
    torch.manual_seed(0)
    x = torch.randn(1, 4, 25, 25, dtype=DT, requires_grad=True)
    for generator, kept in (("lora", 1), ("tucker", 0)):
        layer = LieRALayer(nn.Conv2d(4, 4, 3, padding=1).to(DT), "c")
        layer.add_adapter("default", LieRAConfig(rank=2, target_modules=["x"],
                                                 generator=generator))
        assert _saved_like_weight(layer, x) == 1 + kept, generator  # the frozen W, and W'?
    W = torch.zeros(4, 4, 3, 3)
    L, R = torch.zeros(4, 2), torch.zeros(2, 36, requires_grad=True)
    assert ln._computed_entries(L, R) == 0  # parameters (leaves) are not extra memory
    assert ln._computed_entries(L, R * 2) == 72
    assert ln._keep_second_buffer(W, x, 2500, 0) and not ln._keep_second_buffer(W, x, 2500, 72)
    assert policy.keep_adapted_weight(144, 8, 5000)  # LoRA: 32·152 = 4864 ≤ 5000
    assert not policy.keep_adapted_weight(144, 80, 5000)  # Tucker: 32·224 = 7168 > 5000


def test_block_buffer_leaves_room_for_computed_factors():
    """The exact map's block buffer takes the keep budget less the computed factors."""
    W, acts = 32 * 864, 2 * 442368  # the weight's entries; x + gy
    assert policy.block_rows(W, 864, acts, 0) == 32  # 884736 // 32 = 27648 = all 32 rows
    assert policy.block_rows(W, 864, acts, 7168) == (27648 - 7168) // 864
    assert policy.block_rows(W, 864, acts, 10**9) == 32 * 864 // 16 // 864  # floor: 1/16 of W
    # at most CHUNK_ENTRIES per block (in cache), and at least one row
    assert policy.block_rows(1 << 24, 1024, 1 << 40, 0) == policy.CHUNK_ENTRIES // 1024
    assert policy.block_rows(10, 1 << 20, 0, 10**9) == 1


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("case", ["linear", "linear_nobias"])
def test_additive_linear_factor_route(case, keep, monkeypatch):
    """Additive Linear: ∂L/∂L = gyᵀ(x Rᵀ), ∂L/∂R = (gy L)ᵀ x, no ∂L/∂W' formed; same grads."""
    _force_keep(monkeypatch, keep)
    layer, x = _layer(case, "additive", "exact")
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    x.requires_grad_(True)
    y_ref = _reference(layer, x)
    gy = torch.randn_like(y_ref)
    want = _grads(layer, x, y_ref, gy)
    real = ln._factor_grads
    for route in (True, False):
        monkeypatch.setattr(ln, "factor_route", lambda *a, r=route: r)
        calls = []
        monkeypatch.setattr(ln, "_factor_grads", lambda *a, c=calls: c.append(1) or real(*a))
        y = layer(x)
        assert torch.equal(y, y_ref)
        got = _grads(layer, x, y, gy)
        assert calls == ([] if route else [1])  # the product route never takes G
        u = torch.finfo(DT).eps
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


def test_factor_route_rule():
    """Through the activations when 2Nm(n₀ + n₁) < N n₀ n₁ + 2 n₀ n₁ m, and W's own shape."""
    W = torch.zeros(1024, 1024)
    L, R = torch.zeros(1024, 32), torch.zeros(32, 1024)
    assert ln.factor_route(W, L, R, torch.zeros(2048, 1024))
    assert not ln.factor_route(W, torch.zeros(1024, 600), torch.zeros(600, 1024),
                                torch.zeros(2048, 1024))
    assert not ln.factor_route(W, torch.zeros(512, 2), torch.zeros(2, 2048),
                                torch.zeros(8, 1024))  # another layout of L @ R
