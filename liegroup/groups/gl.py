"""The general and special linear groups ``GL(n)`` and ``SL(n)``.

* ``GL(n)``: invertible ``n × n`` matrices; algebra ``gl(n)`` = all matrices, ``dim = n²``;
  ``vee`` is the row-major flatten. ``exp``/``log`` are ``liegroup.linalg.expm``/``logm``;
  ``log`` is the principal real logarithm, defined when no eigenvalue lies on the closed
  negative real axis, and raises :class:`~liegroup.errors.DomainError` otherwise.
* ``SL(n)``: determinant one; algebra ``sl(n)`` = traceless matrices, ``dim = n² − 1``;
  ``vee`` is the row-major flatten without the last entry ``X[n−1, n−1] = −Σ_{i<n−1} X[i, i]``.
  ``exp`` of a traceless matrix has ``det = e^{tr X} = 1``; ``log`` returns an exactly
  traceless matrix. ``project`` scales by ``|det|^{−1/n}`` (with sign ``−1`` for a negative
  determinant when ``n`` is odd; a negative determinant with ``n`` even cannot be reached by
  scaling and raises :class:`~liegroup.errors.DomainError`).

``random`` returns ``exp`` of ``random_algebra`` (standard normal entries over ``√n``), so points
lie in the identity component, inside the domain of the principal log almost surely.

Example:
    >>> import torch, liegroup
    >>> G = liegroup.SL(3)
    >>> g = G.exp(G.random_algebra(dtype=torch.float64))
    >>> round(float(torch.linalg.det(g)), 12)
    1.0
"""

from __future__ import annotations

import math

import torch

from liegroup._validation import check_finite, offending
from liegroup.errors import DomainError
from liegroup.groups.base import check_batch, where_batch
from liegroup.groups.matrix import _HALF, MatrixLieGroup, default_atol

__all__ = ["GL", "SL"]


