"""Build of the optional compiled kernel ``liegroup.linalg._cexpm``.

Everything else about the package is in pyproject.toml.
The extension is marked optional: on a machine without a C compiler the install still
succeeds and :mod:`liegroup.linalg` uses its torch path (``liegroup.linalg.compiled_kernel()``
says which one is in use). No ``-march=native``: the kernel carries its own x86-64
AVX-512/AVX2 clones, chosen at load time, and runs on any x86-64 or aarch64 CPU.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup

# -Wno-psabi: the explicit vector types never cross a call (all inlined), so the ABI note
# gcc prints for them in the baseline body does not apply.
_ARGS = (
    []
    if sys.platform == "win32"
    else ["-O3", "-g0", "-std=c11", "-fno-strict-aliasing", "-Wno-psabi"]
)

setup(
    ext_modules=[
        Extension(
            "liegroup.linalg._cexpm",
            sources=["liegroup/linalg/_cexpm.c"],
            include_dirs=["liegroup/linalg"],
            extra_compile_args=_ARGS,
            optional=True,
        )
    ]
)
