"""The CUDA path: the torch implementation of every operator, eager and compiled.

Skipped without a CUDA device (CI has none). On a GPU these check that an adapted model
computes on CUDA what it computes on the CPU (to float32 rounding of the reductions), that
``torch.compile(fullgraph=True)`` (inductor, Triton) matches eager, that bf16 autocast trains,
that the operators pass ``opcheck`` on CUDA tensors, and that the engine keeps no CPU-style
workspace on CUDA: a step's peak memory stays within full fine-tuning's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft._engine import ledger, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

U32 = torch.finfo(torch.float32).eps / 2


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def _model(gen: str = "lora", **kw: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = LieRAConfig(rank=4, target_modules=["0", "2", "4"], generator=gen, **kw)  # type: ignore[arg-type]
    model = get_peft_model(_net(), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), [p.grad for p in model.parameters() if p.requires_grad]  # type: ignore[misc]


def _close(a: torch.Tensor, b: torch.Tensor, c: float = 256) -> None:
    a, b = a.float().cpu(), b.float().cpu()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= c * U32 * scale


@pytest.mark.parametrize("gen", ["lora", "adalora", "tucker"])
@pytest.mark.parametrize("emap", ["exact", "first_order"])
def test_cuda_matches_cpu(gen: str, emap: str) -> None:
    cpu = _model(gen, exp_map=emap)
    cuda = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 8, 8, 8)
    y0, g0 = _step(cpu, x)
    y1, g1 = _step(cuda, x.cuda())
    _close(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        _close(a, b)


@pytest.mark.parametrize("gen", ["lora", "tucker"])
def test_cuda_compiled_matches_eager(gen: str) -> None:
    eager = _model(gen).cuda()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(4, 8, 8, 8, device="cuda")
    y0, g0 = _step(eager, x)
    y1, g1 = _step(compiled, x)
    _close(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        _close(a, b)


def test_bf16_autocast_trains_on_cuda() -> None:
    model = _model().cuda()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 8, 8, 8, device="cuda")
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_operators_pass_opcheck_on_cuda() -> None:
    W = torch.randn(6, 10, device="cuda")
    L, R = torch.randn(6, 3, device="cuda"), torch.randn(3, 10, device="cuda")
    torch.library.opcheck(torch.ops.liegroup.lowrank_form.default, (W, L, R, False))
    torch.library.opcheck(torch.ops.liegroup.lowrank_factor_grads.default,
                          (torch.randn_like(W), W, L, R, ops.GRAD_TIMES_EXP))


def test_no_workspace_on_cuda_and_step_memory_within_full_fine_tuning() -> None:
    assert ledger.current(torch.device("cuda")) is None
    x = torch.randn(16, 8, 8, 8, device="cuda")

    def peak(model: nn.Module) -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    full = _net().cuda()
    adapted = _model().cuda()
    peak(full), peak(adapted)  # warm-up: cuDNN workspaces, allocator pools
    assert peak(adapted) <= 1.05 * peak(full)
