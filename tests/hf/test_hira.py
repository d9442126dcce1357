"""HF peft HiRA checkpoints ⇄ LieRA first-order adapters (skipped without peft)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from liegroup.errors import AdapterStateError, CheckpointError, UnsupportedModuleError
from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model
from liegroup.peft.interop import export_hira, import_hira
from tests.hf._models import tiny_gpt2

peft = pytest.importorskip("peft")
if not hasattr(peft, "HiraConfig"):
    pytest.skip("peft without HiRA (needs peft>=0.20)", allow_module_level=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.c3 = nn.Conv1d(6, 4, 3, padding="same")
        self.fc = nn.Linear(4 * 16, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))  # (n, 6, 4, 4)
        y = self.c3(y.flatten(2))                          # (n, 4, 16)
        return self.head(torch.tanh(self.fc(y.flatten(1))))


def _randomise(model: LieRAModel, std: float = 0.2) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in model.lie_layers():
            for g in layer.generators.values():
                g.B.normal_(std=std)


def _trained(net: nn.Module, targets: list[str], saves: list[str] | None = None,
             exp_map: str | int = "first_order") -> LieRAModel:
    m = get_peft_model(net, LieRAConfig(rank=3, alpha=6.0, target_modules=targets,
                                        modules_to_save=saves, exp_map=exp_map))
    _randomise(m)
    if saves:
        with torch.no_grad():
            for _, w in m._save_wrappers():
                for p in w.modules_to_save["default"].parameters():
                    p.add_(0.1)
    return m.eval()


def test_hira_round_trip_conv_and_linear(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    fresh = copy.deepcopy(net)
    fresh2 = copy.deepcopy(net)
    ours = _trained(net, ["c1", "c2", "c3", "fc"], saves=["head"])
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        y = ours(x)
    export_hira(ours, tmp_path / "hira")
    assert sorted(os.listdir(tmp_path / "hira")) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "hira").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), y, atol=1e-5, rtol=1e-5)
    # and back: peft's own save → our import
    theirs.save_pretrained(tmp_path / "again")
    back = import_hira(fresh2, tmp_path / "again")
    assert back.peft_config["default"].exp_map == "first_order"
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, atol=1e-5, rtol=1e-5)


def test_peft_trained_hira_imports_equal(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    fresh = copy.deepcopy(net)
    cfg = peft.HiraConfig(r=2, target_modules=["c1", "c3", "fc"], init_weights=False)
    theirs = peft.get_peft_model(net, cfg).eval()
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 4, 4)
    ours = import_hira(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_hira_conv3d_and_taylor_order_one(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 27, 2))
    fresh = copy.deepcopy(net)
    ours = _trained(net, ["0", "2"], exp_map=1)
    export_hira(ours, tmp_path)
    x = torch.randn(2, 2, 3, 3, 3)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_hira_both_ways(tmp_path) -> None:
    gpt = tiny_gpt2()
    fresh, fresh2 = copy.deepcopy(gpt), copy.deepcopy(gpt)
    ours = _trained(gpt, ["c_attn", "c_proj"])
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        y = ours(input_ids=ids).logits
    export_hira(ours, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "h").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, y, atol=1e-4, rtol=1e-4)
    back = import_hira(fresh2, tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module, err", [
    (nn.Conv2d(4, 4, 3, groups=2), UnsupportedModuleError),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), UnsupportedModuleError),
    (nn.Conv3d(4, 4, (1, 1, 3)), UnsupportedModuleError),
])
def test_export_refuses_what_hira_cannot_express(tmp_path, module, err) -> None:
    m = _trained(nn.Sequential(module), ["0"])
    with pytest.raises(err):
        export_hira(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_other_maps_and_merged(tmp_path) -> None:
    for kw in ({"exp_map": "exact"}, {"exp_map": 2}, {"update": "additive"}):
        m = get_peft_model(nn.Sequential(nn.Linear(3, 3)),
                           LieRAConfig(rank=1, target_modules=["0"], **kw))
        with pytest.raises(CheckpointError):
            export_hira(m, tmp_path)
    m = _trained(nn.Sequential(nn.Linear(3, 3)), ["0"])
    m.merge_adapter()
    with pytest.raises(AdapterStateError):
        export_hira(m, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_old_files_on_failure(tmp_path) -> None:
    good = _trained(nn.Sequential(nn.Linear(3, 3)), ["0"])
    export_hira(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = _trained(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), ["0"])
    with pytest.raises(UnsupportedModuleError):
        export_hira(bad, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_import_is_all_or_nothing(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["fc"]))
    theirs.save_pretrained(tmp_path / "lora")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="peft_type"):
        import_hira(net, tmp_path / "lora")
    # a HiRA checkpoint whose shapes do not fit: nothing changes
    other = peft.get_peft_model(nn.Sequential(nn.Linear(7, 2)),
                                peft.HiraConfig(r=2, target_modules=["0"]))
    other.save_pretrained(tmp_path / "misfit")
    target = nn.Sequential(nn.Linear(5, 2))
    snap = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError):
        import_hira(target, tmp_path / "misfit")
    assert type(target[0]) is nn.Linear
    assert all(torch.equal(v, snap[k]) for k, v in target.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
