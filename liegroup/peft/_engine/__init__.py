"""The private engine that runs an adapted layer: ``op(x, W')`` with ``W' = update(W, ΔW)``.

A :class:`~liegroup.peft.LieRALayer` calls :func:`adapted_forward` and nothing else; the
engine chooses how ``op(x, W')`` runs, so that generators, updates, the layer and the model
never see an implementation:

* under ``torch.compile`` — plain differentiable torch ops (``W ⊙ exp(L R)``, then the base
  module's op), which Dynamo traces without a graph break and the compiler fuses, on CPU and
  CUDA alike;
* eagerly, for low-rank factors and the shipped updates — one autograd node
  (:mod:`.lowrank_node`) that keeps no weight-sized tensor beyond what full fine-tuning
  keeps, forming ``W'`` and the factor gradients through the operators of :mod:`.ops` (the
  compiled CPU kernel for float32, torch ops elsewhere);
* eagerly, for any other update — plain autograd when the weight is small next to the
  activations, else ``W'`` recomputed in the backward (:mod:`.recompute_node`);
* with ``W`` trainable, under autocast with non-low-rank updates, for unbatched conv inputs —
  plain autograd on ``W'``.

Every memory constant lives in :mod:`.policy`; the step ledger (CPU only) in :mod:`.ledger`.

Example:
    >>> import torch
    >>> from liegroup.peft import GeneratorSpec, get_update
    >>> from liegroup.peft.generators import LoRAGenerator
    >>> lin = torch.nn.Linear(4, 3)
    >>> gen = LoRAGenerator(GeneratorSpec(weight_shape=(3, 4), rank=1, scaling=1.0))
    >>> x = torch.randn(2, 4)
    >>> torch.equal(adapted_forward(lin, x, gen, get_update("hadamard")), lin(x))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from liegroup.errors import ShapeError
from liegroup.peft._engine import ledger, lowrank_node, ops, policy
from liegroup.peft._engine.geometry import (
    OpGeometry,
    autocast_dtype,
    is_transposed_linear,
    op_forward,
    op_input,
    transposed_linear_class,
    weights_outside_autocast,
)
from liegroup.peft._engine.hadamard_node import HadamardExpFunction, LowRankHadamardExpFunction
from liegroup.peft._engine.lowrank_node import adapted_op_lowrank
from liegroup.peft._engine.recompute_node import adapted_op_recompute

__all__ = [
    "HadamardExpFunction",
    "LowRankHadamardExpFunction",
    "adapted_forward",
    "check_adapter",
    "compiled_kernel",
    "is_transposed_linear",
    "transposed_linear_class",
    "weights_outside_autocast",
]

compiled_kernel = ops.compiled_kernel


TRANSPOSED_LINEAR = OpGeometry("linear", transposed=True)


def base_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base module's own op on ``weight``: ``F.linear``, ``Conv1D``'s ``x @ W + b``, a conv.

    A conv runs its own ``_conv_forward`` (every ``padding_mode``).

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular")
        >>> x = torch.randn(1, 1, 5)
        >>> torch.equal(base_op(conv, x, conv.weight), conv(x))
        True
    """
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if is_transposed_linear(base):
        bias = base.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return op_forward(x, weight, bias, TRANSPOSED_LINEAR)
    out: torch.Tensor = base._conv_forward(x, weight, base.bias)  # type: ignore[operator]
    return out


def adapted_forward(base: nn.Module, x: torch.Tensor, generator: Any, update: Any) -> torch.Tensor:
    """``op(x, W')``: the base module's op on ``W' = update(W, generator())``.

    Args:
        base: the frozen ``nn.Linear`` / ``nn.Conv1d/2d/3d``.
        x: its input.
        generator: a :class:`~liegroup.peft.Generator` (``factors()`` → ``(L, R)`` or
            ``None``; called → ``ΔW``).
        update: an :class:`~liegroup.peft.Update`.

    Raises:
        ShapeError: factors (from any generator, a user's included) that do not unfold ``W``,
            or an algebra element that does not fit the update.

    Example: see the module docstring.
    """
    W = base.weight
    assert isinstance(W, torch.Tensor)
    with weights_outside_autocast(x):
        factors, delta = _algebra_element(W, generator, update)
    if torch.compiler.is_compiling():
        return _traced_forward(base, x, W, factors, delta, update)
    return _eager_forward(base, x, W, factors, delta, update)


