"""The compiled CPU kernel of LieRA's low-rank Hadamard update (liegroup/peft/_engine/_cfused.c).

It is reached only through the ``torch.library`` operators of ``liegroup.peft._engine.ops``
(``lowrank_form``, ``lowrank_factor_grads``); the accuracy tests call those operators and check
first that the kernel takes the call (``ops._kernel_takes``), or count the calls that reach it
(a spy in place of ``ops._k``).

* it is built in this install (unless ``LIEGROUP_DISABLE_KERNELS=1``) and reports the
  ``_USE_KERNEL`` switch;
* its ``exp`` is within 1 ulp of the float64 exponential on every instruction-set body this
  CPU has, with exact inf / 0 / NaN / 1 where they are due and correctly rounded subnormal
  results away from rounding midpoints; an entry's bits do not depend on the other entries
  that share its vector, its four-row block (form) or its row pair (gradients);
* ``form`` (both maps) and ``factor_grads`` (three modes) agree with float64 references to
  bounds derived from the float32 unit roundoff ``u`` (standard dot-product error analysis:
  ``|fl(x·y) − x·y| ≤ γ_n |x|·|y|``, ``γ_n = n u / (1 − n u)``), over shapes exercising the
  vector tails, the two-vector main loop, the rank passes and the column panels of the
  gradient kernel and R_MAX;
* ``form`` is bit-identical across thread counts; gradients stay within their bound;
* what the kernel does not take (rank R_MAX + 1, float64) runs the torch path and is still
  right; non-contiguous or negated views are made plain by the operator first; the library's
  paths (adapted_weight_lowrank, the fused layer node, a LieRA model's backward) reach the
  kernel for float32 CPU only and agree with the torch path;
* the operators refuse bad operands with typed errors before the kernel reads a pointer; bad
  raw arguments to the kernel raise ValueError; NaN and inf propagate to exactly the entries
  they touch (kernel and torch implementation alike).

The bound tests of ``form`` and the factor gradients, and the non-finite tests, also run the
operators' torch implementation (the ``torch`` case, as on CUDA), so they run without the
kernel too.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.grad import conv2d_weight

from liegroup._kernels import kernels_disabled
from liegroup.errors import ConfigError, DTypeError, ShapeError
from liegroup.peft import LieRAConfig, adapted_weight_lowrank, get_peft_model
from liegroup.peft._engine import compiled_kernel, ops
from liegroup.peft._engine.geometry import OpGeometry
from liegroup.peft._engine.lowrank_node import adapted_op_lowrank
from liegroup.peft.layer import LieRALayer

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53
ISAS = ["baseline", "avx2", "avx512"]
# the kernel's rank limit (without the kernel every rank takes the torch path; 256 is what
# _cfused.c reports)
R_MAX = ops._R_MAX or 256
NO_KERNEL = "compiled kernel absent (not built, or LIEGROUP_DISABLE_KERNELS=1)"


def gamma(n: int, u: float = U32) -> float:
    """γ_n = n u / (1 − n u): the relative bound of an n-term float sum of products."""
    return n * u / (1.0 - n * u)


def grow(x: torch.Tensor, *eps: float) -> torch.Tensor:
    """(Π (1 + ε)) · e^x − 1, without the cancellation of forming it in float64."""
    return torch.expm1(x + sum(math.log1p(e) for e in eps))


def _need_kernel() -> None:
    if ops._k is None:
        pytest.skip(NO_KERNEL)


# --------------------------------------------------------------------------- fixtures
class KernelSpy:
    """Stands in for ``ops._k``: counts the calls that reach the kernel.

    Without the kernel (``kernel=None``) it is not installed and its counts stay 0: the
    tests that only assert that no call reaches the kernel still run.
    """

    def __init__(self, kernel: Any) -> None:
        self._k = kernel
        self.forms = 0
        self.grads_calls = 0

    def form(self, *args: Any) -> Any:
        self.forms += 1
        return self._k.form(*args)

    def grads(self, *args: Any) -> Any:
        self.grads_calls += 1
        return self._k.grads(*args)

    def __getattr__(self, name: str) -> Any:  # R_MAX, MT_WORK, isa, tucker, ...
        return getattr(self._k, name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> KernelSpy:
    s = KernelSpy(ops._k)
    if ops._k is not None:
        monkeypatch.setattr(ops, "_k", s)
    return s


def _set_isa(name: str) -> None:
    try:
        ops._k.isa(name)
    except ValueError:
        ops._k.isa("auto")
        pytest.skip(f"this CPU lacks {name}")
    assert ops._k.isa() == name


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each instruction-set body of the kernel this CPU has."""
    _need_kernel()
    name: str = request.param
    try:
        _set_isa(name)
        yield name
    finally:
        ops._k.isa("auto")


