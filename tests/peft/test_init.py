"""Non-zero (PiSSA-style) initialisers: step 0 is exact, the frozen copy is subtracted."""

from __future__ import annotations

import pytest
import torch

from liegroup.errors import ConfigError, DTypeError
from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft.layer import LieRALayer
from liegroup.peft.registry import get_initialiser, register_initialiser
from tests.peft._matrix import FAST_MAPS, check_generator_case
from tests.peft.test_layer_geometry import CASES, DT, EQUAL_KERNEL


def _ref(p, s, shape):
    return (s * (p["B"] @ p["A"]) - s * (p["B0"] @ p["A0"])).reshape(shape)


def _rand(gen):
    with torch.no_grad():
        gen.B.add_(0.2 * torch.randn_like(gen.B))


MATRIX = [
    pytest.param(case, g, m, lay, init, id=f"{case}-{g}-{m}-{lay}-{init}")
    for case in CASES for (g, m) in FAST_MAPS
    for lay in (["mode1", "loralib"] if case in EQUAL_KERNEL else ["mode1"])
    for init in ("pissa", "gaussian")
    if lay == "mode1" or (g, m, init) == ("hadamard", "exact", "pissa")
]


@pytest.mark.parametrize(("case", "group", "exp_map", "layout", "init"), MATRIX)
def test_geometry_matrix(case, group, exp_map, layout, init):
    # check_generator_case asserts torch.equal(layer(x), base(x)) at step 0: bit-exact
    layer = check_generator_case(case, group, exp_map, "lora", _rand, _ref, layout=layout,
                                 generator_kwargs={"init": init})
    g = layer.generators["default"]
    assert not g.B0.requires_grad and not g.A0.requires_grad


@pytest.mark.parametrize("case", list(CASES))
def test_pissa_is_the_best_rank_r_approximation(case):
    torch.manual_seed(0)
    base = CASES[case][0]().to(DT)
    layer = LieRALayer(base)
    cfg = LieRAConfig(rank=2, alpha=3.0, target_modules=["x"], generator_kwargs={"init": "pissa"})
    layer.add_adapter("a", cfg)
    g = layer.generators["a"]
    W = base.weight.detach()
    M = W.reshape(W.shape[0], -1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    best = (U[:, :2] * S[:2]) @ Vh[:2]
    got = cfg.scaling * g.B0 @ g.A0
    assert torch.allclose(got, best, atol=1e-12 * S[0].item())
    # W' is unchanged at step 0, bit for bit, in float32 too
    layer32 = LieRALayer(CASES[case][0]())
    layer32.add_adapter("a", cfg)
    assert torch.equal(layer32.adapted_weight(), layer32.weight)


def test_step0_exact_at_model_level_and_training_moves():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 4))
    x = torch.randn(5, 3, 6, 6)
    ref = net(x).detach()
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0", "3"],
                                            generator_kwargs={"init": "pissa"}))
    assert torch.equal(model(x), ref)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(model(x), ref)


def test_init_errors():
    layer = LieRALayer(torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="unknown init"):
        layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"],
                                           generator_kwargs={"init": "svd?"}))
    with pytest.raises(ConfigError, match="dropout"):
        layer.add_adapter("b", LieRAConfig(rank=1, target_modules=["x"], dropout=0.1,
                                           generator_kwargs={"init": "pissa"}))
    with pytest.raises(ConfigError, match="zeros"):
        register_initialiser("zeros", get_initialiser("pissa"))
    with pytest.raises(DTypeError, match="callable"):
        register_initialiser("x", 3)  # type: ignore[arg-type]


def test_pissa_without_weight_is_refused():
    from liegroup.peft import GeneratorSpec
    from liegroup.peft.generators import LoRAGenerator

    with pytest.raises(ConfigError, match="base weight"):
        LoRAGenerator(GeneratorSpec(weight_shape=(3, 4), rank=1, scaling=1.0,
                                    options={"init": "pissa"}))
