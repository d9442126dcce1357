"""The engine's operators: ``torch.library`` custom ops over the compiled CPU kernel.

Every entry point of ``_cfused.c`` is reached only through one of these ops, and each op
validates its operands (shapes, dtypes, devices; view bits resolved, memory made contiguous)
before any raw pointer is read:

* ``liegroup::lowrank_form(W, L, R, first_order)`` → ``W ⊙ exp(L R)`` or ``W ⊙ (1 + L R)``
  (``L R`` viewed as ``W``'s shape); ``liegroup::lowrank_form_into`` writes it into a given
  buffer (the engine's workspace);
* ``liegroup::lowrank_factor_grads(G, M, L, R, rule)`` → ``(G_Δ Rᵀ, Lᵀ G_Δ)`` with
  ``G_Δ = G ⊙ M`` (rule 0), ``G ⊙ M ⊙ exp(L R)`` (rule 1) or ``G`` (rule 2);
  ``liegroup::lowrank_factor_grads_`` may use ``G`` as scratch (the engine's own ``∂L/∂W'``).

Each op's default implementation is written in torch ops: it serves CUDA, every dtype other
than float32, ranks above the kernel's limit, ``LIEGROUP_DISABLE_KERNELS=1`` and installs
without a compiler. The CPU implementation calls the kernel for float32 operands (the dtype
and rank checks are the kernel's eligibility; the device dispatch is PyTorch's). Every op has
a fake implementation, so ``torch.compile`` traces through it without a graph break.
Kernel and torch implementations agree to float32 rounding (the kernel's ``exp`` is within
1 ulp); every path of liegroup that forms ``W'`` goes through these ops, so they agree with
each other bit for bit on one machine and configuration.

Example:
    >>> import torch
    >>> W, L, R = torch.ones(2, 3), torch.zeros(2, 1), torch.zeros(1, 3)
    >>> torch.equal(lowrank_form(W, L, R, False), W)
    True
"""

from __future__ import annotations

from typing import Any

import torch

from liegroup._kernels import load_extension
from liegroup.errors import ConfigError, DeviceError, DTypeError, ShapeError

__all__ = [
    "GRAD_PLAIN",
    "GRAD_TIMES",
    "GRAD_TIMES_EXP",
    "check_factors",
    "compiled_kernel",
    "exp_taylor",
    "lowrank_factor_grads",
    "lowrank_form",
]

_k: Any = load_extension("liegroup.peft._engine._cfused")
_R_MAX: int = int(_k.R_MAX) if _k is not None else 0
# Work (entries × (rank + 8)) per thread for which the kernel starts a thread of its own.
_MT_WORK: int = int(_k.MT_WORK) if _k is not None else 0
# Internal switch for tests: False sends every call to the torch implementation.
_USE_KERNEL: bool = True

_F32 = torch.float32

GRAD_TIMES = 0  # G_Δ = G ⊙ M
GRAD_TIMES_EXP = 1  # G_Δ = G ⊙ M ⊙ exp(L R)
GRAD_PLAIN = 2  # G_Δ = G


def compiled_kernel() -> bool:
    """Whether LieRA's float32 CPU operators run the compiled kernel.

    The kernel (``liegroup/peft/_engine/_cfused.c``, built by ``pip install`` when a C
    compiler is available) forms ``W ⊙ exp(L·R)`` (and the first-order ``W ⊙ (1 + L·R)``)
    and the factor gradients in one pass over the weight. ``False`` when it was not built or
    ``LIEGROUP_DISABLE_KERNELS=1`` is set: then every operator runs its torch
    implementation, as on CUDA and for other dtypes.

    Example:
        >>> from liegroup.peft._engine import compiled_kernel
        >>> isinstance(compiled_kernel(), bool)
        True
    """
    return _k is not None and _USE_KERNEL


