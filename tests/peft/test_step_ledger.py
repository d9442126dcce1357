"""The model-level StepLedger: a shared W' workspace and a second backward buffer on credit.

Inside a :class:`LieRAModel` the adapted layers share one :class:`StepLedger`. Two things
follow, and both must leave every value and gradient as the reference path gives it:

* a transient ``W'`` (forward, backward recompute) lives in one reused workspace; a ``W'``
  kept for the backward is copied out of it, so later layers cannot overwrite it;
* a layer's backward may hold ``W'`` next to ``∂L/∂W'`` (one recompute, no blocked second
  ``exp``) only when the weights of the layers whose backward already ran in this step —
  the gradients full fine-tuning would hold by now — are at least its own size.
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, get_peft_model
from liegroup.peft import fused_op as fo
from liegroup.peft.functional import adapted_weight_lowrank
from liegroup.peft.fused_op import StepLedger

DT = torch.float64
MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("hadamard", 2),
        ("additive", "exact")]


def _net(kind: str, group: str, exp_map, seed: int = 0):
    """Three adapted layers, the last (first in the backward) the smallest."""
    torch.manual_seed(seed)
    if kind == "conv":
        base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(),
                             nn.Conv2d(6, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 2, 1))
        x = torch.randn(2, 3, 6, 6, dtype=DT)
    else:
        base = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(),
                             nn.Linear(8, 3))
        x = torch.randn(4, 7, dtype=DT)
    base = base.to(DT)
    model = get_peft_model(base, LieRAConfig(rank=2, alpha=2.0, target_modules=["0", "2", "4"],
                                             exp_map=exp_map, group=group))
    for _, layer in model.lie_layers():
        with torch.no_grad():
            layer.generators["default"].B.normal_(0, 0.3)
    return model, x.requires_grad_(True)


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    """The same net with every W' formed explicitly and differentiated by autograd."""
    h = x
    for module in model.base_model:
        if hasattr(module, "generators"):
            L, R = module.generators["default"].factors()
            h = module._op(h, adapted_weight_lowrank(module.weight, L, R,
                                                     module.updates["default"]))
        else:
            h = module(h)
    return h


def _grads(model, x, y, gy):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(y, [x, *params], gy)


def _spy_second_buffer(monkeypatch) -> list[bool]:
    """Per adapted-layer backward, in order: was W' available next to ∂L/∂W'?"""
    seen: list[bool] = []
    real = fo.LowRankAdaptedOpFunction.backward

    def spy(ctx, gy):
        before = ctx.ledger.credit if ctx.ledger is not None else 0
        W = ctx.saved_tensors[1]
        seen.append(ctx.keep or (ctx.ledger is not None and W.numel() <= before))
        return real(ctx, gy)

    monkeypatch.setattr(fo.LowRankAdaptedOpFunction, "backward", staticmethod(spy))
    return seen


@pytest.mark.parametrize("keep", [1 << 30, 0])
@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_model_paths_match_reference(kind, group, exp_map, keep, monkeypatch):
    # 1 << 30: no W' kept from the forward (all in the workspace; the ledger decides the
    # backward); 0: every W' kept, so it must survive the later layers' use of the workspace
    monkeypatch.setattr(fo, "_KEEP_RATIO", keep)
    model, x = _net(kind, group, exp_map)
    y = model(x)
    y_ref = _reference(model, x)
    assert torch.equal(y, y_ref)  # forward bit for bit, workspace or not
    gy = torch.randn_like(y)
    u = torch.finfo(DT).eps
    for _ in range(2):  # a second step: the ledger starts again from zero credit
        got = _grads(model, x, model(x), gy)
        want = _grads(model, x, _reference(model, x), gy)
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_second_buffer_only_on_credit(kind, monkeypatch):
    monkeypatch.setattr(fo, "_KEEP_RATIO", 1 << 30)
    model, x = _net(kind, "hadamard", "exact")
    sizes = [layer.weight.numel() for _, layer in model.lie_layers()][::-1]  # backward order
    credit = [sum(sizes[:i]) for i in range(len(sizes))]
    expected = [s <= c for s, c in zip(sizes, credit, strict=True)]
    assert expected[0] is False and any(expected)  # the net exercises both branches
    seen = _spy_second_buffer(monkeypatch)
    for _ in range(2):
        seen.clear()
        model(x).sum().backward()
        assert seen == expected  # same decisions every step: the credit was reset
    assert model._ledger.credit == sum(sizes)


def test_ledger_counts_and_resets():
    ledger = StepLedger()
    assert not ledger.allows(1) and ledger.allows(0)
    ledger.backward_done(5)
    ledger.backward_done(7)
    assert ledger.credit == 12 and ledger.allows(12) and not ledger.allows(13)
    ledger.forward_seen()  # a forward after a backward: a new step
    assert ledger.credit == 0 and not ledger.in_backward
    ledger.forward_seen()
    ledger.backward_done(3)
    assert ledger.credit == 3


