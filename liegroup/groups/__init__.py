"""Lie groups: the :class:`LieGroup` interface and its implementations."""

from liegroup.groups.base import LieGroup
from liegroup.groups.gl import GL, SL
from liegroup.groups.hadamard import Hadamard, taylor_exp, taylor_remainder_bound
from liegroup.groups.matrix import MatrixLieGroup
from liegroup.groups.product import Product
from liegroup.groups.se import SE
from liegroup.groups.so import SO

__all__ = [
    "GL",
    "SE",
    "SL",
    "SO",
    "Hadamard",
    "LieGroup",
    "MatrixLieGroup",
    "Product",
    "taylor_exp",
    "taylor_remainder_bound",
]
