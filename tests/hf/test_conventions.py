"""peft's conventions without transformers: target matching, get_base_model, forward signature."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from liegroup.errors import ConfigError
from liegroup.peft import LieRAConfig, get_peft_model


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1)
        self.block = _Block()


@pytest.mark.parametrize("targets", [["conv1", "block.conv1"], ["block.conv1", "conv1"],
                                     ["block.conv1"]])
def test_target_matching_is_order_free(targets) -> None:
    m = get_peft_model(_Net(), LieRAConfig(rank=1, target_modules=targets))
    names = sorted(n for n, _ in m.lie_layers())
    want = ["block.conv1"] if targets == ["block.conv1"] else ["block.conv1", "conv1"]
    assert names == want


def test_get_base_model_and_signature() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
            return self.fc(pixel_values)

    net = Net()
    m = get_peft_model(net, LieRAConfig(rank=1, target_modules=["fc"]))
    assert m.get_base_model() is net
    assert list(inspect.signature(m.forward).parameters) == ["pixel_values", "labels"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(m(x), net(x))
    torch.testing.assert_close(m(pixel_values=x), net(x))
    # the bound forward follows a deep copy (it is not a closure over the original)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.get_base_model().fc.base_layer.weight.add_(1.0)
    assert not torch.allclose(c(x), m(x))


def test_unmatched_entry_still_reported() -> None:
    with pytest.raises(ConfigError, match="conv9"):
        get_peft_model(_Net(), LieRAConfig(rank=1, target_modules=["conv1", "conv9"]))
