"""The adapted op for any update: ``op(x, W')`` with ``W'`` recomputed in the backward.

The low-rank Hadamard and additive updates have their own fused node
(:mod:`.lowrank_node`). Every other variant — mode-wise group adapters on convs,
block-structured mode-wise generators, dense generators, user-defined updates — forms
``W' = update(W, ΔW)`` with differentiable torch ops. Run plainly, the op saves ``W'`` from the
forward to the backward, and the update's own backward may keep weight-sized intermediates
(a mode-wise update on a conv keeps a transposed copy of ``W``): measured 1.6–1.7× full
fine-tuning's step memory on the ResNet-50-like net. :func:`adapted_op_recompute` keeps only
``x`` and the (small) algebra element: the forward forms ``W'`` without a graph, runs the op and
frees ``W'``; the backward forms ``W'`` again *with* its graph, takes ``∂L/∂x``, ``∂L/∂W'`` and
``∂L/∂b`` from one call of the op's backward and pushes ``∂L/∂W'`` through the update's graph.
Nothing weight-sized lives across the forward; the cost is one more ``update(W, ΔW)``.

The forward is bit for bit ``op(x, W')`` with ``W' = adapted_weight(W, ΔW, update)`` formed
under ``torch.no_grad()`` — what inference and merging compute (the plain autograd path can
round differently: ``torch.matmul`` does not fold a batch that requires grad); gradients agree
with the plain path to rounding (``tests/peft/test_recompute_op.py``). Not twice
differentiable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from liegroup.errors import AdapterStateError, DTypeError
from liegroup.peft._engine.geometry import (
    OpGeometry,
    conv_backward,
    linear_input_grad,
    linear_weight_grad,
    op_forward,
)

__all__ = ["RecomputedWeightOpFunction", "adapted_op_recompute"]


def _flatten(obj: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors inside an algebra element (tensor, dict, list/tuple, dataclass, None)."""
    if isinstance(obj, torch.Tensor):
        return [obj], lambda ts: ts[0]
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return [], lambda ts: obj
    if isinstance(obj, dict):
        keys = list(obj)
        parts = [_flatten(obj[k]) for k in keys]
        return _join(parts, lambda vals: dict(zip(keys, vals, strict=True)))
    if isinstance(obj, (list, tuple)):
        parts = [_flatten(v) for v in obj]
        kind = type(obj)
        return _join(parts, lambda vals: kind(vals))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        parts = [_flatten(getattr(obj, n)) for n in names]
        cls = type(obj)
        return _join(parts, lambda vals: cls(**dict(zip(names, vals, strict=True))))
    raise DTypeError(
        f"cannot recompute an update whose algebra element holds a {type(obj).__name__}; "
        "use tensors, dicts, lists/tuples or dataclasses of them"
    )


def _join(
    parts: list[tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]],
    build: Callable[[list[Any]], Any],
) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    flat = [t for ts, _ in parts for t in ts]
    sizes = [len(ts) for ts, _ in parts]

    def rebuild(ts: list[torch.Tensor]) -> Any:
        vals, i = [], 0
        for (_, rb), n in zip(parts, sizes, strict=True):
            vals.append(rb(ts[i:i + n]))
            i += n
        return build(vals)

    return flat, rebuild


