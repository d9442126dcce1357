"""LieRA on a tiny Llama with the Hugging Face Trainer: train, save, load, merge, generate.

The model is built from a config (random weights, nothing downloaded) and learns a toy
language — each sequence counts up by a fixed step modulo the vocabulary — with LieRA adapters
on every linear layer of the decoder (attention and MLP). Checked, and printed as a table:

* the Trainer keeps the input columns the model takes and drops the others (``text``), as it
  does for a plain ``LlamaForCausalLM``;
* training lowers the loss;
* ``save_model`` writes the adapter files only (``LieRATrainer``), and
  ``LieRAModel.from_pretrained`` on a fresh copy of the base model gives the same logits;
* ``merge_and_unload`` gives a plain ``LlamaForCausalLM`` with the same logits, and greedy
  ``generate`` gives the same tokens with the adapter and merged.

Needs the ``hf`` extra. Run: ``.venv/bin/python -m examples.hf_llama`` (CPU, well under a
minute).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model

VOCAB, LENGTH, RANK, STEPS = 64, 16, 8, 150
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def counting_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Sequences ``start, start + step, …`` (mod VOCAB) with an extra, unused text column."""
    g = torch.Generator().manual_seed(seed)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (1,), generator=g)
        step = torch.randint(1, 4, (1,), generator=g)
        ids = (start + step * torch.arange(LENGTH)) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                     "text": f"count from {int(start)} by {int(step)}"})
    return rows


def main() -> int:
    try:
        import transformers

        from liegroup.peft.interop.trainer import LieRATrainer
    except ImportError as e:
        print(f"needs the hf extra (pip install -e '.[hf]'): {e}")
        return 0
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest (and the CPU may be shared)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    base = transformers.LlamaForCausalLM(config)
    pristine = copy.deepcopy(base)  # the "pretrained" weights, to load the adapter onto later
    model = get_peft_model(base, LieRAConfig(rank=RANK, alpha=2.0 * RANK, target_modules=LINEAR))
    trainable, total = model.get_nb_trainable_parameters()
    train, held_out = counting_rows(256), counting_rows(8, seed=1)
    ids = torch.stack([r["input_ids"] for r in held_out])  # type: ignore[misc]

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    rows: list[tuple[str, str]] = []
    loss0 = loss_now()
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=os.path.join(tmp, "run"), max_steps=STEPS, per_device_train_batch_size=16,
            learning_rate=5e-2, warmup_steps=5, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        )
        trainer = LieRATrainer(model=model, args=args, train_dataset=train)
        batch = next(iter(trainer.get_train_dataloader()))
        rows.append(("Trainer keeps the model's columns, drops 'text'",
                     ", ".join(sorted(batch))))
        trainer.train()
        loss1 = loss_now()
        rows.append((f"held-out loss before -> after {STEPS} steps",
                     f"{loss0:.3f} -> {loss1:.3f}"))

        out = os.path.join(tmp, "adapter")
        trainer.save_model(out)
        files = sorted(os.listdir(out))
        size = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
        rows.append(("save_model writes", f"{', '.join(files)} ({size / 1024:.0f} KiB)"))

        with torch.no_grad():
            logits = model(input_ids=ids).logits
            loaded = LieRAModel.from_pretrained(copy.deepcopy(pristine), out)
            d_load = float((loaded(input_ids=ids).logits - logits).abs().max())
        rows.append(("from_pretrained on a fresh base: max |Δlogits|", f"{d_load:.1e}"))

    prompt = ids[:2, :4]
    with torch.no_grad():
        gen_adapter = model.generate(prompt, max_new_tokens=8, do_sample=False)
        plain = loaded.merge_and_unload()
        d_merge = float((plain(input_ids=ids).logits - logits).abs().max())
        gen_merged = plain.generate(prompt, max_new_tokens=8, do_sample=False)
    rows.append((f"merge_and_unload -> {type(plain).__name__}: max |Δlogits|", f"{d_merge:.1e}"))
    same = torch.equal(gen_adapter, gen_merged)
    rows.append(("greedy generate, adapter vs merged", "same tokens" if same else "DIFFERENT"))

    print(f"tiny Llama ({total:,d} parameters), LieRA rank {RANK} on {len(LINEAR)} linear kinds: "
          f"{trainable:,d} trainable ({100 * trainable / total:.1f} %)")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  {'wall time':<{width}}  {time.perf_counter() - t0:.1f} s")
    ok = loss1 < loss0 and d_load < 1e-5 and d_merge < 1e-4 and same and "text" not in batch
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