@pytest.fixture(params=[*ISAS, "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each kernel body, and the operators' torch implementation (runs without the kernel)."""
    name: str = request.param
    if name == "torch":
        monkeypatch.setattr(ops, "_USE_KERNEL", False)
        yield name
        return
    _need_kernel()
    try:
        _set_isa(name)
        yield name
    finally:
        ops._k.isa("auto")


def form(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.lowrank_form``, checking that the kernel takes the call when it is switched on."""
    if ops.compiled_kernel():
        assert ops._kernel_takes(W.numel(), L.shape[1], W, L, R)
    return ops.lowrank_form(W, L, R, first_order, out)


def factor_grads(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor, R: torch.Tensor,
                 mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.lowrank_factor_grads`` (G left as it is), checking that the kernel takes it."""
    if ops.compiled_kernel():
        assert ops._kernel_takes(G.numel(), L.shape[1], G, L, R)
    return ops.lowrank_factor_grads(G, M, L, R, mode)


@pytest.fixture
def threads() -> Iterator[None]:
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _factors(rows: int, cols: int, r: int, seed: int, scale: float = 0.7
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 W (rows, cols), L (rows, r), R (r, cols) with |L R| = O(scale)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    L = torch.randn(rows, r, generator=gen) * (scale / r**0.25)
    R = torch.randn(r, cols, generator=gen) * (scale / r**0.25)
    return W, L, R


# --------------------------------------------------------------------------- derived bounds
def form_ref_and_bound(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, first_order: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of form and the bound on |out − ref| of a float32 evaluation.

    D̂ (computed rank-r sum) satisfies |D̂ − D| ≤ γ_r S, S = |L||R| (any summation order,
    with or without FMA).
    exact map: out = fl(W · ê), ê = exp(D̂)(1 + ε_e), |ε_e| ≤ 1 ulp ≤ 2u (ulp(y) ≤ 2^-23 y),
      exp(D̂) = exp(D) e^δ, |δ| ≤ γ_r S; so |out − ref| ≤ |ref|·((1 + 2u)(1 + u) e^{γ_r S} − 1),
      i.e. 3u + γ_r S to first order (c1 = 3: 1 ulp of exp, one product).
    first order: out = fl(fl(D̂ + 1)·W) = (D̂ + 1)(1 + ε1) W (1 + ε2), so
      |out − ref| ≤ |W| γ_r S (1 + u)² + |ref|·((1 + u)² − 1).
    The float64 reference itself is off by ≤ |ref|·((1 + u64)³ e^{γ64_r S} − 1) + |W|γ64_r S;
    that (≈1e-16, relative) is added.
    """
    r = L.shape[1]
    W64, L64, R64 = W.double(), L.double(), R.double()
    D = L64 @ R64
    S = L64.abs() @ R64.abs()
    g, g64 = gamma(r), gamma(r, U64)
    if first_order:
        ref = W64 * (D + 1)
        bound = W64.abs() * g * S * (1 + U32) ** 2 + ref.abs() * (2 * U32 + U32**2)
    else:
        ref = W64 * torch.exp(D)
        bound = ref.abs() * grow(g * S, 2 * U32, U32)
    ref64_err = ref.abs() * grow(g64 * S, U64, U64, U64) + W64.abs() * g64 * S
    return ref, bound + ref64_err


def grads_ref_and_bound(G: torch.Tensor, M: torch.Tensor | None, L: torch.Tensor,
                        R: torch.Tensor, mode: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (gL, gR) and bounds on the float32 errors.

    Computed G_Δ = G_Δ (1 + θ) entrywise with |θ| ≤ η: η = 0 (plain: G itself), u (one
    product G·M), (1 + u)²(1 + 2u) e^{γ_r S} − 1 (two products, 1 ulp of exp, the rank-r sum
    inside exp as in form). Then gL = G_Δ Rᵀ is a cols-term sum, gR = Lᵀ G_Δ a rows-term sum
    (any order — lanes, panels, per-thread partials): with T = |G_Δ| (float64),
      |ĝL − gL| ≤ (1 + γ_cols)·(T(1 + η))|R|ᵀ − T|R|ᵀ,   likewise gR with γ_rows and |L|ᵀ.
    Plus the float64 reference's own error, the same with u64 (γ64 over cols + r + 4 terms).
    """
    rows, r, cols = L.shape[0], L.shape[1], R.shape[1]
    G64, L64, R64 = G.double(), L.double(), R.double()
    S = L64.abs() @ R64.abs()
    if mode == ops.GRAD_PLAIN:
        gd = G64
        eta = torch.zeros_like(G64)
    elif mode == ops.GRAD_TIMES:
        assert M is not None
        gd = G64 * M.double()
        eta = torch.full_like(G64, U32)
    else:
        assert M is not None
        gd = G64 * M.double() * torch.exp(L64 @ R64)
        eta = grow(gamma(r) * S, U32, U32, 2 * U32)
    T = gd.abs()
    bL, bR = grads_bounds(T, eta, L64, R64)
    T64 = T * (1 + grow(gamma(r, U64) * S, U64, U64, U64))
    bL = bL + gamma(cols + r + 4, U64) * (T64 @ R64.abs().T)
    bR = bR + gamma(rows + r + 4, U64) * (L64.abs().T @ T64)
    return gd @ R64.T, L64.T @ gd, bL, bR


def grads_bounds(T: torch.Tensor, eta: torch.Tensor, L64: torch.Tensor, R64: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + γ_cols)(T(1 + η))|R|ᵀ − T|R|ᵀ = γ_cols (T(1 + η))|R|ᵀ + (Tη)|R|ᵀ, and for gR."""
    rows, cols = T.shape
    Te = T * (1 + eta)
    bL = gamma(cols) * (Te @ R64.abs().T) + (T * eta) @ R64.abs().T
    bR = gamma(rows) * (L64.abs().T @ Te) + L64.abs().T @ (T * eta)
    return bL, bR


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (out.double() - ref).abs()
    assert bool(torch.isfinite(out).all()), what
    ratio = float((err / bound.clamp_min(1e-300)).max())
    assert bool((err <= bound).all()), f"{what}: error / bound = {ratio:.3g}"


# --------------------------------------------------------------------------- 1. built, switch
@pytest.mark.skipif(kernels_disabled(), reason="LIEGROUP_DISABLE_KERNELS=1 turns the kernel off")
def test_kernel_is_built() -> None:
    # the project's install compiles the extension; a silently failed (optional) build must
    # not go unnoticed
    assert ops._k is not None, "liegroup/peft/_engine/_cfused.c was not compiled"
    assert ops._k is importlib.import_module("liegroup.peft._engine._cfused")
    assert compiled_kernel() and ops.compiled_kernel()
    assert R_MAX == ops._k.R_MAX >= 64
    assert ops._MT_WORK == ops._k.MT_WORK > 0
    assert ops._k.isa() in ("baseline", "avx2", "avx512")


@pytest.mark.skipif(not kernels_disabled(), reason="only with LIEGROUP_DISABLE_KERNELS=1")
def test_disable_switch_turns_the_kernel_off() -> None:
    assert ops._k is None and not compiled_kernel() and not ops.compiled_kernel()
    assert ops._R_MAX == 0 and ops._MT_WORK == 0
    W, L, R = _factors(3, 4, 2, 0)
    assert not ops._kernel_takes(W.numel(), 2, W, L, R)
    ref, bound = form_ref_and_bound(W, L, R, False)  # the torch implementation serves
    assert_within(ops.lowrank_form(W, L, R), ref, bound, "torch")


def test_compiled_kernel_reports_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    assert not compiled_kernel()
    W, L, R = _factors(3, 4, 2, 0)
    assert not ops._kernel_takes(W.numel(), 2, W, L, R)


def test_isa_rejects_unknown_names() -> None:
    _need_kernel()
    try:
        with pytest.raises(ValueError, match="not available"):
            ops._k.isa("sse9")
    finally:
        ops._k.isa("auto")


# --------------------------------------------------------------------------- 2. exp accuracy
def _kernel_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) through form: W = 1, L = 1 (the rank-1 sum 0 + 1·x is x exactly)."""
    X = torch.from_numpy(x.astype(np.float32))[None].contiguous()
    out = form(torch.ones(1, X.shape[1]), torch.ones(1, 1), X, False)
    return out.numpy()[0].astype(np.float64)


def test_exp_is_within_one_ulp_with_exact_special_values(isa: str) -> None:
    sweep = np.linspace(-104.0, 89.0, 300_001, dtype=np.float64).astype(np.float32)
    # around the overflow threshold ln(2^128) = 88.7228391... and the normal/subnormal/zero
    # underflow thresholds (-87.3365..., -103.2789..., -103.9720...)
    edges = [88.72283905206835, -87.33654475055310, -103.27892990343184, -103.97207708399179]
    near = [np.float32(e) + np.arange(-300, 301, dtype=np.float32) * np.spacing(np.float32(e))
            for e in edges]
    tiny = np.array([1e-30, -1e-30, 1e-45, -1e-45, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0],
                    dtype=np.float32)
    x = np.concatenate([sweep, *near, tiny]).astype(np.float32)
    out = _kernel_exp(x)
    ref = np.exp(x.astype(np.float64))  # exp of the float32 input; float64 error ≪ 1 ulp(f32)

    over = ref >= 2.0**128  # correctly rounded: inf; the kernel promises inf
    assert np.all(np.isposinf(out[over]))
    fin = ~over
    # ulp of the float32 format at ref (subnormal spacing 2^-149 below 2^-126); an inf result
    # counts as 2^128 (the next binade's first value), so FLT_MAX-vs-inf near the threshold
    # is judged by distance
    e = np.maximum(np.floor(np.log2(np.maximum(ref[fin], 2.0**-160))), -126.0)
    ulp = 2.0 ** (e - 23)
    o = np.where(np.isposinf(out[fin]), 2.0**128, out[fin])
    err = np.abs(o - ref[fin]) / ulp
    assert np.isfinite(err).all()
    worst = int(np.argmax(err))
    assert err.max() <= 1.0, f"{err.max():.4f} ulp at x = {x[fin][worst]!r}"

    # subnormal and zero results: the kernel scales an (≤ 1 ulp ≤ 2u relative) normal value
    # down once, so it is the correctly rounded value unless ref lies within 2u·ref of a
    # midpoint of the 2^-149 grid (where the 1-ulp error of the normal value may tip it)
    sub = ref < 2.0**-126
    q = 2.0**-149
    cr = ref[sub].astype(np.float32).astype(np.float64)
    mid = (np.floor(ref[sub] / q) + 0.5) * q
    clear = np.abs(ref[sub] - mid) > 2 * U32 * ref[sub] * (1 + 1e-9)
    assert clear.sum() > 10_000
    assert np.array_equal(out[sub][clear], cr[clear])
    assert np.all(out[x <= np.float32(-103.98)] == 0.0)


def test_exp_special_inputs(isa: str) -> None:
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 89.0, 200.0, -104.0, -1e30, 1e30],
                 dtype=np.float32)
    out = _kernel_exp(x)
    assert out[0] == 1.0 and out[1] == 1.0
    assert np.isposinf(out[2]) and out[3] == 0.0 and np.isnan(out[4])
    assert np.isposinf(out[5]) and np.isposinf(out[6])
    assert out[7] == 0.0 and out[8] == 0.0 and np.isposinf(out[9])
    assert not np.signbit(out[3]) and not np.signbit(out[7])


def test_exp_bits_do_not_depend_on_the_other_lanes(isa: str) -> None:
    """A vector with every lane in [-87, 88] takes the kernel's short path; one lane outside
    sends it through the general path. Both give the same bits for every in-range entry."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-87.0, 88.0, 4096),
                        [-87.0, 88.0, 0.0, -0.0, 1e-30, -86.99999, 87.99999]]).astype(np.float32)
    alone = _kernel_exp(x)  # whole vectors in range (the tail vector too: zero-padded)
    # the same values with an out-of-range neighbour in every vector of every width
    mixed = np.empty(2 * x.size, dtype=np.float32)
    mixed[0::2], mixed[1::2] = x, np.float32(-100.0)
    assert np.array_equal(_kernel_exp(mixed)[0::2], alone)
    mixed[1::2] = np.float32(np.nan)
    assert np.array_equal(_kernel_exp(mixed)[0::2], alone)


def _kernel_exp_rows(X: np.ndarray) -> np.ndarray:
    """exp of a (rows, cols) array through form: W = 1, L = I, R = X (row i's rank sum adds
    exact zeros to 1·x, so it is x for finite X); four rows go through one row block."""
    rows = X.shape[0]
    out = form(torch.ones(X.shape), torch.eye(rows), torch.from_numpy(X).contiguous(), False)
    return out.numpy().astype(np.float64)


@pytest.mark.parametrize("other", [-100.0, 100.0, 50.0])
def test_exp_bits_do_not_depend_on_the_rows_beside(isa: str, other: float) -> None:
    """A block of four rows takes one range test and one interleaved exp: an entry's bits are
    those of its row formed alone, whatever the block's other rows hold (below the range,
    overflowing to inf, in range)."""
    cols = 64 + 16 + 5  # the two-vector loop of every width, one-vector columns, a tail
    x = np.random.default_rng(11).uniform(-87.0, 88.0, cols).astype(np.float32)
    alone = _kernel_exp(x)
    for row in range(4):
        X = np.full((4, cols), other, dtype=np.float32)
        X[row] = x
        assert np.array_equal(_kernel_exp_rows(X)[row], alone), row


@pytest.mark.parametrize("r", [2, 9], ids=["one pass", "rank groups"])
@pytest.mark.parametrize("other", [-100.0, -90.0, 50.0])
def test_gradient_exp_bits_do_not_depend_on_the_paired_row(isa: str, r: int,
                                                           other: float) -> None:
    """The gradient pass takes a row pair's two exps together (G ⊙ M ⊙ exp(L R)): with
    G = M = 1, L = [I 0] and R = [X; 0], ∂L/∂R's row i is exp(X_i) exactly, the same bits
    whatever the paired row holds and as the form's exp of the row alone."""
    cols = 64 + 16 + 5
    x = np.random.default_rng(12).uniform(-87.0, 88.0, cols).astype(np.float32)
    alone = _kernel_exp(x)
    for row in range(2):
        R = torch.zeros(r, cols)
        R[:2] = float(other)
        R[row] = torch.from_numpy(x)
        L = torch.zeros(2, r)
        L[0, 0] = L[1, 1] = 1.0
        ones = torch.ones(2, cols)
        _, g_r = factor_grads(ones, ones, L, R, ops.GRAD_TIMES_EXP)
        assert np.array_equal(g_r[row].numpy().astype(np.float64), alone), row


# --------------------------------------------------------------------------- 3. form
ROWS = [1, 2, 7, 10]
COLS = [1, 5, 17, 33, 1000]
RANKS = [1, 3, 8, 9, 17, R_MAX]


@pytest.mark.parametrize("first_order", [False, True], ids=["exact", "first"])
@pytest.mark.parametrize("r", RANKS)
def test_form_matches_float64_within_derived_bound(path: str, r: int, first_order: bool) -> None:
    for i, rows in enumerate(ROWS):
        for j, cols in enumerate(COLS):
            W, L, R = _factors(rows, cols, r, 100 * i + j + r)
            out = form(W, L, R, first_order)
            ref, bound = form_ref_and_bound(W, L, R, first_order)
            assert_within(out, ref, bound, f"{path} rows={rows} cols={cols} r={r}")


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
def test_form_writes_into_out_and_leaves_operands(monkeypatch: pytest.MonkeyPatch,
                                                  spy: KernelSpy, use_kernel: bool) -> None:
    if use_kernel:
        _need_kernel()
    monkeypatch.setattr(ops, "_USE_KERNEL", use_kernel)
    W, L, R = _factors(5, 37, 4, 3)
    W0, L0, R0 = W.clone(), L.clone(), R.clone()
    want = form(W, L, R, False)
    for shape in ((5, 37), (185,)):  # out: any contiguous buffer with W's entries
        out = torch.full(shape, float("nan"))
        got = form(W, L, R, False, out)
        assert got.shape == W.shape and got.data_ptr() == out.data_ptr()
        assert torch.equal(got, want)
    assert torch.equal(W, W0) and torch.equal(L, L0) and torch.equal(R, R0)
    assert spy.forms == (3 if use_kernel else 0)
    with pytest.raises(ShapeError, match="contiguous"):
        ops.lowrank_form(W, L, R, False, torch.empty(37, 5).T)
    with pytest.raises(ShapeError):
        ops.lowrank_form(W, L, R, False, torch.empty(5, 36))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 80), r=st.integers(1, 24),
       first_order=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 0.3, 1.0, 2.5]))
