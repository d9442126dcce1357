"""Wahba's problem on SO(3) with RiemannianAdam, checked against the closed-form SVD solution.

Find the attitude ``R`` minimising ``½ Σ w_i ‖b_i − R r_i‖²`` for reference directions ``r_i``
and noisy body-frame measurements ``b_i``. The optimum is ``U diag(1, 1, det(U Vᵀ)) Vᵀ`` with
``Σ w_i b_i r_iᵀ = U S Vᵀ`` (Markley's SVD method). Here ``R`` is a ``geoopt.ManifoldParameter``
on ``LieGroupManifold(SO(3))`` optimised by ``geoopt.optim.RiemannianAdam``.

Run: ``.venv/bin/python -m examples.wahba_so3``
"""

from __future__ import annotations

import math
import time
import warnings

import torch

import liegroup
from liegroup.manifolds import LieGroupManifold

with warnings.catch_warnings():  # geoopt warns about torch.jit.script on import
    warnings.simplefilter("ignore")
    import geoopt


def wahba_svd(b: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Closed-form optimum of Wahba's problem (rows of ``b``, ``r`` are vectors)."""
    B = (w[:, None, None] * b[:, :, None] * r[:, None, :]).sum(0)
    U, _, Vh = torch.linalg.svd(B)
    D = torch.ones(3, dtype=b.dtype)
    D[-1] = torch.linalg.det(U @ Vh)
    return U @ torch.diag(D) @ Vh


def main() -> None:
    torch.set_num_threads(1)  # tiny problems: threads only add overhead (and contention)
    torch.manual_seed(0)
    dt = torch.float64
    G = liegroup.SO(3)
    M = LieGroupManifold(G, metric="bi-invariant")
    n = 25
    r = torch.nn.functional.normalize(torch.randn(n, 3, dtype=dt), dim=1)
    R_true = G.exp(G.hat(torch.tensor([0.9, -2.1, 1.4], dtype=dt)))  # a 2.7 rad rotation
    b = r @ R_true.T + 0.02 * torch.randn(n, 3, dtype=dt)
    w = torch.rand(n, dtype=dt) + 0.5

    def loss_fn(R: torch.Tensor) -> torch.Tensor:
        return 0.5 * (w * ((b - r @ R.T) ** 2).sum(1)).sum()

    R_star = wahba_svd(b, r, w)
    R = geoopt.ManifoldParameter(M.origin(3, 3, dtype=dt), manifold=M)
    opt = geoopt.optim.RiemannianAdam([R], lr=0.05)
    t0 = time.perf_counter()
    steps = 600
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(R)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    Rd = R.detach().as_subclass(torch.Tensor)
    # geodesic distance on SO(3) with the Frobenius metric is √2·angle
    ang = (M.dist(Rd, R_star) / math.sqrt(2)).item()
    ang_true = (M.dist(R_true, R_star) / math.sqrt(2)).item()
    orth = (Rd.T @ Rd - torch.eye(3, dtype=dt)).abs().max().item()
    print(f"Wahba on SO(3): {n} weighted vector pairs, start at the identity "
          f"({(M.dist(M.origin(3, 3, dtype=dt), R_star) / math.sqrt(2)).item():.2f} rad away)")
    print(f"RiemannianAdam, {steps} steps in {elapsed:.2f} s")
    print(f"  loss {loss_fn(Rd).item():.12f}  vs SVD optimum {loss_fn(R_star).item():.12f}")
    print(f"  angle(R, R_svd) = {ang:.2e} rad   (noise puts R_svd {ang_true:.3f} rad "
          "from the true attitude)")
    print(f"  max|RᵀR − I| = {orth:.1e}   det R = {torch.linalg.det(Rd).item():.15f}")


if __name__ == "__main__":
    main()
