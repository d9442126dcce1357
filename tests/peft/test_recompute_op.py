"""The recompute node (adapted_op_recompute) for updates without a fused low-rank path.

Reference: ``op(x, adapted_weight(W, ΔW, update))`` differentiated by autograd. The node must
give the same forward bit for bit, the same gradients to rounding, pass gradcheck in float64,
and save nothing weight-sized for the backward (the plain path saves ``W'`` and, for a
mode-wise conv, a transposed copy of ``W``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from liegroup.errors import AdapterStateError, DTypeError
from liegroup.peft import LieRAConfig, adapted_weight, get_update
from liegroup.peft._engine import base_op, policy
from liegroup.peft._engine.geometry import OpGeometry, op_input
from liegroup.peft._engine.recompute_node import _flatten, adapted_op_recompute
from liegroup.peft.layer import LieRALayer

DT = torch.float64

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 5, 5)),
    "conv1d_strided": (lambda: nn.Conv1d(6, 7, 3, stride=2, dilation=2), (2, 6, 15)),
    "conv3d_reflect": (lambda: nn.Conv3d(5, 6, 3, padding=1, padding_mode="reflect"),
                       (1, 5, 4, 4, 4)),
    "linear_3d_input": (lambda: nn.Linear(9, 7), (2, 3, 9)),
}
VARIANTS = {
    "so_lowrank": {"update": "so", "generator": "modewise"},
    "gl_lowrank": {"update": "gl", "generator": "modewise"},
    "sl_lowrank": {"update": "sl", "generator": "modewise"},
    "so_block": {"update": "so", "generator": "modewise",
                 "generator_kwargs": {"structure": "block", "block_size": 3}},
    "so_kernel_mode": {"update": "so", "generator": "modewise",
                       "generator_kwargs": {"modes": [0, 2]}},
    "dense_hadamard": {"generator": "full"},
    "dense_first_order": {"generator": "full", "exp_map": "first_order"},
}


def _layer(case: str, variant: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, xshape = LAYERS[case]
    layer = LieRALayer(factory().to(DT), case)
    kw = dict(VARIANTS[variant])
    if variant == "so_kernel_mode" and case.startswith("linear"):
        kw["generator_kwargs"] = {"modes": [0, 1]}
    layer.add_adapter("default", LieRAConfig(rank=2, alpha=2.0, target_modules=["x"], **kw))
    with torch.no_grad():
        for p in layer.generators["default"].parameters():
            p.normal_(0, 0.2)
    x = torch.randn(xshape, dtype=DT, requires_grad=True)
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    return layer, x


def _reference(layer: LieRALayer, x: torch.Tensor) -> torch.Tensor:
    delta = layer.generators["default"]()
    return base_op(layer.base_layer, x,
                   adapted_weight(layer.weight, delta, layer.updates["default"]))


def _wrt(layer: LieRALayer, x: torch.Tensor) -> list[torch.Tensor]:
    return [x, *(p for p in layer.parameters() if p.requires_grad)]


def _takes_recompute_path(layer: LieRALayer, x: torch.Tensor) -> bool:
    y = layer(x)
    return y.grad_fn is not None and "RecomputedWeightOp" in type(y.grad_fn).__name__


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(LAYERS))
def test_matches_reference(case, variant):
    layer, x = _layer(case, variant)
    lr = layer.updates["default"].additive_factors(layer.weight, layer.generators["default"]())
    fused_linear = case.startswith("linear") and lr is not None  # the W + L R fused node
    assert _takes_recompute_path(layer, x) is not fused_linear
    y, y_ref = layer(x), _reference(layer, x)
    with torch.no_grad():
        y_ng = _reference(layer, x)
    # forward: bit for bit the no-grad W' — what inference and merging compute; the autograd
    # path may round differently (torch.matmul does not fold a batch that requires grad)
    assert torch.equal(y, y_ng)
    u = torch.finfo(DT).eps
    assert (y - y_ref).abs().max().item() <= 1e2 * u * (1 + y_ref.abs().max().item())
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, _wrt(layer, x), gy)
    want = torch.autograd.grad(y_ref, _wrt(layer, x), gy)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


@pytest.mark.parametrize("variant", ["so_lowrank", "so_block", "dense_hadamard"])
def test_gradcheck(variant):
    layer, x = _layer("conv1d_strided", variant)
    x = x[:1, :, :9].detach().requires_grad_(True)
    # through the node, with the algebra element's tensors as gradcheck's leaves
    delta = layer.generators["default"]()
    tensors, rebuild = _flatten(delta)
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    xin, op = op_input(layer.base_layer, x)
    update = layer.updates["default"]

    def g(xx, *ts):
        return adapted_op_recompute(xx, layer.weight, layer.bias.detach(), rebuild(list(ts)),
                                    update, op)

    assert torch.autograd.gradcheck(g, (xin.detach().requires_grad_(True), *leaves))


def test_saves_nothing_weight_sized():
    layer, x = _layer("conv2d", "so_lowrank")
    n = layer.weight.numel()

    def saved_big(fn) -> list[tuple[int, ...]]:
        big: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() >= n and t.data_ptr() not in (x.data_ptr(), layer.weight.data_ptr()):
                big.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return big

    assert saved_big(lambda: layer(x)) == []
    assert saved_big(lambda: _reference(layer, x))  # the plain path keeps W' (and more)


def test_errors():
    W = torch.randn(3, 4, dtype=DT, requires_grad=True)
    D = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    x = torch.randn(2, 4, dtype=DT)
    u = get_update("hadamard", "exact")
    with pytest.raises(AdapterStateError, match="freeze"):
        adapted_op_recompute(x, W, None, D, u, OpGeometry("linear"))
    with pytest.raises(DTypeError, match="cannot recompute"):
        _flatten({"a": object()})
    with pytest.raises(ValueError):  # the update's own check of the algebra element
        adapted_op_recompute(x, W.detach(), None, D[:, :2], u, OpGeometry("linear"))


def test_flatten_round_trip():
    @dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor | None
        scale: float

    t = [torch.full((2,), float(i)) for i in range(4)]
    obj = {0: Pair(t[0], None, 2.0), 1: [t[1], (t[2],)], 2: t[3]}
    flat, rebuild = _flatten(obj)
    assert [id(v) for v in flat] == [id(v) for v in t]
    back = rebuild([v + 1 for v in flat])
    assert isinstance(back[0], Pair) and back[0].b is None and back[0].scale == 2.0
    assert torch.equal(back[1][1][0], t[2] + 1) and isinstance(back[1][1], tuple)
    assert torch.equal(back[2], t[3] + 1)


def test_small_weights_next_to_large_activations_keep_the_plain_path():
    """64·|W| ≤ |x| + |y|: the plain path's kept W' is ≤ ~3 % of the activations; no recompute."""
    assert policy.KEEP_PLAIN_RATIO == 64
    layer, _ = _layer("conv2d", "so_lowrank")
    n = layer.weight.numel()  # 8·6·3·3 = 432
    for hw, plain in ((5, False), (40, True)):  # |x| + |y| = 2·(6 + 8)·hw²
        x = torch.randn(2, 6, hw, hw, dtype=DT, requires_grad=True)
        assert (64 * n <= 28 * hw * hw) is plain
        assert policy.keep_plain_graph(n, 28 * hw * hw) is plain
        assert _takes_recompute_path(layer, x) is not plain
        y = layer(x)
        assert torch.allclose(y, _reference(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["conv1d_strided", "conv2d", "conv3d_reflect", "linear_3d_input"])
def test_output_numel(case):
    layer, x = _layer(case, "dense_hadamard")
    xin, op = op_input(layer.base_layer, x)
    assert op.output_numel(xin, layer.weight) == layer.base_layer(x).numel()


def test_tensors_the_update_ignores_get_no_gradient():
    """An algebra element may carry tensors the update does not use (zero gradient, no error)."""
    torch.manual_seed(1)
    W = torch.randn(3, 4, dtype=DT)
    used = torch.full((3, 4), 0.1, dtype=DT, requires_grad=True)
    unused = torch.zeros(2, dtype=DT, requires_grad=True)

    class FirstOnly(type(get_update("hadamard", "exact"))):
        def check_delta(self, W, delta):
            pass

        def apply(self, W, delta):
            return super().apply(W, delta[0])

    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    y = adapted_op_recompute(x, W, None, [used, unused], FirstOnly(), OpGeometry("linear"))
    _, gu, gn = torch.autograd.grad(y.sum(), [x, used, unused], allow_unused=True)
    assert gn is None or torch.count_nonzero(gn) == 0
    ref = torch.autograd.grad(torch.nn.functional.linear(x, W * torch.exp(used)).sum(), used)[0]
    assert torch.allclose(gu, ref, rtol=1e-12, atol=0)