def test_form_property_random_shapes(rows: int, cols: int, r: int, first_order: bool, seed: int,
                                     scale: float) -> None:
    _need_kernel()
    W, L, R = _factors(rows, cols, r, seed, scale)
    out = form(W, L, R, first_order)
    ref, bound = form_ref_and_bound(W, L, R, first_order)
    assert_within(out, ref, bound, f"rows={rows} cols={cols} r={r}")


# --------------------------------------------------------------------------- 4. factor grads
MODES = [ops.GRAD_TIMES, ops.GRAD_TIMES_EXP, ops.GRAD_PLAIN]


@pytest.mark.parametrize("mode", MODES, ids=["times", "times_exp", "plain"])
def test_factor_grads_match_float64_within_derived_bound(path: str, mode: int) -> None:
    shapes = [(1, 1, 1), (3, 5, 2), (2, 17, 8), (7, 33, 9), (10, 1000, 3), (9, 600, 17),
              (4, 40, R_MAX), (13, 515, 16), (5, 4615, 8), (17, 2100, 3), (6, 2101, 17)]
    for n, (rows, cols, r) in enumerate(shapes):
        W, L, R = _factors(rows, cols, r, 7 * n + mode)
        G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(n))
        G0 = G.clone()
        M = None if mode == ops.GRAD_PLAIN else W
        gL, gR = factor_grads(G, M, L, R, mode)
        assert torch.equal(G, G0)
        refL, refR, bL, bR = grads_ref_and_bound(G, M, L, R, mode)
        where = f"{path} mode={mode} rows={rows} cols={cols} r={r}"
        assert_within(gL, refL, bL, "gL " + where)
        assert_within(gR, refR, bR, "gR " + where)


