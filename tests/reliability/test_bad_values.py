"""Non-finite points, singular Jacobians, mismatched batches and meta tensors: typed errors
with what to do, never a raw torch/LAPACK error (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import liegroup
from liegroup import linalg
from liegroup.errors import DeviceError, DomainError, NonFiniteError, ShapeError
from liegroup.manifolds import LieGroupManifold

BAD = [math.nan, math.inf, -math.inf]


def _groups() -> list[liegroup.groups.base.LieGroup]:
    return [liegroup.SO(3), liegroup.SO(5), liegroup.SE(2), liegroup.SE(3), liegroup.GL(3),
            liegroup.SL(3), liegroup.Hadamard((2, 3))]


def _point(G: object, batch: int) -> torch.Tensor:
    return G.identity(batch, dtype=torch.float64) if not isinstance(  # type: ignore[attr-defined]
        G, liegroup.Hadamard) else torch.ones(batch, *G.shape, dtype=torch.float64)


@pytest.mark.parametrize("G", _groups(), ids=repr)
@given(bad=st.sampled_from(BAD), batch=st.integers(1, 3), data=st.data())
def test_project_and_projx_of_non_finite_point_raise_non_finite_error(
    G: object, bad: float, batch: int, data: st.DataObject
) -> None:
    g = _point(G, batch)
    flat = g.view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = bad
    with pytest.raises(NonFiniteError, match="non-finite"):
        G.project(g)  # type: ignore[attr-defined]
    M = LieGroupManifold(G)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="non-finite"):
        M.projx(g)


def test_product_project_of_non_finite_factor_raises() -> None:
    P = liegroup.Product(liegroup.SO(3), liegroup.Hadamard((2,)))
    g = (torch.full((3, 3), math.nan), torch.ones(2))
    with pytest.raises(NonFiniteError):
        P.project(g)
    with pytest.raises(NonFiniteError):
        P.project((torch.eye(3), torch.tensor([1.0, math.inf])))


def test_hadamard_project_refuses_zeros_without_clipping() -> None:
    H = liegroup.Hadamard((3,))
    with pytest.raises(DomainError, match="zero entries"):
        H.project(torch.tensor([1.0, 0.0, -2.0]))
    x = torch.tensor([1.0, -3.0, 1e-30])
    assert H.project(x) is x


def test_project_checks_survive_torch_compile() -> None:
    # eagerly a typed error; compiled, the check is an in-graph assertion (RuntimeError)
    G = liegroup.SO(3)
    f = torch.compile(G.project, fullgraph=False, backend="eager")
    assert torch.allclose(f(torch.eye(3)), torch.eye(3))
    with pytest.raises((NonFiniteError, RuntimeError)):
        f(torch.full((3, 3), math.nan))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dexp_inv_at_a_2pi_singularity_raises_domain_error_or_blows_up(dtype: torch.dtype) -> None:
    # X = θ J with θ = π: ad_X has eigenvalues ±2iθ = ±2πi; Z = diag(1, −1) lies in that
    # eigenspace. Exactly singular (in the dtype): a DomainError that says why and what to do;
    # otherwise (π rounded off the singularity) the true, huge solution
    X = torch.tensor([[0.0, -math.pi], [math.pi, 0.0]], dtype=dtype)
    Z = torch.diag(torch.tensor([1.0, -1.0], dtype=dtype))
    try:
        Y = linalg.dexp_inv(X, Z)
    except DomainError as e:
        assert "2πik" in str(e) and "log(exp(X))" in str(e)
    else:
        assert torch.isfinite(Y).all()
        assert float(Y.abs().max()) > 1 / (64 * torch.finfo(dtype).eps)


def test_dexp_inv_exact_singularity_float32_names_batch_index() -> None:
    X = torch.zeros(3, 2, 2)
    X[1] = torch.tensor([[0.0, -2 * math.pi], [2 * math.pi, 0.0]])
    with pytest.raises(DomainError, match=r"indices \[1\]"):
        linalg.dexp_inv(X, torch.eye(2).expand(3, 2, 2))


@pytest.mark.parametrize(
    "fn",
    [linalg.expm_frechet, linalg.dexp, linalg.dexp_inv, linalg.bch],
    ids=lambda f: f.__name__,
)
def test_batch_mismatch_raises_shape_error(fn: object) -> None:
    with pytest.raises(ShapeError, match=r"broadcast|shape"):
        fn(torch.zeros(2, 3, 3), torch.zeros(4, 3, 3))  # type: ignore[operator]


META_RAISES = {
    "logm": lambda m: linalg.logm(m),
    "expm_frechet": lambda m: linalg.expm_frechet(m, m),
    "dexp": lambda m: linalg.dexp(m, m),
    "dexp_inv": lambda m: linalg.dexp_inv(m, m),
    "bch": lambda m: linalg.bch(m, m),
    "phi1": lambda m: linalg.phi1(m),
    "SO3.exp": lambda m: liegroup.SO(3).exp(m),
    "SO3.log": lambda m: liegroup.SO(3).log(m),
    "GL3.exp": lambda m: liegroup.GL(3).exp(m),
    "SO3.project": lambda m: liegroup.SO(3).project(m),
    "projx": lambda m: LieGroupManifold(liegroup.SO(3)).projx(m),
}


@pytest.mark.parametrize("name", sorted(META_RAISES))
def test_meta_tensors_raise_device_error_where_values_are_needed(name: str) -> None:
    m = torch.zeros(2, 3, 3, device="meta")
    with pytest.raises(DeviceError, match="'meta' device"):
        META_RAISES[name](m)


def test_meta_tensors_propagate_shapes_where_no_value_is_read() -> None:
    # decided: functions that only need shapes keep working on meta (model init on meta)
    m = torch.zeros(2, 3, 3, device="meta")
    assert linalg.expm(m).device.type == "meta"
    assert liegroup.Hadamard((3,)).exp(torch.zeros(3, device="meta")).shape == (3,)
    T = torch.zeros(3, 4, device="meta")
    assert liegroup.tensor.mode_product(T, torch.zeros(3, 3, device="meta"), 0).shape == (3, 4)


@given(
    log_delta=st.floats(-17.0, -6.0),
    n=st.sampled_from([2, 3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_logm_near_the_branch_cut_gives_a_log_or_domain_error(
    log_delta: float, n: int, dtype: torch.dtype
) -> None:
    # rotations by π − δ: a finite result or a DomainError, never a raw LAPACK error
    theta = math.pi - 10.0**log_delta
    R = torch.eye(n, dtype=torch.float64)
    R[:2, :2] = torch.tensor([[math.cos(theta), -math.sin(theta)],
                              [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    try:
        L = linalg.logm(R.to(dtype))
    except DomainError as e:
        assert "negative real axis" in str(e)
        return
    assert torch.isfinite(L).all()
