"""The GPU benchmark: eager and compiled training steps under bf16 autocast; exits 0 without CUDA.

Run: ``python -m benchmarks.gpu [--cases resnet50,convnext_t,llama_block] [--rounds 7]
[--steps 5] [--methods REGEX] [--batch 64] [--img 224] [--out DIR]``;
``python -m benchmarks.gpu --device cpu --quick`` runs the same code end to end on the CPU
with tiny sizes and one round (what the tests run; its figures mean nothing).

Cases: the ResNet-50-like and ConvNeXt-T-like nets (:mod:`benchmarks.models`; every Conv2d and
Linear but the new 10-class head adapted, the head trained in full; batch 64 at 224×224,
channels_last, cross-entropy) and a Llama-like decoder block (hidden 2048, intermediate 5632,
16 heads, sequence 512, batch 8; all seven Linear layers adapted; loss: mean square of the
output). Methods, rank 8: full fine-tuning, LieRA LoRA exact and first order, our additive LoRA
(``update="additive"``), and HF peft LoRA when installed.

Every method runs twice, **eager** and **compiled** (its module through
``torch.compile(module, fullgraph=True, dynamic=False)``, inductor; one module, parameters
shared, an optimizer each). One step = ``zero_grad`` → forward and loss under
``torch.autocast(device, torch.bfloat16)`` → backward → SGD step (no momentum). Timings: CUDA
events (``time.perf_counter`` on the CPU); every (method, eager/compiled) pair interleaved
round by round in a rotating order, a round's figure the fastest of ``steps`` steps, a ratio
the median over rounds of the per-round ratio (range in brackets). Compile time is excluded
(warm-up steps). Peak memory (CUDA only): ``max_memory_allocated`` over one step after
``reset_peak_memory_stats`` — *step mem* above the memory allocated right after ``zero_grad``,
*total mem* above the memory allocated before the method was built.

Reported, per case and method: eager time / eager full fine-tuning, compiled time / compiled
full fine-tuning, compiled / eager of the same method, and the memory ratios to full
fine-tuning of the same mode. Writes ``DIR/bench-gpu[-cpu][-quick].md`` and ``.json``. Ratios
only, never bare times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from benchmarks import peers
from benchmarks._timing import raise_recompile_limit
from benchmarks.models import convnext_tiny_like, llama_block, resnet50_like
from benchmarks.suite import FULL, Case, _model_targets, build

METHODS = (FULL, "LieRA lora exact", "LieRA lora first order", "LoRA W+ΔW (ours)")
PEER = "peft LoRA"
MODES = ("eager", "compiled")


@dataclass
class GpuCase:
    case: Case  # what :func:`benchmarks.suite.build` needs (builder, targets, head)
    make_input: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor | None]]
    image: bool  # channels_last input and model, cross-entropy; else mean-square loss


def gpu_cases(quick: bool, batch: int | None, img: int | None) -> dict[str, GpuCase]:
    """The three cases at full size, or tiny versions of the same blocks with ``quick``."""
    b = batch or (2 if quick else 64)
    s = img or (32 if quick else 224)
    if quick:
        def rn() -> nn.Module:
            return resnet50_like(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1))

        def cn() -> nn.Module:
            return convnext_tiny_like(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))

        hidden, inter, heads, seq, lb = 64, 172, 4, 16, 2
    else:
        rn, cn = resnet50_like, convnext_tiny_like
        hidden, inter, heads, seq, lb = 2048, 5632, 16, 512, 8

    def llama() -> nn.Module:
        return llama_block(hidden, inter, heads)

    def images(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch.manual_seed(1)
        x = torch.randn(b, 3, s, s, device=dev).to(memory_format=torch.channels_last)
        return x, torch.randint(0, 10, (b,), device=dev)

    def tokens(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch.manual_seed(1)
        return torch.randn(lb, seq, hidden, device=dev), None

    out: dict[str, GpuCase] = {}
    for name, make, head, label in (("resnet50", rn, "fc", "ResNet-50-like"),
                                    ("convnext_t", cn, "head", "ConvNeXt-T-like")):
        tgt = _model_targets(make(), head)
        out[name] = GpuCase(Case(name, f"{label} ({len(tgt)} adapted layers), x ({b},3,{s},{s})",
                                 make, (b, 3, s, s), tgt, [head], True), images, True)
    lin = [n for n, m in llama().named_modules() if isinstance(m, nn.Linear)]
    out["llama_block"] = GpuCase(Case(
        "llama_block", f"Llama-like block (hidden {hidden}, intermediate {inter}, {heads} heads; "
        f"{len(lin)} adapted Linear layers), x ({lb},{seq},{hidden})",
        llama, (lb, seq, hidden), lin, [], True), tokens, False)
    return out


class Device:
    """Timer, synchronisation and peak memory for one device (CUDA events or CPU clock)."""

    def __init__(self, kind: str) -> None:
        self.dev = torch.device(kind)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return float(a.elapsed_time(b))
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak_of(self, fn: Callable[[], None]) -> tuple[int, int] | None:
        """``(allocated before, peak)`` over ``fn`` (``None`` on the CPU: not measured)."""
        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()


class Step:
    """One training step of a built module, eager or compiled (the module is shared)."""

    def __init__(self, gc: GpuCase, module: nn.Module, dev: Device, compiled: bool) -> None:
        self.dev = dev
        self.x, self.y = gc.make_input(dev.dev)
        self.image = gc.image
        params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-4)
        self.module: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(module, fullgraph=True, dynamic=False) if compiled else module
        )

    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def run(self) -> None:
        with torch.autocast(self.dev.dev.type, dtype=torch.bfloat16):
            out = self.module(self.x)
            if self.image:
                assert self.y is not None
                loss = F.cross_entropy(out, self.y)
            else:
                loss = out.float().pow(2).mean()
        loss.backward()
        self.opt.step()

    def __call__(self) -> None:
        self.zero()
        self.run()


def method_names(pattern: str | None) -> list[str]:
    names = list(METHODS) + ([PEER] if PEER in peers.available() else [])
    flt = re.compile(pattern) if pattern else None
    return [m for m in names if m == FULL or flt is None or flt.search(m)]


def _err(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0][:90] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


def bench_case(gc: GpuCase, dev: Device, methods: list[str], rounds: int, steps: int,
               warmup: int) -> dict[str, dict[str, Any]]:
    """Per method: ``{"eager": {...}, "compiled": {...}, "note": str}`` with ``time_rounds``
    (ratios to full fine-tuning of the same mode, per round), ``vs_eager_rounds`` (compiled
    only), ``step_mem``/``total_mem`` bytes (CUDA) — ratios are formed by :func:`ratios`."""
    torch._dynamo.reset()
    runs: dict[tuple[str, str], Step] = {}
    res: dict[str, dict[str, Any]] = {m: {"note": ""} for m in methods}
    for m in methods:
        base = dev.allocated()
        try:
            module = build(gc.case, m).to(dev.dev)
            if gc.image:
                module = module.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        except Exception as e:  # a library refusing the case is a result, reported
            res[m]["note"] = f"refused: {_err(e)}"
            continue
        for mode in MODES:
            try:
                s = Step(gc, module, dev, compiled=mode == "compiled")
                for _ in range(warmup):  # the first compiled step compiles
                    s()
                s.zero()
                peak = dev.peak_of(s.run)
                s.zero()
            except Exception as e:
                res[m]["note"] = (res[m]["note"] + f" {mode}: refused: {_err(e)}").strip()
                continue
            runs[(m, mode)] = s
            if peak is not None and base is not None:
                res[m][mode] = {"step_bytes": peak[1] - peak[0], "total_bytes": peak[1] - base}
            else:
                res[m][mode] = {}
    dev.sync()
    keys = list(runs)
    t: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            best = float("inf")
            for _ in range(steps):
                runs[k].zero()
                best = min(best, dev.time(runs[k].run))
            t[k].append(best)
    for (m, mode), ts in t.items():
        if (FULL, mode) in t:
            res[m][mode]["time_rounds"] = [a / b for a, b in zip(ts, t[(FULL, mode)],
                                                                 strict=True)]
        if mode == "compiled" and (m, "eager") in t:
            res[m][mode]["vs_eager_rounds"] = [a / b for a, b in zip(ts, t[(m, "eager")],
                                                                     strict=True)]
    runs.clear()
    if dev.cuda:
        torch.cuda.empty_cache()
    return ratios(res)


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians of the per-round ratios, and memory as ratios to full fine-tuning (same mode).

    >>> r = ratios({"full fine-tuning": {"note": "", "eager": {"time_rounds": [1.0],
    ...     "step_bytes": 4, "total_bytes": 8}}, "x": {"note": "", "eager": {
    ...     "time_rounds": [1.2, 1.0, 1.1], "step_bytes": 2, "total_bytes": 8}}})
    >>> r["x"]["eager"]["time"], r["x"]["eager"]["step_mem"], r["x"]["eager"]["total_mem"]
    (1.1, 0.5, 1.0)
    >>> "step_bytes" in r["x"]["eager"]
    False
    """
    for row in res.values():
        for mode in MODES:
            c = row.get(mode)
            if c is None:
                continue
            for k in ("time", "vs_eager"):
                if c.get(k + "_rounds"):
                    c[k] = statistics.median(c[k + "_rounds"])
            full = res.get(FULL, {}).get(mode) or {}
            for k in ("step", "total"):
                if c.get(k + "_bytes") is not None and full.get(k + "_bytes"):
                    c[k + "_mem"] = c[k + "_bytes"] / full[k + "_bytes"]
    for row in res.values():  # ratios only leave this module
        for mode in MODES:
            for k in ("step_bytes", "total_bytes"):
                (row.get(mode) or {}).pop(k, None)
    return res