def _traced_forward(base: nn.Module, x: torch.Tensor, W: torch.Tensor,
                    factors: tuple[torch.Tensor, torch.Tensor] | None, delta: Any,
                    update: Any) -> torch.Tensor:
    """``op(x, W')`` as Dynamo traces it: no ledger, no workspace, no Python-side state.

    * An additive Linear whose factors are ``W``'s own ``(out, in)`` matrix, where that is
      cheaper, takes its factor gradients through the activations, as the eager node does
      (:class:`_AdditiveLinear`): ``∂L/∂W'`` is never formed.
    * The exact and first-order maps on float32 CPU weights, where the compiled kernel is
      built, form ``W'`` by the ``liegroup::lowrank_form`` operator (its autograd formula
      runs ``liegroup::lowrank_factor_grads``): the kernel's one pass over the weight is
      faster than the compiler's fused loops (``docs/performance.md``).
    * Everything else — CUDA, other dtypes, Taylor orders, other updates — is plain torch
      ops, which the compiler fuses.
    """
    kind = update.fused_form()
    cast = autocast_dtype(x, W)
    if factors is not None and kind is not None and cast is None:
        L, R = factors
        if kind[0] == "additive" and not W.requires_grad and isinstance(base, nn.Linear) and (
            lowrank_node.factor_route(
                W, L, R, x.reshape(-1, W.shape[-1])
            )
        ):
            out: torch.Tensor = _AdditiveLinear.apply(x, W, base.bias, L, R)
            return out
        if kind[0] == "hadamard" and kind[1] in (None, 1) and _kernel_form(W):
            return base_op(base, x, torch.ops.liegroup.lowrank_form(W, L, R, kind[1] == 1))
    with weights_outside_autocast(x):
        Wp = _traced_weight(W, factors, delta, update)
    if Wp.stride() != W.stride():
        # W' in W's layout, as the kernel's operator gives it: the compiler lays out the
        # conv after W' by W''s strides (a channels-last model stays channels-last); it
        # writes the fused W' into this buffer, no extra pass
        Wp = torch.empty_like(W).copy_(Wp)
    return base_op(base, x, Wp)


