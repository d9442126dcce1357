"""The README's math quickstart blocks run as written (the PEFT block: tests/peft/test_docs.py)."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_math_quickstart_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md quickstart block {i}", "exec"), {})
