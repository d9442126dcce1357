"""Unfoldings and mode products against their definitions and torch.einsum."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liegroup import tensor
from liegroup.errors import DTypeError, ShapeError

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@given(shape=shapes, data=st.data())
def test_unfold_matches_definition_and_fold_inverts_it(shape, data):
    T = torch.randn(*shape, dtype=torch.float64)
    for k in range(-len(shape), len(shape)):
        M = tensor.unfold(T, k)
        assert torch.equal(M, T.movedim(k, 0).reshape(T.shape[k], -1))
        assert torch.equal(tensor.fold(M, k, T.shape), T)
        assert torch.equal(tensor.unfold(tensor.fold(M, k, T.shape), k), M)


def _einsum_mode_product(T, M, k):
    letters = string.ascii_lowercase[: T.dim()]
    out = letters[:k] + "Z" + letters[k + 1 :]
    return torch.einsum(f"Z{letters[k]},{letters}->{out}", M, T)


@given(shape=shapes, data=st.data())
def test_mode_product_matches_einsum_and_unfolding(shape, data):
    T = torch.randn(*shape, dtype=torch.float64)
    k = data.draw(st.integers(0, len(shape) - 1))
    J = data.draw(st.integers(1, 4))
    M = torch.randn(J, shape[k], dtype=torch.float64)
    P = tensor.mode_product(T, M, k)
    expected_shape = list(shape)
    expected_shape[k] = J
    assert list(P.shape) == expected_shape
    torch.testing.assert_close(P, _einsum_mode_product(T, M, k), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tensor.unfold(P, k), M @ tensor.unfold(T, k))


@given(shape=shapes, data=st.data())
def test_repeated_mode_product_composes(shape, data):
    T = torch.randn(*shape, dtype=torch.float64)
    k = data.draw(st.integers(0, len(shape) - 1))
    A = torch.randn(3, shape[k], dtype=torch.float64)
    B = torch.randn(2, 3, dtype=torch.float64)
    lhs = tensor.mode_product(tensor.mode_product(T, A, k), B, k)
    torch.testing.assert_close(lhs, tensor.mode_product(T, B @ A, k), rtol=1e-12, atol=1e-12)


def test_multi_mode_product_is_tucker_and_order_free():
    core = torch.randn(2, 3, 4, dtype=torch.float64)
    U = [torch.randn(5, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64),
         torch.randn(7, 4, dtype=torch.float64)]
    full = tensor.multi_mode_product(core, U)
    ref = torch.einsum("abc,ia,jb,kc->ijk", core, *U)
    torch.testing.assert_close(full, ref)
    rev = tensor.multi_mode_product(core, U[::-1], modes=[2, 1, 0])
    torch.testing.assert_close(full, rev)
    partial = tensor.multi_mode_product(core, [U[2]], modes=[-1])
    torch.testing.assert_close(partial, torch.einsum("abc,kc->abk", core, U[2]))


def test_errors():
    T = torch.randn(2, 3, 4)
    with pytest.raises(ShapeError, match="out of range"):
        tensor.unfold(T, 3)
    with pytest.raises(ShapeError, match="0-d"):
        tensor.unfold(torch.tensor(1.0), 0)
    with pytest.raises(ShapeError, match=r"\(3, 8\)"):
        tensor.fold(torch.zeros(3, 7), 1, (2, 3, 4))
    with pytest.raises(ShapeError, match="J, 3"):
        tensor.mode_product(T, torch.zeros(2, 4), 1)
    with pytest.raises(ShapeError):
        tensor.mode_product(T, torch.zeros(3), 1)
    with pytest.raises(DTypeError, match="floating"):
        tensor.mode_product(T.long(), torch.zeros(2, 3), 1)
    with pytest.raises(ShapeError, match="distinct"):
        tensor.multi_mode_product(T, [torch.eye(2), torch.eye(2)], modes=[0, 0])
    with pytest.raises(ShapeError, match="2 matrices but 1 modes"):
        tensor.multi_mode_product(T, [torch.eye(2), torch.eye(3)], modes=[0])
    with pytest.raises(DTypeError, match="int"):
        tensor.unfold(T, 1.0)  # type: ignore[arg-type]


def test_mode_product_refuses_mixed_dtypes():
    T = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(DTypeError, match=r"T torch\.float64 and M torch\.float32.*M\.to"):
        tensor.mode_product(T, torch.eye(2), 0)
    with pytest.raises(DTypeError, match="same dtype"):
        tensor.multi_mode_product(T, [torch.eye(2, dtype=torch.float64), torch.eye(3)])
    out = tensor.mode_product(T, torch.eye(2, dtype=torch.float64), 0)
    assert out.dtype == torch.float64 and torch.equal(out, T)
