"""AdaLoRA as a generator: SVD-form ``ΔW = s·fold(P·diag(λ)·Q)`` with global rank allocation.

Following AdaLoRA (Zhang et al., ICLR 2023), each adapted weight gets ``r`` triplets
``(P_{:,i}, λ_i, Q_{i,:})``; ``λ = 0`` at init (identity), ``P``, ``Q`` start with orthonormal
columns/rows. A :class:`RankAllocator`, stepped by the user after ``backward()``, scores every
triplet of every adapted layer and keeps only the best ``b(t)`` of them:

* importance of a parameter entry ``w``: ``I = |w·∂L/∂w|``; smoothed
  ``Ī_t = β₁Ī_{t−1} + (1−β₁)I_t``, uncertainty ``Ū_t = β₂Ū_{t−1} + (1−β₂)|I_t − Ī_t|``,
  score ``s(w) = Ī_t·Ū_t``;
* triplet score ``S_i = s(λ_i) + mean_j s(P_{ji}) + mean_j s(Q_{ij})``;
* budget (number of kept triplets over all layers), cubic schedule:
  ``b(t) = b₀`` for ``t < t_i``; ``b_T + ⌊(b₀ − b_T)(1 − (t − t_i)/(T − t_i − t_f))³⌋`` for
  ``t_i ≤ t < T − t_f``; ``b_T`` after. Masking happens every ``ΔT`` steps in the middle phase
  and once (fixed from then on) at ``t = T − t_f``, when the final ``rank_pattern`` is written
  into the adapter's config.

Masking is a persistent boolean buffer per layer, applied in the generator's forward
(``λ_eff = λ`` where kept, exactly ``0`` where masked), so masked triplets contribute nothing
and receive zero gradients: the optimizer cannot revive them between masking steps (HF peft's
AdaLoRA writes zeros into ``λ`` that the next optimizer step overwrites). The allocator also
zeroes masked ``λ`` entries and, when given the optimizer, their Adam-type state, so the raw
parameters stay exactly zero too.

``save_pretrained`` writes only the kept triplets and the ``rank_pattern``; loading rebuilds the
pruned shapes from it. The allocator and :func:`orthogonality_penalty` take the generators
(``model.generators()``), not the model; the penalty is a plain function that the user adds to
the loss (nothing depends on the model output having ``.loss``).

Example:
    >>> import torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> torch.manual_seed(0) is not None
    True
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 4 * 4, 3))
    >>> model = get_peft_model(net, LieRAConfig(rank=3, generator="adalora",
    ...                                         target_modules=["0", "2"]))
    >>> alloc = RankAllocator(model.generators(), target_r=1, tinit=2, tfinal=2, deltaT=1,
    ...                       total_step=8)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> x = torch.randn(8, 2, 6, 6)
    >>> for step in range(8):
    ...     loss = model(x).square().mean() + 0.1 * orthogonality_penalty(model.generators())
    ...     loss.backward()
    ...     opt.step()
    ...     _ = alloc.step(step)
    ...     opt.zero_grad()
    >>> sum(sum(v) for v in alloc.rank_pattern.values())
    2
"""


from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from liegroup.errors import AdapterStateError, ConfigError, DTypeError, ShapeError
from liegroup.peft.generators.base import Generator, GeneratorSpec, lowrank_dims, orthogonal_
from liegroup.peft.registry import register_generator


