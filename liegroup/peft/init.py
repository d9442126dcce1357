"""Non-zero initialisers for low-rank generators (PiSSA-style), identity at step 0 kept exact.

A LoRA-type generator starts at ``B = 0`` so that ``ΔW = 0`` and ``W' = W``. An initialiser
that starts ``B₀A₀ ≠ 0`` (PiSSA: the principal singular directions of the weight) must not
change the model at step 0. Plugging it naively into ``W ⊙ exp(s·BA)`` does (the LieRA paper's
release, its issue #11, reports collapsed accuracy). The LoRA generator therefore keeps frozen
copies ``B₀, A₀`` and uses ``ΔW = s(BA − B₀A₀)``: both products are computed by the same
operations on bit-identical inputs, so ``ΔW`` is exactly zero at step 0 and ``W' = W`` bit for
bit (for the Hadamard and the additive group).

Select with ``LieRAConfig(generator_kwargs={"init": "pissa"})``. Initialisers are functions
``(spec, rows, mid, cols) -> (B₀, A₀)`` registered with :func:`register_initialiser`:

* ``"pissa"`` — ``M = W.reshape(rows, cols)`` (the generator's unfolding: mode-1 or loralib,
  both row-major views), ``M ≈ U_m S_m V_mᵀ`` (top ``mid`` singular triplets), ``B₀ = U_m
  √S_m / √s``, ``A₀ = √S_m V_mᵀ / √s`` so that ``s·B₀A₀`` is the best rank-``mid`` approximation
  of ``M``. Components beyond ``min(rows, cols)`` start as in LoRA (``B`` column 0, ``A`` row
  Kaiming-uniform).
* ``"gaussian"`` — ``B₀ ~ N(0, 1/rows)``, ``A₀`` Kaiming-uniform (a data-free non-zero start).

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig
    >>> from liegroup.peft.layer import LieRALayer
    >>> conv = torch.nn.Conv2d(3, 4, 3)
    >>> layer = LieRALayer(conv)
    >>> layer.add_adapter("a", LieRAConfig(rank=2, target_modules=["x"],
    ...                                    generator_kwargs={"init": "pissa"}))
    >>> x = torch.randn(1, 3, 6, 6)
    >>> bool(layer.generators["a"].B.abs().max() > 0), torch.equal(layer(x), conv(x))
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from liegroup.errors import ShapeError
from liegroup.peft.generators import GeneratorSpec

__all__ = ["Initialiser", "get_initialiser", "register_initialiser"]

Initialiser = Callable[[GeneratorSpec, int, int, int], tuple[torch.Tensor, torch.Tensor]]


def _pissa(
    spec: GeneratorSpec, rows: int, mid: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    W = spec.weight
    if W is None:
        raise ValueError(
            "init='pissa' needs the base weight: build the generator through LieRALayer / "
            "get_peft_model (GeneratorSpec.weight is None)"
        )
    if W.numel() != rows * cols:
        raise ShapeError(f"weight {tuple(W.shape)} does not have rows*cols = {rows}*{cols} entries")
    M = W.detach().reshape(rows, cols)
    # SVD in float64 at least (the factors are rounded once to the weight's dtype)
    wdt = torch.promote_types(M.dtype, torch.float64)
    U, S, Vh = torch.linalg.svd(M.to(wdt), full_matrices=False)
    m = min(mid, S.numel())
    root = (S[:m] / spec.scaling).sqrt()
    B0 = torch.zeros(rows, mid, dtype=M.dtype, device=M.device)
    A0 = torch.empty(mid, cols, dtype=M.dtype, device=M.device)
    nn.init.kaiming_uniform_(A0, a=math.sqrt(5))
    B0[:, :m] = (U[:, :m] * root).to(M.dtype)
    A0[:m] = (root[:, None] * Vh[:m]).to(M.dtype)
    return B0, A0


def _gaussian(
    spec: GeneratorSpec, rows: int, mid: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"dtype": spec.dtype, "device": spec.device}
    B0 = torch.randn(rows, mid, **kw) / math.sqrt(rows)  # type: ignore[arg-type]
    A0 = torch.empty(mid, cols, **kw)  # type: ignore[arg-type]
    nn.init.kaiming_uniform_(A0, a=math.sqrt(5))
    return B0, A0


_INITIALISERS: dict[str, Initialiser] = {"pissa": _pissa, "gaussian": _gaussian}


def register_initialiser(name: str, fn: Initialiser) -> None:
    """Make ``generator_kwargs={"init": name}`` available.

    ``fn(spec, rows, mid, cols)`` returns ``(B₀, A₀)`` of shapes ``(rows, mid)``, ``(mid, cols)``
    (``spec.weight`` holds the base weight).

    Example:
        >>> import torch
        >>> register_initialiser("ones_doc", lambda spec, r, m, c: (torch.ones(r, m),
        ...                                                           torch.ones(m, c)))
        >>> get_initialiser("ones_doc")(None, 2, 1, 3)[1].shape
        torch.Size([1, 3])
    """
    if not isinstance(name, str) or not name or name == "zeros":
        raise ValueError(
            f"initialiser name must be a non-empty string other than 'zeros', got {name!r}"
        )
    if not callable(fn):
        raise TypeError(f"initialiser must be callable, got {fn!r}")
    _INITIALISERS[name] = fn


def get_initialiser(name: str) -> Initialiser:
    """The initialiser registered as ``name``.

    Example:
        >>> get_initialiser("pissa").__name__
        '_pissa'
    """
    if name not in _INITIALISERS:
        raise ValueError(
            f"unknown init {name!r}; known: {['zeros', *sorted(_INITIALISERS)]} (register one "
            "with liegroup.peft.init.register_initialiser)"
        )
    return _INITIALISERS[name]
