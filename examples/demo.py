"""LieRA transfer-learning demo on scikit-learn's handwritten digits (no download).

A small CNN is pretrained on digits 0–4 (cached in ``examples/digits_backbone.safetensors``,
rebuilt when missing) and then adapted, with a new 5-way head, to digits 5–9 from few labelled
examples, by:

* full fine-tuning (every weight),
* head only (the backbone frozen),
* additive LoRA (``W + ΔW``, LoRA generator on the conv layers),
* LieRA first order (``W + W ⊙ ΔW``) and LieRA exact (``W ⊙ exp(ΔW)``), same generator,
* LieRA exact with other generators at about the rank-4 parameter count: AdaLoRA (``P·Λ·Q``,
  initial rank 4 per layer, its :class:`~liegroup.peft.RankAllocator` pruning to an average
  of 2 over training, orthogonality penalty 0.1) and Tucker (core ranks 7 on the channel
  modes, 3 on the kernel modes),

at equal trainable parameters for LoRA/LieRA (same generator and rank; ranks 1 and 4), several
seeds. Every method's learning rate is chosen from the same grid by the mean validation
accuracy over seeds; the test split is only used for the reported numbers. Prints a table and
writes ``out/demo.png`` (accuracy vs trainable parameters).

Run: ``make demo`` (or ``.venv/bin/python -m examples.demo``).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

from liegroup.peft import LieRAConfig, LieRAModel, RankAllocator, get_peft_model
from liegroup.peft.generators import orthogonality_penalty

ROOT = Path(__file__).resolve().parent
BACKBONE = ROOT / "digits_backbone.safetensors"
OUT = ROOT.parent / "out"
SEEDS = (0, 1, 2)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
RANKS = (1, 4)
HEAD_LR = 3e-3  # the new head's rate, fixed in advance and shared by every method
EPOCHS = 30
BATCH = 25
SHOTS = 20  # labelled training examples per target class
N_VAL = 25  # validation examples per target class


class DigitsCNN(nn.Module):
    """Three 3×3 convs, a hidden linear layer and a 5-way head for 8×8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = self.pool(torch.relu(self.conv2(h)))
        h = self.pool(torch.relu(self.conv3(h)))
        return self.head(torch.relu(self.fc(h.flatten(1))))


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def load_data() -> tuple[Split, Split, Split, Split, Split]:
    """Source train/test (digits 0–4) and target train/val/test (digits 5–9, labels 0–4)."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(1234)
    src = torch.nonzero(y < 5).flatten().numpy()
    rng.shuffle(src)
    n_src_test = len(src) // 5
    s_test, s_train = src[:n_src_test], src[n_src_test:]
    tr, va, te = [], [], []
    for c in range(5, 10):
        idx = torch.nonzero(y == c).flatten().numpy()
        rng.shuffle(idx)
        tr += list(idx[:SHOTS])
        va += list(idx[SHOTS : SHOTS + N_VAL])
        te += list(idx[SHOTS + N_VAL :])

    def split(ix: list[int] | np.ndarray, shift: int) -> Split:
        t = torch.as_tensor(np.asarray(ix), dtype=torch.long)
        return Split(x[t], y[t] - shift)

    return split(s_train, 0), split(s_test, 0), split(tr, 5), split(va, 5), split(te, 5)


def accuracy(model: nn.Module, s: Split) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(s.x).argmax(1) == s.y).float().mean().item()
    model.train()
    return acc


def pretrain(src_train: Split, src_test: Split) -> DigitsCNN:
    """Train the backbone on digits 0–4, or load it from the committed cache."""
    net = DigitsCNN()
    if BACKBONE.exists():
        net.load_state_dict(load_file(BACKBONE))
        print(f"loaded cached backbone {BACKBONE.relative_to(ROOT.parent)}")
    else:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in tqdm(range(25), desc="pretraining on digits 0-4", unit="epoch"):
            perm = torch.randperm(len(src_train.y), generator=g)
            for i in range(0, len(perm), 64):
                b = perm[i : i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(net(src_train.x[b]), src_train.y[b]).backward()
                opt.step()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, BACKBONE)
        print(f"saved backbone to {BACKBONE.relative_to(ROOT.parent)}")
    print(f"backbone accuracy on held-out digits 0-4: {accuracy(net, src_test):.3f}")
    return net


def build(method: str, rank: int, backbone: DigitsCNN, seed: int) -> tuple[nn.Module, list]:
    """Model and optimizer parameter groups (the lr of group 0 is the tuned one)."""
    torch.manual_seed(seed)
    net = DigitsCNN()
    net.load_state_dict(backbone.state_dict())
    net.head = nn.Linear(64, 5)  # new task, new head (seeded)
    if method == "full":
        body = [p for n, p in net.named_parameters() if not n.startswith("head.")]
        return net, [body, list(net.head.parameters())]
    if method == "head only":
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.head.parameters():
            p.requires_grad_(True)
        return net, [list(net.head.parameters())]
    group, exp_map, generator, kwargs = {
        "LoRA (W+ΔW)": ("additive", "exact", "lora", {}),
        "LieRA first order": ("hadamard", "first_order", "lora", {}),
        "LieRA exact": ("hadamard", "exact", "lora", {}),
        "LieRA exact, AdaLoRA": ("hadamard", "exact", "adalora", {}),
        "LieRA exact, Tucker": ("hadamard", "exact", "tucker", {"kernel_rank": 3}),
    }[method]
    cfg = LieRAConfig(
        rank=rank,
        alpha=float(rank),
        target_modules=["conv1", "conv2", "conv3"],
        modules_to_save=["head"],
        update=group,
        exp_map=exp_map,
        generator=generator,
        generator_kwargs=kwargs,
    )
    model = get_peft_model(net, cfg)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and ".generators." in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    return model, [adapters, head]


def train(model: nn.Module, groups: list, lr: float, data: Split, seed: int) -> None:
    opt_groups = [{"params": groups[0], "lr": lr}]
    if len(groups) > 1:
        opt_groups.append({"params": groups[1], "lr": HEAD_LR})
    opt = torch.optim.Adam(opt_groups)
    g = torch.Generator().manual_seed(seed)
    model.train()
    adalora = (
        isinstance(model, LieRAModel) and model.peft_config["default"].generator == "adalora"
    )
    alloc = None
    if adalora:
        assert isinstance(model, LieRAModel)
        total = EPOCHS * -(-len(data.y) // BATCH)
        alloc = RankAllocator(model.generators(), target_r=2, tinit=total // 10, tfinal=total // 5,
                              deltaT=5, total_step=total, optimizer=opt)
    t = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(data.y), generator=g)
        for i in range(0, len(perm), BATCH):
            b = perm[i : i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x[b]), data.y[b])
            if alloc is not None:
                assert isinstance(model, LieRAModel)
                loss = loss + 0.1 * orthogonality_penalty(model.generators())
            loss.backward()
            opt.step()
            if alloc is not None:
                alloc.step(t)
            t += 1


def n_trainable(groups: list) -> int:
    return sum(p.numel() for grp in groups for p in grp)


def main() -> None:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    src_train, src_test, tr, va, te = load_data()
    print(
        f"target task: digits 5-9, {len(tr.y)} training / {len(va.y)} validation / "
        f"{len(te.y)} test images"
    )
    backbone = pretrain(src_train, src_test)
    configs = [("full", 0), ("head only", 0)] + [
        (m, r) for r in RANKS for m in ("LoRA (W+ΔW)", "LieRA first order", "LieRA exact")
    ] + [("LieRA exact, AdaLoRA", 4), ("LieRA exact, Tucker", 7)]
    runs = len(configs) * len(LRS) * len(SEEDS)
    # results[(method, rank)][lr] = list of (val, test, seconds) over seeds
    results: dict[tuple[str, int], dict[float, list[tuple[float, float, float]]]] = {}
    params: dict[tuple[str, int], int] = {}
    with tqdm(total=runs, desc="fine-tuning", unit="run") as bar:
        for key in configs:
            method, rank = key
            results[key] = {}
            for lr in LRS:
                results[key][lr] = []
                for seed in SEEDS:
                    bar.set_postfix_str(f"{method} r={rank} lr={lr:g} seed={seed}")
                    model, groups = build(method, rank, backbone, seed)
                    params[key] = n_trainable(groups)
                    t0 = time.perf_counter()
                    train(model, groups, lr, tr, seed)
                    dt = time.perf_counter() - t0
                    results[key][lr].append((accuracy(model, va), accuracy(model, te), dt))
                    bar.update()

    rows = []
    for key in configs:
        best_lr = max(LRS, key=lambda lr: statistics.mean(v for v, _, _ in results[key][lr]))
        r = results[key][best_lr]
        tests = [t for _, t, _ in r]
        rows.append(
            (
                key,
                params[key],
                best_lr,
                statistics.mean(v for v, _, _ in r),
                statistics.mean(tests),
                statistics.stdev(tests),
                statistics.mean(s for _, _, s in r),
            )
        )
    print(
        f"\nlearning rate chosen per method from {list(LRS)} by mean validation accuracy over "
        f"seeds {list(SEEDS)}; new head at lr {HEAD_LR:g}; test accuracy mean ± std over seeds\n"
    )
    print(
        "| method | rank | trainable params | chosen lr | val acc | test acc | time / run (s) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for (method, rank), n, lr, val, mean, std, sec in rows:
        rk = str(rank) if rank else "-"
        print(
            f"| {method} | {rk} | {n:,d} | {lr:g} | {val:.3f} | {mean:.3f} ± {std:.3f} | "
            f"{sec:.2f} |"
        )
    path = plot(rows)
    print(f"\nplot written to {path}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")


def plot(rows: list) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "full": ("black", "s"),
        "head only": ("gray", "D"),
        "LoRA (W+ΔW)": ("tab:blue", "o"),
        "LieRA first order": ("tab:orange", "^"),
        "LieRA exact": ("tab:red", "v"),
        "LieRA exact, AdaLoRA": ("tab:green", "P"),
        "LieRA exact, Tucker": ("tab:purple", "X"),
    }
    for method, (color, marker) in styles.items():
        pts = sorted((n, m, s) for (meth, _), n, _, _, m, s, _ in rows if meth == method)
        if not pts:
            continue
        xs, ms, ss = zip(*pts, strict=True)
        ax.errorbar(xs, ms, yerr=ss, color=color, marker=marker, capsize=3, label=method,
                    linestyle="-" if len(xs) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; LoRA/LieRA at ranks 1 and 4, incl. head)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"digits 0-4 → 5-9, {SHOTS} shots per class")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = OUT / "demo.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.relpath(path)


if __name__ == "__main__":
    main()
