"""Build of the optional compiled kernels (``linalg._cexpm``, ``peft._engine._cfused``).

Everything else about the package is in pyproject.toml. Both extensions are optional: on a
machine without a C compiler the install still succeeds and liegroup runs the torch
implementation of every operator (``liegroup.linalg.compiled_kernel()`` and
``liegroup.peft.compiled_kernel()`` say which one is in use). A failed build is reported
loudly here, and once at import by a ``KernelUnavailableWarning``. No ``-march=native``: the
kernels carry their own x86-64 AVX-512/AVX2 clones, chosen at load time, and run on any
x86-64 or aarch64 CPU.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -Wno-psabi: the explicit vector types never cross a call (all inlined), so the ABI note
# gcc prints for them in the baseline body does not apply.
_ARGS = (
    []
    if sys.platform == "win32"
    else ["-O3", "-g0", "-std=c11", "-fno-strict-aliasing", "-Wno-psabi"]
)

_BANNER = "=" * 78


class _LoudBuildExt(build_ext):
    """``build_ext`` that keeps going past a failed optional extension, and says so loudly."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # any compiler failure: report it, install on
            msg = (
                f"\n{_BANNER}\nWARNING: liegroup's compiled kernel {ext.name} FAILED TO BUILD:\n"
                f"  {e}\nliegroup installs without it and runs its torch implementation "
                "(same results, slower on CPU).\nInstall a C compiler and the Python headers, "
                f"then reinstall to get it.\n{_BANNER}\n"
            )
            sys.stderr.write(msg)
            self.warn(msg)


setup(
    cmdclass={"build_ext": _LoudBuildExt},
    ext_modules=[
        Extension(
            "liegroup.linalg._cexpm",
            sources=["liegroup/linalg/_cexpm.c"],
            include_dirs=["liegroup/linalg"],
            extra_compile_args=_ARGS,
            optional=True,
        ),
        Extension(
            "liegroup.peft._engine._cfused",
            sources=["liegroup/peft/_engine/_cfused.c"],
            extra_compile_args=(
                [*_ARGS, "-ffp-contract=fast", "-Werror=implicit-function-declaration"]
                if _ARGS
                else []
            ),
            optional=True,
        ),
    ],
)
