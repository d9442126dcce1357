"""PEFT state under bad input: all-or-nothing changes, shared weights, bounded sizes, typed errors.

Each test names the property it checks; the failure it guards against is in its docstring.
"""

from __future__ import annotations

import copy
import os
import pathlib

import pytest
import torch
from torch import nn

from liegroup.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DeviceError,
    NonFiniteError,
    ShapeError,
)
from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight (GPT-2 / Llama-style tying)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _train_a_little(model: nn.Module, ids: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_merging_a_tied_head_equals_the_adapter_and_leaves_the_embedding(exp_map: str) -> None:
    """Merging wrote W' into the tied tensor, changing the embedding (outputs off by 0.1-1)."""
    torch.manual_seed(0)
    net = TiedLM()
    emb0 = net.emb.weight.detach().clone()
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["head", "mix"],
                                            exp_map=exp_map))
    ids = torch.randint(0, 11, (4, 5))
    _train_a_little(model, ids)
    model.eval()
    with torch.no_grad():
        y = model(ids)
        model.merge_adapter()
        torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-6)
        assert torch.equal(net.emb.weight, emb0)
        model.unmerge_adapter()
        assert net.head.base_layer.weight is net.emb.weight  # the tie is back
        assert torch.equal(net.emb.weight, emb0)
        torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-6)


def test_a_module_used_twice_is_adapted_once_and_merges_once(tmp_path: os.PathLike) -> None:
    """One Linear under two names got two adapters over one weight: merged twice."""
    torch.manual_seed(1)
    lin = nn.Linear(5, 5)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0", "2"]))
    assert net[0] is net[2]
    assert len(model.lie_layers()) == 1
    x = torch.randn(3, 5)
    _train_a_little(model, x)
    model.eval()
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        y = model(x)  # W back to a few ulps: compare the reload with the model as it is now
    model.save_pretrained(tmp_path)
    net2 = nn.Sequential(copy.deepcopy(net[0].base_layer), nn.Tanh())
    net2.append(net2[0])
    loaded = LieRAModel.from_pretrained(net2, tmp_path)
    assert net2[0] is net2[2] and len(loaded.lie_layers()) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def _saved(tmp_path: os.PathLike, rank: int = 2) -> tuple[nn.Module, str]:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    base = copy.deepcopy(net)
    model = get_peft_model(net, LieRAConfig(rank=rank, target_modules=["0", "2"]))
    with torch.no_grad():
        for g in model.generators().values():
            g.B.normal_()
    d = os.path.join(tmp_path, "ckpt")
    model.save_pretrained(d)
    return base, d


def _fingerprint(net: nn.Module) -> list[tuple[str, str, bool]]:
    return [(n, type(m).__name__, all(p.requires_grad for p in m.parameters(recurse=False)))
            for n, m in net.named_modules()]


def test_a_failed_from_pretrained_leaves_the_model_and_its_flags(tmp_path) -> None:
    """A failed load froze the user's parameters or left injected layers behind."""
    from safetensors.torch import load_file, save_file

    base, d = _saved(tmp_path)
    base[2].weight.requires_grad_(False)  # the user's own, mixed flags
    before = _fingerprint(base)
    w = os.path.join(d, "adapter_model.safetensors")
    t = load_file(w)
    t[next(iter(t))] = torch.zeros(7, 7)
    save_file(t, w)
    with pytest.raises(CheckpointError):
        LieRAModel.from_pretrained(base, d)
    assert _fingerprint(base) == before
    assert base[0].weight.requires_grad and not base[2].weight.requires_grad


def test_a_failed_injection_leaves_the_flags(tmp_path) -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    net[1].bias.requires_grad_(False)
    before = _fingerprint(net)
    with pytest.raises(ConfigError, match="match no module"):
        get_peft_model(net, LieRAConfig(rank=2, target_modules=["0", "nope"]))
    assert _fingerprint(net) == before and net[0].weight.requires_grad


