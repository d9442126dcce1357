"""Shared test settings: hypothesis profiles and dtype helpers."""

from __future__ import annotations

import os

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
