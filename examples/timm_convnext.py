"""LieRA on the convolutions of timm's ConvNeXt-Atto: train, merge, save, load.

``convnext_atto`` is built from its config (``pretrained=False``, random weights, nothing
downloaded) with a new 10-way head. Every convolution — the 4×4 stride-4 stem, the 7×7
depthwise convs of the blocks, the 2×2 stride-2 downsampling convs — gets a LieRA adapter
(exact map, LoRA generator in the mode-1 layout, which covers depthwise kernels); the head is
trained in full (``modules_to_save``). Checked, and printed as a table:

* identity at step 0 (the adapted model computes the base model's outputs bit for bit);
* a few training steps on a fixed batch lower the loss;
* ``merge_adapter`` gives the same outputs (eval mode);
* ``save_pretrained`` → ``LieRAModel.from_pretrained`` on a fresh copy gives the same outputs.

Needs ``timm`` (with a working torchvision; not in the ``hf`` extra, see ``pyproject.toml``).
Run: ``.venv/bin/python -m examples.timm_convnext`` (CPU, a few seconds).
"""

from __future__ import annotations

import copy
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from liegroup.peft import LieRAConfig, LieRAModel, get_peft_model


def main() -> int:
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision's CUDA wheel next to a CPU torch
        print(f"needs timm with a working torchvision: {type(e).__name__}: {e}")
        return 0
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a small model and batch: one thread (the CPU may be shared)
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    pristine = copy.deepcopy(base)
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    depthwise = [n for n in convs if base.get_submodule(n).groups > 1]
    cfg = LieRAConfig(
        rank=4, alpha=4.0, exp_map="exact",
        target_modules="(" + "|".join(re.escape(n) for n in convs) + ")",  # exact names
        modules_to_save=["head.fc"],
    )
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    base.eval()
    with torch.no_grad():
        y_base = base(x)
    model = get_peft_model(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    rows: list[tuple[str, str]] = []
    with torch.no_grad():
        same0 = torch.equal(model(x), y_base)
    rows.append(("identity at step 0 (bit for bit)", "yes" if same0 else "NO"))

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    rows.append(("training loss, step 1 -> 10", f"{losses[0]:.3f} -> {losses[-1]:.3f}"))

    model.eval()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        out = model(x)
        model.save_pretrained(tmp)
        size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        model.merge_adapter()
        d_merge = float((model(x) - out).abs().max())
        model.unmerge_adapter()
        loaded = LieRAModel.from_pretrained(pristine, tmp)
        d_load = float((loaded(x) - out).abs().max())
    rows.append(("merge_adapter: max |Δout|", f"{d_merge:.1e}"))
    rows.append((f"save ({size / 1024:.0f} KiB) -> from_pretrained: max |Δout|", f"{d_load:.1e}"))

    print(f"timm convnext_atto ({total:,d} parameters): LieRA exact, rank 4, on {len(convs)} "
          f"convs ({len(depthwise)} depthwise) + head.fc in full: {trainable:,d} trainable")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  {'wall time':<{width}}  {time.perf_counter() - t0:.1f} s")
    ok = same0 and losses[-1] < losses[0] and d_merge < 1e-4 and d_load < 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
