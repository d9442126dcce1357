"""An orthogonal adapter trained with RiemannianAdam on SO(d), instead of an exp-parametrisation.

A frozen "pretrained" ``nn.Linear`` with weight ``W`` (d_out × d_in) is adapted to
``W' = R·W`` with ``R ∈ SO(d_out)`` (orthogonal fine-tuning: the singular values of ``W`` are
preserved exactly). The usual way to train ``R`` is an exp-parametrisation: a free matrix ``A``,
``R = matrix_exp(A − Aᵀ)``, optimised by ``torch.optim.Adam`` (one matrix exponential and its
backward per step). Here ``R`` itself is a ``geoopt.ManifoldParameter`` on
``LieGroupManifold(SO(d_out))`` optimised by ``geoopt.optim.RiemannianAdam``: the forward is a
plain matmul, and each step is ``R·exp(ξ)`` re-orthonormalised, so ``R`` stays on SO(d_out).

The task: recover a rotated teacher ``R_true·W`` from noisy input/output pairs.

Run: ``.venv/bin/python -m examples.orthogonal_adapter``
"""

from __future__ import annotations

import time
import warnings

import torch
from torch.nn import functional as F  # noqa: N812

import liegroup
from liegroup.manifolds import LieGroupManifold

with warnings.catch_warnings():  # geoopt warns about torch.jit.script on import
    warnings.simplefilter("ignore")
    import geoopt


class RotatedLinear(torch.nn.Module):
    """``F.linear(x, R @ W, b)`` with ``W``, ``b`` frozen; subclasses say what ``R`` is."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    def rotation(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rotation() @ self.base.weight, self.base.bias)


class OrthogonalAdapter(RotatedLinear):
    """``R ∈ SO(d_out)`` itself is the trainable parameter (Riemannian optimisation)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base)
        d = base.out_features
        self.manifold = LieGroupManifold(liegroup.SO(d), metric="bi-invariant")
        eye = self.manifold.origin(d, d, dtype=base.weight.dtype)
        self.R = geoopt.ManifoldParameter(eye, manifold=self.manifold)

    def rotation(self) -> torch.Tensor:
        return self.R


class ExpAdapter(RotatedLinear):
    """The exp-parametrised baseline: ``R = matrix_exp(A − Aᵀ)``, ``A`` a free matrix."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base)
        d = base.out_features
        self.A = torch.nn.Parameter(torch.zeros(d, d, dtype=base.weight.dtype))

    def rotation(self) -> torch.Tensor:
        return torch.linalg.matrix_exp(self.A - self.A.T)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor,
          Y: torch.Tensor, steps: int) -> tuple[float, float]:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        sched.step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    with torch.no_grad():
        return F.mse_loss(model(X), Y).item(), ms


def main() -> None:
    torch.set_num_threads(1)  # tiny problems: threads only add overhead (and contention)
    torch.manual_seed(0)
    d_in, d_out, n, steps = 64, 32, 512, 300
    base = torch.nn.Linear(d_in, d_out)
    G = liegroup.SO(d_out)
    gen = torch.randn(d_out, d_out, dtype=torch.float64)
    R_true64 = G.exp(0.5 * G.project_algebra(gen))  # the teacher's rotation, float64
    R_true = R_true64.float()
    X = torch.randn(n, d_in)
    with torch.no_grad():
        Y = F.linear(X, R_true @ base.weight, base.bias) + 0.01 * torch.randn(n, d_out)
        start = F.mse_loss(base(X), Y).item()

    # RiemannianAdam normalises by one second moment per *point* (geoopt's component_inner),
    # so its lr is a step length in the algebra's Frobenius norm, not per coordinate
    ours = OrthogonalAdapter(base)
    loss_r, ms_r = train(ours, geoopt.optim.RiemannianAdam([ours.R], lr=0.5), X, Y, steps)
    R = ours.R.detach().as_subclass(torch.Tensor)

    sgd = OrthogonalAdapter(base)
    opt_s = geoopt.optim.RiemannianSGD([sgd.R], lr=2.0, momentum=0.9)
    loss_s, ms_s = train(sgd, opt_s, X, Y, steps)
    R_s = sgd.R.detach().as_subclass(torch.Tensor)

    baseline = ExpAdapter(base)
    loss_e, ms_e = train(baseline, torch.optim.Adam([baseline.A], lr=0.02), X, Y, steps)
    with torch.no_grad():
        R_e = baseline.rotation()

    eye = torch.eye(d_out)
    sv_w = torch.linalg.svdvals(base.weight.detach().double())
    print(f"Orthogonal adapter on a frozen Linear({d_in}, {d_out}), float32, {steps} full-batch "
          f"steps (cosine lr); trainable: R ∈ SO({d_out}) ({G.dim} degrees of freedom)")
    print(f"  MSE before adapting: {start:.4f}; noise floor: {0.01**2:.1e}")
    print(f"{'':24}{'final MSE':>12}{'max|RᵀR−I|':>14}{'det R':>12}{'ms/step':>10}"
          f"{'Δσ(W)':>10}")
    rows = (("RiemannianAdam on SO(d)", loss_r, R, ms_r),
            ("RiemannianSGD, momentum", loss_s, R_s, ms_s),
            ("Adam on exp(A − Aᵀ)", loss_e, R_e, ms_e))
    for label, loss, Rm, ms in rows:
        orth = (Rm.T @ Rm - eye).abs().max().item()
        dsv = (torch.linalg.svdvals((Rm @ base.weight.detach()).double()) - sv_w).abs().max()
        print(f"  {label:22}{loss:12.3e}{orth:14.1e}{torch.linalg.det(Rm).item():12.7f}"
              f"{ms:10.2f}{dsv.item():10.1e}")
    print(f"  RiemannianAdam's R is at distance "
          f"{ours.manifold.dist(ours.manifold.projx(R.double()), R_true64).item():.2e} "
          "from the teacher's rotation (started at "
          f"{ours.manifold.dist(torch.eye(d_out, dtype=torch.float64), R_true64).item():.1f})")


if __name__ == "__main__":
    main()
