"""The step ledger and the shared workspace of the fused low-rank node (CPU only).

Full fine-tuning keeps ``∂L/∂W`` of every layer whose backward has run until the optimizer
step; the fused node keeps none of them. :class:`StepLedger` counts those entries (the
weights of the adapted layers whose backward ran since the step began): a layer whose weight
has at most that many entries may hold a second weight-sized buffer in its backward (a
recomputed ``W'`` next to ``∂L/∂W'``), while the process stays within full fine-tuning's
memory at every point of the backward. A forward after a backward starts a new step and zeroes
the credit, so the count can only be low, never high (gradient accumulation, checkpoint
recomputation, two models trained in turn).

A transient ``W'`` is formed in one scratch buffer per thread and dtype, grown to the largest
adapted weight: a fresh weight-sized buffer per layer and step costs page faults on CPU for
no memory saved. The buffer lives while any weight that used it lives.

The ledger is per thread and CPU only. On CUDA the caching allocator already reuses freed
blocks without page faults, and autograd runs a CUDA backward on its own device thread, so
the engine keeps no workspace and no credit there (:func:`current` returns ``None``): each
layer's backward holds one weight-sized buffer at a time.

Example:
    >>> ledger = StepLedger()
    >>> ledger.allows(10)
    False
    >>> ledger.backward_done(16)
    >>> ledger.allows(10), ledger.credit
    (True, 16)
    >>> ledger.forward_seen(); ledger.credit
    0
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

__all__ = ["StepLedger", "current"]


class StepLedger:
    """Credit for a second weight-sized buffer, and the shared scratch buffer (one thread)."""

    __slots__ = ("__weakref__", "_buffers", "_users", "_views", "credit", "in_backward")

    def __init__(self) -> None:
        self.credit = 0
        self.in_backward = False
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        # the views of the buffers by shape, made once: a view costs a few µs per layer call
        self._views: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}
        self._users: dict[int, weakref.finalize] = {}  # id(weight) → its finalizer

    def workspace(self, shape: tuple[int, ...], weight: torch.Tensor) -> torch.Tensor:
        """A contiguous scratch tensor of ``shape`` in ``weight``'s dtype (until the next call).

        Example:
            >>> import torch
            >>> w = torch.zeros(2, 3)
            >>> StepLedger().workspace((3, 2), w).shape
            torch.Size([3, 2])
        """
        if id(weight) not in self._users:
            self._users[id(weight)] = weakref.finalize(weight, self._user_gone, id(weight))
        key = (weight.dtype, shape)
        view = self._views.get(key)
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(weight.dtype)
        if buf is None or buf.numel() < n:
            del buf
            self._drop(weight.dtype)  # the views of a smaller buffer would keep it alive
            buf = self._buffers[weight.dtype] = torch.empty(n, dtype=weight.dtype)
        view = self._views[key] = buf[:n].view(shape)
        return view

    def _user_gone(self, key: int) -> None:
        self._users.pop(key, None)
        if not self._users:
            self.release()

    def _drop(self, dtype: torch.dtype) -> None:
        self._buffers.pop(dtype, None)
        for k in [k for k in self._views if k[0] == dtype]:
            del self._views[k]

    def held(self, dtype: torch.dtype) -> int:
        """Entries of the workspace for ``dtype`` (0: none)."""
        buf = self._buffers.get(dtype)
        return 0 if buf is None else buf.numel()

    def release(self, dtype: torch.dtype | None = None) -> None:
        """Free the workspace for ``dtype`` (``None``: all)."""
        if dtype is None:
            self._buffers.clear()
            self._views.clear()
        else:
            self._drop(dtype)

    def forward_seen(self) -> None:
        """A layer's forward ran: after a backward it is a new step (credit back to 0)."""
        if self.in_backward:
            self.credit, self.in_backward = 0, False

    def allows(self, entries: int) -> bool:
        """Whether a second buffer of ``entries`` entries fits the credit."""
        return entries <= self.credit

    def backward_done(self, entries: int) -> None:
        """A layer's backward ran: full fine-tuning would now hold its ``entries``-entry grad."""
        self.in_backward = True
        self.credit += entries

    def __repr__(self) -> str:
        return f"StepLedger(credit={self.credit}, in_backward={self.in_backward})"


_local = threading.local()


def current(device: torch.device) -> StepLedger | None:
    """The calling thread's ledger for a CPU op, ``None`` for any other device.

    Example:
        >>> import torch
        >>> current(torch.device("cpu")) is current(torch.device("cpu"))
        True
    """
    if device.type != "cpu":
        return None
    ledger: StepLedger | None = getattr(_local, "ledger", None)
    if ledger is None:
        ledger = _local.ledger = StepLedger()
    return ledger
