"""LoRA as a generator, ``ΔW = s·fold(B·A)``, and its non-zero initialisers.

``B = 0`` at init (so ``W' = W`` at step 0), ``A`` Kaiming-uniform, ``s = alpha/r``
(``alpha/√r`` with rsLoRA), in one of two layouts:

* ``mode1`` — ``B ∈ R^{C_out×r}``, ``A ∈ R^{r×(C_in/g·∏k)}``, ``fold`` = reshape of the mode-1
  unfolding (as HF peft and LyCORIS LoCon do). For Linear, rows ``out``, cols ``in``.
* ``loralib`` — the paper's conv layout, ``B ∈ R^{(C_out/g·k)×(r·k)}``,
  ``A ∈ R^{(r·k)×(C_in·k^{N−1})}`` for an N-d kernel with all sizes ``k``, then a row-major view
  (for 2-d kernels exactly loralib's ``ConvLoRA``). Linear layers use ``mode1``.

Initialisers.
A LoRA-type generator starts at ``B = 0`` so that ``ΔW = 0`` and ``W' = W``. An initialiser
that starts ``B₀A₀ ≠ 0`` (PiSSA: the principal singular directions of the weight) must not
change the model at step 0. Plugging it naively into ``W ⊙ exp(s·BA)`` does (the LieRA paper's
release, its issue #11, reports collapsed accuracy). The LoRA generator therefore keeps frozen
copies ``B₀, A₀`` and uses ``ΔW = s(BA − B₀A₀)``: both products are computed by the same
operations on bit-identical inputs, so ``ΔW`` is exactly zero at step 0 and ``W' = W`` bit for
bit (for the Hadamard and the additive group).

Select with ``LieRAConfig(generator_kwargs={"init": "pissa"})``. Initialisers are functions
``(spec, rows, mid, cols) -> (B₀, A₀)`` registered with :func:`liegroup.peft.register_initialiser`:

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

import torch
from torch import nn

from liegroup.errors import ConfigError, ShapeError
from liegroup.peft.generators.base import Generator, GeneratorSpec, _kaiming_uniform_, lowrank_dims
from liegroup.peft.registry import get_initialiser, register_generator, register_initialiser

__all__ = ["LoRAGenerator"]


class LoRAGenerator(Generator):
    """LoRA: ``ΔW = s·fold(B·A)``, ``B`` zeros, ``A`` Kaiming-uniform; dropout acts on ``A``.

    Args:
        spec: the weight's :class:`GeneratorSpec`; ``layout="loralib"`` needs equal kernel
            sizes for a conv weight.

    Example:
        >>> import torch
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0)
        >>> g = LoRAGenerator(spec)
        >>> g.B.shape, g.A.shape
        (torch.Size([8, 2]), torch.Size([2, 36]))
        >>> g2 = LoRAGenerator(GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                                  layout="loralib"))
        >>> g2.B.shape, g2.A.shape
        (torch.Size([24, 6]), torch.Size([6, 12]))
    """

    name = "lora"
    supports_dropout = True
    accepted_options = frozenset({"init"})

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        rows, mid, cols = lowrank_dims(spec)
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.B = nn.Parameter(torch.zeros(rows, mid, **kw))  # type: ignore[arg-type]
        self.A = nn.Parameter(torch.empty(mid, cols, **kw))  # type: ignore[arg-type]
        self.init_name = str(spec.options.get("init", "zeros"))
        self.reset_parameters()
        if self.init_name != "zeros":
            if spec.dropout > 0:
                raise ConfigError(
                    f"init={self.init_name!r} with dropout > 0 would not be the identity at step 0 "
                    "(dropout changes B·A but not the frozen B₀·A₀); set dropout=0"
                )
            B0, A0 = get_initialiser(self.init_name)(spec, rows, mid, cols)
            with torch.no_grad():
                self.B.copy_(B0)
                self.A.copy_(A0)
            # frozen copies: ΔW = s(BA − B₀A₀), bit-exactly zero at step 0
            self.register_buffer("B0", B0.detach().clone())
            self.register_buffer("A0", A0.detach().clone())

    def reset_parameters(self) -> None:
        """``B = 0`` (identity at init), ``A`` Kaiming-uniform as in LoRA."""
        nn.init.zeros_(self.B)
        _kaiming_uniform_(self.A)

    def forward(self) -> torch.Tensor:
        """``s·fold(B·dropout(A))`` (minus ``s·fold(B₀·A₀)`` for a non-zero init).

        The scale multiplies the small factor ``B``; with a non-zero initialiser the frozen
        product is computed by the same operations, so ``ΔW`` is exactly zero at step 0.
        """
        delta = (self.B * self.scaling) @ self.dropout(self.A)
        if self.init_name != "zeros":
            B0, A0 = self.B0, self.A0
            assert isinstance(B0, torch.Tensor) and isinstance(A0, torch.Tensor)
            delta = delta - (B0 * self.scaling) @ A0
        return delta.view(self.weight_shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s·B, dropout(A))``: ``ΔW = (s·B @ dropout(A)).view(weight_shape)``.

        ``None`` with a non-zero initialiser (the subtracted ``B₀A₀`` is not low-rank-fused:
        a fused ``[sB, −sB₀]·[A; A₀]`` would round to a non-zero ``ΔW`` at step 0).
        """
        if self.init_name != "zeros":
            return None
        A, drop = self.A, self.dropout
        # no call through an Identity module: this runs once per layer and step
        return self.B * self.scaling, (A if type(drop) is nn.Identity else drop(A))




def _pissa(
    spec: GeneratorSpec, rows: int, mid: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    W = spec.weight
    if W is None:
        raise ConfigError(
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


register_generator(LoRAGenerator)
register_initialiser("pissa", _pissa)
register_initialiser("gaussian", _gaussian)
