"""geoopt optimisers on LieGroupManifold: convergence, no drift, state-dict round trips."""

from __future__ import annotations

import io
import pickle

import geoopt
import pytest
import torch

import liegroup
from liegroup.errors import DomainError
from liegroup.manifolds import (
    LieGroupManifold,
    check_manifold_parameters,
    load_optimizer_state_dict,
    plain_state_dict,
)
from tests.conftest import eps
from tests.test_manifolds import GROUPS, _manifold, _point


def _procrustes(n: int, dtype: torch.dtype, seed: int = 0):
    """``min_R ‖R A − B‖²`` over SO(n) and its closed-form optimum.

    With ``B Aᵀ = U S Vᵀ`` the minimiser is ``U diag(1, …, 1, det(U Vᵀ)) Vᵀ`` (the special
    orthogonal Procrustes solution).
    """
    gen = torch.Generator().manual_seed(seed)
    m = 8 * n
    A = torch.randn(n, m, dtype=torch.float64, generator=gen) / m**0.5
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]
    B = Q @ A + 0.3 * torch.randn(n, m, dtype=torch.float64, generator=gen) / m**0.5
    U, _, Vh = torch.linalg.svd(B @ A.T)
    D = torch.ones(n, dtype=torch.float64)
    D[-1] = torch.linalg.det(U @ Vh)
    R_star = U @ torch.diag(D) @ Vh
    return A.to(dtype), B.to(dtype), R_star


def _run_procrustes(opt_name: str, dtype: torch.dtype, steps: int):
    n = 5
    A, B, R_star = _procrustes(n, dtype)
    M = LieGroupManifold(liegroup.SO(n))
    R = geoopt.ManifoldParameter(M.origin(n, n, dtype=dtype), manifold=M)
    if opt_name == "sgd":
        opt = geoopt.optim.RiemannianSGD([R], lr=0.2, momentum=0.9)
    else:
        opt = geoopt.optim.RiemannianAdam([R], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((R @ A - B) ** 2).sum()
        loss.backward()
        opt.step()
    return R.detach().as_subclass(torch.Tensor), R_star


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_procrustes_so5_reaches_the_svd_optimum_float64(opt_name):
    R, R_star = _run_procrustes(opt_name, torch.float64, 600)
    eye = torch.eye(5, dtype=torch.float64)
    assert (R.T @ R - eye).abs().max().item() <= 1e-10
    assert abs(torch.linalg.det(R).item() - 1) <= 1e-10
    assert (R - R_star).abs().max().item() <= 1e-8


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_procrustes_so5_float32_stays_orthogonal(opt_name):
    R, R_star = _run_procrustes(opt_name, torch.float32, 600)
    u = eps(torch.float32)
    eye = torch.eye(5)
    assert (R.T @ R - eye).abs().max().item() <= 50 * u
    assert abs(torch.linalg.det(R).item() - 1) <= 50 * u
    # float32 gradients limit the optimum to about sqrt(u)·cond, far above 50u
    assert (R.double() - R_star).abs().max().item() <= 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", list(GROUPS))
def test_rsgd_converges_to_a_target_point_on_every_group(name, momentum):
    # min ‖x − y‖_F² over the group has its minimum 0 at x = y; from a start at distance ~0.5
    M = _manifold(name)
    dtype = torch.float64
    y = _point(M, (), dtype, 1)
    gen = torch.Generator().manual_seed(2)
    X0 = M.algebra_part(y, torch.randn(y.shape, dtype=dtype, generator=gen) * y.abs().amax())
    X0 = 0.5 * X0 / X0.norm()
    x = geoopt.ManifoldParameter(M.retr(y, M._ops.translate(y, X0)), manifold=M)
    opt = geoopt.optim.RiemannianSGD([x], lr=0.05, momentum=momentum)
    steps = 0
    while steps < 3000 and (steps % 50 or M.dist(x.detach(), y).item() > 1e-9):
        opt.zero_grad()
        ((x - y) ** 2).sum().backward()
        opt.step()
        steps += 1
    xd = x.detach().as_subclass(torch.Tensor)
    assert M.dist(xd, y).item() <= 1e-9, steps
    ok, reason = M._check_point_on_manifold(xd, atol=1e-12, rtol=0)
    assert ok, reason


def test_riemannian_adam_stabilize_option():
    M = _manifold("SO3")
    R = geoopt.ManifoldParameter(M.random(3, 3, dtype=torch.float64), manifold=M)
    opt = geoopt.optim.RiemannianAdam([R], lr=0.01, stabilize=5)
    target = torch.eye(3, dtype=torch.float64)
    for _ in range(20):
        opt.zero_grad()
        ((R - target) ** 2).sum().backward()
        opt.step()
    ok, reason = M._check_point_on_manifold(R.detach(), atol=1e-13, rtol=0)
    assert ok, reason


# ---------------------------------------------------------------------------------- saving
class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        so = LieGroupManifold(liegroup.SO(3))
        had = LieGroupManifold(liegroup.Hadamard((2, 3)))
        self.R = geoopt.ManifoldParameter(so.origin(3, 3, dtype=torch.float64), manifold=so)
        self.h = geoopt.ManifoldParameter(had.origin(2, 3, dtype=torch.float64), manifold=had)
        self.bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.R.T + self.bias) @ self.h.T