@pytest.mark.parametrize("what", ["dtype", "nonfinite"])
def test_checkpoint_tensors_of_another_dtype_or_non_finite_are_refused(tmp_path, what) -> None:
    """They were cast and loaded silently."""
    from safetensors.torch import load_file, save_file

    base, d = _saved(tmp_path)
    w = os.path.join(d, "adapter_model.safetensors")
    t = load_file(w)
    k = next(iter(t))
    if what == "dtype":
        t[k] = t[k].double()
    else:
        t[k][0, 0] = float("nan")
    save_file(t, w)
    before = _fingerprint(base)
    with pytest.raises(CheckpointError, match="float64" if what == "dtype" else "non-finite"):
        LieRAModel.from_pretrained(base, d)
    assert _fingerprint(base) == before


def test_a_huge_rank_in_a_checkpoint_is_refused_before_any_allocation(tmp_path) -> None:
    """rank 10⁹ attempted a 32 GB allocation before any check."""
    import json

    base, d = _saved(tmp_path)
    c = os.path.join(d, "adapter_config.json")
    cfg = json.loads(pathlib.Path(c).read_text())
    cfg["rank"] = 10**9
    pathlib.Path(c).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank"):
        LieRAModel.from_pretrained(base, d)


def test_a_rank_far_above_the_weight_is_refused_at_the_layer() -> None:
    with pytest.raises(ConfigError, match="exceeds both sides"):
        get_peft_model(nn.Sequential(nn.Linear(4, 3)), LieRAConfig(rank=300, target_modules=["0"]))


def test_a_save_that_fails_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch) -> None:
    """save_pretrained wrote the config before the weights: a failed write broke the old one."""
    import safetensors.torch as st

    base, d = _saved(tmp_path)
    before = {f: pathlib.Path(d, f).read_bytes() for f in os.listdir(d)}
    net = copy.deepcopy(base)
    model = get_peft_model(net, LieRAConfig(rank=3, target_modules=["0", "2"]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(CheckpointError, match="disk full"):
        model.save_pretrained(d)
    after = {f: pathlib.Path(d, f).read_bytes() for f in os.listdir(d)}
    assert after == before  # no temporary file left, nothing replaced
    LieRAModel.from_pretrained(copy.deepcopy(base), d)


def test_a_failed_save_to_a_new_directory_leaves_no_directory(tmp_path, monkeypatch) -> None:
    import safetensors.torch as st

    model = get_peft_model(nn.Sequential(nn.Linear(4, 3)), LieRAConfig(rank=1,
                                                                      target_modules=["0"]))
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(CheckpointError):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_save_whose_second_rename_fails_puts_the_first_file_back(tmp_path, monkeypatch) -> None:
    """The weights were renamed into place before the config: a failed config rename left the
    new weights beside the old config."""
    base, d = _saved(tmp_path)
    before = {f: pathlib.Path(d, f).read_bytes() for f in os.listdir(d)}
    model = get_peft_model(copy.deepcopy(base), LieRAConfig(rank=3, target_modules=["0", "2"]))
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "adapter_config.json" and ".tmp" in os.path.basename(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="rename failed"):
        model.save_pretrained(d)
    after = {f: pathlib.Path(d, f).read_bytes() for f in os.listdir(d)}
    assert after == before  # the first file is back, nothing left aside
    LieRAModel.from_pretrained(copy.deepcopy(base), d)


def test_tied_modules_to_save_are_saved_and_loaded(tmp_path) -> None:
    """safetensors refused tensors sharing memory ("share memory")."""
    torch.manual_seed(3)
    net = TiedLM()
    base = copy.deepcopy(net)
    model = get_peft_model(net, LieRAConfig(rank=1, target_modules=["mix"],
                                            modules_to_save=["emb", "head"]))
    ids = torch.randint(0, 11, (2, 4))
    _train_a_little(model, ids)
    model.eval()
    y = model(ids).detach()
    model.save_pretrained(tmp_path)
    loaded = LieRAModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(ids), y, rtol=0, atol=0)


def _underflowing(dtype: torch.dtype = torch.float32) -> LieRAModel:
    net = nn.Sequential(nn.Linear(3, 2, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.fill_(torch.finfo(dtype).tiny * 4)  # e^-10 · W underflows to 0
    model = get_peft_model(net, LieRAConfig(rank=1, alpha=1.0, target_modules=["0"],
                                            exp_map="exact"))
    g = model.generators()["0"]
    with torch.no_grad():
        g.B.fill_(-10.0)
        g.A.fill_(1.0)
    return model.eval()


def test_safe_merge_refuses_a_merge_the_inverse_cannot_undo() -> None:
    """safe_merge accepted W' = 0, after which unmerge filled the weight with NaN/inf."""
    model = _underflowing()
    W = model.base_model[0].weight.detach().clone()
    with pytest.raises(AdapterStateError, match="cannot be undone"):
        model.merge_adapter(safe_merge=True)
    assert not model.merged and torch.equal(model.base_model[0].weight, W)


def test_a_merge_the_inverse_cannot_undo_keeps_a_copy_and_unmerges_exactly() -> None:
    model = _underflowing()
    W = model.base_model[0].weight.detach().clone()
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(model.base_model[0].weight, W)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_unmerge_cycles_in_half_precision_give_w_back_bit_for_bit(dtype) -> None:
    """1000 float16/bfloat16 cycles drifted the base weight by 50-100 %."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(8, 8)).to(dtype)
    W = net[0].weight.detach().clone()
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"])).eval()
    with torch.no_grad():
        model.generators()["0"].B.uniform_(-4, 4)
    for _ in range(200):
        model.merge_adapter()
        model.unmerge_adapter()
    assert torch.equal(model.base_model[0].weight, W)


def test_merge_unmerge_cycles_in_float32_drift_at_most_a_few_ulps_per_cycle() -> None:
    """The exact map's inverse: each cycle rounds W' once and the inverse a few times."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(16, 16))
    W = net[0].weight.detach().clone()
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"],
                                            exp_map="exact")).eval()
    with torch.no_grad():
        model.generators()["0"].B.uniform_(-1, 1)
    n = 100
    for _ in range(n):
        model.merge_adapter()
        model.unmerge_adapter()
    rel = ((model.base_model[0].weight - W).abs() / W.abs()).max().item()
    assert rel <= 4 * n * torch.finfo(torch.float32).eps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exp_map": 10**7}, "Taylor order"),
        ({"generator_kwargs": {"iint": "pissa"}}, "iint"),
        ({"rank": 10**9}, "rank"),
    ],
)
def test_unbounded_or_unknown_config_values_are_refused(kwargs, match) -> None:
    """A Taylor order of 10⁷ took minutes per forward; unknown generator_kwargs were ignored."""
    with pytest.raises(ConfigError, match=match):
        LieRAConfig(target_modules=["0"], **kwargs)


