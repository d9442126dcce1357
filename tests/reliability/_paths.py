"""Shared helpers of the reliability tests."""

from __future__ import annotations

import torch


def u(dtype: torch.dtype) -> float:
    """Unit roundoff of ``dtype``."""
    return torch.finfo(dtype).eps / 2