def _train(net: _Net, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, dtype=torch.float64, generator=gen)
        opt.zero_grad()
        ((net(x) - x[:, :2]) ** 2).mean().backward()
        opt.step()


def _roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_state_dict_round_trip_under_weights_only(opt_name):
    def make(net: _Net) -> torch.optim.Optimizer:
        if opt_name == "adam":
            return geoopt.optim.RiemannianAdam(net.parameters(), lr=0.05)
        return geoopt.optim.RiemannianSGD(net.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    net = _Net()
    opt = make(net)
    _train(net, opt, 5, seed=1)
    model_sd = _roundtrip(net.state_dict())
    opt_sd = _roundtrip(opt.state_dict())
    assert all(type(v) is torch.Tensor for v in model_sd.values())  # type: ignore[attr-defined]

    net2 = _Net()
    net2.load_state_dict(model_sd)  # type: ignore[arg-type]
    opt2 = make(net2)
    load_optimizer_state_dict(opt2, opt_sd)  # type: ignore[arg-type]
    check_manifold_parameters(net2)
    assert isinstance(net2.R, geoopt.ManifoldParameter)  # still on its manifold
    # continuing from the checkpoint is bit-identical to never having stopped
    _train(net, opt, 5, seed=2)
    _train(net2, opt2, 5, seed=2)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_manifold_tensors_themselves_need_plain_state_dict():
    net = _Net()
    # geoopt pickles a ManifoldParameter through functools.partial: weights_only refuses it
    with pytest.raises(pickle.UnpicklingError):
        _roundtrip(net.state_dict(keep_vars=True))
    loaded = _roundtrip(plain_state_dict(net.state_dict(keep_vars=True)))
    assert set(loaded) == {"R", "h", "bias"}  # type: ignore[arg-type]
    assert all(type(v) is torch.Tensor for v in loaded.values())  # type: ignore[attr-defined]
    nested = {"a": [net.R, (net.h, 3)], "b": "x"}
    back = _roundtrip(plain_state_dict(nested))
    assert torch.equal(back["a"][0], net.R.detach())  # type: ignore[index]
    assert back["a"][1][1] == 3 and back["b"] == "x"  # type: ignore[index]


def test_check_manifold_parameters_rejects_off_group_checkpoints():
    net = _Net()
    sd = net.state_dict()
    sd["R"] = 2 * sd["R"]
    net.load_state_dict(sd)
    with pytest.raises(DomainError, match="'R'"):
        check_manifold_parameters(net)
