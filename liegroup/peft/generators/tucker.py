"""Tucker generator: ``ΔW = s·core ×₁ U₁ ×₂ U₂ ⋯``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from liegroup.errors import ConfigError
from liegroup.peft.generators.base import Generator, GeneratorSpec, orthogonal_
from liegroup.peft.registry import register_generator

__all__ = ["TuckerGenerator"]


class TuckerGenerator(Generator):
    """Tucker (FLoRA-style) core: ``ΔW = s·(G ×₀ U₀ ×₁ U₁ ⋯ ×_{N−1} U_{N−1})``.

    ``U_i ∈ R^{I_i×r_i}`` with orthonormal columns (random), core ``G ∈ R^{r_0×⋯×r_{N−1}}``
    zero at init (identity). Ranks per mode: ``generator_kwargs["ranks"]`` (one int per mode),
    else ``rank`` for modes 0 and 1 and ``generator_kwargs["kernel_rank"]`` (default: the full
    kernel size) for the kernel modes; every rank is clamped to its mode's size. Works for any
    weight order (Linear: ``U₀ G U₁ᵀ``), grouped convs included (the modes are the weight's:
    ``C_out, C_in/g, k…``). Layout is ignored (Tucker acts on the tensor, not an unfolding).

    The low-rank fused path uses ``unfold(ΔW, 0) = (s·U₀) · unfold(G ×₁ U₁ ⋯, 0)``.

    Example:
        >>> import torch
        >>> spec = GeneratorSpec(weight_shape=(8, 4, 3, 3), rank=2, scaling=1.0,
        ...                      options={"kernel_rank": 2})
        >>> g = TuckerGenerator(spec)
        >>> g.core.shape, [tuple(u.shape) for u in g.factors_list]
        (torch.Size([2, 2, 2, 2]), [(8, 2), (4, 2), (3, 2), (3, 2)])
        >>> with torch.no_grad():
        ...     _ = g.core.normal_()
        >>> L, R = g.factors()
        >>> torch.allclose((L @ R).view(8, 4, 3, 3), g(), atol=1e-5)
        True
    """

    name = "tucker"
    accepted_options = frozenset({"ranks", "kernel_rank"})

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        shape = self.weight_shape
        opts = spec.options
        if "ranks" in opts:
            ranks = list(opts["ranks"])
            if len(ranks) != len(shape) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks
            ):
                raise ConfigError(
                    f"generator_kwargs['ranks'] must be {len(shape)} ints >= 1 (one per mode of "
                    f"the weight {shape}), got {opts['ranks']!r}"
                )
        else:
            kr = opts.get("kernel_rank")
            if kr is not None and (isinstance(kr, bool) or not isinstance(kr, int) or kr < 1):
                raise ConfigError(
                    f"generator_kwargs['kernel_rank'] must be an int >= 1, got {kr!r}"
                )
            ranks = [spec.rank] * min(2, len(shape)) + [
                (k if kr is None else kr) for k in shape[2:]
            ]
        self.ranks = [min(r, n) for r, n in zip(ranks, shape, strict=True)]
        # every kernel mode of size 1 (Linear, 1×1 conv): factors() takes the `linear` graph
        self._scalar_kernel = all(n == 1 for n in shape[2:])
        kw: dict[str, Any] = {"dtype": spec.dtype, "device": spec.device}
        self.core = nn.Parameter(torch.zeros(self.ranks, **kw))
        self.factors_list = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, **kw)) for n, r in zip(shape, self.ranks, strict=True)]
        )
        for u in self.factors_list:
            orthogonal_(u)

    def forward(self) -> torch.Tensor:
        """``s·(G ×₀ U₀ ×₁ U₁ ⋯)`` via :func:`liegroup.tensor.multi_mode_product`."""
        from liegroup.tensor import multi_mode_product

        return multi_mode_product(self.core, list(self.factors_list)) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·U₀, unfold(G ×₁ U₁ ⋯ ×_{N−1} U_{N−1}, 0))``.

        The kernel modes at once through ``K = U₂ ⊗ ⋯ ⊗ U_{N−1}`` (the row-major unfolding of
        a product over trailing modes is the core's unfolding times ``Kᵀ``), then ``C_in`` in
        one batched product laid out as the unfolding. When every kernel mode has size 1 (a
        Linear, a 1×1 conv) ``K`` is a scalar and the unfolding is ``(G·K) U₁ᵀ``: one
        ``linear``. Autograd keeps only the factors and core-sized operands, nothing
        proportional to the weight. Plain torch ops, which ``torch.compile`` fuses.
        """
        # the ParameterList's own dict, in index order (iterating the list itself is slow)
        us: list[torch.Tensor] = [*self.factors_list._parameters.values()]  # type: ignore[list-item]
        r0, r1 = self.ranks[0], self.ranks[1]
        core: torch.Tensor = self.core
        left = us[0] * self.scaling
        if self._scalar_kernel:  # kernel modes of size 1: K is a scalar
            if len(us) > 2:
                k = us[2]
                for u in us[3:]:
                    k = k * u
                core = core.reshape(r0, r1) * k
            return left, torch.nn.functional.linear(core, us[1])  # (r₀, C_in) = G Kᵀ U₁ᵀ
        k = us[2]
        for u in us[3:]:
            k = torch.kron(k, u)  # (K, K_r): U₂ ⊗ ⋯ ⊗ U_{N−1}
        S = torch.nn.functional.linear(core.reshape(r0, r1, -1), k)  # (r₀, r₁, K) = G Kᵀ
        return left, torch.matmul(us[1], S).reshape(r0, -1)


register_generator(TuckerGenerator)