class AdaLoRAGenerator(Generator):
    """``ΔW = s·fold(P·diag(λ ⊙ mask)·dropout(Q))``; ``λ = 0`` at init, ``mask`` all true.

    Shapes follow :func:`~liegroup.peft.generators.lowrank_dims`: ``P: rows×m``, ``λ: m``,
    ``Q: m×cols`` (``m = r`` for ``mode1``, ``r·k`` for ``loralib``), so Linear and every conv
    geometry (grouped, depthwise: ``C_in/g``) work. The low-rank fused path is used.

    Example:
        >>> import torch
        >>> g = AdaLoRAGenerator(GeneratorSpec(weight_shape=(6, 2, 3, 3), rank=2, scaling=1.0,
        ...                                    groups=2))
        >>> g.P.shape, g.lam.shape, g.Q.shape, g().abs().max().item()
        (torch.Size([6, 2]), torch.Size([2]), torch.Size([2, 18]), 0.0)
        >>> torch.allclose(g.P.T @ g.P, torch.eye(2), atol=1e-6)
        True
    """

    name = "adalora"
    accepted_options = frozenset()
    supports_dropout = True

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        rows, mid, cols = lowrank_dims(spec)
        kw: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device}
        self.P = nn.Parameter(torch.empty(rows, mid, **kw))
        self.lam = nn.Parameter(torch.zeros(mid, **kw))
        self.Q = nn.Parameter(torch.empty(mid, cols, **kw))
        self.register_buffer("rank_mask", torch.ones(mid, dtype=torch.bool, device=spec.device))
        self.rank_mask: torch.Tensor
        # positions of the current triplets in the original numbering (after pruning at load)
        self._origin: list[int] = list(range(mid))
        self._n_origin = mid
        orthogonal_(self.P)
        orthogonal_(self.Q)

    def effective_lambda(self) -> torch.Tensor:
        """``λ`` with masked entries exactly zero (and no gradient to them)."""
        return self.lam.masked_fill(~self.rank_mask, 0.0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·P·diag(λ_eff), dropout(Q))``."""
        return self.P * (self.effective_lambda() * self.scaling), self.dropout(self.Q)

    def forward(self) -> torch.Tensor:
        """``s·fold(P·diag(λ_eff)·Q)``."""
        L, R = self.factors()
        return (L @ R).view(self.weight_shape)

    @property
    def n_triplets(self) -> int:
        """Current number of triplets (kept or masked)."""
        return int(self.lam.numel())

    def rank_pattern(self) -> list[bool]:
        """Kept triplets in the original numbering (length = the configured rank)."""
        out = [False] * self._n_origin
        for pos, keep in zip(self._origin, self.rank_mask.tolist(), strict=True):
            out[pos] = bool(keep)
        return out

    def export_state(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets (``P`` columns, ``λ`` entries, ``Q`` rows), mask all true."""
        keep = self.rank_mask
        return {
            "P": self.P.detach()[:, keep],
            "lam": self.effective_lambda().detach()[keep],
            "Q": self.Q.detach()[keep],
            "rank_mask": torch.ones(int(keep.sum()), dtype=torch.bool),
        }

    @torch.no_grad()
    def prune_(self, keep: list[bool]) -> None:
        """Drop triplets where ``keep`` is false (``keep`` in the original numbering).

        Replaces ``P``, ``λ``, ``Q`` by new, smaller parameters (build optimizers after).
        """
        if len(keep) != self._n_origin or not all(isinstance(k, bool) for k in keep):
            raise ShapeError(
                f"rank pattern for {self.spec.module_name or 'a layer'!r} must be "
                f"{self._n_origin} booleans, got {keep!r}"
            )
        here = torch.tensor([keep[p] for p in self._origin], dtype=torch.bool)
        here = here.to(self.rank_mask.device) & self.rank_mask
        idx = here.nonzero().flatten()
        rg = self.P.requires_grad
        self.P = nn.Parameter(self.P.detach()[:, idx].clone(), requires_grad=rg)
        self.lam = nn.Parameter(self.lam.detach()[idx].clone(), requires_grad=rg)
        self.Q = nn.Parameter(self.Q.detach()[idx].clone(), requires_grad=rg)
        self.rank_mask = torch.ones(len(idx), dtype=torch.bool, device=self.rank_mask.device)
        self._origin = [self._origin[i] for i in idx.tolist()]


register_generator(AdaLoRAGenerator)


def _adalora(generators: Mapping[str, Generator], what: str) -> list[tuple[str, AdaLoRAGenerator]]:
    if not isinstance(generators, Mapping):
        raise DTypeError(
            f"{what} takes the adapter's generators (model.generators()), a mapping of module "
            f"name to generator, got {type(generators).__name__}"
        )
    out = [(n, g) for n, g in generators.items() if isinstance(g, AdaLoRAGenerator)]
    if not out:
        raise ConfigError(
            f"{what}: the adapter has no AdaLoRA generator (LieRAConfig(generator='adalora'))"
        )
    return out


