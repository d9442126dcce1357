"""Tiny Hugging Face models built from configs (random weights, no download), and the check
that a compiled model's loss and gradients equal eager's."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32,
                                 bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def assert_compiled_matches_eager(
    loss_e: torch.Tensor, grads_e: dict[str, torch.Tensor],
    loss_c: torch.Tensor, grads_c: dict[str, torch.Tensor], c: float = 256.0,
) -> None:
    """Loss and every (non-zero) gradient within ``c·u`` of eager's, relative to its scale.

    Eager and compiled runs evaluate the same expression with other roundings, a few ``u`` per
    operation; through a few blocks and a loss that stays within a small multiple of
    ``u·√n`` of each value's scale (``n`` the widest reduction, ≤ 97 in these models).
    """
    u = torch.finfo(torch.float32).eps / 2
    assert len(grads_e) > 0 and grads_e.keys() == grads_c.keys()
    torch.testing.assert_close(loss_c, loss_e, rtol=c * u, atol=0.0)
    for name, g in grads_e.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: the gradient should be non-trivial"
        err = (grads_c[name] - g).abs().max().item()
        assert err <= c * u * scale, f"{name}: {err:.3g} > {c:g}·u·{scale:.3g}"
