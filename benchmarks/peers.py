"""Adapters from other libraries (HF peft LoRA/HiRA/AdaLoRA, LyCORIS LoCon), when installed.

Each builder takes a model and the dotted names of the modules to adapt and returns the
wrapped model (base frozen, adapter trainable), or raises — a library's refusal (e.g. peft LoRA
on a depthwise conv) is reported in the table as the method's note.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

RANK = 8


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _peft(kind: str) -> Callable[[nn.Module, list[str], list[str]], nn.Module]:
    def build(model: nn.Module, targets: list[str], save: list[str]) -> nn.Module:
        import peft

        common = {"target_modules": targets, "modules_to_save": save or None}
        if kind == "lora":
            cfg: object = peft.LoraConfig(r=RANK, lora_alpha=RANK, **common)
        elif kind == "hira":
            cfg = peft.HiraConfig(r=RANK, **common)
        else:
            cfg = peft.AdaLoraConfig(
                init_r=RANK, target_r=RANK // 2, lora_alpha=RANK, total_step=1000, **common
            )
        return peft.get_peft_model(model, cfg)  # type: ignore[arg-type]

    return build


def _locon(model: nn.Module, targets: list[str], save: list[str]) -> nn.Module:
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset(
        {"enable_conv": True, "target_module": [], "target_name": targets}
    )
    for p in model.parameters():
        p.requires_grad_(False)
    net = create_lycoris(
        model, 1.0, linear_dim=RANK, linear_alpha=RANK, conv_dim=RANK, conv_alpha=RANK,
        algo="locon", warn_on_unmatched=False,
    )
    net.apply_to()
    n = sum(1 for _ in net.parameters())
    if n == 0:
        raise RuntimeError("LyCORIS matched no module")
    for name in save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    holder = _WithNet(model, net)
    return holder


class _WithNet(nn.Module):
    """Keeps the LyCORIS network registered so its parameters reach the optimizer."""

    def __init__(self, model: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.net = net

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.model(x)


def available() -> dict[str, Callable[[nn.Module, list[str], list[str]], nn.Module]]:
    """Peer methods whose library is installed, by row name."""
    out: dict[str, Callable[[nn.Module, list[str], list[str]], nn.Module]] = {}
    if _has("peft"):
        out["peft LoRA"] = _peft("lora")
        out["peft HiRA"] = _peft("hira")
        out["peft AdaLoRA"] = _peft("adalora")
    if _has("lycoris"):
        out["LyCORIS LoCon"] = _locon
    return out
