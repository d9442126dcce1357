"""Shared base of the matrix Lie groups ``G ⊂ GL(n)`` (GL, SL, SO, SE).

Points and algebra elements are ``(*batch, n, n)`` matrices; batch shapes broadcast.

* product ``g·h = g @ h``, identity ``I``, inverse ``g⁻¹``;
* bracket ``[X, Y] = XY − YX``, adjoint ``Ad_g X = g X g⁻¹``;
* action on a tensor: ``act(g, T, mode=k) = T ×_k g`` (every mode-``k`` fibre multiplied by
  ``g``; :func:`liegroup.tensor.mode_product`);
* ``hat``/``vee`` map between the algebra (matrices) and ``R^dim`` (a basis ``E_i = hat(e_i)``
  fixed per group, documented there); Jacobians and :meth:`MatrixLieGroup.adjoint_matrix` are
  ``dim × dim`` matrices in those coordinates;
* Jacobians: ``exp(ξ + δ) ≈ exp(J_l(ξ) δ)·exp(ξ) ≈ exp(ξ)·exp(J_r(ξ) δ)`` to first order,
  ``J_l(ξ) = Σ_k ad_ξ^k/(k+1)!``, ``J_r(ξ) = J_l(−ξ)``, ``J_l(ξ) = Ad_{exp ξ}·J_r(ξ)``. The
  generic implementation calls the left-trivialised ``liegroup.linalg.dexp`` (``J_r``);
  closed-form groups override it.

Example:
    >>> import torch, liegroup
    >>> G = liegroup.SO(3)
    >>> g = G.exp(G.hat(torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)))
    >>> T = torch.ones(2, 3, 4, dtype=torch.float64)
    >>> G.act(g, T, mode=1).shape
    torch.Size([2, 3, 4])
"""

from __future__ import annotations

import torch

from liegroup import tensor as _tensor
from liegroup._validation import check_finite, check_tensor, normalize_mode, offending
from liegroup.errors import DomainError, DTypeError, OverflowResultError, ShapeError
from liegroup.groups.base import LieGroup, broadcast_batch, check_batch, where_batch

__all__ = ["MatrixLieGroup", "default_atol"]


def default_atol(dtype: torch.dtype) -> float:
    """Default tolerance of ``contains`` and of the algebra checks: ``1e4·u`` of ``dtype``.

    (``1.1e-12`` in float64, ``6e-4`` in float32: room for the drift of a few thousand
    products, while far below any real departure from the group.) For float16/bfloat16, whose
    maps compute in float32 and round once, ``32·u`` (``1.6e-2``, resp. ``0.125``).

    Example:
        >>> import torch
        >>> default_atol(torch.float64) < 1e-11
        True
    """
    u = torch.finfo(dtype).eps / 2
    return 32 * u if dtype in _HALF else 1e4 * u


_HALF = (torch.float16, torch.bfloat16)


