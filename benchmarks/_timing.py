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


def interleaved_rounds(
    runs: dict[str, Callable[[], object]], baseline: str, rounds: int, steps: int,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Per run: its time over ``baseline``'s in each round (same protocol as above).

    ``runs`` are argument-less calls (an op, a training step); each is called ``warmup``
    times first (a compiled callable compiles there: compile time is excluded). A round times
    every run ``steps`` times, keeps the fastest, and visits the runs in a rotating order.
    """
    names = list(runs)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    t: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        for m in names[r % len(names):] + names[: r % len(names)]:
            best = float("inf")
            for _ in range(steps):
                t0 = time.perf_counter()
                runs[m]()
                best = min(best, time.perf_counter() - t0)
            t[m].append(best)
    return {m: [a / b for a, b in zip(t[m], t[baseline], strict=True)] for m in names}


def spread(per_round: list[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of per-round ratios.

    >>> spread([1.0, 1.2, 0.9])
    (1.0, 0.9, 1.2)
    """
    return statistics.median(per_round), min(per_round), max(per_round)


def verdict(per_round: list[float], tol: float = 0.03, share: float = 0.8) -> str:
    """``"faster"``/``"slower"`` (by the median's distance from 1, in percent) when the median
    is more than ``tol`` from 1 and at least ``share`` of the rounds fall on its side of 1;
    else ``"within noise"``.

    >>> verdict([0.98, 1.04, 1.01])
    'within noise'
    >>> verdict([0.70, 0.74, 0.72])
    'faster by 28 %'
    >>> verdict([1.50, 1.60, 1.55])
    'slower by 55 %'
    >>> verdict([1.72, 0.74, 1.73])  # one round on the other side of 1: not decided
    'within noise'
    """
    med = statistics.median(per_round)
    below = sum(v < 1.0 for v in per_round) / len(per_round)
    if med < 1 - tol and below >= share:
        return f"faster by {100 * (1 - med):.0f} %"
    if med > 1 + tol and 1 - below >= share:
        return f"slower by {100 * (med - 1):.0f} %"
    return "within noise"


def raise_recompile_limit() -> None:
    """Many modules with one ``forward`` code object are compiled in one process; past
    Dynamo's default limit of 8 entries it would fall back to eager silently."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(512, cfg.accumulated_recompile_limit)
