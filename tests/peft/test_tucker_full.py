"""Tucker and full generators over the geometry matrix, plus their own properties."""

from __future__ import annotations

import pytest
import torch

from liegroup.errors import ConfigError
from liegroup.peft import GeneratorSpec, LieRAConfig
from liegroup.peft.generators import TuckerGenerator
from liegroup.peft.layer import LieRALayer
from tests.peft._matrix import FAST_MAPS, SLOW_MAPS, check_generator_case
from tests.peft.test_layer_geometry import CASES, DT


def _tucker_ref(p, s, shape):
    """G ×_0 U_0 ×_1 U_1 ⋯ with einsum (no liegroup code)."""
    core = p["core"]
    letters = "abcde"
    upper = "ABCDE"
    n = core.dim()
    expr = letters[:n] + "," + ",".join(f"{upper[i]}{letters[i]}" for i in range(n))
    expr += "->" + upper[:n]
    us = [p[f"factors_list.{i}"] for i in range(n)]
    return s * torch.einsum(expr, core, *us)


def _rand_tucker(gen):
    with torch.no_grad():
        gen.core.normal_(0, 0.3)
        for u in gen.factors_list:
            u.add_(0.1 * torch.randn_like(u))


def _rand_full(gen):
    with torch.no_grad():
        gen.D.normal_(0, 0.2)


GENS = {
    "tucker": (_rand_tucker, _tucker_ref, {"kernel_rank": 2}),
    "full": (_rand_full, lambda p, s, shape: s * p["D"], {}),
}


def _params(maps):
    return [
        pytest.param(case, g, m, gen, id=f"{case}-{g}-{m}-{gen}")
        for case in CASES for (g, m) in maps for gen in GENS
    ]


@pytest.mark.parametrize(("case", "group", "exp_map", "gen"), _params(FAST_MAPS))
def test_geometry_matrix(case, group, exp_map, gen):
    rnd, ref, kw = GENS[gen]
    check_generator_case(case, group, exp_map, gen, rnd, ref, generator_kwargs=kw)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "group", "exp_map", "gen"), _params(SLOW_MAPS))
def test_geometry_matrix_taylor(case, group, exp_map, gen):
    rnd, ref, kw = GENS[gen]
    check_generator_case(case, group, exp_map, gen, rnd, ref, generator_kwargs=kw)


def test_tucker_ranks_and_mode_ranks():
    spec = GeneratorSpec(weight_shape=(6, 5, 3, 2), rank=4, scaling=1.0,
                         options={"kernel_rank": 2}, dtype=DT)
    g = TuckerGenerator(spec)
    assert g.ranks == [4, 4, 2, 2]
    with torch.no_grad():
        g.core.normal_()
    d = g().detach()
    # mode-k rank of ΔW is at most the mode's Tucker rank
    for k, r in enumerate(g.ranks):
        M = d.movedim(k, 0).reshape(d.shape[k], -1)
        assert int(torch.linalg.matrix_rank(M, rtol=1e-10)) <= r
    # explicit per-mode ranks, clamped to the mode size
    g2 = TuckerGenerator(GeneratorSpec(weight_shape=(6, 5, 3, 2), rank=1, scaling=1.0,
                                       options={"ranks": [2, 9, 1, 1]}))
    assert g2.ranks == [2, 5, 1, 1]
    # fused factors equal the full Tucker product
    L, R = g.factors()
    assert torch.allclose((L @ R).view(d.shape), d, atol=1e-12)


def test_tucker_identity_at_init_and_core_zero():
    g = TuckerGenerator(GeneratorSpec(weight_shape=(4, 3), rank=2, scaling=2.0))
    assert torch.equal(g(), torch.zeros(4, 3))
    assert g.core.abs().max() == 0


@pytest.mark.parametrize("bad", [{"ranks": [1, 2]}, {"ranks": [1, 0, 1, 1]},
                                 {"kernel_rank": 0}, {"kernel_rank": True}])
def test_tucker_bad_options(bad):
    with pytest.raises(ConfigError, match="generator_kwargs"):
        TuckerGenerator(GeneratorSpec(weight_shape=(4, 3, 3, 3), rank=2, scaling=1.0,
                                      options=bad))


@pytest.mark.parametrize("gen", ["tucker", "full"])
def test_dropout_refused(gen):
    layer = LieRALayer(torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="dropout"):
        layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"], generator=gen,
                                           dropout=0.1))


def test_full_generator_is_full_rank():
    torch.manual_seed(0)
    layer = LieRALayer(torch.nn.Conv2d(3, 4, 3).to(DT))
    layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"], generator="full",
                                       update="additive"))
    with torch.no_grad():
        layer.generators["a"].D.normal_()
    d = layer.adapted_weight() - layer.weight
    assert int(torch.linalg.matrix_rank(d.reshape(4, -1))) == 4


def test_tucker_factors_save_little_for_backward():
    """The kernel modes (full rank) are applied before C_in, so saved inputs stay core-sized."""
    spec = GeneratorSpec(weight_shape=(32, 32, 3, 3, 3), rank=8, scaling=1.0)
    g = TuckerGenerator(spec)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, R = g.factors()
    W_numel = 32 * 32 * 27
    assert R.numel() == W_numel // 4
    # every saved tensor is a factor, the core or a product that has not met U₁ yet
    assert max(saved) <= 8 * 8 * 27 and sum(saved) < W_numel // 3  # before: 3 of W_numel/4


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 1, 1), (6, 5, 1, 1, 1),
                                   (6, 5, 1, 3), (6, 5, 3, 2), (6, 5, 2, 1, 3)])
def test_tucker_factors_match_dense_product_and_its_gradients(shape):
    """Every factor route (size-1 kernel modes as a scalar, the Kronecker route) is the
    dense Tucker product, value and gradient for the core and every mode factor."""
    torch.manual_seed(0)
    g = TuckerGenerator(GeneratorSpec(weight_shape=shape, rank=3, scaling=0.7, dtype=DT))
    with torch.no_grad():
        g.core.normal_()
        for u in g.factors_list:
            u.mul_(1.3)  # mode factors of size 1 no longer ±1
    C = torch.randn(shape, dtype=DT)
    params = [g.core, *g.factors_list]
    dense = g()
    L, R = g.factors()
    assert torch.allclose((L @ R).view(shape), dense, rtol=1e-13, atol=1e-13)
    want = torch.autograd.grad((dense * C).sum(), params)
    got = torch.autograd.grad(((L @ R).view(shape) * C).sum(), params)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
