"""The per-thread StepLedger: a shared W' workspace and a second backward buffer on credit.

The adapted layers that run on a thread (CPU) share that thread's :class:`StepLedger`
(``ledger.current``); no model wires it. Two things follow, and both must leave every value
and gradient as the reference path gives it:

* a transient ``W'`` (forward, backward recompute) lives in one reused workspace; a ``W'``
  kept for the backward is copied out of it, so later layers cannot overwrite it;
* a layer's backward may hold ``W'`` next to ``∂L/∂W'`` (one recompute, no blocked second
  ``exp``) only when the weights of the layers whose backward already ran in this step —
  the gradients full fine-tuning would hold by now — are at least its own size.
"""

from __future__ import annotations

import copy
import gc
import io
import threading

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, adapted_weight_lowrank, get_peft_model
from liegroup.peft._engine import base_op, ledger, policy
from liegroup.peft._engine import lowrank_node as ln
from liegroup.peft._engine.ledger import StepLedger

DT = torch.float64
MAPS = [("hadamard", "exact"), ("hadamard", "first_order"), ("hadamard", 2),
        ("additive", "exact")]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def lg(monkeypatch: pytest.MonkeyPatch) -> StepLedger:
    """This thread's CPU ledger, new for each test (no credit or workspace from earlier ones)."""
    fresh = StepLedger()
    monkeypatch.setattr(ledger._local, "ledger", fresh, raising=False)
    assert ledger.current(CPU) is fresh
    return fresh


