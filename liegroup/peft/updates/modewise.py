"""Mode-wise matrix-group adapters: ``W' = W ×_{k₁} exp(Ω_{k₁}) ×_{k₂} exp(Ω_{k₂}) ⋯``.

The group is a matrix group ``G(n_k)`` per chosen tensor mode ``k`` of the weight
(``update="so"``: rotations, ``"gl"``: invertible matrices, ``"sl"``: unit determinant),
acting by the mode-``k`` product (:func:`liegroup.tensor.mode_product`). The generator
(:class:`ModeWiseGenerator`, ``generator="modewise"``) returns one matrix ``M_k`` per mode; the
update maps it into the algebra with the group's orthogonal projection
(``G.project_algebra``: the skew part for ``so(n)``, the trace-free part for ``sl(n)``,
unchanged for ``gl(n)``) and exponentiates it with ``G.exp`` (:func:`liegroup.linalg.expm`,
closed forms for ``SO(2)``, ``SO(3)``).

Cost. The generator hands its matrices over in structured form and the update never builds
an ``n_k × n_k`` matrix when that is cheaper:

* low rank (:class:`ModeFactors`, ``M_k = L Rᵀ``): the projection stays factored
  (``so``: ``(LRᵀ − RLᵀ)/2 = [L, R]/2·[R, −L]ᵀ``, width ``m = 2r``; ``sl``: ``LRᵀ − cI`` with
  ``exp = e^{−c}·exp(LRᵀ)``), and ``W ×_k exp(LRᵀ) = W + fold(L φ₁(RᵀL) Rᵀ W_(k))``
  (:func:`liegroup.linalg.lowrank.phi1` of the ``m × m`` matrices, all modes in one batch,
  and ``O(m·|W|)`` products; modes 0 and 1 together in one autograd node,
  :func:`liegroup.linalg.lowrank.eye_plus_lowrank_two_sided`) whenever ``2m < n_k`` —
  measured faster than the dense path from ``n_k = 16`` on; otherwise the dense ``G.exp``
  and mode product. On a Linear (``so``, ``gl``) the two sides are ``W + L R`` of rank
  ``m₀ + m₁`` (:meth:`ModeWiseUpdate.additive_factors`) and the layer runs the op as one
  fused node whose backward never forms ``∂L/∂W'``
  (the engine's low-rank node, ``liegroup/peft/_engine/lowrank_node.py``);
* block diagonal (:class:`ModeBlocks`): one batched exponential of the small blocks and a
  reshaped mode product (``O(b·|W|)``).

On a conv (and a Linear off the low-rank path) the layer runs the op through
the engine's recompute node (``_engine/recompute_node.py``) when the weight is large next to the
activations: ``W'`` is recomputed in the backward instead of being kept, with the update's
intermediates, from forward to backward (memory at full fine-tuning's level, one more
formation of ``W'`` in time; ``docs/performance.md``).

* Identity at init (``M_k = 0`` → ``exp(0) = I``); the layer's forward stays one op on ``W'``.
* ``SO``: every mode-``j`` unfolding of ``W'`` is an orthogonal transformation of ``W``'s
  (rows for ``j = k``, columns otherwise), so **all** mode-wise singular values are preserved
  — an orthogonal fine-tuning of a conv kernel that keeps its spectra.
* Merge/unmerge are exact by the group inverse: ``W = W' ×_k g_k⁻¹`` (``g_kᵀ`` for SO;
  ``exp(−Ω_k)`` on the low-rank path).
* Only the exact exponential (``exp_map="exact"``): a truncated matrix series leaves the group.

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig
    >>> from liegroup.peft.layer import LieRALayer
    >>> conv = torch.nn.Conv2d(4, 6, 3).double()
    >>> layer = LieRALayer(conv)
    >>> layer.add_adapter("a", LieRAConfig(rank=2, update="so", generator="modewise",
    ...                                    target_modules=["x"]))
    >>> x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    >>> torch.equal(layer(x), conv(x))
    True
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

import liegroup
from liegroup._validation import check_tensor
from liegroup.errors import ConfigError, DTypeError, ShapeError
from liegroup.groups.matrix import MatrixLieGroup
from liegroup.linalg import expm
from liegroup.linalg.lowrank import (
    eye_plus_lowrank_mode_product,
    eye_plus_lowrank_two_sided,
    phi1,
)
from liegroup.peft.registry import register_update
from liegroup.peft.updates.base import Update
from liegroup.tensor import mode_product

__all__ = ["ModeBlocks", "ModeFactors", "ModeWiseUpdate"]

_GROUPS = {"so": liegroup.SO, "gl": liegroup.GL, "sl": liegroup.SL}
_GROUP_CACHE: dict[tuple[str, int], MatrixLieGroup] = {}


@dataclass(frozen=True, eq=False)
class ModeFactors:
    """A mode's matrix in factored form ``M = L Rᵀ`` (``L, R`` of shape ``(n, m)``).

    What :class:`ModeWiseGenerator` returns for ``structure="lowrank"``; the update projects it
    to the algebra in factored form and, when ``2m' < n`` (``m'`` the projected width),
    applies ``exp`` by :func:`liegroup.linalg.lowrank.expm_lowrank_apply`, never forming an
    ``n × n`` matrix.

    Example:
        >>> import torch
        >>> f = ModeFactors(torch.ones(3, 1), torch.ones(3, 1))
        >>> f.n, f.dense().shape
        (3, torch.Size([3, 3]))
    """

    L: torch.Tensor
    R: torch.Tensor

    @property
    def n(self) -> int:
        """The matrix size ``n``."""
        return int(self.L.shape[0])

    def dense(self) -> torch.Tensor:
        """``L @ R.T``, shape ``(n, n)``."""
        return self.L @ self.R.T

    def detach(self) -> ModeFactors:
        """The same matrix without autograd history."""
        return ModeFactors(self.L.detach(), self.R.detach())


@dataclass(frozen=True, eq=False)
class ModeBlocks:
    """A block-diagonal mode matrix ``blockdiag(D_1, …, D_q, tail)``.

    ``blocks`` has shape ``(q, b, b)``; ``tail`` (optional) is the last ``(r, r)`` block. The
    update exponentiates the blocks as one batch and applies them by a reshaped mode product
    (``O(b·|W|)``), never forming the ``n × n`` matrix.

    Example:
        >>> import torch
        >>> d = ModeBlocks(torch.zeros(2, 3, 3), torch.zeros(1, 1))
        >>> d.n, d.dense().shape
        (7, torch.Size([7, 7]))
    """

    blocks: torch.Tensor
    tail: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """The matrix size ``n = q·b + r``."""
        q, b = int(self.blocks.shape[0]), int(self.blocks.shape[-1])
        return q * b + (0 if self.tail is None else int(self.tail.shape[-1]))

    def dense(self) -> torch.Tensor:
        """``blockdiag(D_1, …, tail)``, shape ``(n, n)``."""
        parts = list(self.blocks.unbind(0))
        if self.tail is not None:
            parts.append(self.tail)
        return torch.block_diag(*parts)

    def detach(self) -> ModeBlocks:
        """The same matrix without autograd history."""
        return ModeBlocks(self.blocks.detach(), None if self.tail is None else self.tail.detach())


def _blocks_mode_product(
    T: torch.Tensor, E: torch.Tensor, E_tail: torch.Tensor | None, k: int
) -> torch.Tensor:
    """``T ×_k blockdiag(E_1, …, E_q, E_tail)`` by a reshaped product, ``O(b·|T|)``."""
    q, b = E.shape[0], E.shape[-1]
    n = T.shape[k]
    a = math.prod(T.shape[:k])
    c = T.numel() // max(a * n, 1)
    T3 = T.reshape(a, n, c)
    head = T3[:, : q * b].reshape(a, q, b, c)
    # measured (float32, 1 thread): the fastest of matmul / einsum / transposed bmm per case
    if a == 1:  # first mode: q GEMMs (b × b)·(b × c)
        out = torch.matmul(E, head)
    elif c == 1:  # last mode: q GEMMs (a × b)·(b × b) on a transposed view
        out = (head.reshape(a, q, b).transpose(0, 1) @ E.mT).transpose(0, 1)
    else:
        out = torch.einsum("qij,aqjc->aqic", E, head)
    out = out.reshape(a, q * b, c)
    if E_tail is not None:
        out = torch.cat([out, torch.matmul(E_tail, T3[:, q * b :])], dim=1)
    return out.reshape(T.shape)


class ModeWiseUpdate(Update):
    """``W' = W ×_{k} exp(proj(M_k))`` over the modes of ``delta = {k: M_k}``.

    ``M_k`` is a dense ``(n_k, n_k)`` tensor, a :class:`ModeFactors` (``L Rᵀ``) or a
    :class:`ModeBlocks` (block diagonal). The structured forms never build an ``n_k × n_k``
    matrix when that is cheaper (see the module docstring); the dense form takes
    ``G.exp`` and a dense mode product.

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
        >>> F = {1: ModeFactors(torch.randn(4, 1, dtype=torch.float64),
        ...                     torch.randn(4, 1, dtype=torch.float64))}
        >>> torch.allclose(u.apply(W, F), u.apply(W, {1: F[1].dense()}))
        True
    """

    name = "modewise"
    invertible = True
    algebra_kind = "modes"

    def __init__(self, group: str) -> None:
        if group not in _GROUPS:
            raise ConfigError(f"mode-wise group must be one of {sorted(_GROUPS)}, got {group!r}")
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

    def _project_factors(
        self, F: ModeFactors
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``proj(L Rᵀ) = L' R'ᵀ − c·I``: ``(L', R', c)`` (``c`` only for ``sl``).

        ``so``: ``(LRᵀ − RLᵀ)/2 = [L, R]/2 · [R, −L]ᵀ`` (width ``2m``); ``sl``: the trace-free
        part ``LRᵀ − (tr(RᵀL)/n)·I``, whose exponential is ``e^{−c}·exp(LRᵀ)`` (``cI``
        commutes with everything); ``gl``: unchanged.
        """
        L, R = F.L, F.R
        if self.group == "so":
            return torch.cat([L, R], 1) / 2, torch.cat([R, -L], 1), None
        if self.group == "sl":
            return L, R, (L * R).sum() / L.shape[0]
        return L, R, None

    def _project_blocks(self, D: ModeBlocks) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, tail = D.blocks, D.tail
        if self.group == "so":
            return (B - B.mT) / 2, None if tail is None else (tail - tail.mT) / 2
        if self.group == "sl":
            tr = B.diagonal(dim1=-2, dim2=-1).sum()
            if tail is not None:
                tr = tr + tail.diagonal().sum()
            c = tr / D.n
            B = B - c * torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
            if tail is not None:
                tail = tail - c * torch.eye(tail.shape[-1], dtype=B.dtype, device=B.device)
        return B, tail

    def check_delta(self, W: torch.Tensor, delta: Any) -> None:
        """``delta`` must be a non-empty dict ``{mode k: M_k}`` on ``W``'s dtype.

        ``M_k``: an ``(n_k, n_k)`` tensor, a :class:`ModeFactors` with ``(n_k, m)`` factors
        or a :class:`ModeBlocks` whose blocks add up to ``n_k``.
        """
        if not isinstance(delta, dict) or not delta:
            raise DTypeError(
                f"the {self.group!r} mode-wise group needs a dict {{mode: matrix}} from a "
                f"mode-wise generator (generator='modewise'), got {type(delta).__name__}"
            )
        for k, M in delta.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < W.dim():
                raise ShapeError(f"mode {k!r} is not a mode of a weight of order {W.dim()}")
            n = W.shape[k]
            if isinstance(M, ModeFactors):
                parts = [check_tensor(M.L, f"delta[{k}].L"), check_tensor(M.R, f"delta[{k}].R")]
                if M.L.dim() != 2 or M.L.shape != M.R.shape or M.L.shape[0] != n:
                    raise ShapeError(
                        f"delta[{k}] factors must both be ({n}, m) for mode {k} of W "
                        f"{tuple(W.shape)}, got L {tuple(M.L.shape)} and R {tuple(M.R.shape)}"
                    )
            elif isinstance(M, ModeBlocks):
                parts = [check_tensor(M.blocks, f"delta[{k}].blocks")]
                if M.tail is not None:
                    parts.append(check_tensor(M.tail, f"delta[{k}].tail"))
                sq = [t.dim() >= 2 and t.shape[-1] == t.shape[-2] for t in parts]
                if M.blocks.dim() != 3 or (M.tail is not None and M.tail.dim() != 2) or not all(
                    sq
                ) or M.n != n:
                    raise ShapeError(
                        f"delta[{k}] blocks must be (q, b, b) [+ a (r, r) tail] with q·b + r = "
                        f"{n} for mode {k} of W {tuple(W.shape)}, got blocks "
                        f"{tuple(M.blocks.shape)}, tail "
                        f"{None if M.tail is None else tuple(M.tail.shape)}"
                    )
            else:
                parts = [check_tensor(M, f"delta[{k}]")]
                if M.shape != (n, n):
                    raise ShapeError(
                        f"delta[{k}] must be ({n}, {n}) for mode {k} of W {tuple(W.shape)}, "
                        f"got {tuple(M.shape)}"
                    )
            for t in parts:
                if t.dtype != W.dtype:
                    raise DTypeError(f"delta[{k}] has dtype {t.dtype}, W has {W.dtype}")

    def _dense(self, M: Any) -> torch.Tensor:
        return M.dense() if isinstance(M, (ModeFactors, ModeBlocks)) else M

    def group_elements(self, delta: dict[int, Any]) -> dict[int, torch.Tensor]:
        """``{k: exp(proj(M_k))}`` as dense ``(n_k, n_k)`` matrices (the dense path)."""
        out = {}
        for k, M in delta.items():
            D = self._dense(M)
            out[k] = self._group(D.shape[-1]).exp(self._project(D))
        return out

    def _act(self, T: torch.Tensor, M: Any, k: int, sign: int) -> torch.Tensor:
        """``T ×_k exp(sign·proj(M))`` by the block or dense path."""
        if isinstance(M, ModeBlocks):
            B, tail = self._project_blocks(M)
            if self.group == "so" and sign < 0:  # g⁻¹ = gᵀ: transpose the blocks' exps
                E = expm(B).mT
                Et = None if tail is None else expm(tail).mT
            else:
                E = expm(sign * B)
                Et = None if tail is None else expm(sign * tail)
            return _blocks_mode_product(T, E, Et, k)
        D = self._dense(M)
        g = self._group(D.shape[-1]).exp(self._project(D))
        return mode_product(T, g if sign > 0 else self._inverse(g), k)

    def _lowrank_factors(
        self, delta: dict[int, Any], sign: int
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """``{k: (K_k, R_k)}``, ``exp(sign·proj(M_k)) ∝ I + K_k R_kᵀ``, and a log-scale (sl).

        Only the modes on the low-rank path (``2m < n``); the scalar factor is ``sl``'s.

        The ``φ₁`` of all modes with the same width ``m`` are one batched call.
        """
        todo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        log_scale: torch.Tensor | None = None
        for k, M in delta.items():
            if not isinstance(M, ModeFactors):
                continue
            L, R, c = self._project_factors(M)
            if 2 * L.shape[1] >= L.shape[0]:
                continue
            todo[k] = (L if sign > 0 else -L, R)
            if c is not None:
                log_scale = -sign * c if log_scale is None else log_scale - sign * c
        by_width: dict[int, list[int]] = {}
        for k, (L, _) in todo.items():
            by_width.setdefault(L.shape[1], []).append(k)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for ks in by_width.values():
            P = phi1(torch.stack([todo[k][1].mT @ todo[k][0] for k in ks]))
            for i, k in enumerate(ks):
                out[k] = (todo[k][0] @ P[i], todo[k][1])
        return out, log_scale

    def _run(self, W: torch.Tensor, delta: dict[int, Any], sign: int) -> torch.Tensor:
        fac, log_scale = self._lowrank_factors(delta, sign)
        out, done = W, set()
        if 0 in fac and 1 in fac:  # channel modes: one autograd node (a Linear: one GEMM)
            out, done = eye_plus_lowrank_two_sided(W, *fac[0], *fac[1]), {0, 1}
        for k in sorted(delta):
            if k in done:
                continue
            if k in fac:
                out = eye_plus_lowrank_mode_product(out, *fac[k], k)
            else:
                out = self._act(out, delta[k], k, sign)
        if log_scale is not None:
            out = out * torch.exp(log_scale)
        # contiguous like W: the layer's op then takes the same kernel path as on W
        return out.contiguous()

    def additive_factors(
        self, W: torch.Tensor, delta: Any
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``W' = W + L R`` for a matrix ``W`` with both modes on the low-rank path.

        ``(I + K₀R₀ᵀ) W (I + K₁R₁ᵀ)ᵀ = W + [K₀, B]·[A + C K₁ᵀ; K₁ᵀ]`` with ``A = R₀ᵀW``,
        ``B = W R₁``, ``C = A R₁`` (rank ``m₀ + m₁``; the same operations as
        :func:`~liegroup.linalg.lowrank.eye_plus_lowrank_two_sided`, so ``addmm(W, L, R)`` is
        :meth:`apply` bit for bit). ``None`` unless ``W`` is a matrix, ``delta`` holds modes 0
        and 1 as :class:`ModeFactors` on the low-rank path, and the group is not ``sl`` (its
        scalar factor).

        Example:
            >>> import torch
            >>> g = torch.Generator().manual_seed(0)
            >>> W = torch.randn(9, 8, dtype=torch.float64, generator=g)
            >>> F = {k: ModeFactors(*(torch.randn(n, 1, dtype=torch.float64, generator=g)
            ...                       for _ in range(2))) for k, n in ((0, 9), (1, 8))}
            >>> u = ModeWiseUpdate("so")
            >>> L, R = u.additive_factors(W, F)
            >>> L.shape, R.shape
            (torch.Size([9, 4]), torch.Size([4, 8]))
            >>> torch.equal(torch.addmm(W, L, R), u.apply(W, F))
            True
        """
        self.check_delta(W, delta)
        if self.group == "sl" or W.dim() != 2 or set(delta) != {0, 1}:
            return None
        for k in (0, 1):
            M = delta[k]
            width = M.L.shape[1] * (2 if self.group == "so" else 1) if isinstance(
                M, ModeFactors
            ) else W.shape[k]
            if 2 * width >= W.shape[k]:
                return None
        fac, _ = self._lowrank_factors(delta, 1)
        (K0, R0), (K1, R1) = fac[0], fac[1]
        A = R0.mT @ W
        B = W @ R1
        right = torch.addmm(A, A @ R1, K1.mT)
        return torch.cat([K0, B], 1), torch.cat([right, K1.mT], 0)

    def apply(self, W: torch.Tensor, delta: Any) -> torch.Tensor:
        """``W ×_{k₁} g_{k₁} ×_{k₂} g_{k₂} ⋯`` (mode products over distinct modes commute)."""
        self.check_delta(W, delta)
        return self._run(W, delta, 1)

    def inverse(self, Wp: torch.Tensor, delta: Any) -> torch.Tensor:
        """``W' ×_k g_k⁻¹`` (``gᵀ`` for SO, ``exp(−proj(M_k))`` in the structured forms)."""
        self.check_delta(Wp, delta)
        return self._run(Wp, delta, -1)

    def __repr__(self) -> str:
        return f"ModeWiseUpdate({self.group!r})"


def _factory(group: str) -> Any:
    def make(order: int | None) -> ModeWiseUpdate:
        if order is not None:
            raise ConfigError(
                f"update={group!r} acts by the exact matrix exponential (a truncated series "
                "leaves the group); set exp_map='exact'"
            )
        return ModeWiseUpdate(group)

    return make


for _g in _GROUPS:
    register_update(_g, _factory(_g))