def test_factor_grads_is_deterministic_for_a_thread_count() -> None:
    _need_kernel()
    W, L, R = _factors(64, 700, 11, 5)
    G = torch.randn(64, 700)
    a = factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP)
    b = factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- 5. threads
def test_threads_form_bit_identical_grads_within_bound(threads: None, spy: KernelSpy) -> None:
    _need_kernel()
    rows, cols = 512, 4608  # rows·cols·(r + 8) ≫ 4·2^21: split over 4 threads
    for r in (8, 12):  # one rank pass; rank groups on a shared G_Δ buffer (r > 8)
        W, L, R = _factors(rows, cols, r, 11)
        G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(12))
        res = {}
        for nt in (1, 4):
            torch.set_num_threads(nt)
            before = (spy.forms, spy.grads_calls)
            res[nt] = (form(W, L, R, False), form(W, L, R, True),
                       *factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP))
            assert (spy.forms, spy.grads_calls) == (before[0] + 2, before[1] + 1)  # the kernel
        for q in (0, 1):
            assert torch.equal(res[1][q], res[4][q])
        refL, refR, bL, bR = grads_ref_and_bound(G, W, L, R, ops.GRAD_TIMES_EXP)
        for nt in (1, 4):
            assert_within(res[nt][2], refL, bL, f"gL threads={nt} r={r}")
            assert_within(res[nt][3], refR, bR, f"gR threads={nt} r={r}")


