"""``transformers.Trainer`` with a :class:`~liegroup.peft.LieRAModel`: adapter-only checkpoints.

A plain ``transformers.Trainer`` trains a ``LieRAModel`` as it is (the wrapper exposes the
base model's forward signature, so the Trainer keeps the input columns the base model takes).
What it cannot do by itself is *save* an adapter: ``Trainer._save`` calls ``save_pretrained``
only on the two classes it knows by type, ``PreTrainedModel`` and HF peft's ``PeftModel``
(``transformers/trainer.py``, ``supported_classes``); any other module is saved as its full
``state_dict()`` in ``model.safetensors``. HF peft gets adapter-only checkpoints because
transformers imports ``PeftModel`` and checks for it; nothing duck-typed is consulted.

:class:`LieRATrainer` is the equivalent for LieRA: a ``Trainer`` whose ``_save`` writes
``adapter_config.json`` + ``adapter_model.safetensors`` (``LieRAModel.save_pretrained``) and
whose checkpoint loading (``resume_from_checkpoint``, ``load_best_model_at_end``) reads them
back into the adapter. Every other behaviour is the ``Trainer``'s.

Needs ``transformers`` (the ``hf`` extra); importing this module imports it.

Example:
    >>> import torch, transformers
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> from liegroup.peft.interop.trainer import LieRATrainer
    >>> issubclass(LieRATrainer, transformers.Trainer)
    True
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from liegroup.errors import CheckpointError
from liegroup.peft.config import CONFIG_NAME
from liegroup.peft.model import WEIGHTS_NAME, LieRAModel

__all__ = ["LieRATrainer"]

_TRAINING_ARGS_NAME = "training_args.bin"


def _lie_model(model: Any) -> LieRAModel | None:
    """The ``LieRAModel`` under DDP / compile wrappers, or ``None``."""
    for _ in range(4):
        if isinstance(model, LieRAModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


class LieRATrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose saved model is the LieRA adapter, not the full model.

    ``save_model(dir)`` (and every checkpoint) writes ``adapter_config.json`` and
    ``adapter_model.safetensors`` of the active adapter, plus what the Trainer always writes
    (``training_args.bin``, the processing class); ``LieRAModel.from_pretrained(base, dir)``
    loads it. Resuming from a checkpoint and ``load_best_model_at_end`` copy the saved
    tensors back into the active adapter. A model that is not a ``LieRAModel`` is handled as
    by ``Trainer``.

    Example:
        >>> import tempfile, torch, transformers
        >>> from liegroup.peft import LieRAConfig, get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> m = get_peft_model(net, LieRAConfig(rank=1, target_modules=["0"]))
        >>> d = tempfile.mkdtemp()
        >>> args = transformers.TrainingArguments(output_dir=d, report_to=[], use_cpu=True)
        >>> LieRATrainer(model=m, args=args).save_model(d)
        >>> sorted(f for f in os.listdir(d) if f.startswith("adapter"))
        ['adapter_config.json', 'adapter_model.safetensors']
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _lie_model(self.model)
        if model is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        out = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or out is None:
            return
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        torch.save(self.args, os.path.join(out, _TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = _lie_model(self.model if model is None else model)
        if target is None or not _is_adapter_dir(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        _load_into(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = _lie_model(self.model)
        best = self.state.best_model_checkpoint
        if target is None or best is None or not _is_adapter_dir(best):
            super()._load_best_model()
            return
        _load_into(target, best)


def _is_adapter_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
        os.path.join(directory, WEIGHTS_NAME)
    )


def _load_into(model: LieRAModel, directory: str) -> None:
    """Copy a saved adapter's tensors into the active adapter (all or nothing)."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    live = model.adapter_state_dict(live=True)
    if set(live) != set(tensors) or any(live[k].shape != tensors[k].shape for k in live):
        raise CheckpointError(
            f"checkpoint {directory!r} does not fit the active adapter "
            f"{model.active_adapter!r}; nothing was loaded"
        )
    with torch.no_grad():
        for k, v in live.items():
            v.copy_(tensors[k])
