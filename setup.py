"""Build of the optional compiled kernels ``liegroup.linalg._cexpm`` and ``liegroup.peft._cfused``.

Everything else about the package is in pyproject.toml.
Both extensions are optional: on a machine without a C compiler the install still
succeeds and liegroup uses its torch paths (``liegroup.linalg.compiled_kernel()`` and
``liegroup.peft.compiled_kernel()`` say which one is in use). No ``-march=native``: the kernels carry their own x86-64
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
        ),
        Extension(
            "liegroup.peft._cfused",
            sources=["liegroup/peft/_cfused.c", "liegroup/peft/_ctucker.c"],
            depends=["liegroup/peft/_ctucker.h"],
            extra_compile_args=(
                [*_ARGS, "-ffp-contract=fast", "-Werror=implicit-function-declaration"]
                if _ARGS
                else []
            ),
            optional=True,
        ),
    ]
)
