"""Loading of the optional compiled kernels, and the switch that turns them off.

liegroup ships two C extensions (``liegroup.linalg._cexpm`` and ``liegroup.peft._cfused``),
built by ``pip install`` where a C compiler is available. Each is used only through
``torch.library`` custom operators whose default implementation is written in torch ops, so
an install without them computes the same results on every path, more slowly.

* ``LIEGROUP_DISABLE_KERNELS=1`` (or ``true``/``yes``/``on``) in the environment, read once
  at import, makes every operator take its torch implementation and both
  ``compiled_kernel()`` functions report ``False``.
* An extension that failed to build or load (and was not disabled) is reported once, at
  import, by a :class:`KernelUnavailableWarning` naming the module and the import error.
* ``LIEGROUP_KERNEL_ISA=baseline|avx2|avx512`` (x86-64) makes the kernels run that
  instruction-set body instead of the best one the CPU has — to reproduce, on one machine,
  what a CPU without AVX-512 (or without AVX2) computes. Together with PyTorch's own
  ``ATEN_CPU_CAPABILITY=default|avx2`` it runs the whole suite as such a CPU would. A body the
  CPU lacks raises an error at import.

Example:
    >>> from liegroup._kernels import kernels_disabled
    >>> isinstance(kernels_disabled(), bool)
    True
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from liegroup.errors import ConfigError

__all__ = ["KernelUnavailableWarning", "kernels_disabled", "load_extension"]

_TRUE = {"1", "true", "yes", "on"}


class KernelUnavailableWarning(RuntimeWarning):
    """A compiled kernel could not be loaded: liegroup runs its torch implementation instead."""


def kernels_disabled() -> bool:
    """Whether ``LIEGROUP_DISABLE_KERNELS`` asks for the torch implementations only.

    Example:
        >>> import os
        >>> kernels_disabled() == (os.environ.get("LIEGROUP_DISABLE_KERNELS", "").lower()
        ...                        in {"1", "true", "yes", "on"})
        True
    """
    return os.environ.get("LIEGROUP_DISABLE_KERNELS", "").strip().lower() in _TRUE


def load_extension(name: str) -> ModuleType | None:
    """Import the compiled extension ``name``, or ``None`` when disabled or unavailable.

    An extension that is missing or fails to import (without ``LIEGROUP_DISABLE_KERNELS``)
    gives one :class:`KernelUnavailableWarning` that says why and how to rebuild it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     load_extension("liegroup._no_such_extension") is None
        True
    """
    if kernels_disabled():
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        warnings.warn(
            f"liegroup: the compiled kernel {name} is not available ({e}); the torch "
            "implementation runs instead (same results, slower on CPU). Reinstall with a C "
            "compiler (`pip install -e .` shows the build log), or set "
            "LIEGROUP_DISABLE_KERNELS=1 to silence this.",
            KernelUnavailableWarning,
            stacklevel=2,
        )
        return None
    isa = os.environ.get("LIEGROUP_KERNEL_ISA", "").strip().lower()
    if isa:
        try:
            module.isa(isa)
        except ValueError as e:
            raise ConfigError(
                f"LIEGROUP_KERNEL_ISA={isa!r}: {e}; unset it or name a body this CPU has"
            ) from e
    return module
