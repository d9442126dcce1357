"""timm's ConvNeXt-Atto with LieRA on every conv (skipped without a working timm)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model


def _timm() -> Any:
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision's CUDA wheel next to a CPU torch
        pytest.skip(f"timm unavailable: {type(e).__name__}: {e}")
    return timm


def test_convnext_atto_convs_train_merge_save_load(tmp_path) -> None:
    timm = _timm()
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", pretrained=False, num_classes=4).eval()
    fresh = copy.deepcopy(base)
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = base(x)
    model = get_peft_model(base, LieRAConfig(
        rank=2, target_modules="(" + "|".join(map(re.escape, convs)) + ")",
        modules_to_save=["head.fc"]))
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert not torch.equal(y, y0)
        model.save_pretrained(tmp_path)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(LieRAModel.from_pretrained(fresh, tmp_path)(x), y)
