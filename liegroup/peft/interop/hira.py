"""Hugging Face peft's HiRA checkpoints ⇄ LieRA first-order adapters.

HiRA (Huang et al., ICLR 2025; ``peft.HiraConfig``) adapts a weight by
``W' = W + W ⊙ (B·A)`` — LieRA's first-order map ``W + W ⊙ ΔW`` with ``ΔW = B·A`` and no
scale. A LieRA adapter whose update is the Hadamard group's first order
(``exp_map="first_order"`` or ``1``) and whose generator has mode-1 low-rank factors
``ΔW = fold(L·R)`` (LoRA, and AdaLoRA or Tucker on Linear layers) is therefore a HiRA adapter
with ``hira_B = L`` (the scale ``s`` folded in) and ``hira_A = R``, and back.

HF peft stores a HiRA adapter as (``peft/tuners/hira``):

* ``adapter_config.json``: ``peft_type="HIRA"``, ``r``, ``target_modules``,
  ``exclude_modules``, ``hira_dropout``, ``fan_in_fan_out``, ``modules_to_save``,
  ``rank_pattern``, ``layers_to_transform``/``layers_pattern``, ``init_weights``;
* ``adapter_model.safetensors``: ``base_model.model.<module>.hira_A`` / ``.hira_B`` —
  Linear and ``Conv1D``: ``A (r, in)``, ``B (out, r)`` (``Conv1D`` computes with the
  transpose of its ``(in, out)`` weight, ``fan_in_fan_out``); ``Conv{1,2,3}d``:
  ``A (r, C_in, *k)``, ``B (C_out, r, 1, …)`` with ``ΔW[o, i, …] = Σ_r B[o, r] A[r, i, …]``
  (our mode-1 unfolding); ``modules_to_save`` copies as ``base_model.model.<module>.<param>``.

What HiRA cannot express is refused with a typed error, before anything is written or
changed: grouped convs (HiRA raises for them), convs with a ``padding_mode`` other than
``"zeros"`` (HiRA's branch pads with zeros, so its output would differ from the base op's),
3-d convs with a ``1×1×k`` kernel (HiRA's 1×1 shortcut fails on them), embeddings, transposed
convs (:class:`~liegroup.errors.UnsupportedModuleError`); other maps, updates or generators
without mode-1 factors, and checkpoint options we do not read (``layers_to_transform``)
(:class:`~liegroup.errors.CheckpointError`). Dropout is carried over as a number, but the two
libraries apply it to different things (HiRA to the input, LieRA to ``A``): outputs agree in
evaluation, training noise differs.

Example:
    >>> import tempfile, torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    >>> base = {k: v.clone() for k, v in net.state_dict().items()}
    >>> m = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"],
    ...                                     exp_map="first_order"))
    >>> with torch.no_grad():
    ...     _ = m.base_model[0].generators["default"].B.normal_()
    >>> d = tempfile.mkdtemp()
    >>> export_hira(m, d)
    >>> fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)); _ = fresh.load_state_dict(base)
    >>> x = torch.randn(1, 3, 6, 6)
    >>> torch.allclose(import_hira(fresh, d)(x), m(x), atol=1e-6)
    True
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from typing import Any

import torch
from torch import nn

from liegroup.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DTypeError,
    UnsupportedModuleError,
)
from liegroup.peft._engine import is_transposed_linear
from liegroup.peft._files import read_json, read_tensors, write_files
from liegroup.peft.config import CONFIG_NAME, LieRAConfig
from liegroup.peft.layer import LieRALayer
from liegroup.peft.model import WEIGHTS_NAME, LieRAModel, _logical_modules

__all__ = ["export_hira", "import_hira"]

PEFT_TYPE = "HIRA"
_PREFIX = "base_model.model."
# HiRA config fields we read; PeftConfig's bookkeeping fields are ignored on import
_READ = {
    "r", "target_modules", "exclude_modules", "hira_dropout", "fan_in_fan_out",
    "modules_to_save", "rank_pattern", "layers_to_transform", "layers_pattern",
}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------- module checks
def _hira_kind(module: nn.Module, name: str) -> str:
    """``"linear"``, ``"conv1d_t"`` (transformers' ``Conv1D``) or ``"conv"``; else raise.

    Raises:
        UnsupportedModuleError: a module HiRA cannot adapt with LieRA's result.
    """
    label = f"module {name!r} ({type(module).__name__})"
    if is_transposed_linear(module):
        return "conv1d_t"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONV) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"{label}: HiRA does not support grouped convs (groups={module.groups})"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"{label}: padding_mode={module.padding_mode!r}; HiRA's branch pads with zeros, "
                "so its output would differ from the adapted base op"
            )
        k = tuple(module.kernel_size)
        if len(k) == 3 and k[:2] == (1, 1):
            raise UnsupportedModuleError(
                f"{label}: a 3-d kernel {k} starting with 1×1 takes HiRA's 1×1 shortcut, which "
                "fails on it"
            )
        return "conv"
    raise UnsupportedModuleError(
        f"{label}: HiRA interop covers Linear, transformers' Conv1D and Conv1d/2d/3d"
    )


def _to_hira(kind: str, L: torch.Tensor, R: torch.Tensor, W: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hira_A, hira_B)`` from LieRA factors ``ΔW = fold(L @ R)`` of weight ``W``."""
    r = L.shape[1]
    if kind == "conv1d_t":  # W stored (in, out): ΔW = L R, HiRA's (out, in) delta is Rᵀ Lᵀ
        return L.T.contiguous(), R.T.contiguous()
    if kind == "linear":
        return R.contiguous(), L.contiguous()
    ones = (1,) * (W.dim() - 2)
    return R.reshape(r, *W.shape[1:]).contiguous(), L.reshape(W.shape[0], r, *ones).contiguous()


def _from_hira(kind: str, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LieRA mode-1 LoRA ``(B, A)`` (scale 1) from ``(hira_A, hira_B)`` of weight ``W``."""
    r = A.shape[0]
    want_a = (r, W.shape[0]) if kind == "conv1d_t" else (r, *W.shape[1:])
    want_b = (W.shape[1], r) if kind == "conv1d_t" else (W.shape[0], r, *(1,) * (W.dim() - 2))
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        raise CheckpointError(
            f"HiRA factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a weight of "
            f"shape {tuple(W.shape)} (expected A {want_a}, B {want_b})"
        )
    if kind == "conv1d_t":
        return A.T.contiguous(), B.T.contiguous()
    return B.reshape(W.shape[0], r).contiguous(), A.reshape(r, -1).contiguous()


def _exact_names(names: list[str]) -> str:
    """A regex that ``re.fullmatch``-es exactly ``names`` (peft and LieRA read it alike)."""
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _plain(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LieRALayer) else module


# ---------------------------------------------------------------------------- export
def export_hira(
    model: LieRAModel, directory: str | os.PathLike[str], adapter_name: str | None = None
) -> None:
    """Write a LieRA first-order adapter as an HF peft HiRA checkpoint directory.

    ``peft.PeftModel.from_pretrained(base, directory)`` then computes what ``model`` computes:
    for every adapted layer ``W' = W + W ⊙ (B·A)`` with ``B = s·L``, ``A = R`` from the
    generator's factors ``ΔW = fold(L·R)`` (shapes as in the module docstring), and the
    ``modules_to_save`` copies. Files go to temporary names in ``directory`` and are renamed
    at the end, the weights before the config; the model is never changed.

    Args:
        model: the :class:`~liegroup.peft.LieRAModel`; the adapter must use
            ``update="hadamard"`` with ``exp_map="first_order"`` (or ``1``) and a generator
            with mode-1 low-rank factors (``"lora"`` with the default init; AdaLoRA or Tucker
            on Linear layers); each layer a Linear, transformers ``Conv1D`` or an ungrouped
            ``Conv{1,2,3}d`` with zero padding.
        directory: folder to write ``adapter_config.json`` and ``adapter_model.safetensors``
            into (created if needed).
        adapter_name: the adapter to export (default: the active one).

    Raises:
        CheckpointError: another map or update, a generator without mode-1 factors.
        UnsupportedModuleError: a layer HiRA cannot adapt (grouped conv, …).
        AdapterStateError: the adapter is merged (the base weights changed).

    Example:
        >>> import json, os, tempfile, torch
        >>> from liegroup.peft import LieRAConfig, get_peft_model
        >>> m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(5, 3)),
        ...                    LieRAConfig(rank=2, target_modules=["0"], exp_map=1))
        >>> d = tempfile.mkdtemp(); export_hira(m, d)
        >>> cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        >>> cfg["peft_type"], cfg["r"], cfg["target_modules"]
        ('HIRA', 2, '(0)')
    """
    from safetensors.torch import save_file

    if not isinstance(model, LieRAModel):
        raise DTypeError(f"export_hira takes a LieRAModel, got {type(model).__name__}")
    name = model.active_adapter if adapter_name is None else adapter_name
    if name not in model.peft_config:
        raise ConfigError(f"no adapter {name!r}; known: {sorted(model.peft_config)}")
    if model.merged:
        raise AdapterStateError("unmerge_adapter() before exporting (the base weights changed)")
    config = model.peft_config[name]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: list[str] = []
    for lname, layer in model.lie_layers():
        if name not in layer.generators:
            continue
        kind = _hira_kind(layer.base_layer, lname)
        form = layer.updates[name].fused_form()
        if form != ("hadamard", 1):
            raise CheckpointError(
                f"layer {lname!r}: HiRA is the Hadamard group's first order; this adapter uses "
                f"update={config.update!r}, exp_map={config.exp_map!r} (export needs "
                "update='hadamard', exp_map='first_order' or 1)"
            )
        gen = layer.generators[name]
        with torch.no_grad(), _eval(gen):
            factors = gen.factors()  # type: ignore[operator]
        W = layer.weight
        rows = W.shape[0]
        if factors is None or factors[0].dim() != 2 or factors[0].shape[0] != rows or (
            factors[1].shape[1] * rows != W.numel()
        ):
            raise CheckpointError(
                f"layer {lname!r}: generator {type(gen).__name__} has no mode-1 low-rank factors "
                "ΔW = fold(L·R) (HiRA's form); export a 'lora' adapter with layout='mode1' and "
                "the default init"
            )
        A, B = _to_hira(kind, factors[0].detach(), factors[1].detach(), W)
        tensors[f"{_PREFIX}{lname}.hira_A"] = A
        tensors[f"{_PREFIX}{lname}.hira_B"] = B
        ranks[lname] = int(factors[0].shape[1])
        kinds.append(kind)
    if not ranks:
        raise CheckpointError(f"adapter {name!r} adapts no layer; nothing to export")
    saves: list[str] = []
    for wname, wrapper in model._save_wrappers():
        if name in wrapper.modules_to_save:
            saves.append(wname)
            for k, v in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"{_PREFIX}{wname}.{k}"] = v.detach()
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(n)}$": k for n, k in sorted(ranks.items()) if k != r}
    hira_config = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "base_model_name_or_path": getattr(
            getattr(model.get_base_model(), "config", None), "_name_or_path", None
        ) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "target_modules": _exact_names(list(ranks)),
        "exclude_modules": None,
        "hira_dropout": float(config.dropout),
        "fan_in_fan_out": all(k == "conv1d_t" for k in kinds),
        "modules_to_save": saves or None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
    }
    _check_saves_match(model.get_base_model(), saves)
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = json.dumps(hira_config, indent=2, sort_keys=True)

    def write_config(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    write_files(directory, {
        WEIGHTS_NAME: lambda p: save_file(cpu, p, metadata={"format": "pt"}),
        CONFIG_NAME: write_config,
    })


class _eval:  # noqa: N801 (a context manager used like a function)
    """Run a module in eval mode (no dropout), restoring its training flags after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def _check_saves_match(base: nn.Module, saves: list[str]) -> None:
    """Refuse ``modules_to_save`` names that peft's rule (``key.endswith(name)``) reads wider."""
    names = [n for n, _ in _logical_modules(base)]
    for s in saves:
        extra = [n for n in names if n != s and n.endswith(s)]
        if extra:
            raise CheckpointError(
                f"modules_to_save entry {s!r} would also select {extra[:3]} under peft's "
                "suffix rule (key.endswith(name)); rename or drop it before exporting"
            )


