"""Training-step cost of every generator (and the mode-wise groups) relative to full fine-tuning.

Run: ``.venv/bin/python -m benchmarks.generators_step [--rounds N] [--steps K] [--threads T]``

Same layers and protocol as :mod:`benchmarks.adapter_step` (its step function; K steps per
round, the fastest of them, rounds interleaving the methods in a rotating order, the median
over rounds of the ratio to full fine-tuning in the same round): Conv2d(64,64,3) on
(16,64,32,32) and Linear(1024,1024) on (16,128,1024), float32, rank 8, LieRA exact map unless
named. Printed: fwd+bwd and fwd+bwd+sgd ratios.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks._timing import interleaved_ratios, stepper, target_layer
from liegroup.peft import LieRAConfig
from liegroup.peft.layer import LieRALayer

# label -> (generator, group, exp_map, generator_kwargs)
METHODS: dict[str, tuple[str, str, object, dict]] = {
    "lora exact": ("lora", "hadamard", "exact", {}),
    "adalora exact": ("adalora", "hadamard", "exact", {}),
    "adalora first_order": ("adalora", "hadamard", "first_order", {}),
    "tucker exact": ("tucker", "hadamard", "exact", {"kernel_rank": 3}),
    "tucker additive": ("tucker", "additive", "exact", {"kernel_rank": 3}),
    "full exact": ("full", "hadamard", "exact", {}),
    "full additive": ("full", "additive", "exact", {}),
    "lora pissa exact": ("lora", "hadamard", "exact", {"init": "pissa"}),
    "so modes 0,1 lowrank": ("modewise", "so", "exact", {}),
    "gl modes 0,1 lowrank": ("modewise", "gl", "exact", {}),
    "sl modes 0,1 lowrank": ("modewise", "sl", "exact", {}),
    "so modes 0,1 block 4": ("modewise", "so", "exact", {"structure": "block"}),
    "gl modes 0,1 block 4": ("modewise", "gl", "exact", {"structure": "block"}),
}


def _build(kind: str, method: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    base, x = target_layer(kind)
    if method == "full ft":
        module = base
    else:
        gen, group, exp_map, kw = METHODS[method]
        module = LieRALayer(base)
        module.add_adapter("default", LieRAConfig(
            rank=8, alpha=8.0, target_modules=["x"], generator=gen, update=group,
            exp_map=exp_map, generator_kwargs=kw))
        with torch.no_grad():
            for p in module.generators["default"].parameters():
                p.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        gy = torch.randn_like(module(x))
    return module, x, gy


def bench(kind: str, methods: list[str], rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    # lr = 0: the SGD update costs the same, and the random output gradient (not a loss that
    # training would decrease) cannot drive the rotations' generators to overflow
    runs = {m: stepper(*_build(kind, m), lr=0.0) for m in ["full ft", *methods]}
    res = interleaved_ratios(runs, "full ft", rounds, steps)
    return {m: res[m] for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = {
        "conv": "Conv2d(64,64,3) on (16,64,32,32)",
        "linear": "Linear(1024,1024) on (16,128,1024)",
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds × "
          f"{args.steps} steps, float32, rank 8; ratios to full fine-tuning of the same layer\n")
    for kind, label in layers.items():
        res = bench(kind, args.methods, args.rounds, args.steps)
        print(label)
        print("| method | fwd+bwd | fwd+bwd+sgd |\n|---|---|---|")
        for m, (fb, al) in res.items():
            print(f"| {m} | {fb:.3f} | {al:.3f} |")
        print()


if __name__ == "__main__":
    main()
