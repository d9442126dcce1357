"""The Tucker generator's factors in float32: ``(s·U₀, unfold₀(G ×₁ U₁ ⋯ ×_{N−1} U_{N−1}))``.

``R`` and the gradients of the core and of every factor agree with the Tucker product run in
float64 by an independent formulation (:func:`liegroup.tensor.multi_mode_product`, one mode
at a time), within ``γ_n`` times the same computation on absolute values: every quantity here
is a sum of products, so that computation bounds the rounding error of any summation order
(``|fl(Σ) − Σ| ≤ γ_n Σ|terms|``, ``n`` the longest chain of roundings) — whatever BLAS and
CPU run the float32 products. Shapes: Linear; 1-d, 2-d and 3-d kernels; kernel ranks below
the kernel size; rank-1 modes. Gradients are returned only for the inputs that need them,
and results are deterministic. (``tests/peft/test_tucker_full.py`` checks the factors
against the dense product in float64 for every route.)
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from liegroup.peft import GeneratorSpec
from liegroup.peft.generators import TuckerGenerator
from liegroup.tensor import multi_mode_product

U32 = 2.0**-24  # float32 unit roundoff

SHAPES: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((64, 48), {}),
    ((20, 12, 5), {}),
    ((16, 3, 7, 7), {}),
    ((24, 37, 3, 3), {}),
    ((32, 64, 3, 3), {}),
    ((12, 10, 3, 3), {"kernel_rank": 2}),
    ((32, 32, 3, 3, 3), {}),
    ((12, 10, 3, 2, 4), {"ranks": [3, 5, 2, 1, 3]}),
    ((9, 7, 1, 1), {"ranks": [1, 1, 1, 1]}),
]
IDS = ["x".join(map(str, s)) + ("-" + "-".join(o) if o else "") for s, o in SHAPES]


def gamma(n: int) -> float:
    return n * U32 / (1.0 - n * U32)


def _generator(shape: tuple[int, ...], opts: dict[str, Any], seed: int = 0) -> TuckerGenerator:
    torch.manual_seed(seed)
    g = TuckerGenerator(GeneratorSpec(weight_shape=shape, rank=4, scaling=0.7, options=opts))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    return g


def _reference(g: TuckerGenerator, absolute: bool, gL: torch.Tensor, gR: torch.Tensor
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``R`` and the parameters' gradients in float64 by mode products (on |parameters| and
    |gradients| with ``absolute``)."""
    ps = [(q.detach().abs() if absolute else q.detach()).double().requires_grad_(True)
          for q in g.parameters()]
    core, us = ps[0], ps[1:]
    L = us[0] * g.scaling
    R = multi_mode_product(core, us[1:], range(1, len(us))).reshape(core.shape[0], -1)
    gl, gr = gL.double(), gR.double()
    if absolute:
        gl, gr = gl.abs(), gr.abs()
    torch.autograd.backward((L, R), (gl, gr))
    return R.detach(), [p.grad for p in ps]  # type: ignore[misc]


def _chain(g: TuckerGenerator) -> dict[str, int]:
    """An upper bound on the chain of roundings per output (see the module docstring).

    ``R``: the ``N − 3`` products of a ``Kron`` entry, the ``K_r`` terms of ``S = G·Kronᵀ``,
    the ``r₁`` terms of ``U₁ S``. A gradient: the forward's chain plus the terms of every
    backward sum on its path: ``∂S`` (``n₁``), ``∂U₁`` (``r₀K``), ``∂G`` (``K``), ``∂Kron``
    (``r₀r₁``, counted as ``r₀r₁K``) and a kernel factor's (at most ``K·K_r``).
    """
    r0, r1, *kr = g.ranks
    n1, *ks = g.weight_shape[1:]
    K, Kr, N = math.prod(ks), math.prod(kr), len(g.ranks)
    fwd = Kr + r1 + N
    grad = n1 + r0 * r1 * K + K * Kr + r0 * K + fwd
    return {"R": fwd, "grad": grad}


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_forward_within_derived_bound(shape: tuple[int, ...], opts: dict[str, Any]) -> None:
    g = _generator(shape, opts)
    L, R = g.factors()
    assert R.shape == (g.ranks[0], math.prod(shape[1:]))
    zl, zr = torch.zeros_like(L), torch.zeros_like(R)
    R64, _ = _reference(g, False, zl, zr)
    Rabs, _ = _reference(g, True, zl, zr)
    err = (R.double() - R64).abs()
    bound = gamma(_chain(g)["R"]) * Rabs
    assert (err <= bound).all(), f"R: worst err/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize(("shape", "opts"), SHAPES, ids=IDS)
def test_gradients_within_derived_bound(shape: tuple[int, ...], opts: dict[str, Any]) -> None:
    g = _generator(shape, opts, seed=1)
    L, R = g.factors()
    gL, gR = torch.randn_like(L), torch.randn_like(R)
    torch.autograd.backward((L, R), (gL, gR))
    _, ref = _reference(g, False, gL, gR)
    _, absref = _reference(g, True, gL, gR)
    n = _chain(g)["grad"]
    names = ["core"] + [f"U{m}" for m in range(len(g.weight_shape))]
    for name, p, r64, rabs in zip(names, g.parameters(), ref, absref, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        err = (p.grad.double() - r64).abs()
        bound = gamma(n) * rabs
        assert (err <= bound).all(), f"{name}: worst err/bound {(err / bound).max().item():.3g}"


def test_only_needed_gradients_and_deterministic() -> None:
    g = _generator((16, 20, 3, 3), {})
    g.factors_list[2].requires_grad_(False)
    g.core.requires_grad_(False)
    grads = []
    for _ in range(2):
        for p in g.parameters():
            p.grad = None
        L, R = g.factors()
        (L.square().sum() + R.square().sum()).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in g.parameters()])
    assert grads[0][0] is None and grads[0][3] is None  # core, U₂ frozen
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_no_grad_call_matches_the_training_forward() -> None:
    g = _generator((24, 37, 3, 3), {})
    L, R = g.factors()
    with torch.no_grad():
        L2, R2 = g.factors()
    assert torch.equal(L, L2) and torch.equal(R, R2)
