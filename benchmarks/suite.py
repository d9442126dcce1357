"""The CPU benchmark suite: one training step of every method against full fine-tuning.

A *step* is ``zero_grad`` → forward → loss → backward → ``SGD.step`` (no momentum, so full
fine-tuning keeps no optimizer state: the comparison least favourable to adapters). For each
case (a single layer or a whole network) every method is built from the same seed; timings run
in one process with the methods interleaved round by round in a rotating order, each round's
figure being the fastest of ``steps`` steps (other processes only ever add time); a method's
time ratio is the median over rounds of its time divided by full fine-tuning's *in the same
round*. Peak memory runs in a fresh subprocess per case, one method after another, counting the
bytes glibc's malloc has handed out and not taken back (``mallinfo2``), sampled after every ATen op
of the step by a ``TorchDispatchMode`` (timings never run under that mode). (Peak RSS via
``/proc/self/clear_refs`` proved unreliable on this kernel: some processes never saw the
high-water mark move.)

* ``step mem`` — the peak increase of a step over the state right after ``zero_grad`` (all
  parameters, optimizer state and the input exist; no gradient does): what the step itself
  needs — activations, ``∂L/∂W`` for full fine-tuning, ``W'`` and ``∂L/∂W'`` for an adapter.
* ``total mem`` — the step's peak over the process before the method was built: parameters
  (frozen ones too), adapters, optimizer state and the step.

Both are printed as ratios to full fine-tuning, never as bare numbers.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import peers
from benchmarks._timing import raise_recompile_limit
from benchmarks.models import convnext_tiny_like, llama_like, resnet50_like
from liegroup.peft import LieRAConfig, available_generators, get_peft_model
from liegroup.peft.registry import get_generator

RANK = 8
FULL = "full fine-tuning"
HEAD = "head only"


@dataclass
class Case:
    name: str
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    targets: list[str] = field(default_factory=list)  # modules the adapters adapt
    head: list[str] = field(default_factory=list)  # trained in full by every adapter method
    is_model: bool = False
    stress: bool = False  # reported, but its step time is not held to the target (see below)


def _layer_case(
    name: str, label: str, make: Callable[[], nn.Module], shape: tuple[int, ...],
    stress: bool = False,
) -> Case:
    return Case(name, label, lambda: nn.Sequential(OrderedDict(layer=make())), shape, ["layer"],
                stress=stress)


def _model_targets(model: nn.Module, head: str) -> list[str]:
    return [
        n for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n != head
    ]


# The networks run at three input configurations. Batch 8 at 128² and at 224² (the nets'
# ImageNet resolution) are fine-tuning inputs: a step's cost is the convolutions, and the
# adapter's step time is held to the target there. Batch 2 at 64² keeps a CPU run short
# (``--quick`` runs only it) and is a *stress* input: the deep layers' weights are 100× their
# activations (ResNet-50 layer4: 2.4 M weights against 2×512×2×2 activations), so a step is
# mostly passes over the weights, of which any Hadamard adapter needs a few more than full
# fine-tuning's SGD update; it is reported, with its memory held to the target, but its time is
# not a target case (docs/performance.md shows how the ratio falls with the input size).
MODEL_CONFIGS: tuple[tuple[str, int, int, bool], ...] = (
    ("", 2, 64, True), ("_b8", 8, 128, False), ("_224", 8, 224, False),
)


def cases(quick: bool, layer_batch: int | None = None) -> list[Case]:
    """The benchmark layers and networks (smaller inputs with ``quick``).

    Layers run at batch ``layer_batch`` (default 16, the batch of the issue's targets —
    ``Linear(1024,1024)`` on ``(16,128,1024)``, ``Conv2d(64,64,3)`` on ``(16,64,32,32)``; 2 with
    ``quick``; Conv3d at half of it). Networks run at :data:`MODEL_CONFIGS` (``quick``: only
    the small one).
    """
    b = layer_batch or (2 if quick else 16)
    b3 = max(1, b // 2)
    # layers below the target's batch 16 (--quick, --layer-batch 4): reported as stress inputs
    small = b < 16
    tag = f" — batch {b} < 16, time not a target" if small else ""
    out = [
        _layer_case("linear", f"Linear(1024,1024), x ({b},128,1024)" + tag,
                    lambda: nn.Linear(1024, 1024), (b, 128, 1024), small),
        _layer_case("conv1d", f"Conv1d(256,256,3,p=1), x ({b},256,256)" + tag,
                    lambda: nn.Conv1d(256, 256, 3, padding=1), (b, 256, 256), small),
        _layer_case("conv2d", f"Conv2d(64,64,3,p=1), x ({b},64,32,32)" + tag,
                    lambda: nn.Conv2d(64, 64, 3, padding=1), (b, 64, 32, 32), small),
        _layer_case("conv3d", f"Conv3d(32,32,3,p=1), x ({b3},32,12,12,12)" + tag,
                    lambda: nn.Conv3d(32, 32, 3, padding=1), (b3, 32, 12, 12, 12), small),
        _layer_case("depthwise", f"Conv2d(256,256,7,p=3,groups=256), x ({b},256,28,28)" + tag,
                    lambda: nn.Conv2d(256, 256, 7, padding=3, groups=256), (b, 256, 28, 28), small),
        _layer_case("dilated", f"Conv2d(64,64,3,p=2,dilation=2), x ({b},64,32,32)" + tag,
                    lambda: nn.Conv2d(64, 64, 3, padding=2, dilation=2), (b, 64, 32, 32), small),
    ]
    for suffix, mb, img, stress in MODEL_CONFIGS[:1] if quick else MODEL_CONFIGS:
        for name, make, head in (
            ("resnet50", resnet50_like, "fc"), ("convnext_t", convnext_tiny_like, "head")
        ):
            tgt = _model_targets(make(), head)
            label = {"resnet50": "ResNet-50-like", "convnext_t": "ConvNeXt-T-like"}[name]
            tag = " — stress input, time not a target" if stress else ""
            out.append(Case(
                name + suffix,
                f"{label} ({len(tgt)} adapted layers), x ({mb},3,{img},{img}){tag}",
                make, (mb, 3, img, img), tgt, [head], True, stress,
            ))
    # a decoder LLM: every adapted weight a Linear (q/k/v/o, gate/up/down of two Llama-style
    # blocks), on embeddings with ∂L/∂x needed as inside a deeper stack; the HF peft LoRA and
    # HiRA rows of this case are the ones a Llama user compares with
    llama_tgt = [n for n, m in llama_like().named_modules() if isinstance(m, nn.Linear)]
    lb, seq = (1, 32) if quick else (4, 128)
    out.append(Case(
        "llama", f"Llama-like, 2 blocks 512/1408 ({len(llama_tgt)} adapted Linear), "
        f"x ({lb},{seq},512)" + (" — stress input, time not a target" if quick else ""),
        llama_like, (lb, seq, 512), llama_tgt, stress=quick,
    ))
    return out


def liera_methods() -> dict[str, dict[str, Any]]:
    """Our rows: every registered generator in its groups, and additive LoRA.

    A generator of weight-shaped algebra elements runs in the Hadamard group with both maps
    (rows ``LieRA <gen> exact`` / ``first order``); a mode-wise generator (one matrix per mode)
    runs in the mode-wise groups SO and GL (rows ``LieRA <gen> so`` / ``gl``).
    """
    out: dict[str, dict[str, Any]] = {}
    for gen in available_generators():
        if get_generator(gen).algebra_kind == "modes":
            for group in ("so", "gl"):
                out[f"LieRA {gen} {group}"] = {"generator": gen, "update": group}
            continue
        for exp_map, tag in (("exact", "exact"), ("first_order", "first order")):
            out[f"LieRA {gen} {tag}"] = {"generator": gen, "exp_map": exp_map}
    out["LoRA W+ΔW (ours)"] = {"generator": "lora", "update": "additive"}
    return out


_METHOD_FILTER: re.Pattern[str] | None = None


def set_method_filter(pattern: str | None) -> None:
    """Keep only the methods whose name matches ``pattern`` (full fine-tuning always stays)."""
    global _METHOD_FILTER
    _METHOD_FILTER = re.compile(pattern) if pattern else None


_AUTOCAST: torch.dtype | None = None
_OPTIMIZER = "sgd"
OPTIMIZERS = {"sgd": "SGD (no momentum)", "adamw": "AdamW"}


def set_optimizer(name: str) -> None:
    """``"sgd"`` (no momentum: no optimizer state, the comparison least favourable to adapters)
    or ``"adamw"`` (what fine-tuning usually runs: two state tensors per trained entry)."""
    global _OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    _OPTIMIZER = name


_CHANNELS_LAST = False


def set_channels_last(on: bool) -> None:
    """Run the networks (model cases: module and input) in ``torch.channels_last``."""
    global _CHANNELS_LAST
    _CHANNELS_LAST = on


def set_autocast(dtype: torch.dtype | None) -> None:
    """Run every method's forward and loss under ``torch.autocast("cpu", dtype)`` (or not)."""
    global _AUTOCAST
    _AUTOCAST = dtype


