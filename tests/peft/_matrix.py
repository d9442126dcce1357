"""Shared geometry-matrix check for any tensor-valued generator (plain-torch reference)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from liegroup.peft import LieRAConfig
from liegroup.peft.layer import LieRALayer
from liegroup.peft.updates import parse_exp_map
from tests.conftest import eps
from tests.peft._ref import ref_map, ref_op
from tests.peft.test_layer_geometry import CASES, DT

# (group, exp_map) in the default run; Taylor order 3 is in the slow run.
FAST_MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("additive", "exact")]
SLOW_MAPS = [("hadamard", 3)]


def check_generator_case(
    case: str,
    group: str,
    exp_map: object,
    generator: str,
    randomise: Callable[[torch.nn.Module], None],
    ref_delta: Callable[[dict[str, torch.Tensor], float, tuple[int, ...]], torch.Tensor],
    rank: int = 2,
    layout: str = "mode1",
    generator_kwargs: dict | None = None,
) -> LieRALayer:
    """Identity at init, forward/grads vs a plain reference, merge == unmerged, unmerge exact.

    ``ref_delta(params, scaling, shape)`` recomputes ΔW from the generator's parameters (given
    as detached leaf tensors that require grad) with plain torch.
    """
    torch.manual_seed(0)
    factory, xshape = CASES[case]
    base = factory().to(DT)
    layer = LieRALayer(base, case)
    cfg = LieRAConfig(rank=rank, alpha=3.0, target_modules=["x"], exp_map=exp_map,
                      update=group, generator=generator, layout=layout,
                      generator_kwargs=generator_kwargs or {})
    layer.add_adapter("default", cfg)
    x = torch.randn(xshape, dtype=DT)
    W0 = base.weight.detach().clone()
    assert torch.equal(layer(x), base(x))  # identity at init, bit for bit

    gen = layer.generators["default"]
    randomise(gen)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in gen.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in gen.named_buffers()}
    shape = tuple(W0.shape)
    delta_ref = ref_delta({**params, **buffers}, cfg.scaling, shape)
    y_ref = ref_op(base, x, ref_map(W0, delta_ref, group, parse_exp_map(cfg.exp_map)))
    y = layer(x)
    tol = 200 * eps(DT) * (1 + y_ref.abs().max().item())
    assert (y - y_ref).abs().max().item() <= tol

    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert base.weight.grad is None
    n_nonzero = 0
    for n, p in gen.named_parameters():
        want = params[n].grad
        got = p.grad
        assert got is not None and want is not None, n
        gtol = 1e3 * eps(DT) * (1 + want.abs().max().item())
        assert (got - want).abs().max().item() <= gtol, n
        n_nonzero += int(got.abs().max() > 0)
    assert n_nonzero > 0

    layer.eval()
    with torch.no_grad():
        y_un = layer(x)
        layer.merge()
        assert (layer(x) - y_un).abs().max().item() <= tol
        layer.unmerge()
    if group == "hadamard" and parse_exp_map(cfg.exp_map) is not None:
        assert torch.equal(base.weight, W0)
    else:
        assert ((base.weight - W0).abs().max() / W0.abs().max()).item() <= 1e-12
    return layer