class GL(MatrixLieGroup):
    """General linear group ``GL(n)`` of invertible ``n × n`` matrices.

    Example:
        >>> import torch, liegroup
        >>> G = liegroup.GL(2)
        >>> G.contains(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # singular
        tensor(False)
    """

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.dim = n * n

    def hat(self, v: torch.Tensor) -> torch.Tensor:
        """Row-major reshape ``(*batch, n²) → (*batch, n, n)``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.GL(2).hat(torch.arange(4.0))
            tensor([[0., 1.],
                    [2., 3.]])
        """
        self._check_vector(v)
        return v.reshape(*v.shape[:-1], self.n, self.n)

    def vee(self, X: torch.Tensor) -> torch.Tensor:
        """Row-major flatten ``(*batch, n, n) → (*batch, n²)``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.GL(2).vee(torch.eye(2))
            tensor([1., 0., 0., 1.])
        """
        self.check_algebra(X, "X")
        return X.flatten(-2)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` itself if it is invertible (``GL(n)`` is open); ``DomainError`` otherwise.

        ``NonFiniteError`` for NaN or infinite entries.

        Example:
            >>> import torch, liegroup
            >>> liegroup.GL(2).project(torch.eye(2))
            tensor([[1., 0.],
                    [0., 1.]])
        """
        self.check_point(g, "g")
        check_finite(g, "g")  # NaN/inf: a typed NonFiniteError, not "singular"
        ok = self.contains(g)
        hit = offending(~ok)
        if hit is not None:
            count, bad = hit
            raise DomainError(
                f"{count} matrices are numerically singular (no nearest invertible "
                f"matrix exists){where_batch(bad)}"
            )
        return g

    def project_algebra(self, X: torch.Tensor) -> torch.Tensor:
        """Identity: every matrix is in ``gl(n)``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.GL(1).project_algebra(torch.ones(1, 1))
            tensor([[1.]])
        """
        self.check_algebra(X, "X")
        return X

    def contains(self, g: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Finite and numerically invertible: ``σ_min(g) > atol·σ_max(g)`` (default ``1e4·u``).

        Example:
            >>> import torch, liegroup
            >>> liegroup.GL(2).contains(torch.eye(2))
            tensor(True)
        """
        self.check_point(g, "g")
        tol = default_atol(g.dtype) if atol is None else float(atol)
        finite = torch.isfinite(g).flatten(-2).all(-1)
        g0 = torch.where(finite[..., None, None], g, torch.zeros_like(g))
        if g0.dtype in _HALF:  # residuals of a half-precision point, computed in float32
            g0 = g0.float()
        sv = torch.linalg.svdvals(g0)
        return finite & (sv[..., -1] > tol * sv[..., 0])

    def _algebra_residual(self, X: torch.Tensor) -> torch.Tensor:
        return torch.zeros(X.shape[:-2], dtype=X.dtype, device=X.device)

    def _log(self, g: torch.Tensor) -> torch.Tensor:
        from liegroup.linalg import logm

        return logm(g)

    def random(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``exp(random_algebra)``: a point of the identity component.

        Example:
            >>> import liegroup
            >>> G = liegroup.GL(3)
            >>> bool(G.contains(G.random(2)).all())
            True
        """
        X = self.random_algebra(*batch, dtype=dtype, device=device, generator=generator)
        return self._exp(X)

    def random_algebra(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Standard-normal entries over ``√n`` (spectral radius ``O(1)``).

        Example:
            >>> import liegroup
            >>> liegroup.GL(3).random_algebra(2).shape
            torch.Size([2, 3, 3])
        """
        batch = check_batch(batch)
        X = torch.randn(*batch, self.n, self.n, dtype=dtype, device=device, generator=generator)
        return X / math.sqrt(self.n)


class SL(GL):
    """Special linear group ``SL(n)``: ``det g = 1``; algebra: traceless matrices.

    Example:
        >>> import torch, liegroup
        >>> G = liegroup.SL(2)
        >>> G.project(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        tensor([[1., 0.],
                [0., 1.]])
    """

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.dim = n * n - 1

    def hat(self, v: torch.Tensor) -> torch.Tensor:
        """``(*batch, n²−1) → (*batch, n, n)`` traceless: the last diagonal entry is implied.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SL(2).hat(torch.tensor([1.0, 2.0, 3.0]))
            tensor([[ 1.,  2.],
                    [ 3., -1.]])
        """
        self._check_vector(v)
        n = self.n
        diag = v[..., :: n + 1]  # the first n−1 diagonal entries in row-major order
        last = -diag.sum(-1, keepdim=True)
        return torch.cat([v, last], -1).reshape(*v.shape[:-1], n, n)

    def vee(self, X: torch.Tensor) -> torch.Tensor:
        """Row-major flatten without the last entry ``(*batch, n, n) → (*batch, n²−1)``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SL(2).vee(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
            tensor([1., 2., 3.])
        """
        self.check_algebra(X, "X")
        return X.flatten(-2)[..., :-1]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Scale to determinant one: ``g·s·|det g|^{−1/n}``, ``s = sign(det g)`` for odd ``n``.

        Raises:
            DomainError: for a singular ``g`` or, with ``n`` even, a negative determinant.
            NonFiniteError: ``g`` has NaN or infinite entries.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SL(3).project(-2 * torch.eye(3, dtype=torch.float64)).diagonal()
            tensor([1., 1., 1.], dtype=torch.float64)
        """
        self.check_point(g, "g")
        check_finite(g, "g")
        n = self.n
        sign, logabs = torch.linalg.slogdet(g)
        bad = (sign == 0) | ~torch.isfinite(logabs)
        if n % 2 == 0:
            bad = bad | (sign < 0)
        hit = offending(bad)
        if hit is not None:
            count, idx = hit
            raise DomainError(
                f"{count} matrices cannot be scaled onto SL({n}) (singular, or a "
                f"negative determinant with n even){where_batch(idx)}"
            )
        scale = sign * torch.exp(-logabs / n) if n % 2 else torch.exp(-logabs / n)
        return g * scale[..., None, None]

    def project_algebra(self, X: torch.Tensor) -> torch.Tensor:
        """Traceless part ``X − (tr X / n)·I``.

        Example:
            >>> import torch, liegroup
            >>> liegroup.SL(2).project_algebra(torch.eye(2))
            tensor([[0., 0.],
                    [0., 0.]])
        """
        self.check_algebra(X, "X")
        tr = X.diagonal(dim1=-2, dim2=-1).sum(-1) / self.n
        eye = torch.eye(self.n, dtype=X.dtype, device=X.device)
        return X - tr[..., None, None] * eye

    def contains(self, g: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Finite and ``|det g − 1| <= atol`` (default ``1e4·u``).

        Example:
            >>> import torch, liegroup
            >>> liegroup.SL(2).contains(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
            tensor(True)
        """
        self.check_point(g, "g")
        tol = default_atol(g.dtype) if atol is None else float(atol)
        finite = torch.isfinite(g).flatten(-2).all(-1)
        g0 = torch.where(finite[..., None, None], g, torch.zeros_like(g))
        if g0.dtype in _HALF:  # residuals of a half-precision point, computed in float32
            g0 = g0.float()
        return finite & ((torch.linalg.det(g0) - 1).abs() <= tol)

    def _algebra_residual(self, X: torch.Tensor) -> torch.Tensor:
        return X.diagonal(dim1=-2, dim2=-1).sum(-1).abs()

    def _log(self, g: torch.Tensor) -> torch.Tensor:
        return self.project_algebra(super()._log(g))

    def random_algebra(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Traceless part of a standard-normal matrix over ``√n``.

        Example:
            >>> import torch, liegroup
            >>> X = liegroup.SL(3).random_algebra(dtype=torch.float64)
            >>> abs(float(X.trace())) < 1e-15
            True
        """
        X = super().random_algebra(*batch, dtype=dtype, device=device, generator=generator)
        return self.project_algebra(X)
