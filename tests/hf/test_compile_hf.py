"""``torch.compile(fullgraph=True)`` of Hugging Face models adapted by LieRA.

A Llama with LieRA on every linear layer and a GPT-2 with LieRA on its transformers ``Conv1D``
layers trace as one graph (``fullgraph=True`` raises on any graph break) in training mode, and
the compiled loss and adapter gradients match eager. AOTAutograd's ``aot_eager`` backend traces
the forward and the joint backward exactly as inductor does, without code generation (which
``tests/peft/test_compile.py`` runs on single layers).

The bound: both runs evaluate the same expression with other roundings (other summation orders
in the attention and the MLP, the decomposed ops of AOTAutograd), each within a few ``u`` per
operation; through two transformer blocks and the cross-entropy the difference stays within a
small multiple of ``u·√n`` of each value's scale, with ``n`` the widest reduction (the vocabulary
and hidden sizes here are ≤ 97): ``256·u``.
"""

from __future__ import annotations

import pytest
import torch

from liegroup.peft import LieRAConfig, get_peft_model
from tests.hf._models import assert_compiled_matches_eager, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(base: torch.nn.Module, targets: list[str], exp_map: str) -> torch.nn.Module:
    model = get_peft_model(base, LieRAConfig(rank=2, target_modules=targets, exp_map=exp_map))
    torch.manual_seed(1)
    with torch.no_grad():  # away from the identity, so that every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    return model.train()


def _loss_and_grads(
    model: torch.nn.Module, run: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("make", "targets", "exp_map"),
    [
        (tiny_llama, LLAMA_TARGETS, "exact"),
        (tiny_llama, LLAMA_TARGETS, "first_order"),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "exact"),
    ],
    ids=["llama-exact", "llama-first_order", "gpt2_conv1d-exact"],
)
def test_compiled_model_has_no_graph_break_and_matches_eager(make, targets, exp_map) -> None:
    torch._dynamo.reset()
    base = make()
    # transformers cannot infer GPT2LMHeadModel's loss type and logs a warning from inside its
    # forward, which Dynamo cannot trace: a graph break of the plain model, adapters or not
    base.loss_type = "ForCausalLM"
    model = _adapted(base, targets, exp_map)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    loss_e, grads_e = _loss_and_grads(model, model, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = _loss_and_grads(model, compiled, ids)
    assert_compiled_matches_eager(loss_e, grads_e, loss_c, grads_c)
