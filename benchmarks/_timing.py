"""The timing protocol shared by the single-layer step benchmarks.

Each method's step is timed ``steps`` times per round and the fastest kept (noise from other
processes only ever adds time); rounds interleave the methods in a rotating order; a method's
figure is the median over rounds of its ratio to the baseline measured in the same round.
Only ratios leave this module, never absolute times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

Step = Callable[[bool], None]


def target_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """The issue's CPU benchmark layers, seeded: ``"conv"`` Conv2d(64,64,3) on (16,64,32,32),
    ``"linear"`` Linear(1024,1024) on (16,128,1024)."""
    torch.manual_seed(0)
    if kind == "conv":
        return nn.Conv2d(64, 64, 3, padding=1), torch.randn(16, 64, 32, 32)
    if kind == "linear":
        return nn.Linear(1024, 1024), torch.randn(16, 128, 1024)
    raise ValueError(f"unknown layer kind {kind!r}; use 'conv' or 'linear'")


def stepper(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, lr: float = 1e-3) -> Step:
    """A training step on ``module``: forward, backward of ``gy``, and (if asked) an SGD step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)

    def step(with_opt: bool) -> None:
        opt.zero_grad(set_to_none=True)
        module(x).backward(gy)
        if with_opt:
            opt.step()

    return step


def interleaved_ratios(
    runs: dict[str, Step], baseline: str, rounds: int, steps: int
) -> dict[str, tuple[float, float]]:
    """Per method: (fwd+bwd, fwd+bwd+sgd) time ratios to ``baseline`` (see module docstring)."""
    names = list(runs)
    for step in runs.values():  # warm-up
        step(True)
        step(True)
    t_fb: dict[str, list[float]] = {m: [] for m in names}
    t_all: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            fb, al = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                runs[m](False)
                t1 = time.perf_counter()
                runs[m](True)
                t2 = time.perf_counter()
                fb.append(t1 - t0)
                al.append(t2 - t1)
            t_fb[m].append(min(fb))
            t_all[m].append(min(al))

    def paired(t: dict[str, list[float]], m: str) -> float:
        return statistics.median(a / b for a, b in zip(t[m], t[baseline], strict=True))

    return {m: (paired(t_fb, m), paired(t_all, m)) for m in names}
