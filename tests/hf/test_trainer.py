"""transformers' Trainer with a LieRAModel: the forward signature, adapter-only saving."""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model
from tests.hf._models import tiny_llama

transformers = pytest.importorskip("transformers")


def test_forward_signature_is_the_base_models() -> None:
    llama = tiny_llama()
    model = get_peft_model(llama, LieRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    params = inspect.signature(model.forward).parameters
    assert list(params) == list(inspect.signature(llama.forward).parameters)
    assert "input_ids" in params and "labels" in params
    assert model.get_base_model() is llama


def test_trainer_keeps_columns_trains_and_saves_adapter_only(tmp_path) -> None:
    pytest.importorskip("accelerate")
    llama = tiny_llama()
    fresh = copy.deepcopy(llama)
    model = get_peft_model(llama, LieRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
         "text": "an unused column"}
        for ids in torch.randint(0, 97, (8, 10))
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )
    a0 = model.get_base_model().model.layers[0].self_attn.q_proj.generators["default"].B.clone()
    from liegroup.peft.interop.trainer import LieRATrainer

    # the "text" column reaches the model only if the Trainer misreads its signature
    trainer = LieRATrainer(model=model, args=args, train_dataset=rows)
    assert sorted(next(iter(trainer.get_train_dataloader()))) == [
        "attention_mask", "input_ids", "labels"]
    trainer.train()
    b = model.get_base_model().model.layers[0].self_attn.q_proj.generators["default"].B
    assert not torch.equal(a0, b)  # it trained
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    files = sorted(os.listdir(out))
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files
    # a checkpoint resumes into the adapter
    with torch.no_grad():
        b.zero_()
    trainer._load_from_checkpoint(str(out))
    assert not torch.equal(b, torch.zeros_like(b))
    loaded = LieRAModel.from_pretrained(fresh, out)
    ids = rows[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-6, rtol=1e-6)
