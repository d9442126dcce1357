"""DDP smoke test: 2 CPU processes (gloo) train a LieRA model like one process does."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from liegroup.peft import LieRAConfig, get_peft_model

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make(exp_map: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, groups=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    ).double()
    model = get_peft_model(
        net, LieRAConfig(rank=2, target_modules=["0", "2"], modules_to_save=["4"],
                         exp_map=exp_map)
    )
    with torch.no_grad():  # move away from the identity so every gradient is non-trivial
        for n, p in model.named_parameters():
            if ".B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    return model, x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def _worker(rank: int, world: int, port: int, maps: list[str], out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for exp_map in maps:
            model, x, y = _make(exp_map)
            ddp = nn.parallel.DistributedDataParallel(model)
            shard = slice(rank * 4, rank * 4 + 4)  # each rank gets half of the batch
            results[exp_map] = _train(ddp, x[shard], y[shard])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if sys.platform == "win32":
        pytest.skip("spawned gloo workers are not supported here")
    maps = ["exact", "first_order"]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "params.pt")
        mp.spawn(_worker, args=(2, _free_port(), maps, out), nprocs=2, join=True)
        got = torch.load(out, weights_only=True)
    for exp_map in maps:
        model, x, y = _make(exp_map)
        init = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        # one process on the full batch = mean of the two equal half-batch gradients
        ref = _train(model, x, y)
        assert len(got[exp_map]) == len(ref) == len(init)
        for g, r, p0 in zip(got[exp_map], ref, init, strict=True):
            assert not torch.equal(r, p0)  # every trainable tensor moved
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