def method_names(case: Case) -> list[str]:
    names = [FULL] + ([HEAD] if case.is_model else [])
    names += list(liera_methods()) + list(peers.available())
    flt = _METHOD_FILTER
    return [m for m in names if m == FULL or flt is None or flt.search(m)]


def build(case: Case, method: str) -> nn.Module:
    """The case's module set up for ``method`` (seeded: every method starts from one net)."""
    torch.manual_seed(0)
    model = case.build()
    if method == FULL:
        return model
    if method == HEAD:
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(h + ".") for h in case.head))
        return model
    ours = liera_methods()
    if method in ours:
        exact = "|".join(re.escape(n) for n in case.targets)  # full names, not suffixes
        cfg = LieRAConfig(rank=RANK, alpha=float(RANK), target_modules=f"(?:{exact})",
                          modules_to_save=case.head or None, **ours[method])
        return get_peft_model(model, cfg)
    return peers.available()[method](model, case.targets, case.head)


class Stepper:
    """One training step (zero_grad, forward, loss, backward, SGD step) of a built method.

    ``compiled``: the step calls ``torch.compile(module, fullgraph=True, dynamic=False)``
    (inductor; the optimizer step stays eager) — the first step compiles.
    """

    def __init__(self, case: Case, module: nn.Module, compiled: bool = False) -> None:
        torch.manual_seed(1)
        self.x = torch.randn(case.input_shape)
        self.is_model = case.is_model
        if _CHANNELS_LAST and case.is_model:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.module = module
        if case.is_model:
            self.labels = torch.randint(0, 10, (case.input_shape[0],))
        else:
            self.x.requires_grad_(True)  # a layer inside a network: ∂L/∂x is needed
            with torch.no_grad():
                out = module(self.x)
            # ∂L/∂y of unit norm, the scale of a mean-reduced loss: an unscaled random ∂L/∂y
            # is a linear loss whose SGD steps grow without bound over a timing run (mode-wise
            # GL's exp overflowed within it)
            self.gy = torch.randn_like(out) / out.numel() ** 0.5
        if compiled:
            self.module = torch.compile(module, fullgraph=True, dynamic=False)
        params = [p for p in module.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=1e-4) if _OPTIMIZER == "sgd"
            else torch.optim.AdamW(params, lr=1e-4, foreach=True)
        )

    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None

    def run(self) -> None:
        with torch.autocast("cpu", dtype=_AUTOCAST or torch.bfloat16, enabled=bool(_AUTOCAST)):
            out = self.module(self.x)
            loss = F.cross_entropy(out, self.labels) if self.is_model else None
        if loss is not None:
            loss.backward()
        else:
            out.backward(self.gy.to(out.dtype))
        del out
        self.opt.step()

    def step(self) -> None:
        self.zero()
        self.run()


