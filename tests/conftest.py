"""Shared test settings: hypothesis profiles, dtype helpers, the expm-path fixture, and the
``inductor`` marker's skip where torch.compile's CPU backend has no C++ compiler."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

# torch.compile's on-disk caches are keyed by the traced graph, not by the implementations of
# the custom operators in it: a cache left by another build of liegroup on this machine can
# hold code for other output layouts. Every test session compiles into a cache of its own.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="liegroup-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)


def inductor_cpu_compiler() -> str | None:
    """Why inductor cannot compile on the CPU here (no working C++ compiler), or ``None``.

    torch.compile's default backend compiles C++ for CPU graphs; a machine without a compiler
    (an install that took liegroup's torch implementations) cannot run it, so the tests marked
    ``inductor`` skip there, saying so. The other compile tests use ``aot_eager`` and run.
    """
    from torch._inductor import config, exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return f"no working C++ compiler for inductor (tried {config.cpp.cxx!r})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("inductor")]
    if not marked:
        return
    reason = inductor_cpu_compiler()
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=f"torch.compile's CPU backend: {reason}"))


settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)


def eps(dtype: torch.dtype) -> float:
    """Unit roundoff u of a floating dtype (half the machine epsilon)."""
    return torch.finfo(dtype).eps / 2


@pytest.fixture(params=["kernel", "torch"])
def expm_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a test of ``liegroup.linalg.expm`` through the compiled kernel and the torch path.

    Yields a :class:`tests.test_linalg_ckernel.ExpmPath`; its ``check_used()`` asserts that the
    kernel case really reached the kernel.
    """
    from tests.test_linalg_ckernel import use_path

    return use_path(request.param, monkeypatch)
