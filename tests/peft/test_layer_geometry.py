"""The geometry matrix: every supported layer type and conv geometry × maps × layouts.

Each case checks, against an independent plain-torch reference, identity at init, the forward
``op(x, W ⊙ exp(ΔW))``, merge == unmerged, unmerge restoring W, gradients (to A and B only,
equal to autograd through the reference), the mode-1 rank of the recovered algebra element,
and that the forward is a single op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.overrides import TorchFunctionMode

from liegroup import tensor
from liegroup.errors import ShapeError
from liegroup.peft import LieRAConfig
from liegroup.peft.layer import LieRALayer
from liegroup.peft.updates import parse_exp_map
from tests.conftest import eps
from tests.peft._ref import ref_delta, ref_map, ref_op

DT = torch.float64

# name -> (module factory, input shape); inputs are larger than the kernels.
CASES = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "linear_nobias_3d_input": (lambda: nn.Linear(6, 4, bias=False), (2, 5, 6)),
    "conv1d_stride_pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 13)),
    "conv1d_dilated_reflect": (
        lambda: nn.Conv1d(3, 5, 3, dilation=2, padding=2, padding_mode="reflect"),
        (2, 3, 12),
    ),
    "conv2d_nonsquare_nobias": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
        (2, 4, 11, 9),
    ),
    "conv2d_grouped_dilated_circular": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="circular"),
        (2, 4, 10, 9),
    ),
    "conv2d_depthwise_replicate": (
        lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="replicate"),
        (2, 4, 9, 10),
    ),
    "conv2d_same": (lambda: nn.Conv2d(3, 5, 3, padding="same"), (1, 3, 8, 7)),
    "conv3d_nonsquare_reflect": (
        lambda: nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 1), padding=1, padding_mode="reflect"),
        (1, 2, 6, 7, 6),
    ),
    "conv3d_depthwise": (lambda: nn.Conv3d(3, 6, 3, groups=3, padding=1), (1, 3, 5, 6, 5)),
}
EQUAL_KERNEL = {
    "linear",
    "linear_nobias_3d_input",
    "conv1d_stride_pad",
    "conv1d_dilated_reflect",
    "conv2d_grouped_dilated_circular",
    "conv2d_depthwise_replicate",
    "conv2d_same",
    "conv3d_depthwise",
}
MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("hadamard", 3), ("additive", "exact")]


def _setup(case: str, group: str, exp_map, layout: str, rank: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    factory, xshape = CASES[case]
    base = factory().to(DT)
    layer = LieRALayer(base, case)
    cfg = LieRAConfig(rank=rank, alpha=3.0, target_modules=["x"], exp_map=exp_map,
                      layout=layout, update=group)
    layer.add_adapter("default", cfg)
    x = torch.randn(xshape, dtype=DT)
    return base, layer, cfg, x


def _randomise(layer: LieRALayer, scale: float = 0.3) -> None:
    gen = layer.generators["default"]
    with torch.no_grad():
        gen.B.copy_(scale * torch.randn_like(gen.B))


def _layouts(case: str):
    return ["mode1", "loralib"] if case in EQUAL_KERNEL else ["mode1"]


MATRIX = [
    (case, group, m, layout)
    for case in CASES
    for (group, m) in MAPS
    for layout in _layouts(case)
]


@pytest.mark.parametrize(("case", "group", "exp_map", "layout"), MATRIX)
def test_geometry_matrix(case, group, exp_map, layout):
    base, layer, cfg, x = _setup(case, group, exp_map, layout)
    W0 = base.weight.detach().clone()
    order = parse_exp_map(cfg.exp_map)
    # identity at init, bit for bit
    assert torch.equal(layer(x), base(x))

    _randomise(layer)
    gen = layer.generators["default"]
    shape = tuple(W0.shape)
    delta_ref = ref_delta(gen.B.detach(), gen.A.detach(), cfg.scaling, shape)
    W_ref = ref_map(W0, delta_ref, group, order)
    y_ref = ref_op(base, x, W_ref)
    y = layer(x)
    tol = 200 * eps(DT) * (1 + y_ref.abs().max().item())
    assert y.shape == y_ref.shape
    assert (y - y_ref).abs().max().item() <= tol

    # gradients: to A and B only, equal to autograd through the plain reference
    y.square().sum().backward()
    assert base.weight.grad is None
    assert base.bias is None or base.bias.grad is None
    Br = gen.B.detach().clone().requires_grad_(True)
    Ar = gen.A.detach().clone().requires_grad_(True)
    ref_op(base, x, ref_map(W0, ref_delta(Br, Ar, cfg.scaling, shape), group, order)) \
        .square().sum().backward()
    for got, want in ((gen.B.grad, Br.grad), (gen.A.grad, Ar.grad)):
        assert got is not None and got.abs().max() > 0
        gtol = 1e3 * eps(DT) * (1 + want.abs().max().item())
        assert (got - want).abs().max().item() <= gtol

    # merged == unmerged; unmerge restores W
    layer.eval()
    with torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapter == "default"
        y_merged = layer(x)
        assert (y_merged - y_unmerged).abs().max().item() <= tol
        layer.unmerge()
    if group == "hadamard" and order is not None:
        assert torch.equal(base.weight, W0)  # restored from the kept copy, bit for bit
    else:
        rel = ((base.weight - W0).abs().max() / W0.abs().max()).item()
        assert rel <= 1e-12
    with torch.no_grad():
        assert (layer(x) - y_unmerged).abs().max().item() <= tol

    # mode-1 rank of the recovered algebra element
    if layout == "mode1":
        Wp = layer.adapted_weight().detach()
        if group == "additive":
            rec = Wp - W0
        elif order is None:
            rec = torch.log(Wp / W0)
        elif order == 1:
            rec = (Wp - W0) / W0
        else:
            rec = None
        if rec is not None:
            M = tensor.unfold(rec, 0)
            assert min(M.shape) > cfg.rank
            assert int(torch.linalg.matrix_rank(M, rtol=1e-9)) <= cfg.rank


class _CountOps(TorchFunctionMode):
    OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_is_one_op(case):
    _, layer, _, x = _setup(case, "hadamard", "exact", "mode1")
    _randomise(layer)
    with _CountOps() as c:
        layer(x)
    assert c.n == 1


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_dropout_acts_on_A_and_keeps_one_op(exp_map):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    layer = LieRALayer(base)
    cfg = LieRAConfig(rank=2, target_modules=["x"], exp_map=exp_map, dropout=0.5)
    layer.add_adapter("default", cfg)
    _randomise(layer)
    gen = layer.generators["default"]
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    layer.train()
    torch.manual_seed(123)
    with _CountOps() as c:
        y = layer(x)
    assert c.n == 1
    torch.manual_seed(123)
    A_drop = F.dropout(gen.A.detach(), 0.5, training=True)
    W_ref = ref_map(base.weight.detach(), ref_delta(gen.B.detach(), A_drop, cfg.scaling,
                                                    tuple(base.weight.shape)), "hadamard",
                    parse_exp_map(cfg.exp_map))
    assert torch.allclose(y, ref_op(base, x, W_ref), rtol=1e-12, atol=1e-12)
    layer.eval()
    W_eval = ref_map(base.weight.detach(), ref_delta(gen.B.detach(), gen.A.detach(),
                                                     cfg.scaling, tuple(base.weight.shape)),
                     "hadamard", parse_exp_map(cfg.exp_map))
    assert torch.allclose(layer(x), ref_op(base, x, W_eval), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["linear", "conv2d_grouped_dilated_circular", "conv3d_depthwise"])
def test_first_order_lora_equals_hira_formula(case):
    # HF peft HiRA: W + W ⊙ (B·A) with no scale; ours with the scale folded into B.
    base, layer, cfg, _ = _setup(case, "hadamard", "first_order", "mode1")
    _randomise(layer)
    gen = layer.generators["default"]
    W = base.weight.detach()
    B_hira = cfg.scaling * gen.B.detach()
    hira = W + W * (B_hira @ gen.A.detach()).reshape(W.shape)
    assert torch.allclose(layer.adapted_weight().detach(), hira, rtol=1e-13, atol=0)


def test_loralib_param_counts_match_paper_layout():
    conv = nn.Conv2d(8, 16, 3, groups=2)
    layer = LieRALayer(conv)
    layer.add_adapter("a", LieRAConfig(rank=4, target_modules=["x"], layout="loralib"))
    g = layer.generators["a"]
    # B: (C_out/g·k) × (r·k), A: (r·k) × (C_in·k)
    assert tuple(g.B.shape) == (16 // 2 * 3, 4 * 3)
    assert tuple(g.A.shape) == (4 * 3, 8 * 3)
    assert g().shape == conv.weight.shape


def test_loralib_refuses_nonsquare_kernel():
    layer = LieRALayer(nn.Conv2d(2, 3, (3, 1)), "c")
    with pytest.raises(ShapeError, match="equal kernel sizes"):
        layer.add_adapter("a", LieRAConfig(rank=1, target_modules=["c"], layout="loralib"))


@pytest.mark.parametrize("order", [None, 1, 2, 4])
def test_hadamard_function_gradcheck(order):
    from liegroup.peft._engine import HadamardExpFunction

    torch.manual_seed(1)
    W = torch.randn(3, 4, dtype=DT, requires_grad=True)
    X = (0.5 * torch.randn(3, 4, dtype=DT)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, d: HadamardExpFunction.apply(w, d, order), (W, X))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes_follow_the_base_weight(dtype):
    base = nn.Conv2d(3, 4, 3).to(dtype)
    layer = LieRALayer(base)
    layer.add_adapter("a", LieRAConfig(rank=2, target_modules=["x"]))
    assert layer.generators["a"].A.dtype == dtype
    x = torch.randn(1, 3, 7, 7, dtype=dtype)
    assert torch.equal(layer(x), base(x))
    layer(x).float().sum().backward()
    assert layer.generators["a"].B.grad is not None


@pytest.mark.parametrize("order", [None, 1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_map_is_bit_identical_to_the_hadamard_group(order, dtype):
    import liegroup
    from liegroup.peft._engine import HadamardExpFunction

    torch.manual_seed(3)
    W = torch.randn(6, 5, 3, dtype=dtype)
    X = 0.7 * torch.randn(6, 5, 3, dtype=dtype)
    G = liegroup.Hadamard(W.shape)
    assert torch.equal(HadamardExpFunction.apply(W, X, order), G.act(G.exp(X, order=order), W))


@pytest.mark.parametrize("order", [None, 1, 2, 4])
@pytest.mark.parametrize("group", ["hadamard", "additive"])
def test_lowrank_path_equals_dense_path_and_group(order, group):
    import liegroup
    from liegroup.peft import adapted_weight, adapted_weight_lowrank

    torch.manual_seed(5)
    W = torch.randn(6, 4, 3, dtype=DT)
    L = (0.3 * torch.randn(6, 2, dtype=DT)).requires_grad_(True)
    R = torch.randn(2, 12, dtype=DT).requires_grad_(True)
    fused = adapted_weight_lowrank(W, L, R, group, order or "exact")
    dense = adapted_weight(W, (L @ R).view(W.shape), group, order or "exact")
    if group == "hadamard":
        G = liegroup.Hadamard(W.shape)
        delta = (L @ R).view(W.shape).detach()
        assert torch.equal(fused, G.act(G.exp(delta, order=order), W))
    assert torch.allclose(fused, dense, rtol=1e-15, atol=0)
    g = torch.randn_like(W)
    gf = torch.autograd.grad(fused, (L, R), g)
    gd = torch.autograd.grad(dense, (L, R), g)
    for a, b in zip(gf, gd, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda lf, rf: adapted_weight_lowrank(W, lf, rf, group, order or "exact"), (L, R)
    )


def test_lowrank_shape_errors_and_trainable_base_fallback():
    from liegroup.peft import adapted_weight_lowrank

    with pytest.raises(ShapeError):
        adapted_weight_lowrank(torch.ones(2, 3), torch.ones(2, 1), torch.ones(1, 2))
    W = torch.randn(3, 4, dtype=DT, requires_grad=True)
    L = torch.randn(3, 1, dtype=DT, requires_grad=True)
    R = torch.randn(1, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, lf, rf: adapted_weight_lowrank(w, lf, rf), (W, L, R))


# ---------------------------------------------------------------- property-based geometry
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def conv_geometries(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    size = tuple(draw(st.integers(d * (kk - 1) + 2, d * (kk - 1) + 5))
                 for kk, d in zip(k, dilation, strict=True))
    bias = draw(st.booleans())
    exp_map = draw(st.sampled_from(["exact", "first_order", 2]))
    rank = draw(st.integers(1, 3))
    return nd, c_in, c_out, k, stride, dilation, padding, groups, mode, size, bias, exp_map, rank


@given(conv_geometries())
def test_random_conv_geometry_matches_reference(geom):
    nd, c_in, c_out, k, stride, dilation, padding, groups, mode, size, bias, exp_map, rank = geom
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    torch.manual_seed(0)
    base = conv_cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, bias=bias, padding_mode=mode).to(DT)
    layer = LieRALayer(base)
    cfg = LieRAConfig(rank=rank, alpha=2.0, target_modules=["x"], exp_map=exp_map)
    layer.add_adapter("default", cfg)
    x = torch.randn(2, c_in, *size, dtype=DT)
    assert torch.equal(layer(x), base(x))
    _randomise(layer)
    gen = layer.generators["default"]
    W = base.weight.detach()
    W_ref = ref_map(W, ref_delta(gen.B.detach(), gen.A.detach(), cfg.scaling, tuple(W.shape)),
                    "hadamard", parse_exp_map(cfg.exp_map))
    y_ref = ref_op(base, x, W_ref)
    y = layer(x)
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert gen.B.grad is not None and gen.A.grad is not None and base.weight.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize(("case", "group", "exp_map", "layout"), MATRIX)
def test_geometry_matrix_other_ranks(case, group, exp_map, layout, rank, monkeypatch):
    monkeypatch.setattr(
        "tests.peft.test_layer_geometry._setup",
        lambda c, g, e, la, rank_=rank, _orig=_setup: _orig(c, g, e, la, rank=rank_, seed=rank),
    )
    test_geometry_matrix(case, group, exp_map, layout)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_save_load_per_geometry(case, exp_map, tmp_path):
    from liegroup.peft import LieRAModel, get_peft_model

    factory, xshape = CASES[case]
    torch.manual_seed(0)
    net = nn.Sequential(factory()).to(DT)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    layout = "loralib" if case in EQUAL_KERNEL else "mode1"
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"], exp_map=exp_map,
                                            layout=layout))
    _randomise(model.base_model[0])
    x = torch.randn(xshape, dtype=DT)
    y = model(x)
    model.save_pretrained(tmp_path)
    fresh = nn.Sequential(factory()).to(DT)
    fresh.load_state_dict(state)
    assert torch.equal(LieRAModel.from_pretrained(fresh, tmp_path)(x), y)


def test_changed_conv_attributes_take_effect():
    """The layer caches its conv geometry; changing an attribute after wrapping (stride,
    padding, dilation, padding_mode) must change the forward, never reuse the old one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    layer = LieRALayer(conv)
    layer.add_adapter("a", LieRAConfig(rank=2, target_modules=["x"]))
    with torch.no_grad():
        layer.generators["a"].B.normal_()
    x = torch.randn(2, 3, 9, 9, dtype=DT)
    for change in ({}, {"stride": (2, 2)}, {"padding": (0, 2)}, {"dilation": (2, 1)},
                   {"padding_mode": "reflect"},
                   {"padding": "same", "stride": (1, 1), "padding_mode": "zeros"}):
        for k, v in change.items():
            setattr(conv, k, v)
        if isinstance(conv.padding, tuple):  # what nn.Conv2d derives from padding at init
            conv._reversed_padding_repeated_twice = nn.modules.utils._reverse_repeat_tuple(
                conv.padding, 2)
        with torch.no_grad():
            want = conv._conv_forward(x, layer.adapted_weight(), conv.bias)
            assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12), change
