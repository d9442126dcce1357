"""Cost of one adapter training step relative to full fine-tuning of the same layer (CPU).

Run: ``.venv/bin/python -m benchmarks.adapter_step [--rounds N] [--steps K] [--threads T]``

For each benchmark layer, every method runs K steps per round (its round time is the fastest
of the K: other processes only ever add time), rounds interleave the methods in a rotating
order, and a method's figure is the median over rounds of its time divided by full
fine-tuning's time in the same round. Printed are those ratios (never bare times):

* ``fwd+bwd`` — forward and backward;
* ``+sgd`` — forward, backward and an SGD step on the trainable parameters;
* ``step peak mem`` — the step's peak resident-memory increase over the state right after
  ``zero_grad`` (``VmHWM`` after resetting it via ``/proc/self/clear_refs``, glibc told to
  return every freed block above 64 KiB to the OS), relative to full fine-tuning; ``n/a``
  where the kernel does not support that reset;
* ``peak incl. params+data`` — the same plus the bytes of all parameters (frozen ones too),
  the input and the output gradient, i.e. the whole footprint of the step.

Methods: full fine-tuning (weight and bias), additive LoRA (``W + ΔW``, one op), LieRA first
order, LieRA exact, LieRA Taylor order 2, all rank 8 with the LoRA generator.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys

import torch
from torch import nn

from benchmarks._timing import interleaved_ratios, stepper, target_layer
from liegroup.peft import LieRAConfig
from liegroup.peft.layer import LieRALayer

METHODS = ["full", "lora (W+ΔW)", "liera first_order", "liera exact", "liera taylor2"]


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(kind: str, method: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    base, x = target_layer(kind)
    if method == "full":
        module = base
    else:
        group, exp_map = {
            "lora (W+ΔW)": ("additive", "exact"),
            "liera first_order": ("hadamard", "first_order"),
            "liera exact": ("hadamard", "exact"),
            "liera taylor2": ("hadamard", 2),
        }[method]
        module = LieRALayer(base)
        module.add_adapter(
            "default",
            LieRAConfig(rank=8, alpha=8.0, target_modules=["x"], update=group, exp_map=exp_map),
        )
        with torch.no_grad():
            module.generators["default"].B.normal_(0, 0.01)
    with torch.no_grad():
        gy = torch.randn_like(module(x))
    return module, x, gy


def bench_time(kind: str, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    """Per method: ratios to full fine-tuning of the fwd+bwd and the fwd+bwd+sgd times."""
    runs = {m: stepper(*_build(kind, m)) for m in METHODS}
    return interleaved_ratios(runs, "full", rounds, steps)


def _peak_one(kind: str, method: str) -> float | None:
    """Peak RSS increase (KiB) of one step, measured in this (fresh) process."""
    _mallopt()
    mod, x, gy = _build(kind, method)
    step = stepper(mod, x, gy)
    step(True)
    peaks: list[float] = []
    for _ in range(3):
        # the baseline is the state right after zero_grad (no gradient exists): full
        # fine-tuning's ∂L/∂W is part of its step, not of the state before it
        for p in mod.parameters():
            p.grad = None
        before = _rss_kib("VmRSS")
        if not _reset_peak():
            return None
        step(True)
        peaks.append(_rss_kib("VmHWM") - before)
    return statistics.median(peaks)


def bench_memory(kind: str) -> dict[str, tuple[float | None, float]]:
    """Per method: the step's peak RSS increase (KiB, None if unmeasurable) and data (KiB).

    Each method runs in a fresh subprocess with glibc returning freed blocks to the OS.
    """
    out: dict[str, tuple[float | None, float]] = {}
    for m in METHODS:
        mod, x, gy = _build(kind, m)
        data = (sum(p.numel() for p in mod.parameters()) + x.numel() + gy.numel()) * 4 / 1024
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.adapter_step", "--peak", kind, m],
            capture_output=True, text=True, check=True,
        )
        val = res.stdout.strip().splitlines()[-1]
        out[m] = (None if val == "None" else float(val), data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak", nargs=2, metavar=("KIND", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(_peak_one(*args.peak))
        return
    layers = {
        "conv": "Conv2d(64,64,3) on (16,64,32,32)",
        "linear": "Linear(1024,1024) on (16,128,1024)",
    }
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds × "
        f"{args.steps} steps, float32, rank 8; ratios to full fine-tuning of the same layer\n"
    )
    times = {kind: bench_time(kind, args.rounds, args.steps) for kind in layers}
    load = os.getloadavg()[0]
    mems = {kind: bench_memory(kind) for kind in layers}
    for kind, label in layers.items():
        full_mem, full_data = mems[kind]["full"]
        print(f"{label}")
        print(
            "| method | fwd+bwd | fwd+bwd+sgd | step peak mem | peak incl. params+data |\n"
            "|---|---|---|---|---|"
        )
        for m in METHODS:
            fb, al = times[kind][m]
            mem, dat = mems[kind][m]
            if mem is not None and full_mem is not None and full_mem > 0:
                mem_s = f"{mem / full_mem:.2f}"
                tot_s = f"{(mem + dat) / (full_mem + full_data):.2f}"
            else:
                mem_s = tot_s = "n/a"
            print(f"| {m} | {fb:.3f} | {al:.3f} | {mem_s} | {tot_s} |")
        ex, fo = times[kind]["liera exact"][0], times[kind]["liera first_order"][0]
        print(f"exact / first_order (fwd+bwd): {ex / fo:.3f}\n")
    print(f"1-minute load average at the end of the timings: {load:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
