"""The adapter configuration: a dataclass that is also ``adapter_config.json``.

Example:
    >>> from liegroup.peft import LieRAConfig
    >>> cfg = LieRAConfig(rank=4, alpha=8.0, target_modules=["conv1"], exp_map="first_order")
    >>> cfg.scaling
    2.0
    >>> LieRAConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from liegroup._version import __version__
from liegroup.errors import CheckpointError, ConfigError, DTypeError
from liegroup.peft._files import read_json
from liegroup.peft.generators.base import check_options

__all__ = ["CONFIG_NAME", "LieRAConfig"]

CONFIG_NAME = "adapter_config.json"
MAX_RANK = 65536
"""Largest ``rank`` a config accepts: a bound checked before anything is allocated."""
PEFT_TYPE = "LIERA"
_LAYOUTS = ("mode1", "loralib")


def _check_names(value: object, name: str, allow_none: bool) -> list[str] | str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression: {e}") from e
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if not value and not allow_none:
            raise ConfigError(f"{name} must not be empty")
        return list(value)
    raise DTypeError(
        f"{name} must be a list of module-name suffixes or a regex string, got {value!r}"
    )


@dataclass
class LieRAConfig:
    """Configuration of one LieRA adapter; serialised as ``adapter_config.json``.

    Args:
        rank: rank ``r`` of the generator (LoRA ``B·A``).
        alpha: scale numerator; ``ΔW = (alpha / r)·fold(B·A)`` (``alpha/√r`` with
            ``use_rslora``).
        target_modules: module-name suffixes (``"conv1"`` matches ``"layer1.conv1"`` and
            ``"conv1"``, never ``"xconv1"``), or one regex string matched with ``re.fullmatch``
            against the full dotted name. Every suffix must match at least one module.
        exclude_modules: same syntax; matched modules are skipped.
        modules_to_save: same syntax; matched modules are trained in full (a per-adapter
            copy, e.g. a new classifier head) and saved with the adapter.
        exp_map: ``"first_order"`` (``W + W ⊙ ΔW``), ``"exact"`` (``W ⊙ exp(ΔW)``) or an
            int ``k`` (Taylor order ``k``). ``None`` (the default) takes the update's own
            default and stores it: ``"first_order"`` for ``update="hadamard"`` — on the
            digits demo (two tasks, 5 seeds) it ties the exact map on test accuracy, is ahead
            on validation and tolerates a 10× range of learning rates — and ``"exact"`` for
            the others (the mode-wise groups need it; ``"additive"`` ignores it). Choose
            ``"exact"`` when no weight may change sign, or to unmerge by the group inverse.
        generator: a registered generator name (``"lora"``) or a
            :class:`~liegroup.peft.generators.Generator` subclass (registered on use).
        layout: ``"mode1"`` (rows ``C_out``, cols ``C_in/g·∏k``) or ``"loralib"`` (the paper's
            conv layout; equal kernel sizes only).
        dropout: probability of dropout applied to the generator's input factor ``A`` (keeps
            the forward a single op on ``W'``); ``0`` disables it.
        use_rslora: scale by ``alpha/√r`` instead of ``alpha/r``.
        update: the update rule: ``"hadamard"`` (LieRA, ``W' = W ⊙ exp(ΔW)``) or
            ``"additive"`` (LoRA, ``W' = W + ΔW``; its exponential is the identity so
            ``exp_map`` has no effect).
        generator_kwargs: extra keyword arguments for the generator (JSON-serialisable).
        zero_warning_fraction: warn when more than this fraction of a targeted weight's
            entries are exactly zero (they can never move under the Hadamard group).
        rank_pattern: for rank-allocating generators (AdaLoRA), module name → kept rank
            components (booleans in the original numbering); written by
            :class:`~liegroup.peft.RankAllocator` and ``save_pretrained``, used at load
            to rebuild the pruned shapes. ``None``: nothing pruned.

    ``update`` may also be a mode-wise matrix group (``"so"``, ``"gl"``, ``"sl"``) with a
    mode-wise generator (``generator="modewise"``); see :mod:`liegroup.peft.updates.modewise`.
    A config written with the former name of this field (``group``) still loads.

    Example:
        >>> LieRAConfig(rank=2, target_modules=".*conv.*").target_modules
        '.*conv.*'
    """

    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] | str = field(default_factory=list)
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | str | None = None
    exp_map: str | int | None = None
    generator: Any = "lora"
    layout: str = "mode1"
    dropout: float = 0.0
    use_rslora: bool = False
    update: str = "hadamard"
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    zero_warning_fraction: float = 0.01
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise DTypeError(f"rank must be an int, got {self.rank!r}")
        if not 1 <= self.rank <= MAX_RANK:
            raise ConfigError(
                f"rank must be in [1, {MAX_RANK}], got {self.rank} (a layer also refuses a rank "
                "above both sides of its weight)"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise DTypeError(f"alpha must be a real number, got {type(self.alpha).__name__}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be finite and > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        tm = _check_names(self.target_modules, "target_modules", allow_none=False)
        if not tm:
            raise ConfigError(
                "target_modules is empty: name the modules to adapt, e.g. ['conv1', 'fc']"
            )
        self.target_modules = tm
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules", True)
        self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save", True)
        if self.layout not in _LAYOUTS:
            raise ConfigError(f"layout must be one of {_LAYOUTS}, got {self.layout!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise DTypeError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise DTypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        from liegroup.peft.registry import get_generator, get_update

        if not isinstance(self.update, str):
            raise DTypeError(f"update must be a registered update name, got {self.update!r}")
        if self.exp_map is None:
            self.exp_map = get_update(self.update, "exact").default_exp_map
        update = get_update(self.update, self.exp_map)  # validates the name and the map
        gen_cls = get_generator(self.generator)
        self.generator = gen_cls.name
        u_kind = getattr(update, "algebra_kind", "tensor")
        if u_kind != gen_cls.algebra_kind:
            raise ConfigError(
                f"update={self.update!r} needs a generator whose algebra element is "
                f"{'one matrix per mode' if u_kind == 'modes' else 'a weight-shaped tensor'}, "
                f"but generator={self.generator!r} produces "
                f"{'one matrix per mode' if gen_cls.algebra_kind == 'modes' else 'a tensor'}; "
                + ("use generator='modewise'" if u_kind == "modes" else "use e.g. 'lora'")
            )
        if self.rank_pattern is not None:
            rp = self.rank_pattern
            if not isinstance(rp, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v)
                for k, v in rp.items()
            ):
                raise DTypeError(
                    f"rank_pattern must map module names to lists of booleans, got {rp!r}"
                )
        if not isinstance(self.generator_kwargs, dict):
            raise DTypeError(f"generator_kwargs must be a dict, got {self.generator_kwargs!r}")
        check_options(gen_cls, self.generator_kwargs)
        if not 0.0 <= float(self.zero_warning_fraction) <= 1.0:
            raise ConfigError(
                f"zero_warning_fraction must be in [0, 1], got {self.zero_warning_fraction!r}"
            )

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / √r`` with ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``peft_type`` and ``liegroup_version`` added."""
        d = dataclasses.asdict(self)
        d["peft_type"] = PEFT_TYPE
        d["liegroup_version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LieRAConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys raise :class:`CheckpointError`."""
        d = dict(d)
        peft_type = d.pop("peft_type", PEFT_TYPE)
        d.pop("liegroup_version", None)
        if "group" in d and "update" not in d:  # the field's former name
            d["update"] = d.pop("group")
        if peft_type != PEFT_TYPE:
            raise CheckpointError(f"not a LieRA adapter config: peft_type={peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(
                f"adapter config has unknown fields {unknown}; it was written by another "
                "version or another library"
            )
        try:
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"adapter config is invalid: {e}") from e

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``directory``."""
        self.save_as(os.path.join(directory, CONFIG_NAME))

    def save_as(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON to the file ``path``.

        Example:
            >>> import os, tempfile
            >>> cfg = LieRAConfig(rank=2, target_modules=["fc"])
            >>> with tempfile.TemporaryDirectory() as d:
            ...     cfg.save_as(os.path.join(d, "c.json"))
            ...     sorted(os.listdir(d))
            ['c.json']
        """
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LieRAConfig:
        """Read ``adapter_config.json`` from ``directory``."""
        d = read_json(directory, CONFIG_NAME)
        return cls.from_dict(d)