def orthogonality_penalty(generators: Mapping[str, Generator]) -> torch.Tensor:
    """Mean over AdaLoRA layers of ``‖P̃ᵀP̃ − I‖²_F + ‖Q̃Q̃ᵀ − I‖²_F`` (kept triplets only).

    Zero exactly when every layer's kept ``P`` columns and ``Q`` rows are orthonormal; add
    ``γ·orthogonality_penalty(model.generators())`` to the loss (AdaLoRA's regulariser).

    Args:
        generators: module name → generator, e.g. ``model.generators()``; the AdaLoRA ones
            are used.

    Raises:
        ConfigError: when the adapter has no AdaLoRA generator (a silent zero would hide a
            misconfiguration).

    Example:
        >>> import torch
        >>> from liegroup.peft import LieRAConfig, get_peft_model
        >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)),
        ...                    LieRAConfig(rank=2, generator="adalora", target_modules=["0"]))
        >>> float(orthogonality_penalty(m.generators()).detach()) < 1e-10
        True
    """
    terms: list[torch.Tensor] = []
    for _, gen in _adalora(generators, "orthogonality_penalty"):
        keep = gen.rank_mask
        P, Q = gen.P[:, keep], gen.Q[keep]
        eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
        terms.append((P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum())
    return torch.stack(terms).mean()


def budget_schedule(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int
) -> int:
    """AdaLoRA's cubic budget ``b(t)`` (number of kept triplets over all layers).

    Example:
        >>> [budget_schedule(t, 16, 4, 2, 2, 10) for t in range(10)]
        [16, 16, 16, 10, 7, 5, 4, 4, 4, 4]
    """
    if step < tinit:
        return init_budget
    if step >= total_step - tfinal:
        return target_budget
    frac = 1.0 - (step - tinit) / (total_step - tfinal - tinit)
    return target_budget + math.floor((init_budget - target_budget) * frac**3)


class RankAllocator:
    """Global rank allocation over the AdaLoRA generators of one adapter.

    Call :meth:`step` after every ``loss.backward()`` (before ``optimizer.zero_grad()``; after
    or before ``optimizer.step()``), with the global step ``t = 0, 1, …``.

    Args:
        generators: module name → generator of one adapter (``model.generators()``); the
            AdaLoRA ones are allocated, all with the same configured ``rank``.
        target_r: average kept rank per layer at the end (in units of the configured
            ``rank``: the final budget is ``round(target_r / rank · total triplets)``).
        tinit: warm-up steps without masking (``t_i``).
        tfinal: final steps with the fixed final pattern (``t_f``).
        deltaT: masking interval in the middle phase (``ΔT``).
        total_step: total training steps ``T`` (``> tinit + tfinal``).
        beta1: EMA coefficient of the importance (AdaLoRA: 0.85).
        beta2: EMA coefficient of the uncertainty (AdaLoRA: 0.85).
        optimizer: if given, its per-parameter state entries of masked ``λ`` are zeroed at each
            masking, so Adam momentum cannot move masked ``λ`` off zero.

    After the final masking step, :attr:`rank_pattern` holds the kept triplets per module
    (``save_pretrained`` writes the same pattern from the generators).

    Example:
        >>> import torch
        >>> from liegroup.peft import LieRAConfig, get_peft_model
        >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)),
        ...                    LieRAConfig(rank=4, generator="adalora", target_modules=["0"]))
        >>> a = RankAllocator(m.generators(), target_r=2, tinit=10, tfinal=10, deltaT=5,
        ...                   total_step=100)
        >>> a.init_budget, a.target_budget, a.budget(50)
        (4, 2, 2)
    """

    def __init__(
        self,
        generators: Mapping[str, Generator],
        target_r: float,
        tinit: int,
        tfinal: int,
        deltaT: int,
        total_step: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        layers = _adalora(generators, "RankAllocator")
        ranks = {g.spec.rank for _, g in layers}
        if len(ranks) != 1:
            raise ConfigError(f"the AdaLoRA generators have different ranks {sorted(ranks)}")
        rank = ranks.pop()
        for nm, v in (("tinit", tinit), ("tfinal", tfinal), ("total_step", total_step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{nm} must be an int >= 0, got {v!r}")
        if isinstance(deltaT, bool) or not isinstance(deltaT, int) or deltaT < 1:
            raise ConfigError(f"deltaT must be an int >= 1, got {deltaT!r}")
        if total_step <= tinit + tfinal:
            raise ConfigError(
                f"total_step={total_step} must exceed tinit + tfinal = {tinit + tfinal}"
            )
        for nm, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(b) < 1.0:
                raise ConfigError(f"{nm} must be in [0, 1), got {b!r}")
        if not 0 <= float(target_r) <= rank:
            raise ConfigError(f"target_r must be in [0, rank={rank}], got {target_r!r}")
        self.init_budget = sum(g.n_triplets for _, g in layers)
        self.target_budget = round(float(target_r) / rank * self.init_budget)
        self.tinit, self.tfinal, self.deltaT, self.total_step = tinit, tfinal, deltaT, total_step
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.optimizer = optimizer
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.final = False
        self._layers = layers
        self.rank_pattern: dict[str, list[bool]] | None = None

    def budget(self, step: int) -> int:
        """``b(step)`` (:func:`budget_schedule` with this allocator's settings)."""
        return budget_schedule(
            step, self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_step
        )

    def is_masking_step(self, step: int) -> bool:
        """Masking happens at ``t = t_i + jΔT`` (middle phase) and once at ``t = T − t_f``."""
        if step < self.tinit:
            return False
        if step >= self.total_step - self.tfinal:
            return not self.final
        return (step - self.tinit) % self.deltaT == 0

    @torch.no_grad()
    def _update_scores(self, gens: list[tuple[str, AdaLoRAGenerator]]) -> None:
        seen_grad = False
        for _, g in gens:
            for p, value in ((g.P, g.P), (g.lam, g.effective_lambda()), (g.Q, g.Q)):
                if p.grad is None:
                    continue
                seen_grad = True
                ipt = (value * p.grad).abs()
                key = id(p)
                if key not in self.ipt or self.ipt[key].shape != ipt.shape:
                    self.ipt[key] = torch.zeros_like(ipt)
                    self.unc[key] = torch.zeros_like(ipt)
                self.ipt[key].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                self.unc[key].mul_(self.beta2).add_(
                    (ipt - self.ipt[key]).abs(), alpha=1 - self.beta2
                )
        if not seen_grad:
            raise AdapterStateError(
                "RankAllocator.step found no gradients on the AdaLoRA parameters: call it after "
                "loss.backward() and before optimizer.zero_grad()"
            )

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        if key not in self.ipt:
            return torch.zeros_like(p)
        return self.ipt[key] * self.unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module: ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``."""
        out = {}
        for name, g in self._layers:
            out[name] = (
                self._score(g.lam)
                + self._score(g.P).mean(0)
                + self._score(g.Q).mean(1)
            )
        return out

    @torch.no_grad()
    def step(self, global_step: int) -> int | None:
        """Update the importance EMAs; mask at masking steps.

        Returns:
            the budget applied at this step, or ``None`` when no masking happened.
        """
        gens = self._layers
        if self.final:
            return None
        self._update_scores(gens)
        if not self.is_masking_step(global_step):
            return None
        budget = self.budget(global_step)
        scores = self.triplet_scores()
        flat = torch.cat([scores[n].flatten().double().cpu() for n, _ in gens])
        n_mask = flat.numel() - budget
        mask_flat = torch.ones(flat.numel(), dtype=torch.bool)
        if n_mask > 0:
            order = torch.argsort(flat, stable=True)
            mask_flat[order[:n_mask]] = False
        start = 0
        for _, g in gens:
            n = g.n_triplets
            keep = mask_flat[start : start + n].to(g.rank_mask.device)
            start += n
            g.rank_mask.copy_(keep)
            g.lam.masked_fill_(~keep, 0.0)
            if self.optimizer is not None:
                state = self.optimizer.state.get(g.lam, {})
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.shape == g.lam.shape:
                        v.masked_fill_(~keep, 0.0)
        if global_step >= self.total_step - self.tfinal:
            self.final = True
            self.rank_pattern = {n: g.rank_pattern() for n, g in gens}
        return budget