# --------------------------------------------------------------------------- 6. fallback
def test_kernel_takes_only_float32_cpu_rank_up_to_r_max() -> None:
    _need_kernel()
    W, L, R = _factors(4, 6, 3, 1)

    def takes(*ts: torch.Tensor) -> bool:
        return ops._kernel_takes(ts[0].numel(), ts[1].shape[1], *ts)

    assert takes(W, L, R)
    assert not takes(W.double(), L.double(), R.double())
    assert not takes(W, L.double(), R)
    assert not takes(torch.empty(4, 6, device="meta"), L, R)  # not on the CPU
    Wb, Lb, Rb = _factors(2, 5, R_MAX + 1, 1)
    assert not takes(Wb, Lb, Rb)
    assert takes(Wb, Lb[:, :R_MAX].contiguous(), Rb[:R_MAX].contiguous())
    assert not takes(W, L[:, :0].contiguous(), R[:0].contiguous())


def test_views_are_made_plain_before_the_kernel_reads_them(spy: KernelSpy) -> None:
    """Non-contiguous operands and negated views (a conjugate/negative bit the kernel cannot
    see) are resolved into contiguous memory by the operator, then the kernel runs on them:
    the same values bit for bit as the plain operands."""
    _need_kernel()
    W, L, R = _factors(4, 6, 3, 1)
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    want = form(W, L, R, False)
    want_g = factor_grads(G, W, L, R, ops.GRAD_TIMES_EXP)
    n = spy.forms, spy.grads_calls
    views = [
        (W.T.contiguous().T, L, R),  # non-contiguous W
        (W, L.T.contiguous().T, R.T.contiguous().T),  # non-contiguous factors
        ((-W)._neg_view(), L, R),  # a negative-bit view of W
        (W, (-L)._neg_view(), R),
    ]
    for Wv, Lv, Rv in views:
        assert torch.equal(form(Wv, Lv, Rv, False), want)
        gL, gR = factor_grads(G.T.contiguous().T, Wv, Lv, Rv, ops.GRAD_TIMES_EXP)
        assert torch.equal(gL, want_g[0]) and torch.equal(gR, want_g[1])
    assert (spy.forms, spy.grads_calls) == (n[0] + len(views), n[1] + len(views))