class RecomputedWeightOpFunction(torch.autograd.Function):
    """``op(x, form(*tensors), bias)``, keeping ``x`` and ``tensors`` only.

    ``form`` maps the algebra element's tensors to ``W'`` (``update(W, ΔW)`` with ``W``
    frozen inside it); backward reruns it under ``enable_grad`` and returns the gradients of
    ``x``, ``bias`` and every tensor.

    Example:
        >>> import torch
        >>> W = torch.randn(4, 3, dtype=torch.float64)
        >>> D = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
        >>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> form = lambda d: W * torch.exp(d)
        >>> f = RecomputedWeightOpFunction.apply
        >>> torch.autograd.gradcheck(lambda a, d: f(a, None, OpGeometry("linear"), form, d),
        ...                          (x, D))
        True
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        op: OpGeometry,
        form: Callable[..., torch.Tensor],
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        """``op(x, W', bias)``; ``W'`` lives only during the op."""
        with torch.no_grad():
            Wp = form(*tensors)
            out = op_forward(x, Wp, bias, op)
        del Wp
        ctx.op, ctx.form = op, form
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(x, *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``W'`` again with its graph; ``∂L/∂x, ∂L/∂W', ∂L/∂b`` from one op backward."""
        x, *tensors = ctx.saved_tensors
        op: OpGeometry = ctx.op
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_t = list(ctx.needs_input_grad[4:])
        inputs = [t.detach().requires_grad_(n) for t, n in zip(tensors, need_t, strict=True)]
        wrt = [t for t, n in zip(inputs, need_t, strict=True) if n]
        gx = gb = None
        with torch.enable_grad():
            Wp = ctx.form(*inputs)
        need_w = bool(wrt) and Wp.requires_grad
        if op.kind == "linear":
            n_out, n_in = op.linear_features(Wp)
            gy2 = gy.reshape(-1, n_out)
            x2 = x.reshape(-1, n_in)
            gx = (linear_input_grad(gy2, Wp.detach(), op).view(*x.shape[:-1], n_in)
                  if need_x else None)
            G = linear_weight_grad(gy2, x2, op) if need_w else None
            gb = gy2.sum(0) if need_b else None
        else:
            gx, G, gb = conv_backward(gy, x, Wp.detach(), op, need_x, need_w, need_b)
        grads = iter(
            torch.autograd.grad(Wp, wrt, G, allow_unused=True)  # unused: no gradient (zero)
            if need_w and G is not None else ()
        )
        del Wp, G
        out_t = [next(grads, None) if n else None for n in need_t]
        if gb is not None and ctx.bias_shape is not None:
            gb = gb.view(ctx.bias_shape)
        return (gx, gb, None, None, *out_t)


def adapted_op_recompute(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    delta: Any,
    update: Any,
    op: OpGeometry,
) -> torch.Tensor:
    """``op(x, adapted_weight(W, delta, update), bias)`` with nothing weight-sized kept.

    Args:
        x: the op's input (batched for convs, any padding already applied).
        W: frozen weight ``(out, in)`` or ``(C_out, C_in/g, *k)``.
        bias: the op's bias or ``None``.
        delta: the algebra element (a tensor, or the structure a generator returns, e.g.
            ``{mode: ModeFactors}``); gradients flow to its tensors.
        update: the :class:`~liegroup.peft.Update` (``check_delta`` and ``apply``).
        op: the op and its geometry.

    Returns:
        The op's output, bit-identical to the plain path's.

    Raises:
        TypeError: ``W`` requires grad (use the plain path), or ``delta`` holds something
            other than tensors in dicts, lists, tuples or dataclasses.

    Example:
        >>> import torch
        >>> from liegroup.peft import adapted_weight, get_update
        >>> from liegroup.peft._engine.geometry import OpGeometry
        >>> x, W = torch.randn(3, 4), torch.randn(2, 4)
        >>> D = torch.full((2, 4), 0.1, requires_grad=True)
        >>> u = get_update("hadamard")
        >>> y = adapted_op_recompute(x, W, None, D, u, OpGeometry("linear"))
        >>> with torch.no_grad():
        ...     ref = torch.nn.functional.linear(x, adapted_weight(W, D, u))
        >>> torch.equal(y, ref)
        True
    """
    if W.requires_grad:
        raise AdapterStateError("adapted_op_recompute does not differentiate W; freeze it")
    update.check_delta(W, delta)
    tensors, rebuild = _flatten(delta)

    def form(*ts: torch.Tensor) -> torch.Tensor:  # delta was checked once, above
        return update.apply(W, rebuild(list(ts)))

    out: torch.Tensor = RecomputedWeightOpFunction.apply(x, bias, op, form, *tensors)
    return out
