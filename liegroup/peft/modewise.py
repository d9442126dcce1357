"""Mode-wise matrix-group adapters: ``W' = W ×_{k₁} exp(Ω_{k₁}) ×_{k₂} exp(Ω_{k₂}) ⋯``.

The group is a matrix group ``G(n_k)`` per chosen tensor mode ``k`` of the weight
(``group="so"``: rotations, ``"gl"``: invertible matrices, ``"sl"``: unit determinant),
acting by the mode-``k`` product (:func:`liegroup.tensor.mode_product`). The generator
(:class:`ModeWiseGenerator`, ``generator="modewise"``) returns one matrix ``M_k`` per mode; the
update maps it into the algebra with the group's orthogonal projection
(``G.project_algebra``: the skew part for ``so(n)``, the trace-free part for ``sl(n)``,
unchanged for ``gl(n)``) and exponentiates it with ``G.exp`` (:func:`liegroup.linalg.expm`,
closed forms for ``SO(2)``, ``SO(3)``).

* Identity at init (``M_k = 0`` → ``exp(0) = I``); the layer's forward stays one op on ``W'``.
* ``SO``: every mode-``j`` unfolding of ``W'`` is an orthogonal transformation of ``W``'s
  (rows for ``j = k``, columns otherwise), so **all** mode-wise singular values are preserved
  — an orthogonal fine-tuning of a conv kernel that keeps its spectra.
* Merge/unmerge are exact by the group inverse: ``W = W' ×_k g_k⁻¹`` (``g_kᵀ`` for SO).
* Only the exact exponential (``exp_map="exact"``): a truncated matrix series leaves the group.

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig
    >>> from liegroup.peft.layer import LieRALayer
    >>> conv = torch.nn.Conv2d(4, 6, 3).double()
    >>> layer = LieRALayer(conv)
    >>> layer.add_adapter("a", LieRAConfig(rank=2, group="so", generator="modewise",
    ...                                    target_modules=["x"]))
    >>> x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    >>> torch.equal(layer(x), conv(x))
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import liegroup
from liegroup._validation import check_tensor
from liegroup.errors import DTypeError, ShapeError
from liegroup.groups.matrix import MatrixLieGroup
from liegroup.peft.functional import Update, register_update
from liegroup.peft.generators import Generator, GeneratorSpec, register_generator
from liegroup.tensor import multi_mode_product

__all__ = ["ModeWiseGenerator", "ModeWiseUpdate"]

_GROUPS = {"so": liegroup.SO, "gl": liegroup.GL, "sl": liegroup.SL}
_GROUP_CACHE: dict[tuple[str, int], MatrixLieGroup] = {}


class ModeWiseUpdate(Update):
    """``W' = W ×_{k} exp(proj(M_k))`` over the modes of ``delta = {k: M_k}``.

    Args:
        group: ``"so"``, ``"gl"`` or ``"sl"``.

    Example:
        >>> import torch
        >>> u = ModeWiseUpdate("so")
        >>> W = torch.randn(3, 4, dtype=torch.float64)
        >>> M = {0: torch.randn(3, 3, dtype=torch.float64)}
        >>> Wp = u.apply(W, M)
        >>> torch.allclose(torch.linalg.svdvals(Wp), torch.linalg.svdvals(W))
        True
        >>> torch.allclose(u.inverse(Wp, M), W)
        True
    """

    name = "modewise"
    invertible = True
    algebra_kind = "modes"

    def __init__(self, group: str) -> None:
        if group not in _GROUPS:
            raise ValueError(f"mode-wise group must be one of {sorted(_GROUPS)}, got {group!r}")
        self.group = group

    def _group(self, n: int) -> MatrixLieGroup:
        # Built once per size: constructing SO(n) builds its dense algebra basis
        # (n(n−1)/2 · n² entries), far too costly per step, impossible for n ≈ 1024. Above
        # n = 64, SO's exponential is GL(n)'s on the (exactly skew) projection, and its
        # inverse the transpose — the same maps without the basis.
        key = (self.group, n)
        G = _GROUP_CACHE.get(key)
        if G is None:
            cls = liegroup.GL if self.group == "so" and n > 64 else _GROUPS[self.group]
            G = cls(n)  # type: ignore[abstract]
            _GROUP_CACHE[key] = G
        return G

    def _project(self, M: torch.Tensor) -> torch.Tensor:
        if self.group == "so":
            return (M - M.mT) / 2
        return self._group(M.shape[-1]).project_algebra(M)

    def _inverse(self, g: torch.Tensor) -> torch.Tensor:
        if self.group == "so":
            return g.mT
        return self._group(g.shape[-1]).inverse(g)

    def check_delta(self, W: torch.Tensor, delta: Any) -> None:
        """``delta`` must be a non-empty dict ``{mode k: (n_k, n_k) tensor}`` on ``W``'s dtype."""
        if not isinstance(delta, dict) or not delta:
            raise DTypeError(
                f"the {self.group!r} mode-wise group needs a dict {{mode: matrix}} from a "
                f"mode-wise generator (generator='modewise'), got {type(delta).__name__}"
            )
        for k, M in delta.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < W.dim():
                raise ShapeError(f"mode {k!r} is not a mode of a weight of order {W.dim()}")
            check_tensor(M, f"delta[{k}]")
            n = W.shape[k]
            if M.shape != (n, n):
                raise ShapeError(
                    f"delta[{k}] must be ({n}, {n}) for mode {k} of W {tuple(W.shape)}, "
                    f"got {tuple(M.shape)}"
                )
            if M.dtype != W.dtype:
                raise DTypeError(f"delta[{k}] has dtype {M.dtype}, W has {W.dtype}")

    def group_elements(self, delta: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{k: exp(proj(M_k))}``."""
        out = {}
        for k, M in delta.items():
            out[k] = self._group(M.shape[-1]).exp(self._project(M))
        return out

    def apply(self, W: torch.Tensor, delta: Any) -> torch.Tensor:
        """``W ×_{k₁} g_{k₁} ×_{k₂} g_{k₂} ⋯`` (mode products over distinct modes commute)."""
        self.check_delta(W, delta)
        gs = self.group_elements(delta)
        modes = sorted(gs)
        # contiguous like W: the layer's op then takes the same kernel path as on W
        return multi_mode_product(W, [gs[k] for k in modes], modes).contiguous()

    def inverse(self, Wp: torch.Tensor, delta: Any) -> torch.Tensor:
        """``W' ×_k g_k⁻¹`` (``G.inverse``: ``gᵀ`` for SO)."""
        self.check_delta(Wp, delta)
        gs = self.group_elements(delta)
        modes = sorted(gs)
        inv = [self._inverse(gs[k]) for k in modes]
        return multi_mode_product(Wp, inv, modes).contiguous()

    def __repr__(self) -> str:
        return f"ModeWiseUpdate({self.group!r})"


def _factory(group: str) -> Any:
    def make(order: int | None) -> ModeWiseUpdate:
        if order is not None:
            raise ValueError(
                f"group={group!r} acts by the exact matrix exponential (a truncated series "
                "leaves the group); set exp_map='exact'"
            )
        return ModeWiseUpdate(group)

    return make


for _g in _GROUPS:
    register_update(_g, _factory(_g))


class ModeWiseGenerator(Generator):
    """One matrix per chosen mode, zero at init; the group's update maps it to its algebra.

    Options (``generator_kwargs``):
        modes: tensor modes to act on (default ``[0, 1]``: output and input channels, a
            Linear's two modes; modes of size 1, e.g. a depthwise conv's ``C_in/g``, are
            skipped by default and refused when listed). Kernel modes may be listed too.
        structure: ``"lowrank"`` (default) ``M_k = s·B_k A_kᵀ``, ``B_k ∈ R^{n_k×r}`` zero,
            ``A_k`` Kaiming-uniform (``r`` = the config's rank, clamped to ``n_k``; the skew
            part for SO has rank ≤ 2r); or ``"block"``: ``M_k = s·blockdiag(D_1, …)`` with
            blocks of ``block_size`` (default 4; the last block takes the remainder), zero at
            init (OFT-style).

    Example:
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                      options={"modes": [0, 2], "structure": "block",
        ...                               "block_size": 3})
        >>> d = ModeWiseGenerator(spec)()
        >>> sorted(d), tuple(d[0].shape), tuple(d[2].shape)
        ([0, 2], (8, 8), (3, 3))
    """

    name = "modewise"
    algebra_kind = "modes"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        shape = self.weight_shape
        opts = spec.options
        default = [k for k in (0, 1) if shape[k] > 1]
        modes = list(opts.get("modes", default))
        if not modes or len(set(modes)) != len(modes) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(shape)
            and shape[k] > 1
            for k in modes
        ):
            raise ValueError(
                f"generator_kwargs['modes'] must be distinct modes of size > 1 of the weight "
                f"{shape} (0..{len(shape) - 1}), got {opts.get('modes', default)!r}"
            )
        self.modes = sorted(modes)
        self.structure = str(opts.get("structure", "lowrank"))
        if self.structure not in ("lowrank", "block"):
            raise ValueError(
                "generator_kwargs['structure'] must be 'lowrank' or 'block', got "
                f"{self.structure!r}"
            )
        bs = opts.get("block_size", 4)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"generator_kwargs['block_size'] must be an int >= 1, got {bs!r}")
        self.block_size = bs
        kw: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device}
        self.mats = nn.ParameterDict()
        for k in self.modes:
            n = shape[k]
            if self.structure == "lowrank":
                r = min(spec.rank, n)
                self.mats[f"B{k}"] = nn.Parameter(torch.zeros(n, r, **kw))
                A = torch.empty(n, r, **kw)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                self.mats[f"A{k}"] = nn.Parameter(A)
            else:
                b = min(bs, n)
                q, rem = divmod(n, b)
                self.mats[f"D{k}"] = nn.Parameter(torch.zeros(q, b, b, **kw))
                if rem:
                    self.mats[f"R{k}"] = nn.Parameter(torch.zeros(rem, rem, **kw))

    def forward(self) -> dict[int, torch.Tensor]:  # type: ignore[override]
        """``{k: M_k}``."""
        out: dict[int, torch.Tensor] = {}
        for k in self.modes:
            if self.structure == "lowrank":
                M = (self.mats[f"B{k}"] * self.scaling) @ self.mats[f"A{k}"].T
            else:
                blocks = list(self.mats[f"D{k}"].unbind(0))
                if f"R{k}" in self.mats:
                    blocks.append(self.mats[f"R{k}"])
                M = torch.block_diag(*blocks) * self.scaling
            out[k] = M
        return out


register_generator(ModeWiseGenerator)