def bench_time(
    case: Case, rounds: int, steps: int
) -> tuple[dict[str, float], dict[str, str], dict[str, int], dict[str, list[float]]]:
    """Median over rounds of each method's step time over full fine-tuning's (same round).

    Also returns the per-round ratios (the spread the median hides: other tenants of the
    machine move a round's figure by several percent), and the refusals and trainable counts.
    """
    ratios, notes, ntrain, per_round, _ = _bench(case, rounds, steps, compiled=False)
    return ratios, notes, ntrain, per_round


def bench_time_compiled(
    case: Case, rounds: int, steps: int
) -> tuple[dict[str, float], dict[str, str], dict[str, int], dict[str, list[float]],
           dict[str, dict[str, Any]]]:
    """:func:`bench_time`, with every method also timed compiled, in the same rounds.

    Each method runs twice, interleaved with all others: eagerly, and through
    ``torch.compile(module, fullgraph=True)`` (the same module and parameters, an optimizer of
    its own). The fifth result holds, per method, ``time_rounds`` (compiled over compiled full
    fine-tuning, per round), ``vs_eager_rounds`` (compiled over eager, same method, per round),
    ``compile_steps`` (the compiling first step over an eager full fine-tuning step) — or
    ``note`` when the compiler refused it. Compile time is excluded from the timings.
    """
    return _bench(case, rounds, steps, compiled=True)


