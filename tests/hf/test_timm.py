"""timm's ConvNeXt-Atto and ResNet-18 with LieRA on every conv (skipped without a working timm).

timm needs torchvision, and no torchvision wheel imports beside the pinned CPU torch of the
project's own venv: ``make timm`` builds a separate venv where these tests run.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model
from tests.hf._models import assert_compiled_matches_eager

HEADS = {"convnext_atto": "head.fc", "resnet18": "fc"}
# timm zeroes each ResNet block's last BatchNorm scale, which would leave every block conv's
# gradient exactly 0 in these few steps
KWARGS: dict[str, dict[str, Any]] = {"convnext_atto": {}, "resnet18": {"zero_init_last": False}}


def _timm() -> Any:
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision's CUDA wheel next to a CPU torch
        pytest.skip(f"timm unavailable: {type(e).__name__}: {e}")
    return timm


def _adapt(arch: str, generator: str, exp_map: str) -> tuple[nn.Module, nn.Module]:
    """(an untouched copy of the base, the adapted model) for ``arch``, every conv targeted."""
    timm = _timm()
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=4, **KWARGS[arch]).eval()
    fresh = copy.deepcopy(base)
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    cfg = LieRAConfig(
        rank=2, target_modules="(" + "|".join(map(re.escape, convs)) + ")",
        generator=generator, exp_map=exp_map, modules_to_save=[HEADS[arch]],
    )
    return fresh, get_peft_model(base, cfg)


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
@pytest.mark.parametrize("generator", ["lora", "adalora", "tucker"])
@pytest.mark.parametrize("arch", ["convnext_atto", "resnet18"])
def test_timm_convs_train_merge_save_load(tmp_path, arch, generator, exp_map) -> None:
    fresh, model = _adapt(arch, generator, exp_map)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = fresh(x)
        assert torch.equal(model(x), y0)  # the identity at step 0, bit for bit
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the first step moves only B (A's gradient is 0 while B = 0)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
    still = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, start[n])]
    assert not still, f"not trained: {still}"
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert not torch.equal(y, y0)
        model.save_pretrained(tmp_path)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), y)
        # BatchNorm running statistics moved in training mode; they are base-model state, not
        # adapter state (docs/hf.md): the reload matches once the fresh base has them too
        trained = dict(model.get_base_model().named_buffers())
        for name, buf in fresh.named_buffers():
            buf.copy_(trained[name])
        torch.testing.assert_close(LieRAModel.from_pretrained(fresh, tmp_path)(x), y)


def test_timm_resnet18_compiles_with_fullgraph() -> None:
    _, model = _adapt("resnet18", "lora", "exact")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()

    def grads(run: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = run(x).square().mean()
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    state = copy.deepcopy(model.state_dict())  # BatchNorm statistics move in each run
    loss_e, g_e = grads(model)
    model.load_state_dict(state)
    loss_c, g_c = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert_compiled_matches_eager(loss_e, g_e, loss_c, g_c)
