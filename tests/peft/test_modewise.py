"""Mode-wise matrix-group adapters (SO, GL) over the geometry matrix."""

from __future__ import annotations

import pytest
import torch

from liegroup import tensor
from liegroup.errors import ConfigError, DTypeError, ShapeError
from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft.layer import LieRALayer
from liegroup.peft.updates import ModeWiseUpdate
from tests.conftest import eps
from tests.peft._ref import ref_op
from tests.peft.test_layer_geometry import CASES, DT, _CountOps


def _expm_ref(M):
    """torch.linalg.matrix_exp on a batch of two (avoids its single-matrix Taylor-8 path)."""
    return torch.linalg.matrix_exp(torch.stack([M, torch.zeros_like(M)]))[0]


def _ref_weight(W, mats, group):
    out = W
    for k, M in sorted(mats.items()):
        A = (M - M.T) / 2 if group == "so" else M
        out = torch.movedim(torch.tensordot(_expm_ref(A), out, dims=([1], [k])), 0, k)
    return out


def _setup(case, group, structure, modes=(0, 1), seed=0):
    torch.manual_seed(seed)
    factory, xshape = CASES[case]
    base = factory().to(DT)
    layer = LieRALayer(base, case)
    cfg = LieRAConfig(rank=2, alpha=2.0, target_modules=["x"], update=group,
                      generator="modewise",
                      generator_kwargs={"structure": structure, "modes": list(modes),
                                        "block_size": 3})
    layer.add_adapter("default", cfg)
    return base, layer, torch.randn(xshape, dtype=DT)


def _randomise(layer, scale=0.3):
    with torch.no_grad():
        for p in layer.generators["default"].parameters():
            p.add_(scale * torch.randn_like(p))


def _modes(case):
    shape = CASES[case][0]().weight.shape
    return tuple(k for k in ((0, 1) if "linear" in case else (0, 1, 2)) if shape[k] > 1)


MATRIX = [
    pytest.param(case, group, structure, id=f"{case}-{group}-{structure}")
    for case in CASES for group in ("so", "gl") for structure in ("lowrank", "block")
]


@pytest.mark.parametrize(("case", "group", "structure"), MATRIX)
def test_geometry_matrix(case, group, structure):
    base, layer, x = _setup(case, group, structure, _modes(case))
    W0 = base.weight.detach().clone()
    assert torch.equal(layer(x), base(x))  # identity at init
    _randomise(layer)
    gen = layer.generators["default"]
    mats = {k: M.detach().dense() for k, M in gen().items()}
    y_ref = ref_op(base, x, _ref_weight(W0, mats, group))
    with _CountOps() as c:
        y = layer(x)
    assert c.n == 1  # single-op forward
    tol = 1e-11 * (1 + y_ref.abs().max().item())  # expm reference: κ·u, not u
    assert (y - y_ref).abs().max().item() <= tol
    y.square().sum().backward()
    assert base.weight.grad is None
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
    layer.eval()
    with torch.no_grad():
        y_un = layer(x)
        layer.merge()
        assert (layer(x) - y_un).abs().max().item() <= 200 * eps(DT) * (1 + y_un.abs().max())
        layer.unmerge()
    # exact group inverse, no kept copy
    assert layer._merge_backup is None
    assert ((base.weight - W0).abs().max() / W0.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("case", [c for c in CASES if "conv" in c] + ["linear"])
@pytest.mark.parametrize("structure", ["lowrank", "block"])
def test_so_preserves_every_mode_spectrum(case, structure):
    base, layer, _ = _setup(case, "so", structure, _modes(case))
    _randomise(layer, scale=1.0)
    W0 = base.weight.detach().clone()
    layer.merge()
    Wm = base.weight.detach()
    assert (Wm - W0).abs().max() > 1e-3  # it moved
    for k in range(W0.dim()):
        s0 = torch.linalg.svdvals(tensor.unfold(W0, k))
        s1 = torch.linalg.svdvals(tensor.unfold(Wm, k))
        assert (s1 - s0).abs().max().item() <= 1e-10 * max(1.0, s0.max().item())


def test_gl_changes_spectrum_and_model_level_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 2)).to(DT)
    cfg = LieRAConfig(rank=2, update="gl", generator="modewise", target_modules=["0", "2"])
    model = get_peft_model(net, cfg)
    for _, layer in model.lie_layers():
        _randomise(layer)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(5)
    from liegroup.peft import LieRAModel

    loaded = LieRAModel.from_pretrained(model.unload(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), y, rtol=0, atol=1e-12)