# ---------------------------------------------------------------------------- import
def import_hira(
    model: nn.Module | LieRAModel,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> LieRAModel:
    """Load an HF peft HiRA checkpoint as a LieRA first-order adapter.

    The adapter becomes ``LieRAConfig(rank=r, alpha=r, exp_map="first_order",
    generator="lora", layout="mode1")`` (scale 1) on exactly the modules the checkpoint has
    tensors for, with ``B``, ``A`` from ``hira_B``, ``hira_A`` (reshaped; transposed and
    swapped for ``Conv1D``), and the ``modules_to_save`` copies. The model computes what
    peft's ``PeftModel`` computes with that checkpoint. All or nothing: on any error the model
    is left as it was.

    Args:
        model: the base model (an ``nn.Module``, modified in place and wrapped) or a
            :class:`~liegroup.peft.LieRAModel` to add the adapter to.
        directory: a folder with HiRA's ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        adapter_name: the name of the new adapter.
        is_trainable: keep the adapter trainable (default: frozen, for inference).

    Returns:
        The :class:`~liegroup.peft.LieRAModel` (``model`` itself when one was given).

    Raises:
        CheckpointError: not a HiRA checkpoint, missing/unreadable files, options we do not
            read (``layers_to_transform``, ``layers_pattern``), tensors that do not fit.
        UnsupportedModuleError: a checkpoint for a module kind we refuse (see the module
            docstring), e.g. an embedding.

    Example:
        >>> import tempfile, torch
        >>> from liegroup.peft import LieRAConfig, get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(5, 3))
        >>> d = tempfile.mkdtemp()
        >>> export_hira(get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"],
        ...                                             exp_map="first_order")), d)
        >>> m = import_hira(torch.nn.Sequential(torch.nn.Linear(5, 3)), d)
        >>> tuple(m.base_model[0].generators["default"].A.shape)
        (2, 5)
    """
    from safetensors.torch import save_file

    src = os.fspath(directory)
    hira = read_json(src, CONFIG_NAME)
    if hira.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(
            f"not a HiRA adapter config (peft_type={hira.get('peft_type')!r}) in {src!r}"
        )
    for key in ("layers_to_transform", "layers_pattern"):
        if hira.get(key) not in (None, [], ""):
            raise CheckpointError(f"HiRA option {key}={hira[key]!r} is not supported on import")
    tensors = read_tensors(src, WEIGHTS_NAME)

    base = model.get_base_model() if isinstance(model, LieRAModel) else model
    modules = dict(_logical_modules(base))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key.removeprefix(_PREFIX)
        mod, _, leaf = k.rpartition(".")
        if leaf in ("hira_A", "hira_B"):
            factors.setdefault(mod, {})[leaf] = t
        elif leaf.startswith("hira_embedding"):
            raise UnsupportedModuleError(
                f"checkpoint adapts embedding {mod!r}; LieRA does not adapt embeddings"
            )
        else:
            rest[k] = t
    if not factors:
        raise CheckpointError(f"no hira_A/hira_B tensors in {os.path.join(src, WEIGHTS_NAME)}")
    out: dict[str, torch.Tensor] = {}
    for mod, pair in sorted(factors.items()):
        if set(pair) != {"hira_A", "hira_B"}:
            raise CheckpointError(f"module {mod!r}: the checkpoint lacks one of hira_A, hira_B")
        if mod not in modules:
            raise CheckpointError(f"the checkpoint adapts {mod!r}, which the model does not have")
        plain = _plain(modules[mod])
        kind = _hira_kind(plain, mod)
        W = plain.weight
        assert isinstance(W, torch.Tensor)
        B, A = _from_hira(kind, pair["hira_A"], pair["hira_B"], W)
        out[f"{mod}.B"], out[f"{mod}.A"] = B, A
    ranks = {int(p["hira_A"].shape[0]) for p in factors.values()}
    if len(ranks) != 1:
        # LieRAConfig has one rank for every layer: the layers' own ranks come from a
        # rank pattern that we do not write; refuse rather than pad
        raise CheckpointError(f"layers of different ranks {sorted(ranks)} are not supported")
    r = ranks.pop()
    saves = _split_saves(rest, modules, hira.get("modules_to_save"))
    for sname, state in saves.items():
        for k, v in state.items():
            out[f"modules_to_save.{sname}.{k}"] = v
    dropout = float(hira.get("hira_dropout") or 0.0)
    cfg = LieRAConfig(
        rank=r, alpha=float(r), target_modules=_exact_names(list(factors)),
        modules_to_save=_exact_names(list(saves)) if saves else None,
        exp_map="first_order", generator="lora", layout="mode1", dropout=dropout,
        update="hadamard",
    )
    with tempfile.TemporaryDirectory(prefix="liegroup-hira-") as tmp:
        cfg.save(tmp)
        save_file(out, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        if isinstance(model, LieRAModel):
            model.load_adapter(tmp, adapter_name, is_trainable=is_trainable)
            return model
        return LieRAModel.from_pretrained(model, tmp, adapter_name, is_trainable=is_trainable)


def _split_saves(
    rest: dict[str, torch.Tensor], modules: dict[str, nn.Module], spec: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """``modules_to_save`` tensors by module (the longest module name that owns each key)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in rest.items():
        owner = max((n for n in modules if n and k.startswith(n + ".")), key=len, default=None)
        if owner is None:
            raise CheckpointError(f"checkpoint tensor {k!r} belongs to no module of the model")
        out.setdefault(owner, {})[k[len(owner) + 1:]] = v
    if out and not spec:
        raise CheckpointError(
            f"checkpoint has tensors for {sorted(out)[:3]} but no modules_to_save in its config"
        )
    return out
