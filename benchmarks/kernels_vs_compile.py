"""Does each C kernel of LieRA's engine still beat the compiler? Kernel vs torch vs inductor.

Run: ``.venv/bin/python -m benchmarks.kernels_vs_compile [--threads 1,2] [--rounds 7]
[--steps 5] [--quick] [--no-layers] [--out DIR]``

For every compiled entry point of ``liegroup/peft/_engine`` (``_cfused.c``: the weight form
and the factor gradients), on CPU, float32, rank 8, three ways of computing the same thing
are timed side by side:

* **kernel** — the eager op (``liegroup.peft._engine.ops``) through the C kernel;
* **torch eager** — the same op with the kernel switched off (``ops._USE_KERNEL = False``:
  the op's own torch implementation, as with ``LIEGROUP_DISABLE_KERNELS=1``);
* **compiled** — the plain torch formulation of the same maths compiled by inductor
  (``torch.compile(fullgraph=True, dynamic=False)``; compile time excluded: warm-up calls).

Then one whole-layer training step (forward, backward, SGD) of a LieRA LoRA layer, eager with
the kernel, eager without it, and the model compiled with ``fullgraph=True``.

Figures are ratios to the kernel: per round each call's fastest of ``steps`` runs, rounds
interleaving the three in a rotating order, the median over rounds of the per-round ratio with
the rounds' range in brackets. The verdict column says whether the compiled formulation is
within noise of the kernel, faster or slower (median more than 3 % from 1 with at least
80 % of the rounds on its side). With several threads the kernel declines calls too small to
give every thread a full share (``ops._MT_WORK``); those rows say "declined" and the kernel
column runs the torch ops. Writes ``DIR/kernels-vs-compile.md`` and ``.json``. Ratios only,
never bare times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks._timing import (
    interleaved_rounds,
    raise_recompile_limit,
    spread,
    stepper,
    verdict,
)
from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft._engine import ops

RANK = 8
# (label, rows, cols) of the unfolded weight: suite shapes
FORM_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("64×576 (Conv2d 64→64 3×3)", 64, 576),
    ("1024×1024 (Linear 1024)", 1024, 1024),
    ("512×4608 (Conv2d 512→512 3×3)", 512, 4608),
    ("2048×8192 (Linear 8192→2048)", 2048, 8192),
)
LAYERS: tuple[tuple[str, Callable[[], nn.Module], tuple[int, ...]], ...] = (
    ("Conv2d 512→512 3×3, x (8,512,14,14)",
     lambda: nn.Conv2d(512, 512, 3, padding=1), (8, 512, 14, 14)),
    ("Linear 4096×4096, x (64,4096)", lambda: nn.Linear(4096, 4096), (64, 4096)),
)
RUNS = ("kernel", "torch eager", "compiled")


@contextlib.contextmanager
def kernel_off() -> Iterator[None]:
    """Every op of :mod:`ops` runs its torch implementation inside the block."""
    prev = ops._USE_KERNEL
    ops._USE_KERNEL = False
    try:
        yield
    finally:
        ops._USE_KERNEL = prev


def _off(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with kernel_off():
            return fn()

    return run


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True, dynamic=False)


# ------------------------------------------------ the plain torch formulations (compiled)
def _form_exact(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return W * torch.exp(L @ R).view(W.shape)


def _form_first(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return W * (L @ R + 1).view(W.shape)


def _grads_times(G: torch.Tensor, M: torch.Tensor, L: torch.Tensor, R: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    D = G * M
    return D @ R.T, L.T @ D


def _grads_times_exp(G: torch.Tensor, M: torch.Tensor, L: torch.Tensor, R: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    D = G * M * torch.exp(L @ R)
    return D @ R.T, L.T @ D


def _grads_plain(G: torch.Tensor, M: torch.Tensor, L: torch.Tensor, R: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return G @ R.T, L.T @ G


GRADS = (
    (ops.GRAD_TIMES, "mode 0: G⊙M", _grads_times),
    (ops.GRAD_TIMES_EXP, "mode 1: G⊙M⊙exp(LR)", _grads_times_exp),
    (ops.GRAD_PLAIN, "mode 2: G", _grads_plain),
)


# ------------------------------------------------------------------------- the cases
def _row(entry: str, shape: str, declined: bool, per_round: dict[str, list[float]]) -> dict:
    return {"entry": entry, "shape": shape, "declined": declined, "rounds": per_round,
            "verdict": verdict(per_round["compiled"])}


def _form_runs(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first: bool,
               fn: Callable[..., Any]) -> dict[str, Callable[[], object]]:
    cf = _compile(fn)

    def kernel() -> object:
        return ops.lowrank_form(W, L, R, first)

    return {"kernel": kernel, "torch eager": _off(kernel), "compiled": lambda: cf(W, L, R)}


def _grads_runs(G: torch.Tensor, M: torch.Tensor, L: torch.Tensor, R: torch.Tensor, mode: int,
                fn: Callable[..., Any]) -> dict[str, Callable[[], object]]:
    cf = _compile(fn)

    def kernel() -> object:
        return ops.lowrank_factor_grads(G, M, L, R, mode)

    return {"kernel": kernel, "torch eager": _off(kernel), "compiled": lambda: cf(G, M, L, R)}


def lowrank_rows(rounds: int, steps: int, shapes: tuple[tuple[str, int, int], ...]
                 ) -> list[dict]:
    out = []
    for label, rows, cols in shapes:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(rows, cols, generator=g)
        L = torch.randn(rows, RANK, generator=g) * 0.1
        R = torch.randn(RANK, cols, generator=g) * 0.1
        G = torch.randn(rows, cols, generator=g)
        M = torch.randn(rows, cols, generator=g)
        declined = not ops._kernel_takes(W.numel(), RANK, W)
        for first, name, fn in ((False, "exact", _form_exact), (True, "first order", _form_first)):
            out.append(_row(f"lowrank_form {name}", label, declined, interleaved_rounds(
                _form_runs(W, L, R, first, fn), "kernel", rounds, steps)))
        for mode, name, fn in GRADS:
            out.append(_row(f"lowrank_factor_grads {name}", label, declined, interleaved_rounds(
                _grads_runs(G, M, L, R, mode, fn), "kernel", rounds, steps)))
        print(f"... lowrank {label}", file=sys.stderr, flush=True)
    return out


FULL_EAGER = "full fine-tuning (eager)"


def _layer_case(make: Callable[[], nn.Module], shape: tuple[int, ...], exp_map: str
                ) -> tuple[dict[str, Callable[[], object]], bool]:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(OrderedDict(layer=make())), LieRAConfig(
        rank=RANK, alpha=float(RANK), target_modules="layer", exp_map=exp_map))
    # LoRA's B starts at zero; a non-zero B makes the update (and its exp) real work
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    torch.manual_seed(0)
    full = nn.Sequential(OrderedDict(layer=make()))
    x = torch.randn(shape).requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn_like(full(x))
    gy /= gy.numel() ** 0.5
    eager = stepper(model, x, gy, lr=1e-6)
    compiled = stepper(_compile(model), x, gy, lr=1e-6)
    ft = stepper(full, x, gy, lr=1e-6)

    def kernel() -> None:
        eager(True)

    runs: dict[str, Callable[[], object]] = {
        "kernel": kernel, "torch eager": _off(kernel), "compiled": lambda: compiled(True),
        FULL_EAGER: lambda: ft(True),
    }
    w = full.layer.weight.detach()
    return runs, not ops._kernel_takes(w.numel(), RANK, w)


def layer_rows(rounds: int, steps: int) -> list[dict]:
    out = []
    for label, make, shape in LAYERS:
        for exp_map in ("exact", "first_order"):
            runs, declined = _layer_case(make, shape, exp_map)
            out.append(_row(f"training step, LieRA lora {exp_map.replace('_', ' ')}", label,
                            declined, interleaved_rounds(runs, "kernel", rounds, steps)))
        print(f"... layer {label}", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------- report
def _cell(v: list[float]) -> str:
    med, lo, hi = spread(v)
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def render(meta: dict, tables: dict[int, list[dict]]) -> str:
    lines = [
        f"torch {meta['torch']}, {meta['cpu']} ({meta['cpus']} CPUs), float32, rank {RANK}, "
        f"{meta['rounds']} interleaved rounds × {meta['steps']} calls; compile time excluded. "
        "Ratios to the C kernel: median over rounds of the per-round ratio, the rounds' range "
        "in brackets (< 1: faster than the kernel). Verdict: the compiled torch formulation "
        "against the kernel (faster/slower: median more than 3 % from 1 with at least 80 % of "
        f"the rounds on that side; else within noise). Load average {meta['load'][0]:.1f} → "
        f"{meta['load'][1]:.1f}.",
        "",
    ]
    for threads, rows in tables.items():
        lines += [f"### {threads} thread{'s' if threads > 1 else ''}", "",
                  "| entry point | shape | torch eager / kernel | compiled / kernel "
                  "| verdict (compiled vs kernel) |", "|---|---|---|---|---|"]
        for r in rows:
            note = " — kernel declined (too little work per thread): torch ops" if r[
                "declined"] else ""
            extra = ""
            if FULL_EAGER in r["rounds"]:
                extra = f"; full fine-tuning eager / kernel {_cell(r['rounds'][FULL_EAGER])}"
            lines.append(
                f"| {r['entry']} | {r['shape']} | {_cell(r['rounds']['torch eager'])} "
                f"| {_cell(r['rounds']['compiled'])} | {r['verdict']}{note}{extra} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels_vs_compile",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="the two smallest shapes, 3 rounds × 2 calls, no layer step")
    ap.add_argument("--no-layers", action="store_true", help="skip the whole-layer steps")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    if not ops.compiled_kernel():
        print("benchmarks.kernels_vs_compile: the C kernel is not built or is disabled "
              "(LIEGROUP_DISABLE_KERNELS); nothing to compare.")
        return 0
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (2 if args.quick else 5)
    raise_recompile_limit()
    meta = {"torch": torch.__version__, "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "rounds": rounds, "steps": steps,
            "quick": args.quick, "load": [os.getloadavg()[0], 0.0]}
    tables: dict[int, list[dict]] = {}
    for nt in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(nt)
        torch._dynamo.reset()  # inductor's C++ specialises on the thread count
        rows = lowrank_rows(rounds, steps, FORM_SHAPES[:2] if args.quick else FORM_SHAPES)
        if not (args.quick or args.no_layers):
            rows += layer_rows(max(3, rounds - 2), max(2, steps - 2))
        tables[nt] = rows
        meta["load"][1] = os.getloadavg()[0]
        print(render(meta, {nt: rows}), file=sys.stderr, flush=True)
    md = render(meta, tables)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "kernels-vs-compile" + ("-quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "tables": tables}, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


def _cpu_model() -> str:
    from benchmarks.__main__ import _cpu_model as cpu

    return cpu()


if __name__ == "__main__":
    sys.exit(main())
