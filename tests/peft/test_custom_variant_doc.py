"""docs/custom_variants.md runs as written, and each variant is under 30 lines."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_custom_variants_doc_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "custom_variants.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    gen_lines = blocks[0].split("\nnet = ")[0].strip().splitlines()
    grp_lines = blocks[1].split("\nnet2 = ")[0].strip().splitlines()
    assert len(gen_lines) < 30 and len(grp_lines) < 30
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/custom_variants.md block {i}", "exec"), ns)
    from liegroup.peft import available_generators

    assert "kron" in available_generators()
