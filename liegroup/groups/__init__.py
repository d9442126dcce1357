"""Lie groups: the :class:`LieGroup` interface and its implementations."""

from liegroup.groups.base import LieGroup
from liegroup.groups.hadamard import Hadamard, taylor_exp, taylor_remainder_bound

__all__ = ["Hadamard", "LieGroup", "taylor_exp", "taylor_remainder_bound"]
