"""The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

``liegroup/linalg/_cexpm.c`` and ``liegroup/peft/_engine/_cfused.c`` are
built here as Python extensions with ``-fsanitize=address,undefined`` (no ISA clones, ``-O0``)
and driven, in a subprocess that preloads the ASan runtime, through their real entry points
with buffers from the C ``malloc`` (so every read or write past an operand's end hits a red
zone): every matrix size from 1 to ``N_MAX`` and beyond, empty and single-matrix batches,
overflowing, prescaled, triangular and non-finite inputs, the Fréchet derivative in all its
call forms; the fused Hadamard kernels at rank 1 and ``CF_RMAX``, one and two threads. Any
sanitizer report fails the test with its output.

Skipped (with the reason) where the compiler or its sanitizer runtimes are missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_FLAGS = [
    "-shared",
    "-fPIC",
    "-O0",
    "-g",
    "-std=c11",
    "-fno-strict-aliasing",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-Wno-psabi",
]


def _cc() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def _toolchain(tmp: str) -> tuple[str, str] | str:
    """``(compiler, path of the ASan runtime)``, or the reason there is none."""
    cc = _cc()
    if cc is None:
        return "no C compiler on PATH"
    src = Path(tmp) / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = Path(tmp) / "probe"
    r = subprocess.run(
        [cc, "-fsanitize=address,undefined", str(src), "-o", str(exe)],
        capture_output=True, text=True, check=False,
    )
    if r.returncode != 0:
        return f"{cc} cannot build with -fsanitize=address,undefined: {r.stderr.strip()[:300]}"
    if subprocess.run([str(exe)], capture_output=True, check=False).returncode != 0:
        return "a sanitized probe program does not run here"
    lib = subprocess.run(
        [cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not lib or not os.path.isabs(lib) or not os.path.exists(lib):
        return f"{cc} does not name a shared ASan runtime to preload (got {lib!r})"
    return cc, os.path.realpath(lib)


def _build(cc: str, out: Path, sources: list[str], extra: list[str]) -> None:
    inc = sysconfig.get_paths()["include"]
    cmd = [cc, *_FLAGS, *extra, f"-I{inc}", *sources, "-o", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"sanitized build failed:\n{' '.join(cmd)}\n{r.stderr}"


_DRIVER = textwrap.dedent(
    r"""
    import ctypes, importlib.machinery, importlib.util, random, struct, sys

    def load(name, path):
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_loader(name, loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    live = []

    def buf(count, size, values=None):
        # exactly count elements from the C heap (red zones right after the end)
        p = libc.malloc(max(count * size, 1))
        live.append(p)
        if values is not None:
            fmt = "d" if size == 8 else "f"
            ctypes.memmove(p, struct.pack(f"{count}{fmt}", *values), count * size)
        return p

    rng = random.Random(0)

    def mats(kind, B, n):
        v = []
        for b in range(B):
            for i in range(n):
                for j in range(n):
                    if kind == "rand":
                        x = rng.gauss(0, 1) * 10 ** rng.uniform(-3, 1.5)
                    elif kind == "tri":
                        x = rng.gauss(0, 2) if j >= i else 0.0
                    elif kind == "overflow":
                        x = 800.0 if i == j == 0 else 0.0
                    elif kind == "huge":
                        x = rng.gauss(0, 1) * 1e35
                    elif kind == "skew":
                        x = 0.0
                    elif kind == "nan":
                        x = float("nan") if (b, i, j) == (B - 1, n - 1, 0) else 1.0
                    else:
                        x = 0.0
                    v.append(x)
        if kind == "skew":
            for b in range(B):
                for i in range(n):
                    for j in range(i):
                        t = rng.gauss(0, 1) * 1e6
                        v[b * n * n + i * n + j] = t
                        v[b * n * n + j * n + i] = -t
        return v

    cx = load("_cexpm", sys.argv[1])
    nmax = cx.N_MAX
    sizes = sorted({1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 63, nmax})
    for dt, size in ((1, 8), (0, 4)):
        for n in sizes:
            for B in (0, 1, 3):
                for kind in ("rand", "tri", "overflow", "huge", "skew", "nan", "zero"):
                    if kind in ("huge", "skew", "nan", "overflow") and B == 0:
                        continue
                    nn = n * n
                    vals = mats(kind, B, n)
                    if size == 4:
                        vals = [max(min(x, 3e38), -3e38) for x in vals]
                    A = buf(B * nn, size, vals)
                    X = buf(B * nn, size)
                    ms = buf(2 * B, 4)
                    bad = cx.expm(A, X, ms, B, n, dt)
                    assert bad == -1 or 0 <= bad < B, bad
                    bad2 = cx.expm(A, X, 0, B, n, dt)
                    assert bad2 == bad, (bad, bad2)
                    E = buf(B * nn, size, [rng.gauss(0, 1) for _ in range(B * nn)])
                    L = buf(B * nn, size)
                    X2 = buf(B * nn, size)
                    ms2 = buf(2 * B, 4)
                    cx.frechet(A, E, X2, L, ms2, B, n, dt, 0)
                    cx.frechet(A, E, 0, L, 0, B, n, dt, 0)
                    if bad == -1:
                        cx.frechet(A, E, 0, L, ms, B, n, dt, 1)
                        cx.frechet(A, E, 0, L, ms, B, n, dt, 3)
        for n, B in ((0, 1), (nmax + 1, 1), (2, -1)):
            try:
                cx.expm(buf(4, size), buf(4, size), 0, B, n, dt)
            except ValueError:
                pass
            else:
                raise AssertionError(f"_cexpm.expm took n={n}, B={B}")

    if len(sys.argv) > 2:
        cf = load("_cfused", sys.argv[2])
        for rows, cols, r in ((1, 1, 1), (3, 5, 2), (17, 33, 8), (64, 40, 256), (5, 2049, 9)):
            for nt in (1, 2):
                W = buf(rows * cols, 4, [rng.uniform(-1, 1) for _ in range(rows * cols)])
                Lp = buf(rows * r, 4, [rng.uniform(-0.1, 0.1) for _ in range(rows * r)])
                Rp = buf(r * cols, 4, [rng.uniform(-0.1, 0.1) for _ in range(r * cols)])
                O = buf(rows * cols, 4)
                for mode in (0, 1):
                    cf.form(mode, rows, cols, r, W, Lp, Rp, O, nt)
                G = buf(rows * cols, 4, [rng.uniform(-1, 1) for _ in range(rows * cols)])
                gl, gr = buf(rows * r, 4), buf(r * cols, 4)
                for mode in (0, 1, 2):
                    cf.grads(mode, rows, cols, r, G, W, Lp, Rp, gl, gr, nt)
    for p in live:
        libc.free(p)
    print("DRIVER-OK")
    """
)


@pytest.mark.slow
def test_c_kernels_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path,
) -> None:
    if sys.platform == "win32":
        pytest.skip("the sanitizer build uses a Unix compiler driver")
    tc = _toolchain(str(tmp_path))
    if isinstance(tc, str):
        pytest.skip(tc)
    cc, asan = tc
    cexpm = tmp_path / "_cexpm_san.so"
    _build(cc, cexpm, ["liegroup/linalg/_cexpm.c"], ["-DCEXPM_NO_ISA", "-Iliegroup/linalg"])
    args = [str(cexpm)]
    fused_src = ROOT / "liegroup/peft/_engine/_cfused.c"
    if fused_src.exists():
        cfused = tmp_path / "_cfused_san.so"
        _build(
            cc,
            cfused,
            ["liegroup/peft/_engine/_cfused.c"],
            ["-pthread"],
        )
        args.append(str(cfused))
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {
        **os.environ,
        "LD_PRELOAD": asan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87",
        "PYTHONMALLOC": "malloc",
    }
    r = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(driver), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    report = r.stdout[-4000:] + "\n" + r.stderr[-8000:]
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, report
    assert r.returncode == 0 and "DRIVER-OK" in r.stdout, report