@pytest.mark.parametrize("name", ["a.b", "", 3])
def test_bad_adapter_names_raise_a_value_error(name) -> None:
    """Names with '.' raised a raw KeyError from nn.ModuleDict."""
    with pytest.raises(ConfigError, match="adapter name"):
        get_peft_model(nn.Sequential(nn.Linear(3, 2)), LieRAConfig(rank=1, target_modules=["0"]),
                       adapter_name=name)


def test_a_meta_weight_raises_a_device_error() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(DeviceError, match="meta"):
        get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"]))


def test_a_module_to_save_used_twice_gets_one_trained_copy(tmp_path) -> None:
    """One head under two names got two wrappers, each with its own trained copy."""
    torch.manual_seed(6)
    head = nn.Linear(4, 4)
    net = nn.Sequential(nn.Linear(4, 4), head, nn.Tanh(), head)
    base = copy.deepcopy(net)
    assert base[1] is base[3]
    model = get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"],
                                            modules_to_save=["1", "3"]))
    assert net[1] is net[3] and len(model._save_wrappers()) == 1
    x = torch.randn(2, 4)
    _train_a_little(model, x)
    model.eval()
    y = model(x).detach()
    model.save_pretrained(tmp_path)
    loaded = LieRAModel.from_pretrained(base, tmp_path)
    assert base[1] is base[3]
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


