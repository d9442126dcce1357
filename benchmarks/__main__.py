"""``python -m benchmarks`` (``make bench``): every method against full fine-tuning, on CPU.

Options: ``--quick`` (smaller inputs, fewer rounds), ``--threads T`` (pinned, default 1),
``--rounds R --steps K``, ``--only linear,resnet50``, ``--methods REGEX`` (e.g.
``"LieRA lora"``; full fine-tuning always runs), ``--layer-batch B`` (single layers' batch,
default 16), ``--optimizer adamw`` (default ``sgd``, without momentum), ``--autocast bf16``
(forward and loss under CPU bfloat16 autocast, as training on a GPU runs; float32 weights and
optimizer), ``--compile`` (every method, full fine-tuning too, also timed through
``torch.compile(module, fullgraph=True)`` in the same interleaved rounds: compiled ratio to
compiled full fine-tuning and compiled / eager of the same method; compile time excluded;
memory stays the eager step's), ``--channels-last`` (the networks, module and input, in
``torch.channels_last``), ``--force-layout-opt`` (with ``--compile``: inductor's
``force_layout_optimization``, which gives the backward graph's convolutions channels-last
inputs; see ``docs/performance.md``), ``--no-memory``, ``--out DIR`` (default ``out/``).
Writes ``DIR/bench-cpu[-bf16][-adamw][-compile][-flo][-cl][-quick].md`` and ``.json`` and
prints the tables.
See :mod:`benchmarks.suite` for what is measured, and ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

from benchmarks import peers
from benchmarks._timing import verdict
from benchmarks.suite import (
    FULL,
    OPTIMIZERS,
    bench_memory,
    bench_time,
    bench_time_compiled,
    cases,
    memory_in_this_process,
    method_names,
    set_autocast,
    set_channels_last,
    set_method_filter,
    set_optimizer,
)

TIME_LIMIT, MEM_LIMIT, MAP_LIMIT = 1.10, 1.05, 1.05
COMPILED_LIMIT = 1.0  # compiled / eager of the same method: compiling must not slow it
DENSE_FRAC = 0.5  # LieRA rows training at least this fraction of the weights are baselines
MODEWISE_GROUPS = ("so", "gl", "sl")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--methods", default="",
                    help="regex: only methods whose name matches (full fine-tuning always runs)")
    ap.add_argument("--layer-batch", type=int, default=None,
                    help="batch of the single-layer cases (default 16; --quick: 2)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                    help="sgd (no momentum; default) or adamw")
    ap.add_argument("--autocast", choices=["bf16"], default=None,
                    help="forward and loss under torch.autocast('cpu', torch.bfloat16)")
    ap.add_argument("--compile", action="store_true",
                    help="also time every method under torch.compile(fullgraph=True)")
    ap.add_argument("--channels-last", action="store_true",
                    help="networks (module and input) in torch.channels_last")
    ap.add_argument("--force-layout-opt", action="store_true",
                    help="with --compile: torch._inductor.config.force_layout_optimization, "
                    "so the backward graph's convolutions also get channels-last inputs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default="out")
    ap.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.force_layout_opt:
        if not args.compile:
            ap.error("--force-layout-opt is an inductor setting: use it with --compile")
        import torch._inductor.config as inductor_config

        inductor_config.force_layout_optimization = True
    torch.set_num_threads(args.threads)
    set_method_filter(args.methods or None)
    set_autocast(torch.bfloat16 if args.autocast else None)
    set_optimizer(args.optimizer)
    set_channels_last(args.channels_last)
    all_cases = cases(args.quick, args.layer_batch)
    if args.memory_case:  # internal: one case's peak memory, in a fresh process
        case = next(c for c in all_cases if c.name == args.memory_case)
        print(json.dumps(memory_in_this_process(case, method_names(case))))
        return 0
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or 2
    selected = [c for c in all_cases if not args.only or c.name in args.only.split(",")]
    if not selected:
        ap.error(f"--only matched no case; cases: {[c.name for c in all_cases]}")
    load0 = os.getloadavg()
    meta = {
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
        "rounds": rounds, "steps_per_round": steps, "quick": args.quick, "rank": 8,
        "dtype": "float32" + (", forward under bf16 autocast" if args.autocast else ""),
        "optimizer": OPTIMIZERS[args.optimizer], "methods": args.methods or "all",
        "peers": sorted(peers.available()), "load_avg_start": load0,
        "compiled": args.compile, "channels_last": args.channels_last,
        "force_layout_opt": args.force_layout_opt,
    }
    results: dict[str, dict] = {}
    for case in selected:
        print(f"... {case.label}", file=sys.stderr, flush=True)
        if args.compile:
            ratios, notes, ntrain, per_round, crows = bench_time_compiled(case, rounds, steps)
        else:
            ratios, notes, ntrain, per_round = bench_time(case, rounds, steps)
            crows = {}
        extra = ["--methods", args.methods] if args.methods else []
        if args.layer_batch:
            extra += ["--layer-batch", str(args.layer_batch)]
        if args.autocast:
            extra += ["--autocast", args.autocast]
        if args.optimizer != "sgd":
            extra += ["--optimizer", args.optimizer]
        if args.channels_last:
            extra += ["--channels-last"]
        mem = {} if args.no_memory else bench_memory(case.name, args.quick, args.threads, extra)
        rows = {}
        full_mem = mem.get(FULL)
        for m in method_names(case):
            row: dict = {"time": ratios.get(m), "time_rounds": per_round.get(m),
                         "note": notes.get(m, "")}
            if m in ntrain:
                row["trainable_frac"] = ntrain[m] / ntrain[FULL]
            mm = mem.get(m)
            if mm is not None and full_mem:
                row["step_mem"] = mm[0] / full_mem[0]
                row["total_mem"] = mm[1] / full_mem[1]
            if m in crows:
                row["compiled"] = crows[m]
            rows[m] = row
        results[case.name] = {"label": case.label, "rows": rows, "stress": case.stress}
        print(render(meta | {"load_avg_end": os.getloadavg()}, {case.name: results[case.name]}),
              file=sys.stderr, flush=True)
    meta["load_avg_end"] = os.getloadavg()
    md = render(meta, results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    name = "bench-cpu" + ("-bf16" if args.autocast else "") + (
        "" if args.optimizer == "sgd" else f"-{args.optimizer}") + (
        "-compile" if args.compile else "") + ("-flo" if args.force_layout_opt else "") + (
        "-cl" if args.channels_last else "") + (
        "-quick" if args.quick else "")
    stem = os.path.join(args.out, name)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


def render(meta: dict, results: dict[str, dict]) -> str:
    lines = [
        f"torch {meta['torch']}, {meta['cpu']}, {meta['threads']} thread(s) of "
        f"{meta['cpus']} CPUs, {meta['rounds']} interleaved rounds × {meta['steps_per_round']} "
        f"steps, {meta['dtype']}, rank {meta['rank']}, {meta['optimizer']}; load average "
        f"{meta['load_avg_start'][0]:.1f} → {meta['load_avg_end'][0]:.1f}. "
        "All figures are ratios to full fine-tuning of the same case (median of per-round "
        "ratios for time, the rounds' range in brackets; peak live malloc bytes, sampled per "
        "ATen op in a fresh process, for memory). Exact / first order: the median over rounds "
        "of the two maps' ratio in the same round.",
        "",
    ]
    if meta.get("channels_last"):
        lines[0] += " Networks (module and input) in torch.channels_last."
    compiled = bool(meta.get("compiled"))
    if compiled:
        lines[0] += (
            " Compiled: every method (full fine-tuning too) also runs its module through "
            "torch.compile(module, fullgraph=True) (inductor; the optimizer step eager) in the "
            "same interleaved rounds — *compiled step time* is its ratio to compiled full "
            "fine-tuning, *compiled / eager* its time over the same method's eager time (median "
            "of same-round ratios, range in brackets); compile excluded (warm-up steps); "
            "memory is the eager step's."
        )
    if meta.get("force_layout_opt"):
        lines[0] += (
            " Inductor with force_layout_optimization=True (the backward graph's convolutions "
            "get channels-last inputs too)."
        )
    fails: list[str] = []
    cfails: list[str] = []  # compiled slower than eager (LieRA target rows)
    stressed: list[str] = []  # stress inputs: step time reported, not held to the target
    for name, res in results.items():
        rows = res["rows"]
        lines += [f"### {res['label']}", ""]
        if compiled:
            lines += ["| method | trainable | step time | compiled step time | compiled / eager "
                      "| step mem | total mem | note |", "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| method | trainable | step time | step mem | total mem | note |",
                      "|---|---|---|---|---|---|"]
        compile_cost: list[float] = []
        for m, r in rows.items():
            tf = r.get("trainable_frac")
            # the targets are for parameter-efficient rows: a dense generator (as many
            # trainable entries as the weight) is full fine-tuning through the group, a baseline
            dense = m.startswith("LieRA") and (tf or 0.0) >= DENSE_FRAC
            # mode-wise matrix groups (SO, GL) are not LieRA's Hadamard maps: reported only
            modewise = m.startswith("LieRA") and m.split()[-1] in MODEWISE_GROUPS
            note = r["note"]
            if dense:
                note = (note + " dense baseline, not a target row").strip()
            elif modewise:
                note = (note + " mode-wise group, not a Hadamard map: reported only").strip()
            dense = dense or modewise
            ccells = ""
            if compiled:
                c = r.get("compiled") or {}
                if c.get("note"):
                    note = (note + " " + c["note"]).strip()
                if c.get("compile_steps") is not None:
                    compile_cost.append(c["compile_steps"])
                vs = {"time": c.get("vs_eager"), "time_rounds": c.get("vs_eager_rounds")}
                ccells = f" | {_time_cell(c)} | {_time_cell(vs)}"
                if (m.startswith("LieRA") and not dense and c.get("vs_eager") is not None
                        and c["vs_eager"] > COMPILED_LIMIT):
                    rr = c.get("vs_eager_rounds") or [c["vs_eager"]]
                    cfails.append(f"{name}: {m} compiled / eager {_time_cell(vs)}, "
                                  f"{verdict(rr)}")
            lines.append(
                f"| {m} | {'—' if tf is None else f'{100 * tf:.2f} %'} | {_time_cell(r)}{ccells} "
                f"| {_fmt(r.get('step_mem'))} | {_fmt(r.get('total_mem'))} | {note} |"
            )
            if m.startswith("LieRA") and not dense and r.get("time") is not None:
                if r["time"] > TIME_LIMIT:
                    (stressed if res.get("stress") else fails).append(
                        f"{name}: {m} time {r['time']:.2f} > {TIME_LIMIT}"
                    )
                for k in ("step_mem", "total_mem"):
                    if r.get(k) is not None and r[k] > MEM_LIMIT:
                        fails.append(f"{name}: {m} {k} {r[k]:.2f} > {MEM_LIMIT}")
        pairs = []
        for m, r in rows.items():
            if m.startswith("LieRA") and m.endswith(" exact"):
                q = _map_ratio(r, rows.get(m[: -len("exact")] + "first order", {}))
                if q is not None:
                    pairs.append(f"{m[len('LieRA '):-len(' exact')]} {q:.3f}")
                    if q > MAP_LIMIT and (r.get("trainable_frac") or 0.0) < DENSE_FRAC:
                        (stressed if res.get("stress") else fails).append(
                            f"{name}: {m} / first order time {q:.3f} > {MAP_LIMIT}"
                        )
        lines += ["", "exact / first order (time): " + ", ".join(pairs), ""]
        if compile_cost:
            lines += [f"Compile excluded from the timings above; the compiling first step cost "
                      f"{min(compile_cost):.0f}–{max(compile_cost):.0f} eager full fine-tuning "
                      "steps per method.", ""]
    lines.append(
        f"Targets (LieRA rows): time ≤ {TIME_LIMIT}, step and total memory ≤ {MEM_LIMIT}, "
        f"exact / first order ≤ {MAP_LIMIT}: "
        + ("all met." if not fails else f"{len(fails)} missed:")
    )
    lines += [f"- {f}" for f in fails]
    if stressed:
        lines += ["", "Above the time target on stress inputs (weight-bound; not target cases):"]
        lines += [f"- {f}" for f in stressed]
    if compiled:
        lines += ["", f"Compiled (LieRA rows): compiled / eager ≤ {COMPILED_LIMIT:.2f}: "
                  + ("all met." if not cfails else f"{len(cfails)} above:")]
        lines += [f"- {f}" for f in cfails]
        if cfails and not meta.get("force_layout_opt") and not meta.get("channels_last"):
            lines += ["", "On a CPU conv net in NCHW, inductor's backward graph runs the "
                      "convolutions without its channels-last layout (pytorch/pytorch#189239): "
                      "rerun with --force-layout-opt or --channels-last (docs/performance.md, "
                      "\"Compiled runs\")."]
    return "\n".join(lines) + "\n"


def _time_cell(row: dict) -> str:
    """``median (min–max)`` over the rounds; the median alone for results without rounds."""
    t, rounds = row.get("time"), row.get("time_rounds")
    if t is None or not rounds or len(rounds) < 2:
        return _fmt(t)
    return f"{t:.2f} ({min(rounds):.2f}–{max(rounds):.2f})"


def _map_ratio(exact: dict, first: dict) -> float | None:
    """Exact over first order: the median of the per-round ratios when both rows have them
    (the two maps in the same round, without full fine-tuning's noise), else of the medians.

    >>> _map_ratio({"time": 1.1, "time_rounds": [1.1, 1.2, 1.0]},
    ...            {"time": 1.0, "time_rounds": [1.0, 1.2, 1.0]})
    1.0
    >>> _map_ratio({"time": 1.5}, {"time": 1.0})
    1.5
    """
    te, tf = exact.get("time"), first.get("time")
    if not te or not tf:
        return None
    re, rf = exact.get("time_rounds"), first.get("time_rounds")
    if re and rf and len(re) == len(rf):
        return float(statistics.median(a / b for a, b in zip(re, rf, strict=True)))
    return float(te / tf)


if __name__ == "__main__":
    sys.exit(main())