def test_kernel_leaves_small_weights_to_torch_threads(threads: None) -> None:
    # with several intra-op threads the kernel (which starts its own threads per call) is
    # used only when every thread gets a full share of work; smaller weights keep torch's
    # thread-pooled ops (the per-thread share is MT_WORK entries x (rank + 8))
    _need_kernel()
    r = 8
    per_row = 512 * (r + 8)
    rows_needed = -(-ops._MT_WORK * 2 // per_row)  # ceil: a full share for each of 2 threads
    W, L, R = (torch.zeros(rows_needed, 512), torch.zeros(rows_needed, r), torch.zeros(r, 512))
    Ws, Ls = W[: rows_needed - 1].contiguous(), L[: rows_needed - 1].contiguous()

    def takes(*ts: torch.Tensor) -> bool:
        return ops._kernel_takes(ts[0].numel(), ts[1].shape[1], *ts)

    torch.set_num_threads(1)
    assert takes(Ws, Ls, R) and takes(W, L, R)
    torch.set_num_threads(2)
    assert takes(W, L, R)
    assert not takes(Ws, Ls, R)


@pytest.mark.parametrize("order", [None, 1], ids=["exact", "first"])
def test_fallback_paths_are_right(spy: KernelSpy, order: int | None) -> None:
    # rank R_MAX + 1 (float32): the torch path, within form's bound
    W, L, R = _factors(3, 40, R_MAX + 1, 2, scale=0.3)
    Wn = torch.randn(40, 3).T  # (3, 40), not contiguous
    for Wc in (W, Wn):
        out = adapted_weight_lowrank(Wc, L, R, exp_map=order or "exact")
        ref, bound = form_ref_and_bound(Wc, L, R, order == 1)
        assert_within(out, ref, bound, "float32 fallback")
    assert spy.forms == 0
    # float64: the torch path, against a long-double reference with the u64 bound
    W, L, R = (t.double() for t in _factors(4, 30, 5, 3))
    out = adapted_weight_lowrank(W, L, R, exp_map=order or "exact")
    Wl, Ll, Rl = (t.numpy().astype(np.longdouble) for t in (W, L, R))
    D = np.einsum("ik,kj->ij", Ll, Rl)
    ref_l = Wl * (D + 1) if order == 1 else Wl * np.exp(D)
    S = (L.abs() @ R.abs()).numpy()
    g = gamma(5, U64)
    absref = np.abs(ref_l.astype(np.float64))
    if order == 1:
        bound_np = np.abs(W.numpy()) * g * S * (1 + 2 * U64) + absref * (2 * U64 + U64**2)
    else:
        bound_np = absref * grow(torch.from_numpy(g * S), 2 * U64, U64).numpy()
    err = np.abs(out.numpy().astype(np.longdouble) - ref_l).astype(np.float64)
    assert np.all(err <= bound_np * (1 + 1e-6) + 1e-300)  # (1e-6: the long-double reference)
    assert spy.forms == 0


def test_fallback_fused_layer_rank_above_r_max(spy: KernelSpy) -> None:
    x = torch.randn(5, 40)
    W, L, R = _factors(3, 40, R_MAX + 1, 4, scale=0.3)
    L.requires_grad_(True)
    R.requires_grad_(True)
    y = adapted_op_lowrank(x, W, None, L, R, "hadamard", None, OpGeometry("linear"), None)
    assert torch.equal(y, F.linear(x, adapted_weight_lowrank(W, L, R)))
    y.square().sum().backward()
    assert spy.forms == 0 and spy.grads_calls == 0
    assert L.grad is not None and R.grad is not None
    # against float64 autograd of the same function (rounding of float32, loosely: gradients
    # of a quadratic loss are well-conditioned here; 1e-4 relative to the largest entry)
    L64, R64 = L.detach().double().requires_grad_(True), R.detach().double().requires_grad_(True)
    F.linear(x.double(), W.double() * torch.exp(L64 @ R64)).square().sum().backward()
    assert L64.grad is not None and R64.grad is not None
    for a, b in ((L.grad, L64.grad), (R.grad, R64.grad)):
        assert float((a.double() - b).abs().max() / b.abs().max()) < 1e-4


def test_operators_refuse_bad_operands_before_the_kernel(spy: KernelSpy) -> None:
    """Shapes, dtypes and modes are checked by the operator; nothing reaches the kernel."""
    W, L, R = _factors(3, 4, 2, 0)
    G = torch.randn(3, 4)
    with pytest.raises(ShapeError, match="unfold"):
        ops.lowrank_form(W, L, R[:, :3])
    with pytest.raises(ShapeError):
        ops.lowrank_form(W, L, R.T)  # ranks differ
    with pytest.raises(ShapeError):
        ops.lowrank_form(W, L[:, 0], R)  # not a matrix
    with pytest.raises(DTypeError):
        ops.lowrank_form(W, L.double(), R)
    with pytest.raises(DTypeError):
        ops.lowrank_form(W.int(), L.int(), R.int())
    with pytest.raises(ConfigError, match="0, 1 or 2"):
        ops.lowrank_factor_grads(G, W, L, R, 3)
    with pytest.raises(ConfigError, match="needs M"):
        ops.lowrank_factor_grads(G, None, L, R, ops.GRAD_TIMES_EXP)
    with pytest.raises(ShapeError):
        ops.lowrank_factor_grads(G, W[:, :3], L, R, ops.GRAD_TIMES)
    with pytest.raises(ShapeError):
        ops.lowrank_factor_grads(G[:, :3], W, L, R, ops.GRAD_TIMES, scratch=True)
    with pytest.raises(ShapeError, match="unfold"):
        ops.check_factors(W, L, R[:, :3])
    assert spy.forms == 0 and spy.grads_calls == 0


# --------------------------------------------------------------------------- 7. integration
@pytest.mark.parametrize("order", [None, 1], ids=["exact", "first"])
def test_adapted_weight_kernel_vs_torch_path(monkeypatch: pytest.MonkeyPatch, spy: KernelSpy,
                                             order: int | None) -> None:
    _need_kernel()
    W = torch.randn(8, 3, 3, 3)
    _, L, R = _factors(8, 27, 5, 9)
    on = adapted_weight_lowrank(W, L, R, exp_map=order or "exact")
    assert spy.forms == 1
    monkeypatch.setattr(ops, "_USE_KERNEL", False)
    off = adapted_weight_lowrank(W, L, R, exp_map=order or "exact")
    assert spy.forms == 1
    ref, bound = form_ref_and_bound(W.view(8, 27), L, R, order == 1)
    # both are float32 evaluations within the bound of the same exact value
    assert_within(on.view(8, 27), ref, bound, "kernel")
    assert_within(off.view(8, 27), ref, bound, "torch")
    assert bool(((on - off).abs().view(8, 27) <= 2 * bound).all())


@pytest.mark.parametrize("order", [None, 1], ids=["exact", "first"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fused_layer_forward_is_bit_identical(spy: KernelSpy, kind: str,
                                              order: int | None) -> None:
    """The node's forward is the op on adapted_weight_lowrank's W', bit for bit (kernel or
    torch implementation: both paths form W' through one operator)."""
    kernel = ops._k is not None
    gen = torch.Generator().manual_seed(21)
    if kind == "linear":
        x, W = torch.randn(6, 37, generator=gen), torch.randn(19, 37, generator=gen)
        op = OpGeometry("linear")
        rows, cols = 19, 37
    else:
        x, W = torch.randn(2, 3, 9, 9, generator=gen), torch.randn(10, 3, 3, 3, generator=gen)
        op = OpGeometry("conv", (2, 1), (1, 1), (1, 1), 1)
        rows, cols = 10, 27
    bias = torch.randn(rows, generator=gen)
    _, L, R = _factors(rows, cols, 4, 22)
    L.requires_grad_(True)
    R.requires_grad_(True)
    y = adapted_op_lowrank(x, W, bias, L, R, "hadamard", order, op, None)
    n = spy.forms
    assert (n >= 1) is kernel
    Wp = adapted_weight_lowrank(W, L, R, exp_map=order or "exact")
    assert spy.forms == n + int(kernel)
    if kind == "linear":
        want = F.linear(x, Wp, bias)
    else:
        want = F.conv2d(x, Wp, bias, (2, 1), (1, 1), (1, 1), 1)
    assert torch.equal(y, want)
    y.sum().backward()
    assert (spy.grads_calls >= 1) is kernel


def _conv_model(exp_map: str, dtype: torch.dtype) -> tuple[nn.Module, LieRALayer]:
    torch.manual_seed(31)
    model = get_peft_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)),
                           LieRAConfig(rank=4, alpha=3.0, target_modules=["0"], exp_map=exp_map))
    model = model.to(dtype)
    torch.manual_seed(32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    (layer,) = [m for m in model.modules() if isinstance(m, LieRALayer)]
    return model, layer


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_model_gradients_kernel_vs_torch_path(monkeypatch: pytest.MonkeyPatch, spy: KernelSpy,
                                              exp_map: str) -> None:
    """A one-conv LieRA model with the linear loss Σ c·y: G = ∂loss/∂W' does not depend on W',
    so both paths get the same G (torch's conv weight gradient); they differ only in how W' and
    the factor gradients are formed. Each is within grads_ref_and_bound's bound (η widened to
    cover M = W' formed by either path: (1 + u)²(1 + 2u) e^{γ_r S} − 1) of the exact
    gradients of that G; |G| ≤ (1 + γ_N)·conv_weight_grad(|x|, |c|), N = batch·H·W terms.
    B's gradient is s·gL rounded once in both: |fl(s a) − fl(s b)| ≤ |s||a − b| + u|s|(|a| + |b|).
    """
    _need_kernel()
    x = torch.randn(3, 3, 7, 7, generator=torch.Generator().manual_seed(33))
    c = torch.randn(3, 8, 7, 7, generator=torch.Generator().manual_seed(34))
    grads = []
    for use in (True, False):
        monkeypatch.setattr(ops, "_USE_KERNEL", use)
        model, layer = _conv_model(exp_map, torch.float32)
        before = (spy.forms, spy.grads_calls)
        (model(x) * c).sum().backward()
        hit = (spy.forms - before[0], spy.grads_calls - before[1])
        assert (hit[0] >= 1 and hit[1] >= 1) if use else hit == (0, 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None})
    gon, goff = grads
    assert set(gon) == set(goff) and len(gon) == 2
    with torch.no_grad():
        gen: Any = layer.generators["default"]
        L, R = gen.factors()
        W = layer.weight.view(8, 27)
        r = 4
        N = 3 * 7 * 7
        Gabs = conv2d_weight(x.double().abs(), (8, 3, 3, 3), c.double().abs(),
                                           padding=1).view(8, 27) * (1 + gamma(N))
        L64, R64 = L.double(), R.double()
        S = L64.abs() @ R64.abs()
        if exp_map == "exact":
            T = Gabs * W.double().abs() * torch.exp(L64 @ R64)
            eta = grow(gamma(r) * S, U32, U32, 2 * U32)
        else:  # G ⊙ W: one product; W' never enters
            T = Gabs * W.double().abs()
            eta = torch.full_like(T, U32)
        bL, bR = grads_bounds(T, eta, L64, R64)
    s = abs(float(gen.scaling)) * (1 + U32)
    for name in gon:
        a, b = gon[name].double(), goff[name].double()
        if name.endswith(".A"):  # R = A: gA = gR
            bound = 2 * bR
        else:  # L = s·B: gB = fl(s·gL)
            assert name.endswith(".B"), name
            bound = s * 2 * bL + U32 * (a.abs() + b.abs())
        assert bool(((a - b).abs() <= bound.view(a.shape)).all()), name


