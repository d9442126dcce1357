"""Independent references for the adapter tests: plain torch, no liegroup code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def ref_delta(B: torch.Tensor, A: torch.Tensor, scaling: float, shape: tuple[int, ...]):
    """s * (B @ A) reshaped row-major to the weight's shape (both layouts are a plain view)."""
    return (scaling * (B @ A)).reshape(shape)


def ref_map(W: torch.Tensor, delta: torch.Tensor, group: str, order: int | None):
    if group == "additive":
        return W + delta
    if order is None:
        return W * torch.exp(delta)
    t = sum(delta**j / math.factorial(j) for j in range(order + 1))
    return W * t


def ref_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base module's computation written out with F.pad + F.convNd / F.linear."""
    if isinstance(module, nn.Linear):
        return x @ weight.T + (module.bias if module.bias is not None else 0)
    nd = weight.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    padding = module.padding
    if module.padding_mode != "zeros":
        assert not isinstance(padding, str)
        pads: list[int] = []
        for p in reversed(padding):
            pads += [p, p]
        x = F.pad(x, pads, mode=module.padding_mode)
        padding = (0,) * nd
    return conv(
        x, weight, module.bias, module.stride, padding, module.dilation, module.groups
    )