def _cell(c: dict[str, Any] | None, key: str) -> str:
    if not c or c.get(key) is None:
        return "—"
    rounds = c.get(key + "_rounds")
    if not rounds or len(rounds) < 2:
        return f"{c[key]:.2f}"
    return f"{c[key]:.2f} ({min(rounds):.2f}–{max(rounds):.2f})"


def render(meta: dict, results: dict[str, dict]) -> str:
    mem = "peak memory: max_memory_allocated" if meta["cuda"] else (
        "memory not measured (CUDA only)")
    lines = [
        f"{meta['device_name']}, torch {meta['torch']}, bf16 autocast, {meta['rounds']} "
        f"interleaved rounds × {meta['steps']} steps, rank 8, SGD (no momentum); {mem}"
        + ("; **quick run: tiny sizes, the figures mean nothing**" if meta["quick"] else "")
        + ". Ratios: eager to eager full fine-tuning, compiled (torch.compile fullgraph=True, "
        "compile excluded) to compiled full fine-tuning, compiled / eager of the same method "
        "(median of same-round ratios, range in brackets).",
        "",
    ]
    for res in results.values():
        lines += [f"### {res['label']}", "",
                  "| method | eager time | compiled time | compiled / eager | eager step mem "
                  "| compiled step mem | eager total mem | compiled total mem | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, r in res["rows"].items():
            e, c = r.get("eager"), r.get("compiled")
            lines.append(
                f"| {m} | {_cell(e, 'time')} | {_cell(c, 'time')} | {_cell(c, 'vs_eager')} "
                f"| {_cell(e, 'step_mem')} | {_cell(c, 'step_mem')} | {_cell(e, 'total_mem')} "
                f"| {_cell(c, 'total_mem')} | {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default); cpu runs the same code with CPU timers (for tests)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 round × 1 step")
    ap.add_argument("--cases", default="", help="comma-separated: resnet50,convnext_t,llama_block")
    ap.add_argument("--methods", default="",
                    help="regex: only methods whose name matches (full fine-tuning always runs)")
    ap.add_argument("--batch", type=int, default=None, help="image batch (default 64)")
    ap.add_argument("--img", type=int, default=None, help="image size (default 224)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device available; skipped (nothing measured). "
              "`--device cpu --quick` runs the same code on the CPU.")
        return 0
    dev = Device(args.device)
    if dev.cuda:
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
    else:
        from benchmarks.__main__ import _cpu_model

        name = f"{_cpu_model()} (CPU, {torch.get_num_threads()} threads)"
    raise_recompile_limit()
    rounds = args.rounds or (1 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 5)
    warmup = 2 if args.quick else 3
    all_cases = gpu_cases(args.quick, args.batch, args.img)
    chosen = args.cases.split(",") if args.cases else list(all_cases)
    unknown = [c for c in chosen if c not in all_cases]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; cases: {list(all_cases)}")
    methods = method_names(args.methods or None)
    meta = {"device_name": name, "cuda": dev.cuda, "torch": torch.__version__,
            "python": platform.python_version(), "rounds": rounds, "steps": steps,
            "quick": args.quick, "methods": methods}
    results: dict[str, dict] = {}
    for cname in chosen:
        gc = all_cases[cname]
        print(f"... {gc.case.label}", file=sys.stderr, flush=True)
        rows = bench_case(gc, dev, methods, rounds, steps, warmup)
        results[cname] = {"label": gc.case.label, "rows": rows}
    md = render(meta, results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench-gpu" + ("" if dev.cuda else "-cpu")
                        + ("-quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
