"""Batched, differentiable matrix functions in torch.

``expm``, ``expm_frechet``, ``logm``, ``dexp``/``dexp_inv`` and the Baker–Campbell–Hausdorff
series ``bch``.

See ``docs/linalg.md`` for the algorithms, accuracy guarantees and measurements.

Example:
    >>> import torch
    >>> from liegroup import linalg
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> torch.allclose(linalg.expm(A) @ linalg.expm(-A), torch.eye(2, dtype=torch.float64))
    True
"""

from liegroup.linalg.expm import expm, expm_frechet

__all__ = ["expm", "expm_frechet"]
