"""Batched, differentiable matrix functions in torch.

``expm``, ``expm_frechet``, ``logm``, ``dexp``/``dexp_inv`` and the Baker–Campbell–Hausdorff
series ``bch``; low-rank exponentials ``exp(L Rᵀ) = I + L φ₁(RᵀL) Rᵀ`` (``phi1``,
``expm_lowrank*``) that never form an n×n matrix. See ``docs/linalg.md`` for the algorithms,
accuracy guarantees and measurements.

Example:
    >>> import torch
    >>> from liegroup import linalg
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> torch.allclose(linalg.logm(linalg.expm(A)), A)
    True
"""

from liegroup.linalg.bch import MAX_BCH_ORDER, bch
from liegroup.linalg.dexp import dexp, dexp_inv
from liegroup.linalg.expm import compiled_kernel, expm, expm_frechet
from liegroup.linalg.logm import logm
from liegroup.linalg.lowrank import (
    expm_lowrank,
    expm_lowrank_apply,
    expm_lowrank_factor,
    eye_plus_lowrank_mode_product,
    eye_plus_lowrank_two_sided,
    phi1,
)

__all__ = [
    "MAX_BCH_ORDER",
    "bch",
    "compiled_kernel",
    "dexp",
    "dexp_inv",
    "expm",
    "expm_frechet",
    "expm_lowrank",
    "expm_lowrank_apply",
    "expm_lowrank_factor",
    "eye_plus_lowrank_mode_product",
    "eye_plus_lowrank_two_sided",
    "logm",
    "phi1",
]
