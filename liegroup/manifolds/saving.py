"""Saving and loading modules and optimisers whose parameters live on Lie-group manifolds."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import geoopt
import torch

from liegroup.errors import DomainError
from liegroup.manifolds._kernels import (
    _unit_roundoff,
)
from liegroup.manifolds.manifold import LieGroupManifold

__all__ = ["check_manifold_parameters", "load_optimizer_state_dict", "plain_state_dict"]



def plain_state_dict(obj: Any) -> Any:
    """Copy of a (nested) state dict with every tensor subclass turned into a plain tensor.

    ``ManifoldTensor``/``ManifoldParameter`` pickle through a ``functools.partial`` that
    ``torch.load(..., weights_only=True)`` refuses; after this conversion the object loads
    there. Dicts, lists and tuples are rebuilt; other values are returned as they are.

    Example:
        >>> import io, torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.Hadamard(2))
        >>> p = geoopt.ManifoldParameter(M.origin(2), manifold=M)
        >>> buf = io.BytesIO()
        >>> torch.save(plain_state_dict({"p": p}), buf)
        >>> _ = buf.seek(0)
        >>> torch.load(buf, weights_only=True)
        {'p': tensor([1., 1.])}
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
        return t
    if isinstance(obj, Mapping):
        out = {k: plain_state_dict(v) for k, v in obj.items()}
        if isinstance(obj, collections.OrderedDict):
            return collections.OrderedDict(out)
        return out
    if isinstance(obj, list):
        return [plain_state_dict(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain_state_dict(v) for v in obj)
    return obj


def check_manifold_parameters(
    module: torch.nn.Module, *, atol: float | None = None, rtol: float = 0.0
) -> None:
    """Raise :class:`~liegroup.errors.DomainError` unless every group parameter is on its group.

    Checks every ``ManifoldParameter`` of ``module`` whose manifold is a
    :class:`LieGroupManifold`.

    Meant for after ``module.load_state_dict(torch.load(path, weights_only=True))``: the
    checkpoint holds bare tensors and nothing else verifies them. ``atol`` defaults to
    ``1000·u`` of each parameter's dtype.

    Example:
        >>> import torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.Hadamard(2))
        >>> m = torch.nn.Module()
        >>> m.w = geoopt.ManifoldParameter(M.origin(2), manifold=M)
        >>> check_manifold_parameters(m)
        >>> _ = m.load_state_dict({"w": torch.tensor([1.0, 0.0])})
        >>> try:
        ...     check_manifold_parameters(m)
        ... except ValueError as e:
        ...     print(type(e).__name__)
        DomainError
    """
    for name, p in module.named_parameters():
        manifold = getattr(p, "manifold", None)
        if not isinstance(manifold, LieGroupManifold):
            continue
        tol = 1000 * _unit_roundoff(p.dtype) if atol is None else atol
        with torch.no_grad():
            ok, reason = manifold._check_point_on_manifold(p.detach(), atol=tol, rtol=rtol)
        if not ok:
            raise DomainError(f"parameter {name!r} is not on {manifold!r}: {reason}")


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """``optimizer.load_state_dict(state_dict)``, keeping geoopt's integer step counters.

    ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns every per-parameter
    ``"step"`` into a float32 tensor. ``RiemannianAdam`` computes its bias corrections as
    ``beta ** state["step"]`` and so, after a reload, in float32 instead of Python floats: a
    resumed run differs from an uninterrupted one (about 1e-8 relative), and a float32 step count
    stops increasing at 2^24. This helper restores the ints, so resuming is bit-identical.

    Example:
        >>> import torch, geoopt, liegroup
        >>> M = LieGroupManifold(liegroup.SO(2))
        >>> p = geoopt.ManifoldParameter(M.origin(2, 2), manifold=M)
        >>> opt = geoopt.optim.RiemannianAdam([p], lr=0.1)
        >>> p.sum().backward(); opt.step()
        >>> load_optimizer_state_dict(opt, opt.state_dict())
        >>> opt.state[p]["step"]
        1
    """
    optimizer.load_state_dict(state_dict)
    if not isinstance(optimizer, geoopt.optim.mixin.OptimMixin):
        return
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = int(step.item())
