"""The README's PEFT quickstart and the code in docs/peft.md run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_peft_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## PEFT quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks(section)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 15  # "ten lines" of real work + imports
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out/adapter/adapter_config.json").is_file()
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()


def _peft_blocks() -> list[tuple[int, str]]:
    return list(enumerate(_blocks((ROOT / "docs" / "peft.md").read_text())))


def _compiles(code: str) -> bool:
    """Whether a block runs torch.compile's default backend (inductor: a C++ compiler)."""
    return re.search(r"torch\.compile\((?![^)]*backend=)", code) is not None


def _run_blocks(blocks: list[tuple[int, str]], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in blocks:
        try:
            exec(compile(code, f"docs/peft.md block {i}", "exec"), ns)
        except Exception as e:  # pragma: no cover - the failure message names the block
            pytest.fail(f"docs/peft.md code block {i} failed: {e!r}")


def test_docs_peft_code_runs(tmp_path, monkeypatch):
    blocks = _peft_blocks()
    assert len(blocks) >= 4
    _run_blocks([(i, c) for i, c in blocks if not _compiles(c)], tmp_path, monkeypatch)


@pytest.mark.inductor
def test_docs_peft_compile_blocks_run(tmp_path, monkeypatch):
    compiling = [(i, c) for i, c in _peft_blocks() if _compiles(c)]
    assert compiling, "docs/peft.md shows torch.compile; the block was not found"
    for block in compiling:  # each on its own: a compile example stands alone in the docs
        _run_blocks([block], tmp_path, monkeypatch)
