"""The engine's custom operators: registration, validation before any raw memory, view bits.

* ``torch.library.opcheck`` passes for every operator (schema, fake implementation, autograd
  registration, dispatch), with the compiled kernel and without it;
* factors, gradients and buffers of inconsistent shapes, mixed dtypes or non-floating dtypes
  raise typed errors from every operator, kernel or not, before anything is computed;
* negative-view and non-contiguous operands give the values of their plain copies;
* layering: generator, layer and model files reach the engine only through its entry module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import liegroup.peft._engine as engine
from liegroup.errors import ConfigError, DTypeError, ShapeError
from liegroup.peft._engine import ops

KERNEL_STATES = [
    pytest.param(True, id="kernel"),
    pytest.param(False, id="torch"),
]


@pytest.fixture(params=KERNEL_STATES)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with the compiled kernel (skipped when absent) and with the torch path."""
    use = bool(request.param)
    if use and ops._k is None:
        pytest.skip("the compiled kernel is not built or LIEGROUP_DISABLE_KERNELS is set")
    monkeypatch.setattr(ops, "_USE_KERNEL", use)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the kernel takes any size
    return use


def _factors(rows: int = 6, r: int = 3, cols: int = 10, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    L = 0.3 * torch.randn(rows, r, generator=g, dtype=dtype)
    R = 0.3 * torch.randn(r, cols, generator=g, dtype=dtype)
    return W, L, R


# ------------------------------------------------------------------------------ opcheck
def test_opcheck_lowrank_form(kernel: bool) -> None:
    W, L, R = _factors()
    for first in (False, True):
        torch.library.opcheck(torch.ops.liegroup.lowrank_form.default, (W, L, R, first))
        torch.library.opcheck(torch.ops.liegroup.lowrank_form_into.default,
                              (W, L, R, first, torch.empty_like(W)))


def test_opcheck_factor_grads(kernel: bool) -> None:
    W, L, R = _factors()
    G = torch.randn_like(W)
    for mode, M in ((ops.GRAD_TIMES, W), (ops.GRAD_TIMES_EXP, W), (ops.GRAD_PLAIN, None)):
        torch.library.opcheck(torch.ops.liegroup.lowrank_factor_grads.default, (G, M, L, R, mode))
        torch.library.opcheck(torch.ops.liegroup.lowrank_factor_grads_.default,
                              (G.clone(), M, L, R, mode, 2))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("target", ["W", "R", "R-overlap"])
def test_lowrank_form_into_refuses_an_out_that_overlaps_an_input(kernel: bool,
                                                                  target: str) -> None:
    """The torch path wrote W' over its own inputs: values off by up to 99.8."""
    W, L, R = _factors()
    buf = torch.empty(R.numel() + W.numel() + 4)
    Rb = buf[: R.numel()].view(R.shape).copy_(R)
    out = {"W": W, "R": buf[: W.numel()].view(W.shape),
           "R-overlap": buf[R.numel() - 3 : R.numel() - 3 + W.numel()].view(W.shape)}[target]
    W0, R0 = W.clone(), Rb.clone()
    with pytest.raises(ShapeError, match=f"shares memory with {target[0]}"):
        torch.ops.liegroup.lowrank_form_into(W, L, Rb, False, out)
    assert torch.equal(W, W0) and torch.equal(Rb, R0)  # nothing written
    free = buf[R.numel() : R.numel() + W.numel()].view(W.shape)  # adjacent, not overlapping
    torch.ops.liegroup.lowrank_form_into(W, L, Rb, False, free)
    torch.testing.assert_close(free, ops.lowrank_form(W, L, R), rtol=0, atol=0)


BAD_FACTORS = [
    pytest.param((6, 3), (3, 9), ShapeError, id="cols-short"),  # reads past R, past W
    pytest.param((5, 3), (3, 10), ShapeError, id="rows-short"),
    pytest.param((6, 3), (2, 10), ShapeError, id="rank-mismatch"),
    pytest.param((6, 3, 1), (3, 10), ShapeError, id="L-not-a-matrix"),
    pytest.param((12, 3), (3, 5), None, id="other-unfolding-ok"),  # same entries: allowed
]


@pytest.mark.parametrize(("lshape", "rshape", "err"), BAD_FACTORS)
def test_every_operator_checks_the_factor_shapes(kernel: bool, lshape: tuple[int, ...],
                                                 rshape: tuple[int, ...],
                                                 err: type[Exception] | None) -> None:
    W = torch.randn(6, 10)
    L, R = torch.randn(*lshape), torch.randn(*rshape)
    calls = [
        lambda: ops.lowrank_form(W, L, R),
        lambda: ops.lowrank_form(W, L, R, out=torch.empty(60)),
        lambda: ops.lowrank_factor_grads(W, W, L, R, ops.GRAD_TIMES_EXP),
        lambda: ops.lowrank_factor_grads(W.clone(), W, L, R, ops.GRAD_TIMES, scratch=True),
        lambda: ops.check_factors(W, L, R),
    ]
    for call in calls:
        if err is None:
            call()
        else:
            with pytest.raises(err, match=r"entries|rank|matrices"):
                call()


def test_operators_refuse_mixed_or_integer_dtypes_and_short_buffers(kernel: bool) -> None:
    W, L, R = _factors()
    with pytest.raises(DTypeError):
        ops.lowrank_form(W, L.double(), R)
    with pytest.raises(DTypeError):
        ops.lowrank_form(W.to(torch.int32), L.to(torch.int32), R.to(torch.int32))
    with pytest.raises(ShapeError):
        ops.lowrank_form(W, L, R, out=torch.empty(W.numel() - 1))
    with pytest.raises(ShapeError):
        ops.lowrank_form(W, L, R, out=torch.empty(W.shape[1], W.shape[0]).T)  # not contiguous
    with pytest.raises(ShapeError):
        ops.lowrank_factor_grads(W, W[:-1], L, R, ops.GRAD_TIMES)
    with pytest.raises(ConfigError, match="needs M"):
        ops.lowrank_factor_grads(W, None, L, R, ops.GRAD_TIMES)
    with pytest.raises(ConfigError, match="rule"):
        ops.lowrank_factor_grads(W, W, L, R, 7)


def test_a_model_whose_generator_returns_bad_factors_raises_before_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused node and the plain path check the factors; the kernel is never entered."""
    from liegroup.peft import LieRAConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(10, 6)),
                           LieRAConfig(rank=3, target_modules=["0"]))
    gen = model.base_model[0].generators["default"]
    calls: list[str] = []

    class Spy:
        def __getattr__(self, name: str) -> object:
            calls.append(name)
            raise AssertionError("the kernel was entered")

    monkeypatch.setattr(ops, "_k", Spy())
    monkeypatch.setattr(gen, "factors", lambda: (torch.zeros(6, 3), torch.zeros(3, 9)))
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ShapeError):
            model(torch.randn(2, 10))
    assert calls == []


# ------------------------------------------------------------------------------ view bits
LAYOUTS = {  # weight shape, memory format
    "depthwise channels-last": ((6, 1, 3, 3), torch.channels_last),  # contiguous too
    "1x1 channels-last": ((6, 4, 1, 1), torch.channels_last),  # contiguous too
    "3x3 channels-last": ((6, 4, 3, 3), torch.channels_last),
    "3d channels-last": ((5, 3, 2, 3, 2), torch.channels_last_3d),
    "conv1d": ((6, 5, 2), torch.contiguous_format),
}


def _laid_out(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape, fmt = LAYOUTS[name]
    g = torch.Generator().manual_seed(1)
    W = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    L = 0.5 * torch.randn(shape[0], 3, generator=g)
    R = 0.5 * torch.randn(3, W[0].numel(), generator=g)
    return W, L, R


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lowrank_form_keeps_the_weights_layout_and_its_fake_says_so(kernel: bool,
                                                                    name: str) -> None:
    """``W'`` has ``W``'s strides (a channels-last model stays channels-last), the strides
    its fake gives a compiled graph (``opcheck`` does not compare them), and ``W``'s values:
    entry by entry the same operations as on a contiguous copy of ``W``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    W, L, R = _laid_out(name)
    with FakeTensorMode() as mode:
        fake = torch.ops.liegroup.lowrank_form(*(mode.from_tensor(t) for t in (W, L, R)), False)
    assert fake.stride() == W.stride()
    for first in (False, True):
        real = torch.ops.liegroup.lowrank_form(W, L, R, first)
        assert real.stride() == W.stride()
        assert ops.lowrank_form(W, L, R, first).stride() == W.stride()
        assert torch.equal(real, ops.lowrank_form(W.contiguous(), L, R, first))
        buf = torch.empty(W.shape)  # the engine's workspace: W' in W's memory order there
        into = ops.lowrank_form(W, L, R, first, buf)
        assert into.data_ptr() == buf.data_ptr() and into.stride() == W.stride()
        assert torch.equal(into, real)


def _grads_ref(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
               rule: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(G_Δ Rᵀ, Lᵀ G_Δ)`` and the sums of the products' magnitudes."""
    rows, cols = L.shape[0], R.shape[1]
    D = G.double().reshape(rows, cols)
    if rule != ops.GRAD_PLAIN:
        assert M is not None
        D = D * M.double().reshape(rows, cols)
        if rule == ops.GRAD_TIMES_EXP:
            D = D * torch.exp(L.double() @ R.double())
    Ld, Rd = L.double(), R.double()
    return D @ Rd.T, Ld.T @ D, D.abs() @ Rd.abs().T, Ld.abs().T @ D.abs()


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("scratch", [False, True])
def test_factor_grads_read_a_channels_last_gradient_as_its_values(kernel: bool, name: str,
                                                                  scratch: bool) -> None:
    """A channels-last ``∂L/∂W'`` (with ``M`` in its layout or in another) gives the factor
    gradients of its values, within the rounding of sums of ``cols`` (``∂L/∂L``) and ``rows``
    (``∂L/∂R``) products in float32 (the sums run in another order than for a contiguous
    ``G``), and ``∂L/∂R`` in ``R``'s own column order."""
    W, L, R = _laid_out(name)
    G = torch.randn(W.shape, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=LAYOUTS[name][1])
    u = torch.finfo(torch.float32).eps / 2
    rows, cols = L.shape[0], R.shape[1]
    for rule, M in ((ops.GRAD_TIMES, W), (ops.GRAD_TIMES, W.contiguous()),
                    (ops.GRAD_TIMES_EXP, W), (ops.GRAD_PLAIN, None)):
        want_l, want_r, mag_l, mag_r = _grads_ref(G, M, L, R, rule)
        got_l, got_r = ops.lowrank_factor_grads(G.clone(), M, L, R, rule, scratch=scratch)
        # each product within a few u (exp: the kernel's 1 ulp), each sum within n·u of its
        # terms' magnitudes
        for got, want, mag, n in ((got_l, want_l, mag_l, cols), (got_r, want_r, mag_r, rows)):
            assert got.shape == want.shape
            err = (got.double() - want).abs()
            assert bool((err <= (n + 8) * u * mag + 1e-30).all()), float((err / mag).max())


def test_negative_view_and_strided_operands_give_their_plain_values(kernel: bool) -> None:
    W, L, R = _factors()
    neg_R = torch.complex(torch.zeros_like(R), -R).conj().imag  # a negative view of R
    assert neg_R.is_neg() and torch.equal(neg_R.resolve_neg(), R)
    strided_L = torch.randn(L.shape[1], L.shape[0]).T.copy_(L)  # the values of L, transposed
    assert not strided_L.is_contiguous()
    want = ops.lowrank_form(W, L, R)
    assert torch.equal(ops.lowrank_form(W, strided_L, neg_R), want)
    G = torch.randn_like(W)
    want_g = ops.lowrank_factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP)
    got_g = ops.lowrank_factor_grads(G.T.contiguous().T, W, strided_L, neg_R,
                                     ops.GRAD_TIMES_EXP)
    for a, b in zip(want_g, got_g, strict=True):
        assert torch.equal(a, b)


def test_scratch_gradient_op_leaves_a_caller_view_untouched(kernel: bool) -> None:
    """A non-contiguous ``G`` is copied before the torch implementation writes into it."""
    W, L, R = _factors()
    base = torch.randn(W.shape[1], W.shape[0])
    G = base.T
    before = base.clone()
    ops.lowrank_factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP, scratch=True)
    assert torch.equal(base, before)