def test_workspace_is_reused_per_thread_device_dtype():
    ledger = StepLedger()
    W = torch.zeros(4, 6)
    a = ledger.workspace((4, 6), W)
    b = ledger.workspace((2, 5), W)
    assert a.shape == (4, 6) and b.shape == (2, 5) and a.data_ptr() == b.data_ptr()
    assert ledger.workspace((4, 6), W) is a  # a shape's view is made once
    c = ledger.workspace((8, 2, 2, 2), W)  # grows: a new buffer, the old one dropped
    assert c.shape == (8, 2, 2, 2) and c.is_contiguous()
    assert ledger.workspace((4, 6), W).data_ptr() == c.data_ptr()
    # no view of the smaller buffer survives (it would keep that buffer alive)
    assert all(v.data_ptr() == c.data_ptr() for v in ledger._views.values())
    assert ledger.workspace((2, 2), W.double()).dtype == torch.float64
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(ledger.workspace((4, 6), W).data_ptr()))
    t.start()
    t.join()
    assert other[0] != c.data_ptr()  # another thread never shares a buffer
    ledger.release()
    assert not ledger._views and ledger.workspace((1, 1), W).numel() == 1


def test_pickled_and_copied_models_carry_no_workspace():
    model, x = _net("conv", "hadamard", "exact")
    model(x).sum().backward()
    assert model._ledger._buffers  # the step left its workspace
    clone = copy.deepcopy(model)
    assert clone._ledger._buffers == {} and clone._ledger is not model._ledger
    assert {id(layer.ledger) for _, layer in clone.lie_layers()} == {id(clone._ledger)}
    blob = io.BytesIO()
    torch.save(model, blob)
    size = blob.tell()
    model._ledger.release()
    blob2 = io.BytesIO()
    torch.save(model, blob2)
    assert size == blob2.tell()  # the workspace is not in the pickle
    assert torch.equal(clone(x), model(x))


def test_model_layers_share_one_ledger():
    model, _ = _net("conv", "hadamard", "exact")
    ledgers = {id(layer.ledger) for _, layer in model.lie_layers()}
    assert ledgers == {id(model._ledger)}
    model.add_adapter("second", LieRAConfig(rank=1, target_modules=["0"]))
    assert {id(layer.ledger) for _, layer in model.lie_layers()} == {id(model._ledger)}


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_linear_on_permuted_activations(exp_map):
    """ConvNeXt's 1×1 MLPs: a Linear between permutes gets strided x and ∂L/∂y."""
    torch.manual_seed(3)
    lin = nn.Linear(5, 6).to(DT)
    model = get_peft_model(nn.Sequential(lin), LieRAConfig(rank=2, target_modules=["0"],
                                                           exp_map=exp_map))
    layer = model.lie_layers()[0][1]
    with torch.no_grad():
        layer.generators["default"].B.normal_(0, 0.3)
    x = torch.randn(2, 5, 4, 3, dtype=DT, requires_grad=True)
    gy = torch.randn(2, 6, 4, 3, dtype=DT)

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        h = x.permute(0, 2, 3, 1)
        if fused:
            y = model(h)
        else:
            L, R = layer.generators["default"].factors()
            y = layer._op(h, adapted_weight_lowrank(layer.weight, L, R, layer.updates["default"]))
        y = y.permute(0, 3, 1, 2)  # ∂L/∂y arrives strided
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(y, [x, *params], gy)

    u = torch.finfo(DT).eps
    for g, w in zip(run(True), run(False), strict=True):
        assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_uncovered_backward_holds_one_weight_buffer(kind, monkeypatch):
    """Without credit (a one-layer model) the workspace never lives next to ∂L/∂W'."""
    monkeypatch.setattr(fo, "_KEEP_RATIO", 1 << 30)
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else nn.Linear(5, 7)
    model = get_peft_model(nn.Sequential(base.to(DT)), LieRAConfig(rank=2, target_modules=["0"]))
    x = torch.randn(*((2, 4, 5, 5) if kind == "conv" else (3, 5)), dtype=DT, requires_grad=True)
    W = model.lie_layers()[0][1].weight
    y = model(x)
    assert model._ledger.held(W) == W.numel()  # the forward's W' lives in the workspace
    live: list[int] = []
    real = fo._factor_grads

    def spy(G, *args):
        live.append(model._ledger.held(W))  # while ∂L/∂W' exists
        same = model._ledger.held(W) and G.data_ptr() == model._ledger.workspace(
            G.shape, W).data_ptr()
        live.append(int(bool(same)))
        return real(G, *args)

    monkeypatch.setattr(fo, "_factor_grads", spy)
    y.sum().backward()
    held, g_in_workspace = live
    # a conv frees the workspace before ∂L/∂W'; a Linear writes ∂L/∂W' into it: one buffer
    assert (held == 0) if kind == "conv" else (held == W.numel() and g_in_workspace == 1)
