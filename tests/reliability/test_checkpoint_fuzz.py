"""Fuzzed checkpoints: a corrupted, truncated or mismatched adapter either loads or raises
``CheckpointError`` — never another exception, never a crash — and a failed load leaves the
model bit for bit as it was (parameters, buffers, module classes, ``requires_grad`` flags).
"""

from __future__ import annotations

import atexit
import copy
import json
import pathlib
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from liegroup.errors import CheckpointError
from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _snapshot(net: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    kinds = [(n, type(m).__name__) for n, m in net.named_modules()]
    flags = [(n, p.requires_grad) for n, p in net.named_parameters()]
    return state, kinds, flags


def _same(net: nn.Module, snap: tuple) -> bool:
    state, kinds, flags = snap
    now = net.state_dict()
    return (
        set(now) == set(state)
        and all(torch.equal(now[k], v) for k, v in state.items())
        and [(n, type(m).__name__) for n, m in net.named_modules()] == kinds
        and [(n, p.requires_grad) for n, p in net.named_parameters()] == flags
    )


_ORIGINAL = pathlib.Path(tempfile.mkdtemp(prefix="liegroup-fuzz-"))
atexit.register(shutil.rmtree, _ORIGINAL, True)
_model = get_peft_model(_net(), LieRAConfig(rank=2, target_modules=["0"], modules_to_save=["3"]))
with torch.no_grad():
    for _g in _model.generators().values():
        _g.B.normal_()
_model.save_pretrained(_ORIGINAL)

corruption = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from([WEIGHTS, CONFIG]), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.sampled_from([WEIGHTS, CONFIG]),
              st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1,
                       max_size=8)),
    st.tuples(st.just("config"), st.sampled_from(
        ["rank", "alpha", "exp_map", "target_modules", "generator", "update", "layout",
         "rank_pattern", "peft_type", "generator_kwargs", "extra"]),
              st.one_of(st.none(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                        st.text(max_size=8), st.lists(st.text(max_size=3), max_size=3))),
    st.tuples(st.just("delete"), st.sampled_from([WEIGHTS, CONFIG]), st.none()),
)


def _corrupt(d: pathlib.Path, how: tuple) -> None:
    kind, what, arg = how
    if kind == "delete":
        (d / what).unlink()
    elif kind == "truncate":
        data = (d / what).read_bytes()
        (d / what).write_bytes(data[: int(arg * len(data))])
    elif kind == "flip":
        data = bytearray((d / what).read_bytes())
        for pos, x in arg:
            i = min(int(pos * len(data)), len(data) - 1)
            data[i] ^= x
        (d / what).write_bytes(bytes(data))
    else:
        cfg = json.loads((d / CONFIG).read_text())
        cfg[what] = arg
        (d / CONFIG).write_text(json.dumps(cfg))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=corruption, via=st.sampled_from(["from_pretrained", "load_adapter"]))
def test_a_corrupted_checkpoint_loads_or_raises_checkpoint_error_and_changes_nothing(
    how: tuple, via: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp) / "ckpt"
        shutil.copytree(_ORIGINAL, d)
        _corrupt(d, how)
        if via == "from_pretrained":
            net = _net()
            snap = _snapshot(net)
            try:
                LieRAModel.from_pretrained(net, d)
            except CheckpointError:
                assert _same(net, snap), f"{how}: a failed load changed the model"
        else:
            model = get_peft_model(_net(), LieRAConfig(rank=1, target_modules=["0"]))
            snap = _snapshot(model)
            adapters = dict(model.peft_config)
            try:
                model.load_adapter(d, "other")
            except CheckpointError:
                assert _same(model, snap), f"{how}: a failed load changed the model"
                assert model.peft_config == adapters


def test_the_fuzz_reaches_both_outcomes() -> None:
    """The corruptions above are not all harmless: a truncated weights file must fail."""
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp) / "ckpt"
        shutil.copytree(_ORIGINAL, d)
        _corrupt(d, ("truncate", WEIGHTS, 0.5))
        net = _net()
        snap = _snapshot(net)
        try:
            LieRAModel.from_pretrained(net, d)
        except CheckpointError:
            assert _same(net, snap)
        else:
            raise AssertionError("a half-truncated safetensors file loaded")
        ok = LieRAModel.from_pretrained(_net(), _ORIGINAL)
        assert isinstance(copy.deepcopy(ok), LieRAModel)
