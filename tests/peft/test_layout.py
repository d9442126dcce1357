"""The peft package's layout: no import cycles, a small public API, one verb set per registry."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import liegroup.peft as peft

PEFT = pathlib.Path(peft.__file__).parent
MODULES = sorted(
    ".".join(("liegroup", "peft", *p.relative_to(PEFT).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for p in PEFT.rglob("*.py")
)


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """liegroup.peft modules imported when ``path`` runs (not under TYPE_CHECKING or in a def)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith(
                "liegroup.peft"
            ):
                for a in sub.names:  # `from liegroup.peft import generators` names a module
                    full = f"{sub.module}.{a.name}"
                    out.add(full if full in MODULES else sub.module)
            elif isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("liegroup.peft")}
    return out


def _path(module: str) -> pathlib.Path:
    if module == "liegroup.peft":
        return PEFT / "__init__.py"
    rel = pathlib.Path(*module.split(".")[2:])
    return PEFT / rel / "__init__.py" if (PEFT / rel).is_dir() else (PEFT / rel).with_suffix(".py")


def test_the_module_graph_has_no_cycle() -> None:
    graph = {m: _module_level_imports(_path(m)) - {m} for m in MODULES}
    assert graph["liegroup.peft.generators.lora"], "the import scan found nothing"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n in graph and state.get(n) is None:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if state.get(m) is None:
            visit(m)


def test_every_module_imports_first() -> None:
    """Importing any module before the others works (an order-dependent cycle would fail)."""
    mods = [m for m in MODULES if ".interop" not in m]
    code = (
        "import importlib, sys, torch\n"
        f"for m in {mods!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('liegroup.peft')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok True" in out.stdout, out.stderr[-2000:]


def test_public_api_is_small_and_importable() -> None:
    assert len(peft.__all__) <= 20
    for name in peft.__all__:
        assert hasattr(peft, name), name


def test_every_registry_has_the_same_three_verbs() -> None:
    for kind in ("generator", "update", "initialiser"):
        for verb in (f"register_{kind}", f"get_{kind}", f"available_{kind}s"):
            assert verb in peft.__all__, verb


def test_folders_name_the_design() -> None:
    top = {p.name for p in PEFT.iterdir()}
    assert {"config.py", "layer.py", "model.py", "registry.py", "generators", "updates",
            "_engine"} <= top
    assert {p.stem for p in (PEFT / "generators").glob("*.py")} >= {
        "lora", "adalora", "tucker", "full", "modewise"}
    assert {p.stem for p in (PEFT / "updates").glob("*.py")} >= {
        "hadamard", "additive", "modewise"}


def test_rank_allocator_does_not_import_the_model() -> None:
    assert not any(
        m.startswith("liegroup.peft.model")
        for m in _module_level_imports(PEFT / "generators" / "adalora.py")
    )
