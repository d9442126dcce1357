"""Architecture rules: the math layer never imports the PEFT layer."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_liegroup_does_not_import_peft():
    code = "import sys, liegroup; import liegroup.tensor; print('liegroup.peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_math_module_mentions_peft():
    offenders = []
    for path in (ROOT / "liegroup").rglob("*.py"):
        if "peft" in path.relative_to(ROOT / "liegroup").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.startswith("liegroup.peft")]
    assert offenders == []