def test_model_float64_does_not_reach_the_kernel(spy: KernelSpy) -> None:
    _need_kernel()
    model, _ = _conv_model("exact", torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    assert spy.forms == 0 and spy.grads_calls == 0
    model32, _ = _conv_model("exact", torch.float32)
    model32(x.float()).square().sum().backward()
    assert spy.forms >= 1 and spy.grads_calls >= 1


# --------------------------------------------------------------------------- 8. bad arguments
def test_raw_module_rejects_bad_arguments() -> None:
    _need_kernel()
    k = ops._k
    W, L, R = _factors(2, 3, 2, 0)
    out = torch.empty(2, 3)
    gL, gR = torch.empty(2, 2), torch.empty(2, 3)
    p = [t.data_ptr() for t in (W, L, R, out)]
    k.form(0, 2, 3, 2, *p, 1)  # the good call runs
    bad_forms = [
        (2, 2, 3, 2, *p, 1), (-1, 2, 3, 2, *p, 1),  # mode
        (0, 0, 3, 2, *p, 1), (0, 2, 0, 2, *p, 1),  # rows, cols
        (0, 2, 3, 0, *p, 1), (0, 2, 3, R_MAX + 1, *p, 1),  # rank
        (0, 2, 3, 2, 0, p[1], p[2], p[3], 1), (0, 2, 3, 2, p[0], 0, p[2], p[3], 1),
        (0, 2, 3, 2, p[0], p[1], 0, p[3], 1), (0, 2, 3, 2, p[0], p[1], p[2], 0, 1),
    ]
    for args in bad_forms:
        with pytest.raises(ValueError, match="bad arguments"):
            k.form(*args)
    g = [t.data_ptr() for t in (W, W, L, R, gL, gR)]  # G, M, L, R, gL, gR
    k.grads(2, 2, 3, 2, g[0], 0, *g[2:], 1)  # plain: M may be null
    bad_grads = [
        (3, 2, 3, 2, *g, 1), (-1, 2, 3, 2, *g, 1), (0, 0, 3, 2, *g, 1), (0, 2, 0, 2, *g, 1),
        (0, 2, 3, 0, *g, 1), (0, 2, 3, R_MAX + 1, *g, 1),
        (0, 2, 3, 2, g[0], 0, *g[2:], 1), (1, 2, 3, 2, g[0], 0, *g[2:], 1),  # M null
        *[(0, 2, 3, 2, *g[:q], 0, *g[q + 1:], 1) for q in (0, 2, 3, 4, 5)],
    ]
    for args in bad_grads:
        with pytest.raises(ValueError, match="bad arguments"):
            k.grads(*args)


# --------------------------------------------------------------------------- 9. non-finite
def test_nan_in_l_poisons_exactly_its_row(path: str) -> None:
    for cols in (5, 33, 1000):
        W, L, R = _factors(6, cols, 9, cols)
        L[3, 4] = float("nan")
        for first_order in (False, True):
            out = form(W, L, R, first_order)
            assert bool(torch.isnan(out[3]).all())
            rest = torch.cat([out[:3], out[4:]])
            assert bool(torch.isfinite(rest).all())


def test_inf_in_w_gives_signed_inf_at_that_entry(path: str) -> None:
    W, L, R = _factors(4, 37, 3, 8)
    W[1, 2], W[2, 36] = float("inf"), float("-inf")
    for first_order in (False, True):
        out = form(W, L, R, first_order)
        factor = (L.double() @ R.double()) + 1 if first_order else torch.ones(4, 37)
        assert float(out[1, 2]) == math.copysign(math.inf, float(factor[1, 2]))
        assert float(out[2, 36]) == math.copysign(math.inf, -float(factor[2, 36]))
        mask = torch.ones(4, 37, dtype=torch.bool)
        mask[1, 2] = mask[2, 36] = False
        assert bool(torch.isfinite(out[mask]).all())