def test_kernel_and_torch_implementations_agree_to_float32_rounding() -> None:
    if ops._k is None:
        pytest.skip("the compiled kernel is not built or LIEGROUP_DISABLE_KERNELS is set")
    W, L, R = _factors(rows=37, r=5, cols=123)
    u = torch.finfo(torch.float32).eps / 2
    ref = ops._form_torch(W.double(), L.double(), R.double(), False, None)
    got = ops.lowrank_form(W, L, R)
    # |Σ_r L R| is summed with ≤ r roundings and exp within 1 ulp; W ⊙ exp(·) one more
    bound = (L.abs() @ R.abs()).double() * (L.shape[1] + 1) * u + 3 * u
    assert bool(((got.double() - ref).abs() <= ref.abs() * bound.view_as(ref)).all())


# ------------------------------------------------------------------------------ layering
PEFT = pathlib.Path(engine.__file__).parent.parent
ENGINE_PUBLIC = set(engine.__all__)


METHOD_FILES = sorted(
    str(p.relative_to(PEFT)) for p in PEFT.rglob("*.py") if "_engine" not in p.parts
)


def test_the_method_files_are_found() -> None:
    assert {"layer.py", "model.py", "generators/lora.py", "updates/hadamard.py"} <= set(
        METHOD_FILES
    )


