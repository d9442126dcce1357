"""Dispatch to the compiled CPU kernel of the low-rank Hadamard update (``_cfused.c``).

For a float32 CPU weight ``W`` viewed as ``(rows, cols)`` with factors ``L (rows, r)``,
``R (r, cols)``, the kernel forms ``W ⊙ exp(L R)`` / ``W ⊙ (L R + 1)`` and the factor
gradients ``(G_Δ Rᵀ, Lᵀ G_Δ)`` of ``G_Δ = G ⊙ M`` (``M`` = ``W'`` or ``W``),
``G ⊙ W ⊙ exp(L R)`` or ``G`` with every weight entry read once and written at most once,
where the eager torch chain passes over weight-sized memory four to six times. Everything it
does not take (other dtypes or devices, ranks above ``R_MAX``, installs without a compiler)
runs the torch ops it replaces. Values agree with those ops to rounding (the rank-r sums and
``exp`` are computed by other code: ≤ 1 ulp for ``exp``), not bit for bit; within liegroup
every path that forms ``W'`` (the fused layer, :func:`~liegroup.peft.adapted_weight_lowrank`,
merging) goes through the same dispatch, so they agree with each other bit for bit.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

_k: Any
try:  # built by `pip install` where a C compiler is available (setup.py, optional)
    _k = importlib.import_module("liegroup.peft._cfused")
except ImportError:  # pragma: no cover - installs without a compiler
    _k = None

_R_MAX: int = int(_k.R_MAX) if _k is not None else 0
# Work (entries × (rank + 8)) per thread for which the kernel starts a thread of its own.
_MT_WORK: int = int(_k.MT_WORK) if _k is not None else 0
# Internal switch: False sends every call through the torch ops (tests compare the two).
_USE_KERNEL: bool = True

_F32 = torch.float32

# grads modes of the kernel
GRAD_TIMES = 0  # G_Δ = G ⊙ M
GRAD_TIMES_EXP = 1  # G_Δ = G ⊙ M ⊙ exp(L R)
GRAD_PLAIN = 2  # G_Δ = G


def compiled_kernel() -> bool:
    """Whether LieRA's fused layers use the compiled CPU kernel for float32 weights.

    The kernel (``liegroup/peft/_cfused.c``, built by ``pip install`` when a C compiler is
    available) forms ``W ⊙ exp(L·R)`` (and the first-order ``W ⊙ (1 + L·R)``) and the factor
    gradients in one pass over the weight; other dtypes, CUDA, ranks above 256 and installs
    without a compiler run the equivalent torch ops. See ``docs/performance.md``.

    Example:
        >>> from liegroup.peft import compiled_kernel
        >>> isinstance(compiled_kernel(), bool)
        True
    """
    return _k is not None and _USE_KERNEL


def takes(*ts: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: float32, CPU, contiguous, rank ≤ ``R_MAX``.

    ``ts[0]`` is weight-sized, ``ts[1]`` is ``L`` (its second dimension is the rank); pass
    every operand of one call at once (this runs on the adapter's hot path). With
    several intra-op threads the kernel is used only when it gives each of them a full share
    of work (``_MT_WORK``): it starts its threads per call, and below that the torch ops,
    which run on torch's thread pool, are as fast (measured with 2 threads: formation of a
    0.26–0.6 M-entry weight 1.2–1.7× slower in the kernel, of 1 M and more 0.8×).
    """
    r = ts[1].shape[1]
    if _k is None or not _USE_KERNEL or not 0 < r <= _R_MAX:
        return False
    nt = torch.get_num_threads()
    if nt > 1 and ts[0].numel() * (r + 8) < _MT_WORK * nt:
        return False
    for t in ts:  # noqa: SIM110 - a loop, not all(genexpr): runs several times per layer and step
        if t.dtype is not _F32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def form(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``W ⊙ exp(L R)`` (or ``W ⊙ (L R + 1)``) as ``W``'s ``(rows, cols)`` view, into ``out``.

    Callers check :func:`takes` first; ``out`` (returned as given) must be contiguous float32
    with ``rows·cols`` entries, of any shape.
    """
    rows, r, cols = L.shape[0], L.shape[1], R.shape[1]
    if out is None:
        out = torch.empty((rows, cols), dtype=W.dtype)
    _k.form(1 if first_order else 0, rows, cols, r, W.data_ptr(), L.data_ptr(), R.data_ptr(),
            out.data_ptr(), torch.get_num_threads())
    return out


def factor_grads(
    G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor, mode: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_Δ Rᵀ, Lᵀ G_Δ)`` with ``G_Δ`` by ``mode`` (see the module docstring); ``G`` unchanged.

    Callers check :func:`takes` for ``G, L, R`` (and ``M``); ``G`` and ``M`` are read as
    ``(rows, cols)`` row-major whatever their shape (contiguous, ``rows·cols`` entries).
    """
    rows, r, cols = L.shape[0], L.shape[1], R.shape[1]
    gL = torch.empty((rows, r), dtype=L.dtype)
    gR = torch.empty((r, cols), dtype=R.dtype)
    _k.grads(mode, rows, cols, r, G.data_ptr(), 0 if M is None else M.data_ptr(), L.data_ptr(),
             R.data_ptr(), gL.data_ptr(), gR.data_ptr(), torch.get_num_threads())
    return gL, gR


def takes_tucker(core: torch.Tensor, us: list[torch.Tensor]) -> bool:
    """Whether the kernel takes a Tucker generator's core and factors (see :func:`tucker`).

    float32 on the CPU, contiguous, 2–8 modes, ``core.shape[m] == us[m].shape[1]``, kernel-mode
    ranks ≤ their sizes (the generator clamps them so); any thread count (the work is a few
    hundred kFLOP).
    """
    if _k is None or not _USE_KERNEL or not 2 <= len(us) <= 8:
        return False
    for t in (core, *us):  # a loop, not all(genexpr): runs once per Tucker layer and step
        if t.dtype is not _F32 or not t.is_cpu or not t.is_contiguous():
            return False
    if core.dim() != len(us) or any(core.shape[m] != u.shape[1] for m, u in enumerate(us)):
        return False  # not a Tucker pair: the torch formulation raises its own error
    return all(u.shape[1] <= u.shape[0] for u in us[2:])


def _tucker_shape(core: torch.Tensor, us: list[torch.Tensor]) -> tuple[Any, ...]:
    return (tuple(u.shape[0] for u in us), tuple(core.shape), core.data_ptr(),
            tuple(u.data_ptr() for u in us))


def tucker(core: torch.Tensor, us: list[torch.Tensor], scaling: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·U₀, unfold₀(G ×₁ U₁ ⋯ ×_{N−1} U_{N−1}))`` for a core ``G`` and ``U_m (n_m, r_m)``.

    Callers check :func:`takes_tucker` first. ``L`` is ``(n₀, r₀)``, ``R`` is
    ``(r₀, n₁·n₂⋯n_{N−1})``; ``s`` is rounded to float32 first (as ``U₀ * s`` does in torch).
    """
    n0, r0 = us[0].shape
    cols = math.prod(u.shape[0] for u in us[1:])
    L = torch.empty((n0, r0), dtype=_F32)
    R = torch.empty((r0, cols), dtype=_F32)
    _k.tucker(*_tucker_shape(core, us), scaling, L.data_ptr(), R.data_ptr())
    return L, R


def tucker_grads(core: torch.Tensor, us: list[torch.Tensor], scaling: float,
                 gL: torch.Tensor, gR: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradients of ``core`` and every ``U_m`` from those of :func:`tucker`'s ``(L, R)``.

    ``gL``, ``gR`` contiguous float32 of ``L``'s and ``R``'s shapes.
    """
    g_core = torch.empty_like(core)
    g_us = [torch.empty_like(u) for u in us]
    _k.tucker_grads(*_tucker_shape(core, us), scaling, gL.data_ptr(), gR.data_ptr(),
                    g_core.data_ptr(), tuple(g.data_ptr() for g in g_us))
    return g_core, g_us