# ---------------------------------------------------------------------------- validation
def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its conjugate/negative view bits applied, in contiguous memory."""
    if t.is_neg():
        t = t.resolve_neg()
    if t.is_conj():
        t = t.resolve_conj()
    return t.contiguous()


def _memory_order(t: torch.Tensor, rows: int) -> list[int] | None:
    """The dims of a dense, non-contiguous ``t`` in memory order, dim 0 outermost, or ``None``.

    ``t.permute(order)`` is then contiguous: its entries in memory order, each of the ``rows``
    rows (dim 0) one run of ``cols`` entries — a channels-last conv weight
    ``(C_out, C_in, *k)`` is read as ``(C_out, *k, C_in)``. The element-wise maps pair entry
    ``(i, j)`` of ``L R`` with entry ``(i, j)`` of ``W``, so ``R``'s columns are permuted the
    same way (:func:`_permute_cols`), and ``∂L/∂R``'s back (:func:`_unpermute_cols`).
    """
    if t.is_contiguous() or t.dim() < 3 or rows != t.shape[0] or t.is_neg() or t.is_conj():
        return None
    size, stride = t.shape, t.stride()
    order = sorted(range(t.dim()), key=lambda d: (d != 0, size[d] == 1, -stride[d], d))
    return order if t.permute(order).is_contiguous() else None


def _permute_cols(R: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor:
    """``R (r, cols)``, its columns in the memory order of a ``shape`` tensor (a copy)."""
    r = R.shape[0]
    return R.reshape(r, *shape[1:]).permute(0, *order[1:]).reshape(r, -1)


def _inverse(order: list[int]) -> list[int]:
    """The permutation that undoes ``permute(order)``."""
    return sorted(range(len(order)), key=order.__getitem__)


def _unpermute_cols(gR: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor:
    """:func:`_permute_cols` undone: columns in memory order back to ``shape``'s own order."""
    r = gR.shape[0]  # dim 0 stands for rows, which memory order keeps first
    return gR.reshape(r, *(shape[d] for d in order[1:])).permute(_inverse(order)).reshape(r, -1)


def _check_lowrank(name: str, W: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                   *more: tuple[str, torch.Tensor | None]) -> None:
    """Raise a typed error unless ``W``, ``L``, ``R`` (and ``more``) fit one low-rank call."""
    for i, (label, t) in enumerate((("W", W), ("L", L), ("R", R), *more)):
        if t is None and i >= 3:
            continue
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{name}: {label} must be a real floating tensor, got {t.dtype}")
        if t.dtype != W.dtype:
            raise DTypeError(f"{name}: {label} is {t.dtype} but W is {W.dtype}; use one dtype")
        if t.device != W.device:
            raise DeviceError(f"{name}: {label} is on {t.device} but W is on {W.device}")
    if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
        raise ShapeError(
            f"{name}: L (rows, r) and R (r, cols) must be matrices of one rank, got L "
            f"{tuple(L.shape)} and R {tuple(R.shape)}"
        )
    n = L.shape[0] * R.shape[1]
    if n != W.numel():
        raise ShapeError(
            f"{name}: L @ R has {L.shape[0]}×{R.shape[1]} = {n} entries but W "
            f"{tuple(W.shape)} has {W.numel()}; the factors must unfold W"
        )
    for label, t in more:
        if t is not None and t.numel() != n:
            raise ShapeError(
                f"{name}: {label} {tuple(t.shape)} must have W's {n} entries"
            )


def check_factors(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> None:
    """Raise :class:`~liegroup.errors.ShapeError` unless ``L (rows, r) @ R (r, cols)`` unfolds W.

    Also refuses non-tensors and mixed dtypes (:class:`~liegroup.errors.DTypeError`) or devices
    (:class:`~liegroup.errors.DeviceError`).

    Example:
        >>> import torch
        >>> try:
        ...     check_factors(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(1, 4))
        ... except ValueError as e:
        ...     print(type(e).__name__)
        ShapeError
    """
    _check_lowrank("factors", W, L, R)


def _kernel_takes(numel: int, r: int, *ts: torch.Tensor) -> bool:
    """Whether the kernel takes this call: float32 CPU operands, 0 < rank ≤ ``R_MAX``.

    With several intra-op threads the kernel is used only when it gives each of them a full
    share of work (``_MT_WORK``): below that the torch ops, on torch's thread pool, are as
    fast.
    """
    if _k is None or not _USE_KERNEL or not 0 < r <= _R_MAX:
        return False
    nt = torch.get_num_threads()
    if nt > 1 and numel * (r + 8) < _MT_WORK * nt:
        return False
    return all(t.dtype is _F32 and t.is_cpu for t in ts)


# A frozen base weight is an nn.Parameter: a plain tensor to the dispatcher (its
# __torch_function__ is disabled), so it takes the direct path too; subclasses of either do not.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

# Internal switch for tests: False sends eager CPU calls through the dispatcher too.
_EAGER_DIRECT: bool = True


def _eager_direct(*ts: torch.Tensor | None) -> bool:
    """Whether an eager call on plain CPU tensors may run the op's CPU implementation directly.

    The same function the dispatcher would call, with the same validation: it saves the
    dispatcher's overhead (several µs per call, a mutating op more) on the hot path of every
    adapted layer. Anything else — ``torch.compile``, a dispatch mode (fake tensors,
    ``opcheck``), functorch transforms, tensor subclasses, other devices — goes through
    ``torch.ops.liegroup``.
    """
    if not _EAGER_DIRECT or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or (type(t) in _PLAIN_TYPES and t.is_cpu) for t in ts)


