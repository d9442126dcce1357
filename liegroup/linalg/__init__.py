"""Batched, differentiable matrix functions in torch.

``expm``, ``expm_frechet``, ``logm``, ``dexp``/``dexp_inv`` and the Baker–Campbell–Hausdorff
series ``bch``. See ``docs/linalg.md`` for the algorithms, accuracy guarantees and
measurements.

Example:
    >>> import torch
    >>> from liegroup import linalg
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> torch.allclose(linalg.logm(linalg.expm(A)), A)
    True
"""

from liegroup.linalg.bch import MAX_BCH_ORDER, bch
from liegroup.linalg.dexp import dexp, dexp_inv
from liegroup.linalg.expm import expm, expm_frechet
from liegroup.linalg.logm import logm

__all__ = ["MAX_BCH_ORDER", "bch", "dexp", "dexp_inv", "expm", "expm_frechet", "logm"]
