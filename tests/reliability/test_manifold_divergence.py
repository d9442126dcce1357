"""A diverging manifold step is reported, typed, at the step that diverged (issue 17).

Decision (documented in ``LieGroupManifold.expmap``): a step from a finite point with a finite
tangent vector whose result is not finite raises :class:`OverflowResultError`; nothing is
returned, so an optimiser's parameter keeps its last finite value.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup.errors import NonFiniteError, OverflowResultError
from liegroup.manifolds import LieGroupManifold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(step=st.floats(1.0, 1e6), x0=st.floats(0.5, 4.0), sign=st.sampled_from([-1.0, 1.0]))
def test_hadamard_step_is_finite_or_raises_overflow(
    dtype: torch.dtype, step: float, x0: float, sign: float
) -> None:
    M = LieGroupManifold(liegroup.Hadamard((2,)))
    x = torch.tensor([sign * x0, 1.0], dtype=dtype)
    u = x * torch.tensor([step, 0.0], dtype=dtype)  # algebra part x⁻¹u = (step, 0)
    exact = math.log(x0) + step  # log |y₀|
    if exact > math.log(torch.finfo(dtype).max) + 1e-3:
        with pytest.raises(OverflowResultError, match="diverged"):
            M.expmap(x, u)
    elif exact < math.log(torch.finfo(dtype).max) - 1e-3:
        y = M.expmap(x, u)
        assert torch.isfinite(y).all()


def test_riemannian_adam_keeps_the_last_finite_point() -> None:
    M = LieGroupManifold(liegroup.Hadamard((3,)))
    p = geoopt.ManifoldParameter(torch.tensor([1.0, 2.0, 3.0]), manifold=M)
    opt = geoopt.optim.RiemannianSGD([p], lr=1e4)
    before = p.detach().clone()
    (p * torch.tensor([-100.0, 0.0, 0.0])).sum().backward()  # the step grows p[0]
    with pytest.raises(OverflowResultError):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_non_finite_start_is_a_non_finite_error() -> None:
    M = LieGroupManifold(liegroup.GL(2))
    with pytest.raises(NonFiniteError):
        M.expmap(torch.full((2, 2), math.nan), torch.zeros(2, 2))


def test_gl_step_overflow_is_typed() -> None:
    M = LieGroupManifold(liegroup.GL(2))
    x = torch.eye(2, dtype=torch.float64)
    with pytest.raises(OverflowResultError):
        M.expmap(x, torch.diag(torch.tensor([800.0, 0.0], dtype=torch.float64)))