# ---------------------------------------------------------------------------- torch maths
def exp_taylor(X: torch.Tensor, order: int | None) -> torch.Tensor:
    """``exp(X)`` (``order=None``) or ``T_k(X) = Σ_{j≤k} X^j/j!`` in one fresh buffer.

    Horner's rule done in place, the same operations in the same order as
    :func:`liegroup.groups.taylor_exp` (so bit-identical to it); ``order=0`` gives ones.

    Example:
        >>> import torch
        >>> exp_taylor(torch.tensor([1.0]), 2)
        tensor([2.5000])
    """
    if order is None:
        return torch.exp(X)
    if order == 0:
        return torch.ones_like(X)
    t = X / order + 1 if order > 1 else X + 1
    for j in range(order - 1, 0, -1):
        t.mul_(X)
        if j > 1:
            t.div_(j)
        t.add_(1)
    return t


def _form_torch(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
                out: torch.Tensor | None) -> torch.Tensor:
    rows, cols = L.shape[0], R.shape[1]
    d = (L @ R if out is None else torch.mm(L, R, out=out.view(rows, cols))).view(W.shape)
    return (d.add_(1) if first_order else d.exp_()).mul_(W)


def _grads_torch(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
                 rule: int, block_rows: int, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_Δ Rᵀ, Lᵀ G_Δ)``; ``inplace``: ``G`` is scratch (``G_Δ`` formed in it)."""
    rows, cols = L.shape[0], R.shape[1]
    Gm = G.reshape(rows, cols)
    if rule == GRAD_PLAIN:
        D = Gm
    elif rule == GRAD_TIMES:
        assert M is not None
        D = Gm.mul_(M.reshape(rows, cols)) if inplace else Gm * M.reshape(rows, cols)
    else:  # G ⊙ M ⊙ exp(L R), per row block so that exp(L_i R) stays in cache
        assert M is not None
        D = Gm if inplace else Gm.clone()
        Mm = M.reshape(rows, cols)
        step = max(1, min(rows, block_rows))
        buf = torch.empty((step, cols), dtype=G.dtype, device=G.device)
        for i in range(0, rows, step):
            j = min(i + step, rows)
            t = torch.mm(L[i:j], R, out=buf[: j - i]).exp_()
            D[i:j].mul_(t.mul_(Mm[i:j]))
        del buf
    return D.mm(R.T), L.T.mm(D)


# ---------------------------------------------------------------------------- form
def _form_laid_out(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
                   kernel: bool) -> torch.Tensor:
    """``W'`` with the strides of ``torch.empty_like(W)`` (those of a dense ``W``).

    ``W'`` keeps ``W``'s layout, as ``W * exp(ΔW)`` in torch ops would: a channels-last model
    stays channels-last, eagerly and in a compiled graph (which lays out the ops after ``W'``
    by the fake's strides). A channels-last ``W`` is read and written in memory order, with
    ``R``'s columns permuted to match: no copy of ``W``.
    """
    out = torch.empty_like(W)
    Wv, Rv, ov = W, R, out
    if not out.is_contiguous():
        order = _memory_order(out, L.shape[0])
        if order is None or W.stride() != out.stride():
            # a layout the rows do not run through: formed in row-major order, then laid out
            return out.copy_(_form_laid_out(W.contiguous(), L, R, first_order, kernel))
        Wv, Rv, ov = W.permute(order), _permute_cols(R, W.shape, order), out.permute(order)
    Wv, L, Rv = _plain(Wv), _plain(L), _plain(Rv)
    if kernel and _kernel_takes(Wv.numel(), L.shape[1], Wv):
        _form_kernel(Wv, L, Rv, first_order, ov)
    else:
        _form_torch(Wv, L, Rv, first_order, ov)
    return out


@torch.library.custom_op("liegroup::lowrank_form", mutates_args=())
def _lowrank_form_op(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                     first_order: bool) -> torch.Tensor:
    _check_lowrank("lowrank_form", W, L, R)
    return _form_laid_out(W, L, R, first_order, kernel=False)


@_lowrank_form_op.register_kernel("cpu")
def _form_cpu(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
              first_order: bool) -> torch.Tensor:
    _check_lowrank("lowrank_form", W, L, R)
    return _form_laid_out(W, L, R, first_order, kernel=True)


@_lowrank_form_op.register_fake
def _(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool) -> torch.Tensor:
    _check_lowrank("lowrank_form", W, L, R)
    return torch.empty_like(W)


def _form_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    W, L, R, first_order = inputs
    ctx.first_order = first_order
    # G ⊙ W' (exact) reads W' itself: the op that consumes W' keeps it anyway
    ctx.save_for_backward(W, L, R, None if first_order else output)


def _form_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    W, L, R, Wp = ctx.saved_tensors
    need_w, need_l, need_r = ctx.needs_input_grad[:3]
    g_l = g_r = g_w = None
    if need_l or need_r:
        M, rule = (W, GRAD_TIMES) if ctx.first_order else (Wp, GRAD_TIMES)
        g_l, g_r = torch.ops.liegroup.lowrank_factor_grads(grad, M, L, R, rule)
    if need_w:
        d = (L @ R).view(W.shape)
        g_w = grad * (d + 1 if ctx.first_order else torch.exp(d))
    return g_w, (g_l if need_l else None), (g_r if need_r else None), None


_lowrank_form_op.register_autograd(_form_grad, setup_context=_form_setup)


def _form_kernel(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
                 out: torch.Tensor) -> None:
    # operands checked by the op: contiguous float32 CPU, rows·cols entries each
    _k.form(1 if first_order else 0, L.shape[0], R.shape[1], L.shape[1], W.data_ptr(),
            L.data_ptr(), R.data_ptr(), out.data_ptr(), torch.get_num_threads())


@torch.library.custom_op("liegroup::lowrank_form_into", mutates_args=("out",))
def _lowrank_form_into_op(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
                          out: torch.Tensor) -> None:
    _check_lowrank("lowrank_form_into", W, L, R, ("out", out))
    _check_buffer(out, W, L, R)
    _form_torch(_plain(W), L, R, first_order, out)


@_lowrank_form_into_op.register_kernel("cpu")
def _form_into_cpu(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
                   out: torch.Tensor) -> None:
    _check_lowrank("lowrank_form_into", W, L, R, ("out", out))
    _check_buffer(out, W, L, R)
    W, L, R = _plain(W), _plain(L), _plain(R)
    if _kernel_takes(W.numel(), L.shape[1], W):
        _form_kernel(W, L, R, first_order, out)
    else:
        _form_torch(W, L, R, first_order, out)


@_lowrank_form_into_op.register_fake
def _(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
      out: torch.Tensor) -> None:
    _check_lowrank("lowrank_form_into", W, L, R, ("out", out))


def _check_buffer(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    if not out.is_contiguous() or out.is_neg() or out.is_conj():
        raise ShapeError("lowrank_form_into: out must be a contiguous tensor without view bits")
    for name, t in zip("WLR", inputs, strict=True):
        if _overlap(out, t):
            raise ShapeError(
                f"lowrank_form_into: out shares memory with {name}; write into a separate buffer"
            )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` (non-empty) intersect."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        lo = hi = int(t.storage_offset())
        for n, s in zip(t.shape, t.stride(), strict=True):
            if s >= 0:
                hi += (int(n) - 1) * s
            else:
                lo += (int(n) - 1) * s
        return lo * t.element_size(), (hi + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def lowrank_form(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``W ⊙ exp(L R)`` (or ``W ⊙ (1 + L R)``), ``L R`` viewed as ``W``'s shape; no autograd.

    Args:
        W: any shape, ``rows·cols`` entries.
        L: ``(rows, r)``; R: ``(r, cols)``; one floating dtype and device with ``W``.
        first_order: ``W ⊙ (1 + L R)`` instead of the exponential.
        out: a contiguous buffer with ``W``'s entries to write into (returned as a view
            of ``W``'s shape, and of ``W``'s strides where ``W`` is channels-last: the
            buffer then holds ``W'`` in ``W``'s memory order).

    Returns:
        ``W'``, laid out as ``W`` (``torch.empty_like(W)``'s strides) without ``out``.

    Raises:
        ShapeError: factors that do not unfold ``W``, or a bad ``out``.
        DTypeError: mixed or non-floating dtypes.

    Example:
        >>> import torch
        >>> W, L, R = torch.full((2, 2), 2.0), torch.ones(2, 1), torch.ones(1, 2)
        >>> lowrank_form(W, L, R, first_order=True)
        tensor([[4., 4.],
                [4., 4.]])
    """
    if out is not None and not W.is_contiguous():
        order = _memory_order(W, L.shape[0])
        if order is not None:  # channels-last: W' in W's memory order, as the op lays it out
            Wp = lowrank_form(W.permute(order), L, _permute_cols(R, W.shape, order),
                              first_order, out)
            return Wp.permute(_inverse(order))
    direct = _eager_direct(W, L, R, out)
    if out is None:
        if direct:
            return _form_cpu(W, L, R, first_order)
        return torch.ops.liegroup.lowrank_form(W, L, R, first_order)
    if direct:
        _form_into_cpu(W, L, R, first_order, out)
    else:
        torch.ops.liegroup.lowrank_form_into(W, L, R, first_order, out)
    # a view is a dispatcher call (tens of µs once a layer's passes have evicted the
    # interpreter from cache): the engine's workspace has W's shape already
    return out if out.shape == W.shape else out.view(W.shape)


# ---------------------------------------------------------------------------- factor grads
def _check_grads(name: str, G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor,
                 R: torch.Tensor, rule: int) -> None:
    if rule not in (GRAD_TIMES, GRAD_TIMES_EXP, GRAD_PLAIN):
        raise ConfigError(f"{name}: rule must be 0, 1 or 2, got {rule}")
    if rule != GRAD_PLAIN and M is None:
        raise ConfigError(f"{name}: rule {rule} needs M")
    _check_lowrank(name, G, L, R, ("M", M))


def _grads_kernel(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
                  rule: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not _kernel_takes(G.numel(), L.shape[1], G):
        return None
    G, L, R = _plain(G), _plain(L), _plain(R)
    Mc = None if rule == GRAD_PLAIN or M is None else _plain(M)
    rows, r, cols = L.shape[0], L.shape[1], R.shape[1]
    gL = torch.empty((rows, r), dtype=_F32)
    gR = torch.empty((r, cols), dtype=_F32)
    _k.grads(rule, rows, cols, r, G.data_ptr(), 0 if Mc is None else Mc.data_ptr(),
             L.data_ptr(), R.data_ptr(), gL.data_ptr(), gR.data_ptr(), torch.get_num_threads())
    return gL, gR


def _grads_fake(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor,
                R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return L.new_empty(L.shape), R.new_empty(R.shape)


def _grads_laid_out(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
                    rule: int, block_rows: int, inplace: bool,
                    kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_Δ Rᵀ, Lᵀ G_Δ)``; ``inplace``: ``G`` is scratch.

    A channels-last ``G`` (and ``M`` of its strides) is read in memory order with ``R``'s
    columns permuted to match: no copy.
    """
    order = _memory_order(G, L.shape[0])
    if order is not None and (M is None or rule == GRAD_PLAIN or M.stride() == G.stride()):
        shape = G.shape
        Mv = None if M is None or rule == GRAD_PLAIN else M.permute(order)
        g_l, g_r = _grads_laid_out(G.permute(order), Mv, L, _permute_cols(R, shape, order),
                                   rule, block_rows, inplace, kernel)
        return g_l, _unpermute_cols(g_r, shape, order)
    if kernel:
        got = _grads_kernel(G, M, L, R, rule)
        if got is not None:
            return got
    if inplace and (not G.is_contiguous() or G.is_neg() or G.is_conj()):
        G = _plain(G)  # a private copy: scratch that is not the caller's
    return _grads_torch(G if inplace else _plain(G), None if M is None else _plain(M), L, R,
                        rule, block_rows, inplace=inplace)


@torch.library.custom_op("liegroup::lowrank_factor_grads", mutates_args=())
def _lowrank_factor_grads_op(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor,
                             R: torch.Tensor, rule: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads", G, M, L, R, rule)
    return _grads_laid_out(G, M, L, R, rule, _default_block(L, R), inplace=False, kernel=False)


@_lowrank_factor_grads_op.register_kernel("cpu")
def _grads_cpu(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
               rule: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads", G, M, L, R, rule)
    return _grads_laid_out(G, M, L, R, rule, _default_block(L, R), inplace=False, kernel=True)


@_lowrank_factor_grads_op.register_fake
def _(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
      rule: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads", G, M, L, R, rule)
    return _grads_fake(G, M, L, R)


@torch.library.custom_op("liegroup::lowrank_factor_grads_", mutates_args=("G",))
def _lowrank_factor_grads_inplace_op(
    G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor, rule: int,
    block_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads_", G, M, L, R, rule)
    return _grads_laid_out(G, M, L, R, rule, block_rows, inplace=True, kernel=False)


@_lowrank_factor_grads_inplace_op.register_kernel("cpu")
def _grads_inplace_cpu(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor,
                       R: torch.Tensor, rule: int,
                       block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads_", G, M, L, R, rule)
    return _grads_laid_out(G, M, L, R, rule, block_rows, inplace=True, kernel=True)


@_lowrank_factor_grads_inplace_op.register_fake
def _(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor, rule: int,
      block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grads("lowrank_factor_grads_", G, M, L, R, rule)
    return _grads_fake(G, M, L, R)


def _default_block(L: torch.Tensor, R: torch.Tensor) -> int:
    from liegroup.peft._engine.policy import CHUNK_ENTRIES

    return max(1, CHUNK_ENTRIES // max(R.shape[1], 1))


def lowrank_factor_grads(
    G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor, rule: int,
    scratch: bool = False, block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_Δ Rᵀ, Lᵀ G_Δ)``: the factor gradients from ``G = ∂L/∂W'``.

    ``G_Δ = G ⊙ M`` (:data:`GRAD_TIMES`), ``G ⊙ M ⊙ exp(L R)`` (:data:`GRAD_TIMES_EXP`) or
    ``G`` (:data:`GRAD_PLAIN`, ``M`` unused), all read as ``(rows, cols)``.

    Args:
        G, M: ``rows·cols`` entries each, any shape.
        L: ``(rows, r)``; R: ``(r, cols)``.
        rule: one of the three above.
        scratch: ``G`` may be overwritten (the torch implementation forms ``G_Δ`` in it).
        block_rows: rows per block of the torch implementation's recomputed ``exp(L_i R)``.

    Returns:
        ``(∂L/∂L (rows, r), ∂L/∂R (r, cols))``.

    Example:
        >>> import torch
        >>> G, L, R = torch.ones(2, 2), torch.ones(2, 1), torch.ones(1, 2)
        >>> lowrank_factor_grads(G, None, L, R, GRAD_PLAIN)[0]
        tensor([[2.],
                [2.]])
    """
    direct = _eager_direct(G, M, L, R)
    if scratch:
        b = _default_block(L, R) if block_rows is None else block_rows
        if direct:
            return _grads_inplace_cpu(G, M, L, R, rule, b)
        out = torch.ops.liegroup.lowrank_factor_grads_(G, M, L, R, rule, b)
    else:
        if direct:
            return _grads_cpu(G, M, L, R, rule)
        out = torch.ops.liegroup.lowrank_factor_grads(G, M, L, R, rule)
    return out[0], out[1]
