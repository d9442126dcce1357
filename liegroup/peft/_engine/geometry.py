"""The base module's op as the engine sees it: ``F.linear`` or an N-d convolution.

:class:`OpGeometry` describes the op (stride, padding, dilation, groups), worked out once per
set of conv attributes by :func:`op_input`, which also applies a non-zeros ``padding_mode``
to the input. :func:`op_forward` and :func:`conv_backward` run the op and its backward on a
given weight; :func:`weights_outside_autocast` and :func:`autocast_dtype` say how autocast
treats the adapted weight (formed in the weight's dtype, the op in autocast's).

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    >>> x = torch.randn(1, 2, 5, 5)
    >>> xin, op = op_input(conv, x)
    >>> torch.equal(op_forward(xin, conv.weight, conv.bias, op), conv(x))
    True
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from liegroup.errors import ShapeError

__all__ = [
    "OpGeometry",
    "autocast_dtype",
    "conv_backward",
    "op_forward",
    "op_input",
    "weights_outside_autocast",
]


@dataclass(frozen=True)
class OpGeometry:
    """The op of an adapted layer: ``F.linear`` or an N-d conv with explicit padding.

    Attributes:
        kind: ``"linear"`` or ``"conv"``.
        stride, padding, dilation: per spatial dimension (convs; symmetric padding — a
            ``padding_mode`` other than zeros is applied to the input before the op).
        groups: the conv's groups.

    Example:
        >>> OpGeometry("conv", (1, 1), (1, 1), (1, 1), 1).ndim
        2
    """

    kind: str
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv"):
            raise ValueError(f"kind must be 'linear' or 'conv', got {self.kind!r}")
        n = len(self.stride)
        if self.kind == "conv" and (
            n not in (1, 2, 3) or len(self.padding) != n or len(self.dilation) != n
        ):
            raise ShapeError(
                f"a conv needs stride, padding and dilation of one length 1-3, got {self}"
            )

    @property
    def ndim(self) -> int:
        """Spatial dimensions (0 for linear)."""
        return len(self.stride)

    def output_numel(self, x: torch.Tensor, W: torch.Tensor) -> int:
        """Entries of ``op(x, W)`` (``x`` batched, padding already applied), without running it.

        Example:
            >>> import torch
            >>> op = OpGeometry("conv", (2, 1), (1, 0), (1, 2), 1)
            >>> x, W = torch.zeros(2, 3, 9, 8), torch.zeros(5, 3, 3, 3)
            >>> op.output_numel(x, W) == torch.nn.functional.conv2d(
            ...     x, W, None, (2, 1), (1, 0), (1, 2)).numel()
            True
        """
        if self.kind == "linear":
            return x.numel() // W.shape[1] * W.shape[0]
        n = x.shape[0] * W.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], W.shape[2:], self.stride, self.padding,
                                    self.dilation, strict=True):
            n *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        return n


_LINEAR = OpGeometry("linear")
# a conv's geometry by module, recomputed when one of its attributes changes
_CONV_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, OpGeometry | None]] = (
    weakref.WeakKeyDictionary()
)


def _conv_geometry(conv: nn.Module, W: torch.Tensor) -> OpGeometry | None:
    """The geometry of ``conv``, or ``None`` for ``padding="same"`` needing asymmetric padding."""
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    n = W.dim() - 2
    dilation = tuple(int(d) for d in conv.dilation)
    padding: tuple[int, ...]
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        padding = (0,) * n
    elif conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, W.shape[2:], strict=True)]
        if any(t % 2 for t in total):
            return None
        padding = tuple(t // 2 for t in total)
    else:
        padding = tuple(int(p) for p in conv.padding)
    stride = tuple(int(s) for s in conv.stride)
    return OpGeometry("conv", stride, padding, dilation, int(conv.groups))


def op_input(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, OpGeometry] | None:
    """The op's input (padded for a non-zeros ``padding_mode``) and geometry, or ``None``.

    ``None`` where the op cannot run as an :class:`OpGeometry`: unbatched conv inputs,
    ``padding="same"`` needing asymmetric padding.

    Example:
        >>> import torch
        >>> op_input(torch.nn.Conv1d(1, 1, 2, padding="same"), torch.zeros(1, 1, 4)) is None
        True
    """
    if isinstance(base, nn.Linear):
        return x, _LINEAR
    W = base.weight
    assert isinstance(W, torch.Tensor)
    if x.dim() != W.dim():
        return None
    conv = base
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    key = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, W.shape)
    hit = _CONV_CACHE.get(conv)
    if hit is None or hit[0] != key:
        hit = _CONV_CACHE[conv] = (key, _conv_geometry(conv, W))
    geometry = hit[1]
    if geometry is None:
        return None
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    return x, geometry


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def op_forward(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
               op: OpGeometry) -> torch.Tensor:
    """``F.linear(x, W, bias)`` or the conv of ``op``.

    Example:
        >>> import torch
        >>> op_forward(torch.ones(1, 2), torch.ones(3, 2), None, OpGeometry("linear"))
        tensor([[2., 2., 2.]])
    """
    if op.kind == "linear":
        return F.linear(x, W, bias)
    out: torch.Tensor = _CONV[op.ndim](x, W, bias, op.stride, op.padding, op.dilation, op.groups)
    return out


def conv_backward(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, op: OpGeometry,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂x, ∂L/∂W, ∂L/∂b)`` of a conv in one call (``None`` where not asked for).

    Example:
        >>> import torch
        >>> op = OpGeometry("conv", (1,), (0,), (1,), 1)
        >>> gx, gw, gb = conv_backward(torch.ones(1, 1, 2), torch.ones(1, 1, 3),
        ...                            torch.ones(1, 1, 2), op, True, True, True)
        >>> gb
        tensor([2.])
    """
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]] if need_b else None, list(op.stride),
        list(op.padding), list(op.dilation), False, [0] * op.ndim, op.groups,
        [need_x, need_w, need_b],
    )
    return gx, gw, gb


def weights_outside_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context that forms an adapted weight in the weight's own dtype under autocast.

    Autocast is meant for the layer's op; the adapter's ``W'`` (rank-r products, ``exp``,
    matrix exponentials of mode-wise updates) is computed in the weight's dtype, as a master
    weight is, and cast by autocast only where the op uses it. Outside autocast this is a
    no-op context.

    Example:
        >>> import torch
        >>> x = torch.zeros(2)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with weights_outside_autocast(x):
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(x: torch.Tensor, W: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``op(x, W)`` in, or ``None`` when it would not cast.

    Autocast (enabled for ``x``'s device type) casts float32 operands of linear and conv ops
    to its lower-precision dtype; float64 and lower-precision weights are left alone.

    Example:
        >>> import torch
        >>> x, W = torch.zeros(2, 3), torch.zeros(4, 3)
        >>> autocast_dtype(x, W) is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype(x, W)
        torch.bfloat16
    """
    dev = x.device.type
    if W.dtype != torch.float32 or not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return None if dt == W.dtype else dt
