"""How a LieRA step's cost relative to full fine-tuning depends on the activation size.

Run: ``.venv/bin/python -m benchmarks.batch_sweep [--net resnet50|convnext_t] [--rounds 3]
[--configs 2x64,4x64,8x64,8x96,8x128]``

For each ``batch × image`` configuration, full fine-tuning and LieRA (LoRA generator, rank 8,
first order and exact, all adaptable layers but the head, the head trained in full) are built
from one seed and timed in interleaved rounds (the fastest of 2 steps per round, the median of
per-round ratios), 1 thread, as in :mod:`benchmarks.suite`. The adapter's extra work is a fixed
number of passes over each weight, so the ratio falls as the activations grow. Prints a
Markdown table (full fine-tuning's step time is shown only to show its growth).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F  # noqa: N812

from benchmarks.models import convnext_tiny_like, resnet50_like
from benchmarks.suite import RANK, _model_targets
from liegroup.peft import LieRAConfig, get_peft_model

METHODS = ("full", "first_order", "exact")


def _stepper(net: str, method: str, batch: int, img: int) -> Callable[[], None]:
    make, head = (resnet50_like, "fc") if net == "resnet50" else (convnext_tiny_like, "head")
    torch.manual_seed(0)
    model = make()
    if method != "full":
        targets = "(?:" + "|".join(re.escape(t) for t in _model_targets(model, head)) + ")"
        model = get_peft_model(model, LieRAConfig(
            rank=RANK, alpha=float(RANK), target_modules=targets, modules_to_save=[head],
            exp_map=method))
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def sweep_one(net: str, batch: int, img: int, rounds: int) -> dict[str, float]:
    """Ratios to full fine-tuning (and full fine-tuning's median step in ms)."""
    runs = {m: _stepper(net, m, batch, img) for m in METHODS}
    for s in runs.values():
        s()
        s()
    t: dict[str, list[float]] = {m: [] for m in METHODS}
    names = list(METHODS)
    for r in range(rounds):
        for m in names[r % len(names):] + names[: r % len(names)]:
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                runs[m]()
                best = min(best, time.perf_counter() - t0)
            t[m].append(best)
    out = {m: statistics.median(a / b for a, b in zip(t[m], t["full"], strict=True))
           for m in METHODS}
    out["full_ms"] = 1e3 * statistics.median(t["full"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet50", choices=["resnet50", "convnext_t"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default="2x64,4x64,8x64,8x96,8x128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.net}, torch {torch.__version__}, {args.threads} thread(s), {args.rounds} "
          f"rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| batch × image | full FT step | first order | exact | exact / first order |")
    print("|---|---|---|---|---|")
    for cfg in args.configs.split(","):
        b, img = (int(v) for v in cfg.split("x"))
        r = sweep_one(args.net, b, img, args.rounds)
        print(f"| {b} × {img}² | {r['full_ms']:.0f} ms | {r['first_order']:.2f} | "
              f"{r['exact']:.2f} | {r['exact'] / r['first_order']:.2f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
