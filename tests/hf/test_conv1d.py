"""GPT-2's Conv1D (weight stored (in, out)) through the one-op LieRA layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model
from liegroup.peft.layer import LieRALayer
from tests.hf._models import tiny_gpt2

transformers = pytest.importorskip("transformers")


def _step(model: nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
def test_gpt2_conv1d_trains_merges_saves(tmp_path, exp_map) -> None:
    gpt = tiny_gpt2()
    fresh = copy.deepcopy(gpt)
    ids = torch.randint(0, 97, (4, 9))
    with torch.no_grad():
        y0 = gpt(input_ids=ids).logits
    model = get_peft_model(gpt, LieRAConfig(rank=4, alpha=8.0, target_modules=["c_attn"],
                                            exp_map=exp_map))
    layers = model.lie_layers()
    assert len(layers) == 2 and all(type(m.base_layer).__name__ == "Conv1D" for _, m in layers)
    with torch.no_grad():  # identity at init
        torch.testing.assert_close(model(input_ids=ids).logits, y0, atol=0, rtol=0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = [_step(model, ids, opt) for _ in range(8)]
    assert losses[-1] < losses[0]
    model.eval()
    w_before = layers[0][1].weight.clone()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        # the adapted weight stays in Conv1D's (in, out) layout
        assert layers[0][1].adapted_weight().shape == w_before.shape == (32, 96)
        model.save_pretrained(tmp_path)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layers[0][1].weight, w_before, atol=1e-6, rtol=1e-6)
    loaded = LieRAModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=1e-6, rtol=1e-6)
        plain = loaded.merge_and_unload()
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(plain(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def test_conv1d_gradients_match_plain_autograd() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()
    layer = LieRALayer(conv, "c")
    layer.add_adapter("a", LieRAConfig(rank=2, target_modules=["c"]))
    gen = layer.generators["a"]
    with torch.no_grad():
        gen.B.normal_()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref = torch.addmm(conv.bias, x.reshape(-1, 5), layer.adapted_weight()).view(3, 4, 6)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, gen.A, gen.B], g)
    want = torch.autograd.grad(ref, [x, gen.A, gen.B], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
