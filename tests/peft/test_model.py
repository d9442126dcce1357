"""Model level: injection, trainability, adapters, merge/unmerge, save/load, error paths."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from liegroup.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DTypeError,
    LieGroupError,
    NonFiniteError,
    ShapeError,
    UnsupportedModuleError,
)
from liegroup.peft import (
    Generator,
    GeneratorSpec,
    LieRAConfig,
    LieRALayer,
    LieRAModel,
    adapted_weight,
    get_generator,
    get_peft_model,
    register_generator,
    register_update,
)
from liegroup.peft.generators import LoRAGenerator, RankAllocator, orthogonality_penalty
from liegroup.peft.interop import export_hira

DT = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(8, 6, (3, 1), stride=2),
        )
        self.seq = nn.Conv1d(6, 6, 3, dilation=2, padding=2)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(torch.relu(self.conv1(x)))  # (N, 6, H', W')
        h = self.seq(h.flatten(2)).mean(-1)
        return self.head(torch.relu(self.fc(h)))


TARGETS = ["conv1", "block.0", "block.2", "seq", "fc"]


def _model(seed: int = 0, **kw) -> tuple[Net, LieRAModel, torch.Tensor]:
    torch.manual_seed(seed)
    net = Net().to(DT)
    kw.setdefault("exp_map", "exact")  # the model verbs' tests cover the group-inverse unmerge
    cfg = LieRAConfig(rank=2, alpha=4.0, target_modules=TARGETS, modules_to_save=["head"], **kw)
    model = get_peft_model(net, cfg)
    x = torch.randn(2, 3, 10, 9, dtype=DT)
    return net, model, x


def _perturb(model: LieRAModel, scale: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _train_steps(model: LieRAModel, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_injection_freezes_base_and_counts():
    _net, model, _x = _model()
    for name in TARGETS:
        assert isinstance(model.base_model.get_submodule(name), LieRALayer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".generators.default." in n or ".modules_to_save.default." in n
                             for n in trainable)
    t, a = model.get_nb_trainable_parameters()
    assert t == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert a == sum(p.numel() for p in model.parameters())


def test_print_trainable_parameters(capsys):
    _, model, _ = _model()
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    t, a = model.get_nb_trainable_parameters()
    assert re.fullmatch(rf"trainable params: {t:,d} \|\| all params: {a:,d} \|\| trainable%: "
                        r"[0-9.]+\n", out)


@pytest.mark.parametrize("exp_map", ["exact", "first_order", 2])
def test_training_moves_only_adapters_and_identity_at_init(exp_map):
    _net, model, x = _model(exp_map=exp_map)
    with model.disable_adapter():
        y_base = model(x)
    assert torch.allclose(model(x), y_base, rtol=0, atol=0)  # identity at init (head copy too)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train_steps(model, x)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.allclose(model(x), y_base)
    with model.disable_adapter():
        assert torch.equal(model(x), y_base)


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_merge_unmerge_and_merge_and_unload(exp_map):
    net, model, x = _model(exp_map=exp_map)
    _perturb(model)
    model.eval()
    y = model(x)
    W = {n: p.detach().clone() for n, p in net.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert model.merged
    assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12)
    model.unmerge_adapter()
    for n, p in net.named_parameters():
        if n in W:
            if exp_map == "first_order":
                assert torch.equal(p, W[n])
            else:
                assert torch.allclose(p, W[n], rtol=1e-13, atol=0)
    plain = model.merge_and_unload()
    assert plain is net
    assert type(net.conv1) is nn.Conv2d and type(net.head) is nn.Linear
    assert all(not isinstance(m, LieRALayer) for m in net.modules())
    assert torch.allclose(net(x), y, rtol=1e-12, atol=1e-12)


def test_unload_without_merge_restores_base_model():
    _net, model, x = _model()
    with model.disable_adapter():
        y0 = model(x)
    _perturb(model)
    plain = model.unload()
    assert type(plain.fc) is nn.Linear and type(plain.head) is nn.Linear
    assert torch.equal(plain(x), y0)


def test_merge_state_errors():
    _, model, x = _model()
    _perturb(model)
    with pytest.raises(AdapterStateError, match="nothing to unmerge"):
        model.unmerge_adapter()
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="already merged"):
        model.merge_adapter()
    model.train()
    with pytest.raises(AdapterStateError, match="training while adapter"):
        model(x)
    with torch.no_grad():
        model(x)  # inference while merged is fine
    with pytest.raises(AdapterStateError), model.disable_adapter():
        pass
    with pytest.raises(AdapterStateError):
        model.save_pretrained("unused")
    with pytest.raises(AdapterStateError):
        model.set_adapter("default")
    with pytest.raises(AdapterStateError):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model(x).sum().backward()


def test_safe_merge_refuses_non_finite_and_writes_nothing():
    net, model, _x = _model()
    layer = model.base_model.get_submodule("block.2")
    with torch.no_grad():
        layer.generators["default"].B.fill_(1e4)  # exp overflows
    W = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"block\.2"):
        model.merge_adapter(safe_merge=True)
    assert not model.merged
    for n, p in net.named_parameters():
        assert torch.equal(p, W[n]), n


def test_multiple_adapters_switch_and_delete():
    net, model, x = _model()
    _perturb(model, seed=1)
    y_default = model(x)
    model.add_adapter("other", LieRAConfig(rank=1, target_modules=["fc"], exp_map="first_order"))
    assert model.active_adapter == "default"
    assert torch.equal(model(x), y_default)
    model.set_adapter("other")
    assert {n.split(".generators.")[-1].split(".")[0] for n, p in model.named_parameters()
            if p.requires_grad} == {"other"}
    with model.disable_adapter():
        y_base = model(x)
    assert torch.equal(model(x), y_base)  # "other" is still identity; head uses the original
    _perturb(model, seed=2)
    y_other = model(x)
    assert not torch.allclose(y_other, y_base)
    model.set_adapter("default")
    assert torch.equal(model(x), y_default)
    model.delete_adapter("default")
    assert model.active_adapter == "other"
    assert type(net.conv1) is nn.Conv2d  # wrappers without adapters are removed
    assert torch.equal(model(x), y_other)
    with pytest.raises(ConfigError, match="no adapter"):
        model.set_adapter("default")
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("other", LieRAConfig(rank=1, target_modules=["fc"]))


@pytest.mark.parametrize("exp_map", ["exact", "first_order", 3])
def test_save_load_reproduces_outputs(tmp_path, exp_map):
    _net, model, x = _model(exp_map=exp_map)
    _perturb(model)
    model.eval()
    y = model(x)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LIERA" and "liegroup_version" in cfg and cfg["exp_map"] == exp_map
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".A" in k or ".B" in k or k.startswith("modules_to_save.head.") for k in tensors)
    assert not any("base_layer" in k for k in tensors)
    torch.manual_seed(0)
    fresh = Net().to(DT)  # same base weights (seed 0)
    loaded = LieRAModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), y)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    again = LieRAModel.from_pretrained(Net().to(DT), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] > 0


def test_load_adapter_into_existing_model(tmp_path):
    _net, model, x = _model()
    _perturb(model)
    y = model(x)
    model.save_pretrained(tmp_path)
    _, other, _ = _model()
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    assert torch.equal(other(x), y)


def _saved(tmp_path) -> tuple[str, LieRAModel]:
    _net, model, _ = _model()
    _perturb(model)
    model.save_pretrained(tmp_path)
    return str(tmp_path), model


def _fresh_is_untouched(net: Net) -> None:
    assert all(not isinstance(m, (LieRALayer,)) for m in net.modules())
    assert type(net.head) is nn.Linear


def test_checkpoint_errors_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"adapter_config\.json"):
        LieRAModel.from_pretrained(Net(), tmp_path)
    d, _ = _saved(tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    net = Net().to(DT)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors"):
        LieRAModel.from_pretrained(net, d)
    _fresh_is_untouched(net)


def test_checkpoint_errors_bad_config(tmp_path):
    d, _ = _saved(tmp_path)
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        good = json.loads(f.read())
    for bad, msg in (
        ("{not json", "not valid JSON"),
        (json.dumps({**good, "peft_type": "LORA"}), "not a LieRA"),
        (json.dumps({**good, "surprise": 1}), "unknown fields"),
        (json.dumps({**good, "rank": 0}), "invalid"),
        (json.dumps({**good, "generator": "nope"}), "invalid"),
        (json.dumps([1, 2]), "JSON object"),
    ):
        with open(path, "w") as f:
            f.write(bad)
        net = Net().to(DT)
        with pytest.raises(CheckpointError, match=msg):
            LieRAModel.from_pretrained(net, d)
        _fresh_is_untouched(net)


def test_checkpoint_errors_do_not_fit_and_never_partial(tmp_path):
    d, _ = _saved(tmp_path)
    wpath = os.path.join(d, "adapter_model.safetensors")
    tensors = load_file(wpath)
    # a model whose fc has another width: shape mismatch in the tensors
    net = Net().to(DT)
    net.fc = nn.Linear(6, 7).to(DT)
    net.head = nn.Linear(7, 4).to(DT)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        LieRAModel.from_pretrained(net, d)
    _fresh_is_untouched(net)
    # missing and unexpected tensors
    for edit, msg in (
        (lambda t: t.pop("fc.A"), r"missing \['fc.A'\]"),
        (lambda t: t.__setitem__("extra.A", torch.zeros(1)), r"unexpected \['extra.A'\]"),
    ):
        t = dict(tensors)
        edit(t)
        save_file(t, wpath)
        net = Net().to(DT)
        with pytest.raises(CheckpointError, match=msg):
            LieRAModel.from_pretrained(net, d)
        _fresh_is_untouched(net)
    save_file(tensors, wpath)
    # a model without the targeted module
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="match no module"):
        LieRAModel.from_pretrained(net, d)
    assert type(net[0]) is nn.Linear
    # corrupt tensor file
    with open(wpath, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        LieRAModel.from_pretrained(Net().to(DT), d)


def test_target_errors_name_the_culprit():
    with pytest.raises(ConfigError, match=r"\['nope'\]"):
        get_peft_model(Net(), LieRAConfig(target_modules=["conv1", "nope"]))
    with pytest.raises(ConfigError, match="match no module"):
        get_peft_model(Net(), LieRAConfig(target_modules=r"zz\d+"))
    with pytest.raises(ConfigError, match=r"modules_to_save entries \['missing'\]"):
        get_peft_model(Net(), LieRAConfig(target_modules=["fc"], modules_to_save=["missing"]))
    with pytest.raises(ConfigError, match="both target_modules"):
        get_peft_model(Net(), LieRAConfig(target_modules=["fc"], modules_to_save=["fc"]))
    net = Net()
    with pytest.raises(UnsupportedModuleError, match="'block'"):
        get_peft_model(net, LieRAConfig(target_modules=["conv1", "block"]))
    assert type(net.conv1) is nn.Conv2d  # nothing injected on failure
    # suffix semantics: "onv1" does not match "conv1"
    with pytest.raises(ConfigError, match="onv1"):
        get_peft_model(Net(), LieRAConfig(target_modules=["onv1"]))


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(5, 3), nn.ConvTranspose2d(2, 2, 3), nn.LazyLinear(3), nn.LayerNorm(3)],
)
def test_unsupported_modules_refused(module):
    m = nn.Sequential()
    m.add_module("thing", module)
    with pytest.raises(UnsupportedModuleError, match="'thing'"):
        get_peft_model(m, LieRAConfig(target_modules=["thing"]))


def test_multihead_attention_out_proj_refused():
    m = nn.Sequential()
    m.add_module("attn", nn.MultiheadAttention(4, 2))
    with pytest.raises(UnsupportedModuleError, match="out_proj"):
        get_peft_model(m, LieRAConfig(target_modules=["out_proj"]))


def test_regex_targets_and_exclude():
    model = get_peft_model(Net(), LieRAConfig(target_modules=r".*conv\d|block\.[02]",
                                              exclude_modules=["block.2"]))
    names = [n for n, _ in model.lie_layers()]
    assert names == ["conv1", "block.0"]


def test_zero_weight_warning():
    net = nn.Sequential(nn.Conv2d(2, 4, 3))
    with torch.no_grad():
        net[0].weight[:2] = 0
    with pytest.warns(UserWarning, match="exactly zero"):
        get_peft_model(net, LieRAConfig(target_modules=["0"]))
    net2 = nn.Sequential(nn.Conv2d(2, 4, 3))
    with torch.no_grad():
        net2[0].weight[:2] = 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(net2, LieRAConfig(target_modules=["0"], update="additive"))


@pytest.mark.parametrize(
    ("kwargs", "err", "msg"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.0}, DTypeError, "rank"),
        ({"rank": 10**9}, ValueError, "rank"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"alpha": "1"}, DTypeError, "alpha"),
        ({"exp_map": "second"}, ValueError, "exp_map"),
        ({"exp_map": 0}, ValueError, "Taylor order"),
        ({"exp_map": 1.5}, DTypeError, "exp_map"),
        ({"layout": "weird"}, ValueError, "layout"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"target_modules": []}, ValueError, "empty"),
        ({"target_modules": "("}, ValueError, "regular expression"),
        ({"target_modules": 3}, DTypeError, "target_modules"),
        ({"generator": "nope"}, ValueError, "unknown generator"),
        ({"update": "nope"}, ValueError, "unknown update"),
        ({"use_rslora": 1}, DTypeError, "use_rslora"),
    ],
)
def test_config_errors(kwargs, err, msg):
    base = {"target_modules": ["fc"]}
    with pytest.raises(err, match=msg):
        LieRAConfig(**{**base, **kwargs})


def test_rslora_scaling():
    assert LieRAConfig(rank=4, alpha=8.0, target_modules=["a"], use_rslora=True).scaling == 4.0


def test_adapted_weight_shape_error():
    with pytest.raises(ShapeError):
        adapted_weight(torch.ones(2, 3), torch.ones(3, 2))


def test_custom_generator_in_a_few_lines(tmp_path):
    @register_generator
    class Dense(Generator):
        name = "dense_test"

        def __init__(self, spec: GeneratorSpec) -> None:
            super().__init__(spec)
            self.D = nn.Parameter(torch.zeros(spec.weight_shape, dtype=spec.dtype))

        def forward(self) -> torch.Tensor:
            return self.scaling * self.D

    net, model, x = (lambda: (None, None, None))()
    torch.manual_seed(0)
    net = Net().to(DT)
    model = get_peft_model(net, LieRAConfig(rank=1, target_modules=["conv1"], generator=Dense))
    assert model.peft_config["default"].generator == "dense_test"
    x = torch.randn(1, 3, 8, 8, dtype=DT)
    _perturb(model)
    y = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    assert torch.equal(LieRAModel.from_pretrained(Net().to(DT), tmp_path)(x), y)
    with pytest.raises(ConfigError, match="dropout"):
        get_peft_model(Net(), LieRAConfig(target_modules=["conv1"], generator=Dense,
                                          dropout=0.1))


def _lora_generator() -> LoRAGenerator:
    return LoRAGenerator(GeneratorSpec(weight_shape=(4, 3), rank=2, scaling=1.0))


_WRONG_TYPES = {
    "config": ("LieRAConfig", lambda: get_peft_model(nn.Linear(3, 4), {"rank": 1})),
    "model": ("torch.nn.Module", lambda: get_peft_model(None, LieRAConfig(target_modules=["0"]))),
    "export_hira": ("LieRAModel", lambda: export_hira(nn.Linear(3, 4), "unused")),
    "get_generator": ("name or a Generator subclass", lambda: get_generator(3)),
    "register_update": ("callable", lambda: register_update("wrong_type_test", 3)),
    "prune_": ("no prunable rank", lambda: _lora_generator().prune_([True, False])),
    "orthogonality_penalty": ("mapping", lambda: orthogonality_penalty([_lora_generator()])),
    "RankAllocator": ("mapping", lambda: RankAllocator(nn.Linear(3, 4), 1, 1, 2, 1, 10)),
}


@pytest.mark.parametrize("entry", list(_WRONG_TYPES))
def test_wrong_argument_types_raise_dtype_error(entry: str) -> None:
    """Every public entry point that checks a Python type raises the typed error, which is
    also a built-in ``TypeError`` and a ``LieGroupError``."""
    match, call = _WRONG_TYPES[entry]
    with pytest.raises(DTypeError, match=match) as err:
        call()
    assert isinstance(err.value, TypeError) and isinstance(err.value, LieGroupError)


def test_register_generator_errors():
    with pytest.raises(DTypeError, match="Generator subclasses"):
        register_generator(nn.Linear)  # type: ignore[arg-type]

    class NoName(Generator):
        pass

    with pytest.raises(ConfigError, match="name"):
        register_generator(NoName)

    class Clash(Generator):
        name = "lora"

    with pytest.raises(ConfigError, match="already taken"):
        register_generator(Clash)


def test_the_default_map_is_the_updates_own_and_is_stored():
    """``exp_map=None`` resolves to first order for the Hadamard update (the demo's evidence)
    and to the exact map for the mode-wise groups, which need it; the config keeps the value.
    """
    assert LieRAConfig(target_modules=["x"]).exp_map == "first_order"
    cfg = LieRAConfig(target_modules=["x"], update="so", generator="modewise")
    assert cfg.exp_map == "exact"
    assert LieRAConfig.from_dict(cfg.to_dict()).exp_map == "exact"
    assert LieRAConfig(target_modules=["x"], exp_map="exact").exp_map == "exact"
