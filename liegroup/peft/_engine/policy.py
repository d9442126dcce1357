"""The engine's memory policy: every constant that decides what an adapted layer keeps.

The rule the engine is held to: at every point of a training step, an adapted model holds no
more than full fine-tuning of the same layers would, up to a few percent. Full fine-tuning
keeps each layer's input (and autograd its output gradient) and, once its backward has run,
``∂L/∂W`` until the optimizer step. The rules below spend only that memory:

* :func:`keep_adapted_weight` — keep ``W'`` from the forward to the backward (no recompute,
  and for the exact map no second ``exp``) when what is kept beyond full fine-tuning (``W'``
  and any factor computed from parameters, e.g. Tucker's ``R``) has at most ``1/KEEP_RATIO``
  of the entries of the layer's input plus output: ≤ ~3 % of activations a step holds anyway.
* :func:`keep_plain_graph` — an update without a fused node (mode-wise, dense, user updates)
  may run as plain autograd (which keeps ``W'`` and about one more weight-sized intermediate)
  when the weight has at most ``1/KEEP_PLAIN_RATIO`` of the activations; otherwise ``W'`` is
  recomputed in the backward.
* :func:`block_rows` — the exact map's recomputed ``W ⊙ exp(L_i R)`` in the backward runs
  per row block of at most ``CHUNK_ENTRIES`` entries (in cache) and at most the larger of
  ``1/BLOCK_WEIGHT_FRACTION`` of the weight and the keep rule's activation budget.
* The step ledger (:mod:`.ledger`) lets a layer hold a second weight-sized buffer in its
  backward only while full fine-tuning would by then hold at least as much in gradients.

Example:
    >>> keep_adapted_weight(weight=100, computed=0, activations=3200)
    True
    >>> keep_adapted_weight(weight=100, computed=1, activations=3200)
    False
"""

from __future__ import annotations

__all__ = [
    "BLOCK_WEIGHT_FRACTION",
    "CHUNK_ENTRIES",
    "KEEP_PLAIN_RATIO",
    "KEEP_RATIO",
    "block_rows",
    "keep_adapted_weight",
    "keep_plain_graph",
]

KEEP_RATIO = 32
KEEP_PLAIN_RATIO = 64
CHUNK_ENTRIES = 1 << 16  # 256 KiB of float32: a block's exp(L_i R) stays in cache
BLOCK_WEIGHT_FRACTION = 16


def keep_adapted_weight(weight: int, computed: int, activations: int) -> bool:
    """Whether ``W'`` (``weight`` entries, plus ``computed`` saved factor entries) is kept.

    ``activations``: entries of the layer's input plus output.

    Example:
        >>> keep_adapted_weight(10, 0, 319)
        False
    """
    return (weight + computed) * KEEP_RATIO <= activations


def keep_plain_graph(weight: int, activations: int) -> bool:
    """Whether an update without a fused node may keep its plain autograd graph.

    Example:
        >>> keep_plain_graph(10, 640), keep_plain_graph(10, 639)
        (True, False)
    """
    return KEEP_PLAIN_RATIO * weight <= activations


def block_rows(weight: int, cols: int, activations: int, computed: int) -> int:
    """Rows per block of the exact map's blocked backward (at least 1).

    Example:
        >>> block_rows(weight=1 << 20, cols=1024, activations=0, computed=0)
        64
    """
    budget = activations // KEEP_RATIO - computed
    entries = min(CHUNK_ENTRIES, max(weight // BLOCK_WEIGHT_FRACTION, budget))
    return max(1, entries // max(cols, 1))