@pytest.mark.parametrize("name", METHOD_FILES)
def test_method_files_reach_the_engine_only_through_its_entry_module(name: str) -> None:
    tree = ast.parse((PEFT / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module
            assert not mod.startswith("liegroup.peft._engine."), f"{name} imports {mod}"
            if mod == "liegroup.peft._engine":
                names = {a.name for a in node.names}
                assert names <= ENGINE_PUBLIC, f"{name} imports {names - ENGINE_PUBLIC}"
            if mod == "liegroup.peft":
                names = {a.name for a in node.names}
                assert "_engine" not in names, f"{name} imports the engine's modules"
        if isinstance(node, ast.Import):
            for a in node.names:
                assert not a.name.startswith("liegroup.peft._engine."), f"{name}: {a.name}"


def test_one_file_holds_the_memory_policy() -> None:
    """No other engine or method file defines a keep/block ratio constant of its own."""
    for path in PEFT.rglob("*.py"):
        if path.name == "policy.py":
            continue
        text = path.read_text()
        for token in ("_KEEP_RATIO", "_KEEP_PLAIN", "_CHUNK_ENTRIES", "// 32"):
            assert token not in text, f"{path.relative_to(PEFT)} has {token!r}"


def test_eager_direct_calls_equal_the_dispatcher_route_bit_for_bit(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager CPU calls skip the dispatcher; the values are those of ``torch.ops.liegroup``."""
    W, L, R = _factors(rows=9, r=4, cols=33)
    G = torch.randn_like(W)

    def run() -> list[torch.Tensor]:
        out = torch.empty_like(W)
        got = [ops.lowrank_form(W, L, R), ops.lowrank_form(W, L, R, True, out=out).clone()]
        for rule, M in ((ops.GRAD_TIMES, W), (ops.GRAD_TIMES_EXP, W), (ops.GRAD_PLAIN, None)):
            got += ops.lowrank_factor_grads(G, M, L, R, rule)
            got += ops.lowrank_factor_grads(G.clone(), M, L, R, rule, scratch=True, block_rows=4)
        return got

    direct = run()
    monkeypatch.setattr(ops, "_EAGER_DIRECT", False)
    routed = run()
    for a, b in zip(direct, routed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first_order", [False, True])
def test_lowrank_form_autograd_matches_the_torch_formulation(kernel: bool,
                                                             first_order: bool) -> None:
    """The operator's registered autograd (used under torch.compile) in float64 and float32."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    L = (0.3 * torch.randn(5, 2, generator=g, dtype=torch.float64)).requires_grad_()
    R = (0.3 * torch.randn(2, 7, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, lf, rf: torch.ops.liegroup.lowrank_form(w, lf, rf, first_order), (W, L, R)
    )
    W32, L32, R32 = (t.detach().float().requires_grad_() for t in (W, L, R))
    y = torch.ops.liegroup.lowrank_form(W32, L32, R32, first_order)
    d = (L @ R).view(W.shape)
    ref = W * (d + 1 if first_order else d.exp())
    gy = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (y * gy.float()).sum().backward()
    (ref * gy).sum().backward()
    for got, want in ((L32.grad, L.grad), (R32.grad, R.grad), (W32.grad, W.grad)):
        assert got is not None and want is not None
        scale = float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= 64 * 2.0**-24 * scale


def test_a_frozen_parameter_takes_the_eager_direct_path() -> None:
    """A base layer's frozen weight is an ``nn.Parameter``: it skips the dispatcher as a tensor
    does; a tensor subclass (which may override dispatch) does not."""

    class Sub(torch.Tensor):
        pass

    W = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    assert ops._eager_direct(W, torch.randn(3, 1), None)
    assert not ops._eager_direct(torch.randn(3, 4).as_subclass(Sub))
    assert not ops._eager_direct(W, torch.randn(3, 1, device="meta"))
