"""Accuracy and speed of liegroup.linalg.expm/logm against scipy and torch.linalg.matrix_exp.

Run from the repository root::

    .venv/bin/python -m benchmarks.linalg            # full run (~2 min on 1 thread)
    .venv/bin/python -m benchmarks.linalg --quick    # smaller sizes, for a smoke test (~15 s)

Run timing measurements one at a time on a shared machine, e.g. under
``flock /tmp/liegroup-bench.lock``, on an otherwise idle machine.

Everything is measured in one process with ``torch.set_num_threads(1)``; the methods being
compared are timed in interleaved rounds and the medians are compared, so only RATIOS are
printed (absolute times depend on the machine and its load). The tables are also written
into ``docs/linalg.md`` between the ``BENCHMARK`` markers (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

from liegroup.linalg import compiled_kernel, expm, logm
from tests.linalg_cases import HARD, expm_kappa, expm_ref, logm_ref, rel_err

EXPM = importlib.import_module("liegroup.linalg._expm_ops")
DOC = Path(__file__).resolve().parent.parent / "docs" / "linalg.md"
BEGIN = "<!-- BENCHMARK:BEGIN (written by python -m benchmarks.linalg) -->"
END = "<!-- BENCHMARK:END -->"

ACC_CASES = [
    "moler_vanloan_2x2",
    "ward_3",
    "burkardt_8",
    "pascal_lower_6",
    "overscale_b1e6",
    "overscale_b1e8_full",
    "se3_large_translation",
    "so3_near_pi",
    "tiny_norm_generic",
]


def _time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    One sample repeats a function for >= ~20 ms (single small matrices take ~0.1 ms, and a
    shared machine's scheduler noise is of the order of milliseconds). When every call is
    cheap (< 50 ms), ``2 * rounds + 1`` rounds are taken instead of ``rounds``: medians of
    few samples were the main source of impossible ratios in earlier tables.
    """
    reps = {}
    slowest = 0.0
    for k, f in fns.items():  # warm up and calibrate
        f()
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7)
        slowest = max(slowest, dt)
        reps[k] = max(1, min(2000, int(0.02 / dt)))
    if slowest < 0.05:
        rounds = 2 * rounds + 1
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                f()
            samples[k].append((time.perf_counter() - t0) / reps[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def _torch_path(f: Callable[[], object]) -> Callable[[], object]:
    """``f`` run with the compiled kernel switched off (liegroup's torch path)."""

    def g() -> object:
        old = EXPM._USE_KERNEL
        EXPM._USE_KERNEL = False
        try:
            return f()
        finally:
            EXPM._USE_KERNEL = old

    return g


def _torch_batched(A: torch.Tensor) -> torch.Tensor:
    # torch uses a different (degree-18) path for batches than for a single small matrix
    return torch.linalg.matrix_exp(A[None].expand(2, *A.shape).contiguous())[0]


def accuracy_table() -> list[str]:
    u = 2.0**-53
    lines = [
        "| matrix | κ·u | ours f64 | scipy.linalg.expm | scipy.sparse expm | torch single "
        "| torch batched | ours f32 | torch f32 | f32 bound 10·max(κu,4u) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ACC_CASES:
        A = HARD[name]
        ref = expm_ref(A)
        At = torch.tensor(A)
        kappa = expm_kappa(A)
        e_ours = rel_err(expm(At).numpy(), ref)
        e_sl = rel_err(scipy.linalg.expm(A), ref)
        e_sp = rel_err(scipy.sparse.linalg.expm(A), ref)
        e_ts = rel_err(torch.linalg.matrix_exp(At).numpy(), ref)
        e_tb = rel_err(_torch_batched(At).numpy(), ref)
        A32 = At.float()
        ref32 = expm_ref(A32.double().numpy())
        e_o32 = rel_err(expm(A32).double().numpy(), ref32)
        e_t32 = rel_err(torch.linalg.matrix_exp(A32).double().numpy(), ref32)
        u32 = 2.0**-24
        b32 = 10 * max(expm_kappa(A32.double().numpy()) * u32, 4 * u32)
        lines.append(
            f"| {name} | {kappa * u:.1e} | {e_ours:.1e} | {e_sl:.1e} | {e_sp:.1e} | {e_ts:.1e} "
            f"| {e_tb:.1e} | {e_o32:.1e} | {e_t32:.1e} | {b32:.1e} |"
        )
    return lines


def logm_accuracy_table() -> list[str]:
    rng = np.random.default_rng(0)
    cases = {
        "I + 1e-8·G": np.eye(3) + 1e-8 * rng.standard_normal((3, 3)),
        "rotation by π − 1e-6": scipy.linalg.expm(HARD["so3_near_pi"]),
        "exp(se3, large t)": scipy.linalg.expm(HARD["se3_large_translation"]),
        "Pascal(5)": scipy.linalg.pascal(5).astype(float),
        "[[1, 1e3], [0, 2]]": np.array([[1.0, 1e3], [0.0, 2.0]]),
    }
    lines = ["| matrix | ours f64 | scipy.linalg.logm |", "|---|---|---|"]
    for name, A in cases.items():
        # mpmath.logm is itself inaccurate next to the branch cut: there the exact generator
        # is the reference (the rounding of expm(X) perturbs it by only ~u/δ)
        ref = HARD["so3_near_pi"] if name.startswith("rotation") else logm_ref(A)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e_sp = rel_err(np.real(scipy.linalg.logm(A)), ref)
        lines.append(f"| {name} | {rel_err(logm(torch.tensor(A)).numpy(), ref):.1e} | {e_sp:.1e} |")
    return lines


def _rand_batch(n: int, b: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, n, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(n)).to(dtype)


def speed_table(sizes: list[tuple[int, int]], rounds: int) -> list[str]:
    lines = [
        "| dtype | n | batch | expm: scipy / ours | expm: ours / torch "
        "| expm: ours without kernel / torch | backward/forward: ours "
        "| backward/forward: ours without kernel | backward/forward: torch | logm: scipy / ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.float64, torch.float32):
        for n, b in sizes:
            A = _rand_batch(n, b, dtype, seed=n * 7 + b)
            An = A.double().numpy()  # scipy is run in float64 (its float32 path is slow)
            Ag = A.clone().requires_grad_()
            G = torch.randn_like(A)
            out_o = expm(Ag)
            out_p = _torch_path(lambda Ag=Ag: expm(Ag))()
            out_t = torch.linalg.matrix_exp(Ag)
            # scipy's logm is slow: time it on at most k matrices and scale to the batch
            k = min(b, 20)
            Lg = expm(A)
            Lgn = Lg.double().numpy()[:k]

            def scipy_logm(Lgn: np.ndarray = Lgn) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for a in Lgn:
                        scipy.linalg.logm(a)

            fns: dict[str, Callable[[], object]] = {
                "ours": lambda A=A: expm(A),
                "torch": lambda A=A: torch.linalg.matrix_exp(A),
                "path": _torch_path(lambda A=A: expm(A)),
                "scipy": lambda An=An: [scipy.linalg.expm(a) for a in An],
                "ours_bwd": lambda o=out_o, Ag=Ag, G=G: torch.autograd.grad(
                    o, Ag, G, retain_graph=True
                ),
                "path_bwd": lambda o=out_p, Ag=Ag, G=G: torch.autograd.grad(
                    o, Ag, G, retain_graph=True
                ),
                "torch_bwd": lambda o=out_t, Ag=Ag, G=G: torch.autograd.grad(
                    o, Ag, G, retain_graph=True
                ),
                "ours_logm": lambda Lg=Lg: logm(Lg),
                "scipy_logm": scipy_logm,
            }
            t = _time_interleaved(fns, rounds)
            t_scipy_logm = t["scipy_logm"] * b / k
            lines.append(
                f"| {str(dtype).replace('torch.', '')} | {n} | {b} "
                f"| {t['scipy'] / t['ours']:.2f} | {t['ours'] / t['torch']:.2f} "
                f"| {t['path'] / t['torch']:.2f} "
                f"| {t['ours_bwd'] / t['ours']:.2f} | {t['path_bwd'] / t['path']:.2f} "
                f"| {t['torch_bwd'] / t['torch']:.2f} "
                f"| {t_scipy_logm / t['ours_logm']:.1f} |"
            )
            print(lines[-1], flush=True)
    return lines


def _write_doc(block: str) -> None:
    if not DOC.exists():
        print(f"(not writing: {DOC} missing)")
        return
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"(not writing: markers missing in {DOC})")
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + BEGIN + "\n" + block + "\n" + END + tail)
    print(f"tables written to {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/linalg.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.quick:
        sizes = [(3, 1), (3, 100), (16, 100)]
        rounds = 3
    else:
        # n = 256 uses batch 10 instead of 1000 (1000 would need ~0.5 GB per tensor and
        # minutes of scipy time)
        sizes = [(3, 1), (3, 1000), (16, 1), (16, 1000), (64, 1), (64, 1000), (256, 1), (256, 10)]
        rounds = 3
    out = [
        f"torch {torch.__version__}, scipy {scipy.__version__}, numpy {np.__version__}, "
        "1 thread; compiled kernel: "
        f"{EXPM._ckernel.isa() if compiled_kernel() else 'not built'} (up to n = "
        f"{EXPM._KERNEL_N_MAX}; 'ours without kernel' is the torch path, timed in the same "
        "rounds); medians of interleaved rounds; "
        "ratios > 1 in 'scipy / ours' mean we are faster; "
        "'ours / torch' < 1 means we are faster than torch.linalg.matrix_exp.",
        "",
        "**expm accuracy** (relative Frobenius error vs mpmath at 50 digits):",
        "",
    ]
    out += accuracy_table()
    out += ["", "**logm accuracy** (relative Frobenius error vs mpmath.logm at 50 digits):", ""]
    out += logm_accuracy_table()
    print("\n".join(out), flush=True)
    out += [
        "",
        "**speed** (random Gaussian matrices with entries of standard deviation 1.5/√n; "
        "scipy loops over the batch; scipy's logm is timed on ≤ 20 matrices and scaled to "
        "the batch; logm inputs are expm of those matrices):",
        "",
    ]
    print("\n".join(out[-3:]), flush=True)
    out += speed_table(sizes, rounds)
    out += ["", f"(benchmark wall time {time.perf_counter() - t0:.0f} s)"]
    print(out[-1])
    if not args.no_write and not args.quick:
        _write_doc("\n".join(out))


if __name__ == "__main__":
    main()
