"""``torch.compile(model, fullgraph=True)`` of adapted models: no graph break, same numbers.

Every generator × map × layer type traces as one graph (``fullgraph=True`` raises on any
break) and matches eager forward and gradients to float32 rounding, in training mode. The full
matrix runs through AOTAutograd (``aot_eager``: Dynamo's graph and the joint forward/backward
graph, without code generation); a cross-section runs through inductor, which CI runs on the
CPU, and a channels-last model (eager against its contiguous twin, and under inductor, which
checks the strides of what each op returns).

The bound: eager and compiled compute the same expression with other roundings (the kernel's
``exp`` vs inductor's, fused vs unfused sums), each within a few ``u`` per operation of the
exact value, so they agree within ``c·u·(|a| + |b| + scale)`` with ``c`` a small multiple of
the reduction lengths' ``√n`` growth; the tests use ``64·u`` of the output's magnitude.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from liegroup.errors import DTypeError, ShapeError
from liegroup.peft import (
    Generator,
    GeneratorSpec,
    LieRAConfig,
    LieRALayer,
    get_peft_model,
    register_generator,
)

U32 = torch.finfo(torch.float32).eps / 2

LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (3, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), (1, 3, 4, 4, 4)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"),
                  (2, 6, 5, 5)),
}
MAPS = {
    "exact": {"exp_map": "exact"},
    "first_order": {"exp_map": "first_order"},
    "additive": {"update": "additive"},
}
GENERATORS = ["lora", "adalora", "tucker"]


class _Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.body = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x)).square().sum(dim=1)


def _model(layer: str, gen: str, emap: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    make, _ = LAYERS[layer]
    cfg = LieRAConfig(rank=2, target_modules=["body"], generator=gen, **MAPS[emap])
    model = get_peft_model(_Net(make()), cfg)
    with torch.no_grad():  # away from the identity, so that every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn_like(p))
    model.train()
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert xx.grad is not None and all(g is not None for g in grads)
    return y.detach(), [xx.grad, *grads]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= 64 * U32 * scale, f"{what}: |eager − compiled| = {err:.3g}, scale {scale:.3g}"


def _check(layer: str, gen: str, emap: str, backend: str) -> None:
    eager = _model(layer, gen, emap)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    _matches_eager(eager, compiled, torch.randn(*LAYERS[layer][1]))


def _matches_eager(eager: nn.Module, compiled: Any, x: torch.Tensor) -> None:
    """Two steps (the second reuses the compiled graph): outputs and gradients agree."""
    for step in range(2):
        y0, g0 = _run(eager, x + step)
        y1, g1 = _run(compiled, x + step)
        _close(y0, y1, f"output (step {step})")
        for i, (a, b) in enumerate(zip(g0, g1, strict=True)):
            _close(a, b, f"gradient {i} (step {step})")


@pytest.mark.parametrize("emap", list(MAPS))
@pytest.mark.parametrize("gen", GENERATORS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_fullgraph_matches_eager_every_generator_map_layer(layer: str, gen: str,
                                                            emap: str) -> None:
    _check(layer, gen, emap, "aot_eager")


@pytest.mark.parametrize(
    ("layer", "gen", "emap"),
    [("linear", "lora", "exact"), ("conv2d", "tucker", "first_order"),
     ("depthwise", "adalora", "additive")],
)
@pytest.mark.inductor
def test_inductor_fullgraph_matches_eager(layer: str, gen: str, emap: str) -> None:
    _check(layer, gen, emap, "inductor")


class _ChannelsLastNet(nn.Module):
    """A ConvNeXt-like stack: a strided conv, a depthwise conv, a Linear on the permuted
    activations, a 1×1 and a 3×3 conv — channels-last weights of both kinds (the depthwise
    and 1×1 ones also count as contiguous, with other strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.fc = nn.Linear(8, 8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.fc(self.dw(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(self.pw(h).relu())


def _channels_last_model(emap: str = "exact") -> nn.Module:
    torch.manual_seed(0)
    cfg = LieRAConfig(rank=2, target_modules=["stem", "dw", "fc", "pw", "conv"], **MAPS[emap])
    model = get_peft_model(_ChannelsLastNet(), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def test_eager_channels_last_model_matches_its_contiguous_twin() -> None:
    """Channels-last weights are read in memory order (``R``'s columns permuted, ``∂L/∂R``'s
    back): the same outputs and gradients as the contiguous model, to float32 rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the compiled kernel (where built) takes every weight
    try:
        plain = _channels_last_model()
        cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        assert not cl.base_model.conv.base_layer.weight.is_contiguous()
        x = torch.randn(2, 3, 12, 12)
        y0, g0 = _run(plain, x)
        y1, g1 = _run(cl, x.contiguous(memory_format=torch.channels_last))
        _close(y0, y1, "output")
        for i, (a, b) in enumerate(zip(g0, g1, strict=True)):
            _close(a, b, f"gradient {i}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("emap", list(MAPS))
def test_traced_adapted_weight_keeps_the_weights_layout(emap: str, kernel: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What Dynamo traces hands the base op ``W'`` in ``W``'s strides (the kernel's operator,
    the additive ``addmm``, the torch ops of the Hadamard maps alike): the compiler lays out
    the conv after it by them, so a channels-last model compiles to channels-last convs."""
    from liegroup.peft import _engine as engine
    from liegroup.peft._engine import ops

    monkeypatch.setattr(ops, "_USE_KERNEL", kernel and ops._USE_KERNEL)
    model = _channels_last_model(emap).to(memory_format=torch.channels_last)
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    base_op = engine.base_op

    def spy(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append((base.weight.stride(), weight.stride()))
        return base_op(base, x, weight)

    monkeypatch.setattr(engine, "base_op", spy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced route
    model(torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last))
    assert len(seen) == 5 - (emap == "additive")  # additive Linear: its own traced node
    for w_stride, wp_stride in seen:
        assert wp_stride == w_stride


@pytest.mark.inductor
@pytest.mark.parametrize("emap", ["exact", "additive"])
def test_inductor_fullgraph_matches_eager_in_channels_last(emap: str) -> None:
    """Inductor checks the strides of what it hands an op against those it derived while
    tracing; a channels-last model must trace and run with the same numbers as eager."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the compiled kernel takes every weight
    try:
        eager = _channels_last_model(emap).to(memory_format=torch.channels_last)
        compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
        x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
        _matches_eager(eager, compiled, x)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.inductor
@pytest.mark.parametrize("emap", ["exact", "first_order"])
def test_inductor_forced_layout_optimization_matches_eager(emap: str) -> None:
    """The setting ``docs/peft.md`` recommends for NCHW conv nets on the CPU
    (``force_layout_optimization``: the backward graph's convolutions get channels-last
    inputs) traces the adapted ConvNeXt-like stack in one graph, with eager's numbers."""
    import torch._inductor.config as inductor_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager = _channels_last_model(emap)
        torch._dynamo.reset()
        with inductor_config.patch(force_layout_optimization=True):
            compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
            _matches_eager(eager, compiled, torch.randn(2, 3, 12, 12))
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def test_compiled_model_merges_to_the_same_outputs() -> None:
    model = _model("conv2d", "lora", "exact")
    x = torch.randn(*LAYERS["conv2d"][1])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        y = compiled(x)
        model.merge_adapter()
        torch._dynamo.reset()
        y_merged = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    _close(y, y_merged, "merged output")


@register_generator
class _SwitchableFactors(Generator):
    """LoRA-like factors that stop unfolding the weight when ``bad`` is set."""

    name = "switchable_factors_compile_test"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        rows, cols = spec.weight_shape[0], math.prod(spec.weight_shape[1:])
        self.bad = spec.options.get("bad", False)
        self.L = nn.Parameter(torch.zeros(rows, 2))
        self.R = nn.Parameter(torch.zeros(2, cols))

    def forward(self) -> torch.Tensor:
        return (self.L @ self.R).view(self.weight_shape)

    def factors(self) -> Any:
        if self.bad == "triple":
            return (self.L, self.R, self.R)
        if self.bad == "no_r":
            return (self.L, None)
        if self.bad == "not_a_pair":
            return self.L
        return (self.L, self.R[:, :-1]) if self.bad else (self.L, self.R)


def _switchable(bad_at_init: bool) -> nn.Module:
    cfg = LieRAConfig(rank=2, target_modules=["body"], generator=_SwitchableFactors.name,
                      generator_kwargs={"bad": bad_at_init})
    return get_peft_model(_Net(nn.Linear(12, 10)), cfg)


def test_user_generator_with_bad_factors_is_refused_when_the_adapter_is_made() -> None:
    with pytest.raises(ShapeError, match="must unfold W"):
        _switchable(bad_at_init=True)


def test_user_generator_whose_factors_go_bad_raises_shape_error_eager_and_compiled() -> None:
    model = _switchable(bad_at_init=False)
    for m in model.modules():
        if isinstance(m, _SwitchableFactors):
            m.bad = True
    x = torch.randn(3, 12)
    with pytest.raises(ShapeError, match="must unfold W"):
        model(x)
    torch._dynamo.reset()
    # raised while tracing: Dynamo reports it inside its own exception, which names it
    with pytest.raises(Exception, match="ShapeError") as info:
        torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert "must unfold W" in str(info.value) + repr(info.value.__cause__)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("triple", ShapeError, "must return None or a pair"),
        ("not_a_pair", ShapeError, "must return None or a pair"),
        ("no_r", DTypeError, "R must be a tensor"),
    ],
)
def test_user_factors_that_are_not_a_pair_of_tensors_raise_typed_errors(
    bad: str, error: type[Exception], match: str
) -> None:
    """A 3-tuple reached the node (TypeError inside autograd); (L, None) an AttributeError."""
    model = _switchable(bad_at_init=False)
    for m in model.modules():
        if isinstance(m, _SwitchableFactors):
            m.bad = bad
    with pytest.raises(error, match=match):
        model(torch.randn(3, 12))
    with pytest.raises(error, match=match):
        _switchable(bad_at_init=bad)  # type: ignore[arg-type]


def test_a_base_weight_replaced_by_another_shape_of_as_many_entries_raises() -> None:
    """A (12, 10) weight in place of the (10, 12) one ran, with ΔW laid out for (10, 12)."""
    model = _switchable(bad_at_init=False)
    layer = next(m for m in model.modules() if isinstance(m, LieRALayer))
    layer.base_layer.weight = nn.Parameter(torch.randn(12, 10), requires_grad=False)
    with pytest.raises(ShapeError, match="made for a weight of shape"):
        model(torch.randn(3, 12))


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"generator": "full"}, id="full"),
        pytest.param({"exp_map": 3}, id="taylor3"),
    ],
)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_other_generators_and_groups_compile_fullgraph(layer: str, kw: dict[str, object]) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[layer]
    cfg = LieRAConfig(rank=2, target_modules=["body"], **kw)  # type: ignore[arg-type]
    eager = get_peft_model(_Net(make()), cfg)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    x = torch.randn(*shape)
    y0, g0 = _run(eager, x)
    y1, g1 = _run(compiled, x)
    _close(y0, y1, "output")
    for i, (a, b) in enumerate(zip(g0, g1, strict=True)):
        _close(a, b, f"gradient {i}")


@pytest.mark.parametrize("emap", list(MAPS))
def test_compiled_trainable_base_weight_gets_its_gradient(emap: str) -> None:
    """A user who unfreezes the base weight gets the same ∂L/∂W compiled as eager."""
    eager = _model("linear", "lora", emap)
    eager.base_model.body.base_layer.weight.requires_grad_(True)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    x = torch.randn(*LAYERS["linear"][1])
    _, g0 = _run(eager, x)
    _, g1 = _run(compiled, x)
    assert len(g0) == len(g1) == 4  # x, W, A, B
    for a, b in zip(g0, g1, strict=True):
        _close(a, b, "gradient")
