"""Checkpoint files: typed reads and all-or-nothing writes, shared by every adapter format.

Reads turn every way a file can be missing or broken into a :class:`CheckpointError` naming
the file. Writes go to temporary names in the target directory and are renamed into place,
in the order given, only after every file is complete; a failure leaves what was there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from liegroup.errors import CheckpointError

__all__ = ["read_json", "read_tensors", "write_files"]


def read_json(directory: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The JSON object in ``directory/name``.

    Raises:
        CheckpointError: missing file, unreadable, not UTF-8 JSON, or not a JSON object.

    Example:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp(); _ = (pathlib.Path(d) / "c.json").write_text('{"a": 1}')
        >>> read_json(d, "c.json")
        {'a': 1}
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {name} in {os.fspath(directory)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (UTF-8 text expected): {e}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return d


def read_tensors(directory: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``directory/name`` (on the CPU).

    Raises:
        CheckpointError: missing, truncated or otherwise unreadable file.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp(); save_file({"x": torch.ones(2)}, f"{d}/t.safetensors")
        >>> read_tensors(d, "t.safetensors")
        {'x': tensor([1., 1.])}
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {name} in {os.fspath(directory)!r}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def write_files(
    directory: str | os.PathLike[str], writers: dict[str, Callable[[str], None]]
) -> None:
    """Write every ``name: writer(path)`` into ``directory``, all or nothing.

    Each writer fills a temporary file in ``directory``; only when all succeeded are they
    renamed to their names, in ``writers``' order (put weights before the config that points
    at them). A file that a rename replaces is first moved aside, so a rename that fails
    half-way puts back every file already replaced; a directory created here is removed
    again on failure.

    Raises:
        CheckpointError: a writer or the file system failed; ``directory`` is as it was.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_files(d, {"a.txt": lambda p: open(p, "w").close()})
        >>> os.listdir(d)
        ['a.txt']
    """
    out = os.fspath(directory)
    created = not os.path.isdir(out)
    temps: dict[str, str] = {}
    moved: dict[str, str] = {}  # name -> where the file it replaces waits
    placed: list[str] = []
    try:
        os.makedirs(out, exist_ok=True)
        for name, write in writers.items():
            temps[name] = _temp_path(out, name, ".tmp")
            write(temps[name])
        for name, tmp in temps.items():
            dst = os.path.join(out, name)
            if os.path.lexists(dst):
                moved[name] = _temp_path(out, name, ".old")
                os.replace(dst, moved[name])
            os.replace(tmp, dst)
            placed.append(name)
    except BaseException as e:
        for name in placed:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))
        for name, old in moved.items():
            with contextlib.suppress(OSError):
                os.replace(old, os.path.join(out, name))
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {sorted(writers)} to {out!r}: {e}") from e
        raise
    else:
        for old in moved.values():
            with contextlib.suppress(OSError):
                os.remove(old)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if created and os.path.isdir(out) and not os.listdir(out):
            with contextlib.suppress(OSError):
                os.rmdir(out)


def _temp_path(directory: str, name: str, suffix: str) -> str:
    """A new empty file ``directory/.name.XXXX<suffix>`` (same file system as the target)."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
    os.close(fd)
    return path