def test_wrong_generator_for_group_is_refused():
    with pytest.raises(ConfigError, match="modewise"):
        LieRAConfig(rank=1, target_modules=["x"], update="so")  # lora is tensor-valued
    with pytest.raises(ConfigError, match="lora"):
        LieRAConfig(rank=1, target_modules=["x"], generator="modewise")  # hadamard
    with pytest.raises(ConfigError, match="exact"):
        LieRAConfig(rank=1, target_modules=["x"], update="so", generator="modewise",
                    exp_map="first_order")


@pytest.mark.parametrize("kw", [{"modes": [0, 0]}, {"modes": [4]}, {"modes": []}, {"modes": [1]},
                                {"structure": "dense"}, {"block_size": 0}])
def test_bad_generator_options(kw):
    layer = LieRALayer(torch.nn.Conv2d(2, 2, 3, groups=2))
    with pytest.raises(ConfigError, match="generator_kwargs"):
        layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["x"], update="so",
                                           generator="modewise", generator_kwargs=kw))


def test_update_checks_its_algebra_element():
    u = ModeWiseUpdate("so")
    W = torch.randn(3, 4)
    with pytest.raises(DTypeError):
        u.apply(W, torch.zeros(3, 4))
    with pytest.raises(ShapeError):
        u.apply(W, {0: torch.zeros(4, 4)})
    with pytest.raises(ShapeError):
        u.apply(W, {2: torch.zeros(3, 3)})
    with pytest.raises(DTypeError):
        u.apply(W, {0: torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ConfigError):
        ModeWiseUpdate("se")


FAST_CASES = [
    pytest.param(shape, group, structure, dtype, id=f"{shape}-{group}-{structure}-{dtype}")
    for shape in [(40, 24), (24, 12, 3, 3)]
    for group in ("so", "gl", "sl")
    for structure in ("lowrank", "block")
    for dtype in ("float64", "float32")
]


@pytest.mark.parametrize(("shape", "group", "structure", "dtype"), FAST_CASES)
def test_fast_path_equals_dense_path(shape, group, structure, dtype):
    """Factored / block path vs the dense G.exp + dense mode product, forward and inverse."""
    from liegroup.peft import GeneratorSpec
    from liegroup.peft.generators import ModeWiseGenerator

    dt = getattr(torch, dtype)
    torch.manual_seed(1)
    modes = [0, 1] if len(shape) == 2 else [0, 1, 2]
    spec = GeneratorSpec(weight_shape=shape, rank=2, scaling=1.0, dtype=dt,
                         options={"structure": structure, "modes": modes, "block_size": 5})
    gen = ModeWiseGenerator(spec)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u = ModeWiseUpdate(group)
    W = torch.randn(shape, dtype=dt)
    delta = {k: M.detach() for k, M in gen().items()}
    dense = {k: M.dense() for k, M in delta.items()}
    gs = u.group_elements({k: M.double() for k, M in dense.items()})
    # the dense result's error: u · (Σ_k n_k · κ(g_k)) · ‖W‖ (κ(g) = ‖g‖‖g⁻¹‖)
    kap = sum(shape[k] * (torch.linalg.matrix_norm(g, 2)
                          * torch.linalg.matrix_norm(torch.linalg.inv(g), 2)).item()
              for k, g in gs.items())
    tol = 50 * eps(dt) * kap * W.abs().max().item()
    fast = u.apply(W, delta)
    slow = u.apply(W, dense)
    assert fast.is_contiguous() and fast.dtype == dt
    assert (fast - slow).abs().max().item() <= tol
    assert (u.inverse(fast, delta) - u.inverse(slow, dense)).abs().max().item() <= tol * kap


def test_lowrank_path_builds_no_dense_exponential(monkeypatch):
    """Linear(1024, 1024)-sized modes go through φ₁ of the factors, never an n × n group exp."""
    from liegroup.peft.updates import modewise

    calls = []
    real_phi1 = modewise.phi1
    monkeypatch.setattr(modewise, "phi1", lambda M: calls.append(tuple(M.shape)) or real_phi1(M))

    def no_dense(self, n):
        raise AssertionError(f"dense group of size {n} built on the low-rank path")

    monkeypatch.setattr(ModeWiseUpdate, "_group", no_dense)
    W = torch.randn(1024, 512, dtype=DT)
    g = torch.Generator().manual_seed(0)
    delta = {k: modewise.ModeFactors(0.1 * torch.randn(W.shape[k], 8, dtype=DT, generator=g),
                                     torch.randn(W.shape[k], 8, dtype=DT, generator=g))
             for k in (0, 1)}
    Wp = ModeWiseUpdate("so").apply(W, delta)
    assert calls == [(2, 16, 16)]  # both modes' φ₁ (width 2r = 16) in one batched call
    for k in (0, 1):  # SO: every mode's spectrum kept
        s0 = torch.linalg.svdvals(tensor.unfold(W, k))
        s1 = torch.linalg.svdvals(tensor.unfold(Wp, k))
        assert (s1 - s0).abs().max().item() <= 1e-10 * s0.max().item()
    back = ModeWiseUpdate("so").inverse(Wp, delta)
    assert (back - W).abs().max().item() <= 1e-12 * W.abs().max().item()


def test_update_checks_structured_elements():
    from liegroup.peft.updates.modewise import ModeBlocks, ModeFactors

    u = ModeWiseUpdate("gl")
    W = torch.randn(6, 4)
    with pytest.raises(ShapeError):
        u.apply(W, {0: ModeFactors(torch.zeros(6, 2), torch.zeros(6, 3))})
    with pytest.raises(ShapeError):
        u.apply(W, {0: ModeFactors(torch.zeros(4, 2), torch.zeros(4, 2))})
    with pytest.raises(DTypeError):
        u.apply(W, {0: ModeFactors(torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, 2))})
    with pytest.raises(DTypeError):
        u.apply(W, {0: ModeFactors(torch.zeros(6, 2, dtype=torch.int64), torch.zeros(6, 2))})
    with pytest.raises(ShapeError):
        u.apply(W, {0: ModeBlocks(torch.zeros(2, 2, 2))})  # 4 != 6
    with pytest.raises(ShapeError):
        u.apply(W, {0: ModeBlocks(torch.zeros(2, 2, 3))})  # not square
    with pytest.raises(ShapeError):
        u.apply(W, {0: ModeBlocks(torch.zeros(2, 2, 2), torch.zeros(2, 3))})
    with pytest.raises(DTypeError):
        u.apply(W, {0: ModeBlocks(torch.zeros(2, 2, 2), torch.zeros(2, 2, dtype=torch.float64))})