def _force_keep(monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    """Make the keep rule (policy.keep_adapted_weight) answer ``keep`` for every layer."""
    monkeypatch.setattr(policy, "keep_adapted_weight", lambda *a, k=keep: k)


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
                                             exp_map=exp_map, update=group))
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
            h = base_op(module.base_layer, h, adapted_weight_lowrank(module.weight, L, R,
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
    real = ln.LowRankAdaptedOpFunction.backward

    def spy(ctx, gy):
        before = ctx.ledger.credit if ctx.ledger is not None else 0
        W = ctx.saved_tensors[1]
        seen.append(ctx.keep or (ctx.ledger is not None and W.numel() <= before))
        return real(ctx, gy)

    monkeypatch.setattr(ln.LowRankAdaptedOpFunction, "backward", staticmethod(spy))
    return seen


@pytest.mark.parametrize("keep", [False, True], ids=["workspace", "keep"])
@pytest.mark.parametrize(("group", "exp_map"), MAPS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_model_paths_match_reference(kind, group, exp_map, keep, monkeypatch):
    # False: no W' kept from the forward (all in the workspace; the ledger decides the
    # backward); True: every W' kept, so it must survive the later layers' use of the workspace
    _force_keep(monkeypatch, keep)
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
def test_second_buffer_only_on_credit(kind, monkeypatch, lg):
    _force_keep(monkeypatch, False)
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
    assert lg.credit == sum(sizes)


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


def test_workspace_is_reused_per_dtype():
    lg = StepLedger()
    W = torch.zeros(4, 6)
    a = lg.workspace((4, 6), W)
    b = lg.workspace((2, 5), W)
    assert a.shape == (4, 6) and b.shape == (2, 5) and a.data_ptr() == b.data_ptr()
    assert lg.workspace((4, 6), W) is a  # a shape's view is made once
    assert lg.held(torch.float32) == 24 and lg.held(torch.float64) == 0
    c = lg.workspace((8, 2, 2, 2), W)  # grows: a new buffer, the old one dropped
    assert c.shape == (8, 2, 2, 2) and c.is_contiguous()
    assert lg.workspace((4, 6), W).data_ptr() == c.data_ptr()
    # no view of the smaller buffer survives (it would keep that buffer alive)
    assert all(v.data_ptr() == c.data_ptr() for v in lg._views.values())
    W64 = W.double()
    d = lg.workspace((2, 2), W64)
    assert d.dtype == torch.float64 and lg.held(torch.float64) == 4
    lg.release(torch.float64)  # one dtype only
    assert lg.held(torch.float64) == 0 and lg.held(torch.float32) == 64
    assert all(k[0] == torch.float32 for k in lg._views)
    lg.release()
    assert not lg._views and lg.held(torch.float32) == 0
    assert lg.workspace((1, 1), W).numel() == 1


def test_one_ledger_per_thread_cpu_only(lg):
    """Each thread has its own ledger (so its own workspace); other devices have none."""
    assert ledger.current(CPU) is lg
    W = torch.zeros(4, 6)
    mine = lg.workspace((4, 6), W).data_ptr()
    other: list[object] = []

    def run() -> None:
        theirs = ledger.current(CPU)
        assert theirs is not None
        other.extend([theirs, theirs is ledger.current(CPU),
                      theirs.workspace((4, 6), W).data_ptr()])

    t = threading.Thread(target=run)
    t.start()
    t.join()
    theirs, stable, ptr = other
    assert theirs is not lg and stable  # one per thread, the same on every call
    assert ptr != mine  # another thread never shares a buffer
    assert ledger.current(CPU) is lg
    # CUDA (and any other device): no ledger, so no workspace and no credit
    assert ledger.current(torch.device("cuda")) is None
    assert ledger.current(torch.device("meta")) is None


def test_workspace_is_freed_with_the_last_weight_that_used_it():
    lg = StepLedger()
    W1, W2 = torch.zeros(4, 6), torch.zeros(3, 3)
    lg.workspace((4, 6), W1)
    lg.workspace((3, 3), W2)
    lg.workspace((3, 3), W2)  # a weight is counted once
    assert lg.held(torch.float32) == 24
    del W1  # (freed by reference counting: no gc pass needed)
    assert lg.held(torch.float32) == 24  # W2 still uses it
    del W2
    assert lg.held(torch.float32) == 0 and not lg._views
    W3 = torch.zeros(2, 2)  # a new user starts a new buffer
    assert lg.workspace((2, 2), W3).numel() == 4 and lg.held(torch.float32) == 4


def test_workspace_of_a_model_is_freed_with_the_model(lg):
    model, x = _net("conv", "hadamard", "exact")
    model(x).sum().backward()
    assert lg.held(torch.float64) > 0  # the step left its workspace
    del model
    gc.collect()
    assert lg.held(torch.float64) == 0


def test_copied_and_saved_models_hold_no_ledger(lg):
    """The ledger is the thread's, not the model's: a deep copy or a saved model carries
    neither a ledger nor a workspace, and runs on the ledger of the thread that runs it."""
    model, x = _net("conv", "hadamard", "exact")
    model(x).sum().backward()
    assert lg.held(torch.float64) > 0
    assert not any(isinstance(v, StepLedger) for m in model.modules() for v in vars(m).values())
    clone = copy.deepcopy(model)
    blob = io.BytesIO()
    torch.save(model, blob)
    size = blob.tell()
    lg.release()
    blob2 = io.BytesIO()
    torch.save(model, blob2)
    assert size == blob2.tell()  # no workspace in the pickle
    assert torch.equal(clone(x), model(x))


def test_model_layers_share_this_threads_ledger(lg):
    """Every adapted layer of every model on this thread counts on the thread's one ledger."""
    model, x = _net("conv", "hadamard", "exact")
    model.add_adapter("second", LieRAConfig(rank=1, target_modules=["0"]))
    other, _ = _net("linear", "hadamard", "exact", seed=1)
    sizes = sum(layer.weight.numel() for _, layer in model.lie_layers())
    model(x).sum().backward()
    assert lg.credit == sizes
    model.set_adapter("second")  # on layer "0" only: the others run their base module
    model(x).sum().backward()  # a new step, on the same ledger
    assert lg.credit == model.base_model[0].weight.numel()
    model.set_adapter("default")
    # a second model's forward starts a new step of the same (thread's) ledger
    y = other(torch.randn(4, 7, dtype=DT))
    assert lg.credit == 0 and not lg.in_backward
    y.sum().backward()
    assert lg.credit == sum(layer.weight.numel() for _, layer in other.lie_layers())
    # on another thread the same model counts on that thread's ledger, not this one
    seen: list[StepLedger | None] = []

    def run() -> None:
        model(x).sum().backward()
        seen.append(ledger.current(CPU))

    before = lg.credit
    t = threading.Thread(target=run)
    t.start()
    t.join()
    (theirs,) = seen
    assert theirs is not None and theirs is not lg and theirs.credit == sizes
    assert lg.credit == before


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
            y = base_op(layer.base_layer, h,
                        adapted_weight_lowrank(layer.weight, L, R, layer.updates["default"]))
        y = y.permute(0, 3, 1, 2)  # ∂L/∂y arrives strided
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(y, [x, *params], gy)

    u = torch.finfo(DT).eps
    for g, w in zip(run(True), run(False), strict=True):
        assert (g - w).abs().max().item() <= 1e3 * u * (1 + w.abs().max().item())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_uncovered_backward_holds_one_weight_buffer(kind, monkeypatch, lg):
    """Without credit (a one-layer model) the workspace never lives next to ∂L/∂W'."""
    _force_keep(monkeypatch, False)
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else nn.Linear(5, 7)
    model = get_peft_model(nn.Sequential(base.to(DT)), LieRAConfig(rank=2, target_modules=["0"]))
    x = torch.randn(*((2, 4, 5, 5) if kind == "conv" else (3, 5)), dtype=DT, requires_grad=True)
    W = model.lie_layers()[0][1].weight
    y = model(x)
    assert lg.held(W.dtype) == W.numel()  # the forward's W' lives in the workspace
    live: list[int] = []
    real = ln._factor_grads

    def spy(G, *args):
        live.append(lg.held(W.dtype))  # while ∂L/∂W' exists
        same = lg.held(W.dtype) and G.data_ptr() == lg.workspace(G.shape, W).data_ptr()
        live.append(int(bool(same)))
        return real(G, *args)

    monkeypatch.setattr(ln, "_factor_grads", spy)
    y.sum().backward()
    held, g_in_workspace = live
    # a conv frees the workspace before ∂L/∂W'; a Linear writes ∂L/∂W' into it: one buffer
    assert (held == 0) if kind == "conv" else (held == W.numel() and g_in_workspace == 1)
