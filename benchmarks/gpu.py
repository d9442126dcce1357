"""The benchmark on CUDA: bf16 autocast, channels_last, CUDA events; exits 0 without a GPU.

Run: ``python -m benchmarks.gpu [--batch 64] [--img 224] [--rounds 7] [--steps 5]``

For the ResNet-50-like and ConvNeXt-T-like nets (benchmarks.models) and every method of the CPU
suite (full fine-tuning, head only, LieRA per generator and map, our additive LoRA, HF peft /
LyCORIS when installed) it times one training step (zero_grad, forward under
``torch.autocast("cuda", torch.bfloat16)``, cross-entropy, backward, SGD step) with CUDA events,
the methods interleaved round by round; each round's figure is the fastest of ``steps`` steps;
a method's time ratio is the median over rounds of its time over full fine-tuning's in the same
round. Peak memory is ``torch.cuda.max_memory_allocated`` over a step, after
``reset_peak_memory_stats``, minus the memory allocated before the step (``step mem``) and in
total. Writes ``out/bench-gpu.md`` and ``.json``. Ratios only, never bare times.

Under autocast the LieRA layer's fused node forms ``W'`` in float32 and runs the op in bf16 on
a kept bf16 copy (what autocast's weight cache keeps for full fine-tuning too). The same path
is measured on the CPU by ``python -m benchmarks --autocast bf16``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.nn import functional as F  # noqa: N812

from benchmarks.suite import FULL, Case, build, cases, method_names


def _stepper(case: Case, method: str, batch: int, img: int):  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    module = build(case, method).to(dev).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, img, img, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()

    return step, opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device available; skipped (nothing measured).")
        return 0
    torch.backends.cudnn.benchmark = True
    results: dict[str, dict] = {}
    for case in (c for c in cases(quick=False) if c.is_model):
        steps, notes = {}, {}
        for m in method_names(case):
            try:
                fn, _ = _stepper(case, m, args.batch, args.img)
                for _ in range(3):
                    fn()
                steps[m] = fn
            except Exception as e:
                notes[m] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
        torch.cuda.synchronize()
        names = list(steps)
        t: dict[str, list[float]] = {m: [] for m in names}
        for r in range(args.rounds):
            for m in names[r % len(names):] + names[: r % len(names)]:
                best = float("inf")
                for _ in range(args.steps):
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    steps[m]()
                    b.record()
                    torch.cuda.synchronize()
                    best = min(best, a.elapsed_time(b))
                t[m].append(best)
        mem: dict[str, tuple[int, int]] = {}
        for m in names:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            steps[m]()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            mem[m] = (peak - before, peak)
        rows = {}
        for m in method_names(case):
            if m not in steps:
                rows[m] = {"note": notes.get(m, "")}
                continue
            rows[m] = {
                "time": statistics.median(a / b for a, b in zip(t[m], t[FULL], strict=True)),
                "step_mem": mem[m][0] / mem[FULL][0],
                "total_mem": mem[m][1] / mem[FULL][1],
                "note": "",
            }
        results[case.name] = {"label": case.label.split(",")[0], "rows": rows}
        steps.clear()
        torch.cuda.empty_cache()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, "
             f"channels_last, batch {args.batch}, {args.img}×{args.img}, {args.rounds} rounds × "
             f"{args.steps} steps; ratios to full fine-tuning", ""]
    for res in results.values():
        lines += [f"### {res['label']}", "",
                  "| method | step time | step mem | total mem | note |", "|---|---|---|---|---|"]
        for m, r in res["rows"].items():
            c = [f"{r[k]:.2f}" if k in r else "—" for k in ("time", "step_mem", "total_mem")]
            lines.append(f"| {m} | {' | '.join(c)} | {r['note']} |")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-gpu.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "bench-gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