def _fused_setup(group, bias=True, seed=0):
    """Linear(20, 18), rank 2: both modes on the low-rank path (2·width < n for so and gl)."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(20, 18, bias=bias).to(DT)
    layer = LieRALayer(base, "lin")
    layer.add_adapter("default", LieRAConfig(rank=2, alpha=2.0, target_modules=["x"],
                                             update=group, generator="modewise"))
    return base, layer, torch.randn(3, 5, 20, dtype=DT)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", ["so", "gl"])
def test_fused_linear_equals_unfused(group, bias):
    """Linear, modes 0 and 1 low-rank: one node W + L R whose backward never forms ∂L/∂W'."""
    from liegroup.peft import adapted_weight
    from liegroup.peft._engine import base_op

    base, layer, x = _fused_setup(group, bias)
    assert torch.equal(layer(x), base(x))  # identity at init, bit for bit
    _randomise(layer)
    if bias:
        base.bias.requires_grad_(True)
    x.requires_grad_(True)
    gen, update = layer.generators["default"], layer.updates["default"]
    with _CountOps() as c:
        y = layer(x)
    assert c.n == 1  # single-op forward
    assert type(y.grad_fn).__name__ == "LowRankAdaptedOpFunctionBackward"  # the fused node
    y_ref = base_op(base, x, adapted_weight(layer.weight, gen(), update))  # autograd on W'
    assert torch.equal(y, y_ref)  # forward bit for bit
    gy = torch.randn_like(y)
    wrt = [x, *gen.parameters()] + ([base.bias] if bias else [])
    got = torch.autograd.grad(y, wrt, gy)
    want = torch.autograd.grad(y_ref, wrt, gy)
    # both sum the same O(N + n) products in another order: u · (terms) · magnitudes
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e3 * eps(DT) * (1 + w.abs().max().item())
    assert base.weight.grad is None
    layer.eval()
    with torch.no_grad():
        y_un = layer(x)
        layer.merge()
        assert (layer(x) - y_un).abs().max().item() <= 200 * eps(DT) * (1 + y_un.abs().max())
        layer.unmerge()