class _TwoNames(nn.Module):
    """One Linear registered as ``a`` and ``b``; only ``a`` is targeted."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(4, 4)
        self.a = lin
        self.b = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_a_module_under_a_second_untargeted_name_keeps_w_when_merged(exp_map: str) -> None:
    """Merging wrote W' into the module that ``b`` also is: the merged output moved by 0.36."""
    torch.manual_seed(3)
    net = _TwoNames()
    w0 = net.b.weight.detach().clone()
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["a"], exp_map=exp_map))
    with torch.no_grad():
        model.base_model.a.generators["default"].B.fill_(0.3)
    model.eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        assert torch.equal(net.b.weight, w0)  # the untargeted name still computes with W
        model.unmerge_adapter()
        assert net.a.base_layer is net.b  # the shared module is back
        assert torch.equal(net.b.weight, w0)
        unloaded = model.merge_and_unload()
        torch.testing.assert_close(unloaded(x), y, rtol=1e-5, atol=1e-6)
        assert torch.equal(unloaded.b.weight, w0)


def test_a_failed_safe_merge_leaves_every_weight_bit_for_bit() -> None:
    """The first layer was merged, then rolled back by the group inverse: off by 3e-8."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4))
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0", "1"], exp_map="exact"))
    with torch.no_grad():
        model.base_model[0].generators["default"].B.normal_(0, 0.3)
        model.base_model[1].generators["default"].B.fill_(1e30)  # W' overflows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with pytest.raises(NonFiniteError):
        model.merge_adapter(safe_merge=True)
    assert not model.merged
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(6, 0), lambda: nn.Linear(0, 5), lambda: nn.Conv2d(3, 0, 3)],
    ids=["no-outputs", "no-inputs", "conv-no-channels"],
)
def test_an_empty_weight_raises_a_shape_error_at_injection(make) -> None:
    """It raised ZeroDivisionError from the rank check or the zero-fraction warning."""
    with pytest.warns(UserWarning, match="zero-element"):
        net = nn.Sequential(make())
    with pytest.raises(ShapeError, match="has no entries"):
        get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_base_weight_raises_at_injection(value: float) -> None:
    """It was adapted silently; every output of the layer was then NaN/inf."""
    net = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight[1, 2] = value
    with pytest.raises(NonFiniteError, match="1 NaN/inf entries"):
        get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"]))
    assert isinstance(net[0], nn.Linear)  # nothing injected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("generator", ["tucker", "adalora"])
def test_orthogonal_initialisers_take_half_precision_weights(generator: str,
                                                             dtype: torch.dtype) -> None:
    """The CPU QR of nn.init.orthogonal_ has no float16/bfloat16 kernel: NotImplementedError."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 5)).to(dtype)
    model = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"], generator=generator))
    gen = model.base_model[0].generators["default"]
    mats = list(gen.factors_list) if generator == "tucker" else [gen.P, gen.Q.T]
    for q in mats:
        assert q.dtype == dtype
        gram = q.float().T @ q.float()  # orthonormal columns, to the dtype's rounding
        tol = 8 * torch.finfo(dtype).eps * q.shape[0]
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), rtol=0, atol=tol)
    y = model(torch.randn(3, 6, dtype=dtype))
    assert y.dtype == dtype and bool(torch.isfinite(y).all())


def test_loading_an_adapter_while_merged_raises_and_changes_nothing(tmp_path) -> None:
    """load_adapter went through while merged (add_adapter refused the same)."""
    base, d = _saved(tmp_path)
    model = get_peft_model(base, LieRAConfig(rank=2, target_modules=["0", "2"]))
    model.eval()
    model.merge_adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        model.load_adapter(d, "other")
    assert set(model.peft_config) == {"default"} and model.merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_saving_non_finite_adapter_tensors_raises_and_writes_nothing(tmp_path) -> None:
    """They were written, and from_pretrained then refused the checkpoint."""
    base, d = _saved(tmp_path)
    files = {p.name: p.read_bytes() for p in pathlib.Path(d).iterdir()}
    model = get_peft_model(base, LieRAConfig(rank=2, target_modules=["0", "2"]))
    with torch.no_grad():
        model.base_model[2].generators["default"].A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="nothing was written"):
        model.save_pretrained(d)
    assert {p.name: p.read_bytes() for p in pathlib.Path(d).iterdir()} == files
