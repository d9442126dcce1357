"""Shared test settings: hypothesis profiles, dtype helpers and the expm-path fixture."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

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