@pytest.mark.parametrize("group", ["so", "gl"])
def test_fused_linear_gradcheck(group):
    """The fused node chained to the generator's parameters, float64 gradcheck."""
    from liegroup.peft._engine.geometry import OpGeometry
    from liegroup.peft._engine.lowrank_node import adapted_op_lowrank

    base, layer, _ = _fused_setup(group)
    _randomise(layer)
    gen, update = layer.generators["default"], layer.updates["default"]
    W = layer.weight
    names = [n for n, _ in gen.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in gen.parameters()]
    x = torch.randn(4, 20, dtype=DT, requires_grad=True)
    b = base.bias.detach().clone().requires_grad_(True)

    def f(xx, bb, *ps):
        delta = torch.func.functional_call(gen, dict(zip(names, ps, strict=True)), ())
        lr = update.additive_factors(W, delta)
        assert lr is not None
        return adapted_op_lowrank(xx, W, bb, *lr, "additive", None, OpGeometry("linear"), None)

    assert torch.autograd.gradcheck(f, (x, b, *params))


def test_additive_factors_only_where_exact():
    """sl (scalar factor), a conv kernel, a dense or too-wide mode: no additive form."""
    from liegroup.peft.updates.modewise import ModeFactors

    g = torch.Generator().manual_seed(0)

    def fac(n, m):
        return ModeFactors(*(torch.randn(n, m, dtype=DT, generator=g) for _ in range(2)))

    W = torch.randn(18, 20, dtype=DT)
    both = {0: fac(18, 2), 1: fac(20, 2)}
    assert ModeWiseUpdate("so").additive_factors(W, both) is not None
    assert ModeWiseUpdate("sl").additive_factors(W, both) is None
    assert ModeWiseUpdate("so").additive_factors(W, {0: both[0]}) is None
    assert ModeWiseUpdate("so").additive_factors(W, {0: both[0], 1: fac(20, 5)}) is None
    dense = {0: both[0], 1: torch.randn(20, 20, dtype=DT)}
    assert ModeWiseUpdate("gl").additive_factors(W, dense) is None
    T = torch.randn(18, 20, 3, dtype=DT)
    assert ModeWiseUpdate("so").additive_factors(T, both) is None
    with pytest.raises(ShapeError):  # the element is checked like apply's
        ModeWiseUpdate("so").additive_factors(W, {0: fac(20, 2)})
    _, layer, x = _fused_setup("sl")  # sl Linear: the unfused path, still one op
    _randomise(layer)
    with _CountOps() as c:
        y = layer(x)
    assert c.n == 1 and type(y.grad_fn).__name__ != "LowRankAdaptedOpFunctionBackward"
