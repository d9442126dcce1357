"""liegroup: Lie groups in PyTorch, and structure-preserving PEFT of weights of any order.

The math layer lives here (groups, exp/log, tensor unfoldings and actions); the PEFT layer is
the subpackage :mod:`liegroup.peft`, which this package never imports.

Example:
    >>> import torch, liegroup
    >>> G = liegroup.Hadamard((3, 3))
    >>> X = torch.zeros(3, 3)
    >>> bool(torch.equal(G.exp(X), G.identity()))
    True
"""

from liegroup import errors, linalg, tensor
from liegroup._version import __version__
from liegroup.groups import GL, SE, SL, SO, Hadamard, LieGroup, MatrixLieGroup, Product

__all__ = [
    "GL",
    "SE",
    "SL",
    "SO",
    "Hadamard",
    "LieGroup",
    "MatrixLieGroup",
    "Product",
    "__version__",
    "errors",
    "linalg",
    "tensor",
]
