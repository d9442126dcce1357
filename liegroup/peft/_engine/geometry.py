"""The base module's op as the engine sees it: a linear map or an N-d convolution.

:class:`OpGeometry` describes the op (stride, padding, dilation, groups; for a linear map
whether the weight is stored transposed, ``(in, out)``, as transformers' ``Conv1D`` stores
it), worked out once per set of conv attributes by :func:`op_input`, which also applies a
non-zeros ``padding_mode`` to the input. :func:`op_forward` runs the op on a given weight,
:func:`conv_backward`, :func:`linear_input_grad` and :func:`linear_weight_grad` its backward
(a weight's gradient in the weight's own layout); :func:`weights_outside_autocast` and
:func:`autocast_dtype` say how autocast treats the adapted weight (formed in the weight's
dtype, the op in autocast's).

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
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from liegroup.errors import ConfigError, ShapeError

__all__ = [
    "OpGeometry",
    "autocast_dtype",
    "conv_backward",
    "is_transposed_linear",
    "linear_input_grad",
    "linear_weight_grad",
    "op_forward",
    "op_input",
    "transposed_linear_class",
    "weights_outside_autocast",
]


def transposed_linear_class() -> type[nn.Module] | None:
    """Transformers' ``Conv1D`` (a linear map with its weight stored ``(in, out)``), if loaded.

    Looked up in ``sys.modules`` only: a model holding a ``Conv1D`` has imported it, and
    liegroup never imports transformers itself.

    Example:
        >>> transposed_linear_class() is None or transposed_linear_class().__name__ == "Conv1D"
        True
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x @ W + b`` with ``W`` stored ``(in, out)`` (``Conv1D``).

    Example:
        >>> import torch
        >>> is_transposed_linear(torch.nn.Linear(2, 3))
        False
    """
    cls = transposed_linear_class()
    return cls is not None and isinstance(module, cls)


@dataclass(frozen=True)
class OpGeometry:
    """The op of an adapted layer: ``F.linear`` or an N-d conv with explicit padding.

    Attributes:
        kind: ``"linear"`` or ``"conv"``.
        stride, padding, dilation: per spatial dimension (convs; symmetric padding — a
            ``padding_mode`` other than zeros is applied to the input before the op).
        groups: the conv's groups.
        transposed: (linear) the weight is stored ``(in, out)`` and the op is
            ``x @ W + b`` — transformers' ``Conv1D``; ``W'``, ``ΔW`` and ``∂L/∂W'`` keep that
            layout.

    Example:
        >>> OpGeometry("conv", (1, 1), (1, 1), (1, 1), 1).ndim
        2
    """

    kind: str
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv"):
            raise ConfigError(f"kind must be 'linear' or 'conv', got {self.kind!r}")
        if self.transposed and self.kind != "linear":
            raise ConfigError("only a linear op may have a transposed weight")
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
            n_out, n_in = self.linear_features(W)
            return x.numel() // n_in * n_out
        n = x.shape[0] * W.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], W.shape[2:], self.stride, self.padding,
                                    self.dilation, strict=True):
            n *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        return n

    def linear_features(self, W: torch.Tensor) -> tuple[int, int]:
        """``(out_features, in_features)`` of a linear op's weight, in either layout.

        Example:
            >>> import torch
            >>> OpGeometry("linear", transposed=True).linear_features(torch.zeros(4, 3))
            (3, 4)
        """
        out_f, in_f = (W.shape[1], W.shape[0]) if self.transposed else (W.shape[0], W.shape[1])
        return int(out_f), int(in_f)


_LINEAR = OpGeometry("linear")
_LINEAR_T = OpGeometry("linear", transposed=True)
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
    if is_transposed_linear(base):
        return x, _LINEAR_T
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
    """``F.linear(x, W, bias)``, ``x @ W + bias`` (transposed weight) or the conv of ``op``.

    The transposed form is ``Conv1D``'s own: ``addmm(bias, x₂, W)`` on the 2-d view of ``x``.

    Example:
        >>> import torch
        >>> op_forward(torch.ones(1, 2), torch.ones(3, 2), None, OpGeometry("linear"))
        tensor([[2., 2., 2.]])
        >>> op_forward(torch.ones(1, 2), torch.ones(2, 3), None, OpGeometry("linear",
        ...                                                                   transposed=True))
        tensor([[2., 2., 2.]])
    """
    if op.kind == "linear":
        if not op.transposed:
            return F.linear(x, W, bias)
        x2 = x.reshape(-1, W.shape[0])
        y = x2.mm(W) if bias is None else torch.addmm(bias, x2, W)
        return y.view(*x.shape[:-1], W.shape[1])
    out: torch.Tensor = _CONV[op.ndim](x, W, bias, op.stride, op.padding, op.dilation, op.groups)
    return out


def linear_input_grad(gy2: torch.Tensor, W: torch.Tensor, op: OpGeometry) -> torch.Tensor:
    """``∂L/∂x`` (2-d) of a linear op from ``gy2 = ∂L/∂y`` (2-d): ``gy₂ W`` or ``gy₂ Wᵀ``.

    Example:
        >>> import torch
        >>> linear_input_grad(torch.ones(1, 3), torch.ones(2, 3), OpGeometry("linear",
        ...                                                                   transposed=True))
        tensor([[3., 3.]])
    """
    return gy2.mm(W.T) if op.transposed else gy2.mm(W)


def linear_weight_grad(gy2: torch.Tensor, x2: torch.Tensor, op: OpGeometry,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``∂L/∂W`` of a linear op in the weight's own layout: ``gy₂ᵀ x₂`` or ``x₂ᵀ gy₂``.

    Args:
        gy2, x2: ``∂L/∂y`` and the input, 2-d.
        op: the op (``transposed``: ``W`` stored ``(in, out)``).
        out: a buffer of the weight's shape to write into (e.g. a recomputed ``W'``'s).

    Example:
        >>> import torch
        >>> linear_weight_grad(torch.ones(1, 3), torch.ones(1, 2), OpGeometry("linear")).shape
        torch.Size([3, 2])
    """
    a, b = (x2.T, gy2) if op.transposed else (gy2.T, x2)
    return a.mm(b) if out is None else torch.mm(a, b, out=out)


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