class _AdditiveLinear(torch.autograd.Function):
    """``linear(x, W + L R, b)`` whose backward never forms ``∂L/∂W'`` (traced by Dynamo).

    ``∂L/∂L = gyᵀ(x Rᵀ)``, ``∂L/∂R = (gy L)ᵀ x``, ``∂L/∂x = gy (W + L R)`` with ``W + L R``
    formed again in the backward: nothing weight-sized is kept from the forward. ``W`` is
    frozen (no gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, W, L, R)
        ctx.has_bias = bias is not None
        return F.linear(x, torch.addmm(W, L, R), bias)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, W, L, R = ctx.saved_tensors
        gy2, x2 = gy.reshape(-1, W.shape[0]), x.reshape(-1, W.shape[1])
        gx = gy2.mm(torch.addmm(W, L, R)).view(x.shape) if ctx.needs_input_grad[0] else None
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        g_l = gy2.T.mm(x2.mm(R.T)) if ctx.needs_input_grad[3] else None
        g_r = gy2.mm(L).T.mm(x2) if ctx.needs_input_grad[4] else None
        return gx, None, gb, g_l, g_r


def _kernel_form(W: torch.Tensor) -> bool:
    """Whether ``liegroup::lowrank_form`` would run the compiled kernel on ``W`` (static)."""
    return ops.compiled_kernel() and W.dtype == torch.float32 and W.device.type == "cpu"


def check_adapter(W: torch.Tensor, generator: Any, update: Any) -> None:
    """Run ``generator`` once without autograd and check what it gives against ``W``.

    Raises:
        ShapeError: factors that do not unfold ``W``, or an algebra element that does not fit
            ``update`` — at the time the adapter is created, not at its first forward (under
            ``torch.compile`` an error raised while tracing reaches the caller wrapped in
            Dynamo's own exception).

    Example:
        >>> import torch
        >>> from liegroup.peft import GeneratorSpec, get_update
    >>> from liegroup.peft.generators import LoRAGenerator
        >>> gen = LoRAGenerator(GeneratorSpec(weight_shape=(3, 4), rank=1, scaling=1.0))
        >>> check_adapter(torch.ones(3, 4), gen, get_update("hadamard"))
    """
    with torch.no_grad():
        _algebra_element(W, generator, update)


def _algebra_element(W: torch.Tensor, generator: Any, update: Any
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, Any]:
    """``(factors, None)`` or ``(None, ΔW)`` from ``generator``, checked against ``W``."""
    spec = getattr(generator, "spec", None)
    shape = getattr(spec, "weight_shape", None)
    if shape is not None and tuple(shape) != tuple(W.shape):
        raise ShapeError(
            f"the adapter was made for a weight of shape {tuple(shape)} but the base weight is "
            f"now {tuple(W.shape)}; re-create the adapter for the new weight"
        )
    factors = generator.factors()
    if factors is not None:
        if not isinstance(factors, tuple | list) or len(factors) != 2:
            got = f"{type(factors).__name__} of length {len(factors)}" if isinstance(
                factors, tuple | list) else type(factors).__name__
            raise ShapeError(
                f"{type(generator).__name__}.factors() must return None or a pair (L, R) "
                f"with L @ R unfolding W, got a {got}"
            )
        L, R = factors
        ops.check_factors(W, L, R)
        return (L, R), None
    delta = generator()
    update.check_delta(W, delta)
    return None, delta


def _traced_weight(W: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None,
                   delta: Any, update: Any) -> torch.Tensor:
    """``W'`` in plain differentiable torch ops, for a compiler to trace and fuse."""
    kind = update.fused_form()
    if factors is not None:
        L, R = factors
        if kind is not None and kind[0] == "additive":
            return torch.addmm(W.reshape(L.shape[0], R.shape[1]), L, R).view(W.shape)
        if kind is None:
            return update.apply_lowrank(W, L, R)
        delta = (L @ R).view(W.shape)
    if kind is None:
        return update.apply(W, delta)
    if kind[0] == "additive":
        return W + delta
    order = kind[1]
    if order is None:
        return W * torch.exp(delta)
    t = delta / order + 1 if order > 1 else delta + 1  # Horner, out of place (differentiable)
    for j in range(order - 1, 0, -1):
        t = t * delta
        if j > 1:
            t = t / j
        t = t + 1
    return t * W


def _eager_forward(base: nn.Module, x: torch.Tensor, W: torch.Tensor,
                   factors: tuple[torch.Tensor, torch.Tensor] | None, delta: Any,
                   update: Any) -> torch.Tensor:
    bias = base.bias
    assert bias is None or isinstance(bias, torch.Tensor)
    cast = autocast_dtype(x, W)
    fused = None if x.dtype not in (W.dtype, cast) else op_input(base, x)
    kind = update.fused_form()
    if factors is not None:
        if fused is not None and kind is not None and not W.requires_grad:
            xin, geometry = fused
            # the factors were checked by _algebra_element: the node itself, not its checking
            # wrapper (this runs once per adapted layer and step)
            out: torch.Tensor = lowrank_node.LowRankAdaptedOpFunction.apply(
                xin, W, bias, *factors, kind[0], kind[1], geometry, ledger.current(W.device),
                cast,
            )
            return out
        with weights_outside_autocast(x):
            Wp = update.apply_lowrank(W, *factors)
        return base_op(base, x, Wp)
    if fused is None or W.requires_grad or cast is not None:
        with weights_outside_autocast(x):
            Wp = update.apply(W, delta)
        return base_op(base, x, Wp)
    xin, geometry = fused
    if geometry.kind == "linear":  # W' = W + L R (mode-wise, both modes): the additive node
        lr = update.additive_factors(W, delta)
        if lr is not None:
            L, R = lr
            return adapted_op_lowrank(xin, W, bias, L, R, "additive", None, geometry,
                                      ledger.current(W.device))
    # any other update: W' recomputed in the backward, nothing weight-sized kept — unless the
    # weight is small next to the activations (then the plain graph costs little memory)
    acts = xin.numel() + geometry.output_numel(xin, W)
    if policy.keep_plain_graph(W.numel(), acts):
        return base_op(base, x, update.apply(W, delta))
    return adapted_op_recompute(xin, W, bias, delta, update, geometry)
