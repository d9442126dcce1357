"""An empty batch is differentiable like any other: ``requires_grad`` of the result matches
the input's and backward gives empty gradients (issue 17)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import liegroup
from liegroup import linalg

F64 = torch.float64


def _empty(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=F64, requires_grad=True)


def _eye_empty(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64).expand(0, n, n).clone().requires_grad_()


CASES: dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]] = {}


def _case(name: str) -> Callable[[Callable[[], tuple]], Callable[[], tuple]]:
    def deco(fn: Callable[[], tuple]) -> Callable[[], tuple]:
        CASES[name] = fn
        return fn

    return deco


@_case("expm")
def _c1() -> tuple:
    A = _empty(0, 3, 3)
    return linalg.expm(A), [A]


@_case("expm_n0")
def _c2() -> tuple:
    A = _empty(2, 0, 0)
    return linalg.expm(A), [A]


@_case("logm")
def _c3() -> tuple:
    A = _eye_empty(3)
    return linalg.logm(A), [A]


@_case("expm_frechet")
def _c4() -> tuple:
    A, E = _empty(0, 3, 3), _empty(0, 3, 3)
    return linalg.expm_frechet(A, E), [A, E]


@_case("dexp")
def _c5() -> tuple:
    A, E = _empty(0, 3, 3), _empty(0, 3, 3)
    return linalg.dexp(A, E), [A, E]


@_case("dexp_inv")
def _c6() -> tuple:
    A, E = _empty(0, 3, 3), _empty(0, 3, 3)
    return linalg.dexp_inv(A, E), [A, E]


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_linalg_result_requires_grad_and_backpropagates(name: str) -> None:
    out, inputs = CASES[name]()
    assert out.numel() == 0 and out.requires_grad
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=False)
    for g, x in zip(grads, inputs, strict=True):
        assert g.shape == x.shape


GROUPS = [liegroup.SO(2), liegroup.SO(3), liegroup.SO(4), liegroup.SE(2), liegroup.SE(3),
          liegroup.GL(3), liegroup.SL(3)]


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_empty_group_exp_and_log_backpropagate(G: liegroup.groups.MatrixLieGroup) -> None:
    n = G.n
    X = _empty(0, n, n)
    g = G.exp(X)
    assert g.shape == (0, n, n) and g.requires_grad
    assert torch.autograd.grad(g.sum(), X)[0].shape == X.shape
    P = _eye_empty(n)
    L = G.log(P)
    assert L.shape == (0, n, n) and L.requires_grad
    assert torch.autograd.grad(L.sum(), P)[0].shape == P.shape


def test_empty_input_without_grad_stays_without_grad() -> None:
    assert not linalg.expm(torch.zeros(0, 3, 3)).requires_grad
    assert not linalg.logm(torch.zeros(0, 3, 3)).requires_grad


def test_empty_expm_on_both_paths(expm_path: object) -> None:
    A = _empty(0, 4, 4)
    X = linalg.expm(A)
    assert X.requires_grad and X.grad_fn is not None
    assert torch.autograd.grad(X.sum(), A)[0].shape == A.shape