def _bench(
    case: Case, rounds: int, steps: int, compiled: bool
) -> tuple[dict[str, float], dict[str, str], dict[str, int], dict[str, list[float]],
           dict[str, dict[str, Any]]]:
    runs: dict[tuple[str, bool], Stepper] = {}
    notes: dict[str, str] = {}
    cnotes: dict[str, str] = {}
    first_step: dict[str, float] = {}
    if compiled:
        raise_recompile_limit()
        torch._dynamo.reset()
    for m in method_names(case):
        try:
            module = build(case, m)
            runs[(m, False)] = Stepper(case, module)
            runs[(m, False)].step()
            runs[(m, False)].step()
        except Exception as e:  # a library refusing the case is a result, reported
            notes[m] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
            continue
        if not compiled:
            continue
        try:
            s = Stepper(case, module, compiled=True)
            t0 = time.perf_counter()
            s.step()  # compiles the forward and the backward
            first_step[m] = time.perf_counter() - t0
            s.step()
            runs[(m, True)] = s
        except Exception as e:  # e.g. a graph break under fullgraph=True
            msg = str(e).strip().splitlines()[0][:90] if str(e).strip() else ""
            cnotes[m] = f"compiled: refused: {type(e).__name__}: {msg}"
    keys = list(runs)
    t: dict[tuple[str, bool], list[float]] = {k: [] for k in keys}
    failed: set[tuple[str, bool]] = set()
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            if k in failed:
                continue
            best = float("inf")
            try:
                for _ in range(steps):
                    runs[k].zero()
                    t0 = time.perf_counter()
                    runs[k].run()
                    best = min(best, time.perf_counter() - t0)
            except Exception as e:  # e.g. a peer that changes shapes mid-training
                msg = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
                if k[1]:
                    cnotes[k[0]] = "compiled: " + msg
                else:
                    notes[k[0]] = msg
                failed.add(k)
                continue
            t[k].append(best)
    names = [m for m, c in keys if not c and (m, c) not in failed]
    base = t[(FULL, False)]
    per_round = {m: [a / b for a, b in zip(t[(m, False)], base, strict=True)] for m in names}
    ratios = {m: statistics.median(v) for m, v in per_round.items()}
    ntrain = {m: runs[(m, False)].n_trainable for m in names}
    crows: dict[str, dict[str, Any]] = {}
    if compiled:
        cbase = t.get((FULL, True)) if (FULL, True) not in failed else None
        step_full = statistics.median(base)
        for m in method_names(case):
            if m in notes:
                continue
            if m in cnotes or cbase is None:
                crows[m] = {"note": cnotes.get(m, "compiled: full fine-tuning did not compile")}
                continue
            tc = t[(m, True)]
            row: dict[str, Any] = {
                "time_rounds": [a / b for a, b in zip(tc, cbase, strict=True)],
                "vs_eager_rounds": [a / b for a, b in zip(tc, t[(m, False)], strict=True)],
                "compile_steps": first_step[m] / step_full,
            }
            row["time"] = statistics.median(row["time_rounds"])
            row["vs_eager"] = statistics.median(row["vs_eager_rounds"])
            crows[m] = row
    return ratios, notes, ntrain, per_round, crows


# ---------------------------------------------------------------- memory (subprocess)
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_bytes() -> int:
    """Bytes handed out by malloc and not freed (all arenas + mmapped chunks; glibc)."""
    mi = _libc.mallinfo2()
    return int(mi.uordblks + mi.hblkhd)


class PeakLive(TorchDispatchMode):
    """Samples :func:`live_bytes` after every ATen op (forward, backward and optimizer).

    Live memory only grows inside an op (its outputs) and falls between ops (references
    dropped), so the maximum over op boundaries is the peak of live tensors; scratch buffers
    an op frees before it returns are not seen (the same kernels run for every method).
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak = live_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, live_bytes())
        return out


def memory_in_this_process(case: Case, methods: list[str]) -> dict[str, list[float] | None]:
    """Per method ``[step bytes, total bytes]`` of live malloc'd memory (``None``: refused).

    Two passes over the methods, the second one reported: the first absorbs one-time
    allocations (thread pools, kernel caches) that would otherwise land on whichever method
    happens to run first.
    """
    out: dict[str, list[float] | None] = {}
    for m in methods + methods:
        gc.collect()
        base = live_bytes()
        try:
            s = Stepper(case, build(case, m))
            s.step()
        except Exception:
            out[m] = None
            continue
        step_b, total_b = [], []
        for _ in range(2):
            s.zero()
            gc.collect()
            before = live_bytes()
            with PeakLive() as mode:
                s.run()
            step_b.append(mode.peak - before)
            total_b.append(mode.peak - base)
        out[m] = [float(min(step_b)), float(min(total_b))]
        del s
    return out


def bench_memory(case_name: str, quick: bool, threads: int,
                 extra: list[str] | None = None) -> dict[str, list[float] | None]:
    cmd = [sys.executable, "-m", "benchmarks", "--memory-case", case_name,
           "--threads", str(threads)] + (["--quick"] if quick else []) + (extra or [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result: dict[str, list[float] | None] = json.loads(res.stdout.strip().splitlines()[-1])
    return result