class MatrixLieGroup(LieGroup):
    """A Lie group of ``n × n`` real matrices under matrix multiplication.

    Subclasses implement :meth:`hat`, :meth:`vee`, :meth:`project`, :meth:`project_algebra`,
    :meth:`_residual` (distance from the group), :meth:`_algebra_residual`, :meth:`random`,
    :meth:`random_algebra`, and may override :meth:`_exp`/:meth:`_log` (closed forms).
    """

    n: int

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ShapeError(f"n must be a positive int, got {n!r}")
        self.n = n
        self.point_shape = (n, n)
        self.algebra_shape = (n, n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._arg()})"

    def _arg(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MatrixLieGroup)
            and type(other) is type(self)
            and other._arg() == self._arg()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._arg()))

    # ------------------------------------------------------------------ structure
    def identity(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Identity matrix ``I``, shape ``(*batch, n, n)``.

        Raises:
            ShapeError: a batch size is negative.
            DTypeError: a batch size is not an int.

        Example:
            >>> import liegroup
            >>> liegroup.SO(2).identity(4).shape
            torch.Size([4, 2, 2])
        """
        batch = check_batch(batch)
        m = self.point_shape[-1]
        eye = torch.eye(m, dtype=dtype, device=device)
        return eye.expand(*batch, m, m).clone()

    def compose(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Matrix product ``g @ h``, batch shapes broadcast.

        Raises:
            ShapeError: a trailing shape is not ``(n, n)``, or the batch shapes do not
                broadcast.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(2)
            >>> bool(torch.equal(G.compose(G.identity(), G.identity()), G.identity()))
            True
        """
        self.check_point(g, "g")
        self.check_point(h, "h")
        broadcast_batch(g, h, 2, ("g", "h"))
        return g @ h

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Matrix inverse ``g⁻¹`` (closed forms in subclasses: ``gᵀ`` for SO, block for SE).

        float16/bfloat16 input is inverted in float32 and rounded once to the input dtype.

        Raises:
            NonFiniteError: ``g`` has NaN or infinite entries.
            DomainError: ``g`` is singular (not in ``GL(n)``), naming the batch entries.
            OverflowResultError: ``g`` is invertible but its inverse has entries beyond
                the dtype's range (``g`` is numerically singular there).

        Example:
            >>> import torch, liegroup
            >>> g = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
            >>> liegroup.GL(2).inverse(g)
            tensor([[ 0.5000, -0.5000],
                    [ 0.0000,  1.0000]])
        """
        self.check_point(g, "g")
        work = g.float() if g.dtype in _HALF else g
        inv, info = torch.linalg.inv_ex(work)
        inv = inv.to(g.dtype)
        if inv.device.type == "meta":  # shapes only (model init on meta): nothing to check
            return inv
        # one host synchronisation, as torch.linalg.inv's own singularity check
        hit = offending((info != 0) | ~torch.isfinite(inv).flatten(-2).all(-1))
        if hit is not None:
            check_finite(g, "g")
            count, bad = hit
            singular = offending(info != 0)
            if singular is not None:
                raise DomainError(
                    f"inverse: {singular[0]} matrices are singular, so not in {self!r}"
                    f"{where_batch(singular[1])}; a singular matrix has no inverse (check how "
                    "it was built, or use G.contains(g) to filter)"
                )
            raise OverflowResultError(
                f"inverse: {count} matrices have an inverse with entries beyond the range of "
                f"{g.dtype} (largest finite {torch.finfo(g.dtype).max:.3g}){where_batch(bad)}; "
                "they are numerically singular in this dtype: compute in float64"
            )
        return inv

    def exp(self, X: torch.Tensor) -> torch.Tensor:
        """Matrix exponential of an algebra element (closed form where one exists).

        float16/bfloat16 input is computed in float32 and rounded once to the input dtype
        (likewise :meth:`log`).

        Large rotation angles: SO(2), SO(3), SE(2) and SE(3) reduce the angle mod 2π from
        the exact input (any finite size; see ``liegroup.groups._angles``); SO(n)/SE(n) for
        ``n ≥ 4`` refuse generators whose rotation block has ``‖·‖₁ > u^{-1/2}`` (the angles
        are not resolvable in the dtype). GL/SL: an exponential beyond the dtype's range
        raises :class:`~liegroup.errors.OverflowResultError` (see ``liegroup.linalg.expm``).

        Raises:
            DomainError: if ``X`` is not in the algebra (e.g. not skew for SO(n)), to
                :func:`default_atol`; map it there with :meth:`project_algebra` if intended;
                or, for SO(n)/SE(n) with ``n ≥ 4``, if its rotation angles are too large to
                resolve.
            NonFiniteError: ``X`` has NaN or infinite entries.
            OverflowResultError: ``exp(X)`` overflows the dtype (GL, SL).

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).exp(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
            tensor([[ 0.5403, -0.8415],
                    [ 0.8415,  0.5403]])
        """
        self.check_algebra(X, "X")
        check_finite(X, "X")
        self._check_in_algebra(X)
        if X.dtype in _HALF:
            return self._exp(X.float()).to(X.dtype)
        return self._exp(X)

    def log(self, g: torch.Tensor) -> torch.Tensor:
        """Principal logarithm, an element of the algebra (exactly in its structure).

        Raises:
            DomainError: if ``g`` is not on the group (to :func:`default_atol`) or outside the
                domain of the principal logarithm.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> G.vee(G.log(G.exp(G.hat(torch.tensor([0.1, 0.2, 0.3])))))
            tensor([0.1000, 0.2000, 0.3000])
        """
        self.check_point(g, "g")
        check_finite(g, "g")
        ok = self.contains(g)
        hit = offending(~ok)
        if hit is not None:
            count, bad = hit
            raise DomainError(
                f"log: {count} points are not on {self!r} to atol="
                f"{default_atol(g.dtype):.1e}{where_batch(bad)}; project them with "
                "G.project(g) first if the departure is rounding"
            )
        if g.dtype in _HALF:
            return self._log(g.float()).to(g.dtype)
        return self._log(g)

    def _exp(self, X: torch.Tensor) -> torch.Tensor:
        from liegroup.linalg import expm

        return expm(X)

    def _log(self, g: torch.Tensor) -> torch.Tensor:
        from liegroup.linalg import logm

        return self.project_algebra(logm(g))

    def bracket(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Commutator ``XY − YX``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> e = torch.eye(3)
            >>> G.vee(G.bracket(G.hat(e[0]), G.hat(e[1])))  # [e1^, e2^] = (e1 × e2)^
            tensor([0., 0., 1.])
        """
        self.check_algebra(X, "X")
        self.check_algebra(Y, "Y")
        return X @ Y - Y @ X

    def Ad(self, g: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Adjoint action ``g X g⁻¹``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> g = G.exp(G.hat(torch.tensor([0.0, 0.0, torch.pi / 2], dtype=torch.float64)))
            >>> v = G.vee(G.Ad(g, G.hat(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))))
            >>> torch.allclose(v, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
            True
        """
        self.check_point(g, "g")
        self.check_algebra(X, "X")
        return g @ X @ self.inverse(g)

    def act(self, g: torch.Tensor, T: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Mode-``k`` product ``T ×_k g`` (keyword ``mode=k``, default 0).

        For an unbatched ``g`` (shape ``(n, n)``), ``T`` is any tensor whose mode ``k`` has size
        ``n`` (:func:`liegroup.tensor.mode_product`). For ``g`` of shape ``(*batch, n, n)``,
        ``T`` has shape ``(*batch', *tensor_shape)`` with ``len(batch') == len(batch)`` (batch
        shapes broadcast) and ``mode`` indexes ``tensor_shape``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(2)
            >>> g = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
            >>> G.act(g, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), mode=0)
            tensor([[-3., -4.],
                    [ 1.,  2.]])
        """
        mode = kwargs.pop("mode", 0)
        if kwargs:
            raise DTypeError(f"{type(self).__name__}.act takes only mode=k, got {sorted(kwargs)}")
        self.check_point(g, "g")
        check_tensor(T, "T")
        m = self.point_shape[-1]
        nb = g.dim() - 2
        order = T.dim() - nb
        if order < 1:
            raise ShapeError(
                f"T must have shape (*batch, *tensor_shape) with len(batch) = {nb} (g's batch) "
                f"and at least one tensor mode, got {tuple(T.shape)}"
            )
        k = normalize_mode(mode, order, "mode")  # type: ignore[arg-type]
        axis = nb + k
        if T.shape[axis] != m:
            raise ShapeError(
                f"mode {k} of T has size {T.shape[axis]}, but the group acts on size {m}"
            )
        if nb == 0:
            return _tensor.mode_product(T, g, k)
        Tm = T.movedim(axis, -1).unsqueeze(-1)  # (*batch', ..., m, 1)
        gb = g.reshape(*g.shape[:-2], *([1] * (order - 1)), m, m)
        return (gb @ Tm).squeeze(-1).movedim(-1, axis)

    def contains(self, g: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Whether each point is finite and on the group to ``atol`` (:func:`default_atol`).

        Example:
            >>> import torch, liegroup
            >>> g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
            >>> liegroup.SO(2).contains(g)
            tensor([ True, False])
        """
        self.check_point(g, "g")
        tol = default_atol(g.dtype) if atol is None else float(atol)
        finite = torch.isfinite(g).flatten(-2).all(-1)
        g0 = torch.where(finite[..., None, None], g, torch.zeros_like(g))
        if g0.dtype in _HALF:  # residuals of a half-precision point, computed in float32
            g0 = g0.float()
        return finite & (self._residual(g0) <= tol)

    def contains_algebra(self, X: torch.Tensor, atol: float | None = None) -> torch.Tensor:
        """Whether each matrix is finite and in the algebra to ``atol`` (relative to ``‖X‖``).

        Example:
            >>> import torch, liegroup
            >>> liegroup.SO(2).contains_algebra(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
            tensor(True)
        """
        self.check_algebra(X, "X")
        tol = default_atol(X.dtype) if atol is None else float(atol)
        finite = torch.isfinite(X).flatten(-2).all(-1)
        X0 = torch.where(finite[..., None, None], X, torch.zeros_like(X))
        scale = X0.abs().flatten(-2).amax(-1).clamp(min=1.0)
        return finite & (self._algebra_residual(X0) <= tol * scale)

    def _check_in_algebra(self, X: torch.Tensor) -> None:
        ok = self.contains_algebra(X)
        hit = offending(~ok)
        if hit is not None:
            count, bad = hit
            raise DomainError(
                f"{count} matrices are not in the Lie algebra of {self!r}{where_batch(bad)}; "
                "map them with G.project_algebra(X) if that is intended"
            )

    # ------------------------------------------------------------------ to override
    def _residual(self, g: torch.Tensor) -> torch.Tensor:
        """Max-abs distance of each (finite) point from the group's defining equations."""
        raise NotImplementedError

    def _algebra_residual(self, X: torch.Tensor) -> torch.Tensor:
        """Max-abs distance of each (finite) matrix from the algebra."""
        raise NotImplementedError

    def hat(self, v: torch.Tensor) -> torch.Tensor:
        """``R^dim → algebra``: ``(*batch, dim) → (*batch, n, n)``."""
        raise NotImplementedError

    def vee(self, X: torch.Tensor) -> torch.Tensor:
        """``algebra → R^dim``, the inverse of :meth:`hat`."""
        raise NotImplementedError

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Nearest (or a canonical close) point of the group."""
        raise NotImplementedError

    def project_algebra(self, X: torch.Tensor) -> torch.Tensor:
        """Orthogonal (Frobenius) projection onto the algebra."""
        raise NotImplementedError

    def random_algebra(
        self,
        *batch: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``hat`` of a standard-normal vector of ``R^dim`` (subclasses may rescale).

        Example:
            >>> import liegroup
            >>> liegroup.SE(3).random_algebra(2).shape
            torch.Size([2, 4, 4])
        """
        batch = check_batch(batch)
        v = torch.randn(*batch, self.dim, dtype=dtype, device=device, generator=generator)
        return self.hat(v)

    # ------------------------------------------------------------------ coordinates
    def basis(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The algebra basis ``E_i = hat(e_i)``, shape ``(dim, n, n)``.

        Example:
            >>> import liegroup
            >>> liegroup.SE(2).basis().shape
            torch.Size([3, 3, 3])
        """
        return self.hat(torch.eye(self.dim, dtype=dtype, device=device))

    def _check_vector(self, v: torch.Tensor, name: str = "v") -> None:
        check_tensor(v, name)
        if v.dim() < 1 or v.shape[-1] != self.dim:
            raise ShapeError(f"{name} must have shape (*batch, {self.dim}), got {tuple(v.shape)}")

    def adjoint_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """Matrix of ``Ad_g`` in ``vee`` coordinates, ``(*batch, dim, dim)``.

        ``vee(Ad_g hat(v)) = adjoint_matrix(g) @ v``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> g = G.random(dtype=torch.float64)
            >>> torch.allclose(G.adjoint_matrix(g), g)  # for SO(3), Ad_R = R
            True
        """
        self.check_point(g, "g")
        E = self.basis(g.dtype, g.device)
        cols = self.vee(g[..., None, :, :] @ E @ self.inverse(g)[..., None, :, :])
        return cols.transpose(-1, -2)

    def _closed_jac(self, X: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor | None:
        """Closed-form Jacobian where a subclass has one (SO(2/3), SE(2/3)); else ``None``."""
        return None

    def _jacobian(self, X: torch.Tensor, left: bool, inverse: bool) -> torch.Tensor:
        self.check_algebra(X, "X")
        J = self._closed_jac(X, left, inverse)
        if J is not None:
            return J
        from liegroup import linalg

        # J_l(X) = J_r(−X); J_r e_i = vee(dexp(X, E_i)), its inverse through dexp_inv.
        fn = linalg.dexp_inv if inverse else linalg.dexp
        sign = -1.0 if left else 1.0
        E = self.basis(X.dtype, X.device)
        shape = (*X.shape[:-2], *E.shape)
        cols = self.vee(fn((sign * X)[..., None, :, :].expand(shape), E.expand(shape)))
        return cols.transpose(-1, -2)

    def right_jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """Right Jacobian ``J_r(X)``: ``exp(X + δ) ≈ exp(X)·exp(J_r δ)``, in vee coordinates.

        Generic: ``J_r(X) e_i = vee(dexp(X, E_i))`` with ``liegroup.linalg.dexp``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> G.right_jacobian(torch.zeros(3, 3)).diagonal()
            tensor([1., 1., 1.])
        """
        return self._jacobian(X, left=False, inverse=False)

    def left_jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """Left Jacobian ``J_l(X) = J_r(−X)``: ``exp(X + δ) ≈ exp(J_l δ)·exp(X)``.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> X = G.hat(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
            >>> torch.allclose(G.left_jacobian(X), G.right_jacobian(-X))
            True
        """
        return self._jacobian(X, left=True, inverse=False)

    def right_jacobian_inv(self, X: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`right_jacobian` (generic: ``liegroup.linalg.dexp_inv``).

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SO(3)
            >>> X = G.hat(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
            >>> I = G.right_jacobian(X) @ G.right_jacobian_inv(X)
            >>> torch.allclose(I, torch.eye(3, dtype=torch.float64))
            True
        """
        return self._jacobian(X, left=False, inverse=True)

    def left_jacobian_inv(self, X: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`left_jacobian`.

        Example:
            >>> import torch, liegroup
            >>> G = liegroup.SE(3)
            >>> X = G.hat(torch.tensor([1.0, 2.0, 3.0, 0.3, -0.2, 0.1], dtype=torch.float64))
            >>> I = G.left_jacobian(X) @ G.left_jacobian_inv(X)
            >>> torch.allclose(I, torch.eye(6, dtype=torch.float64))
            True
        """
        return self._jacobian(X, left=True, inverse=True)
