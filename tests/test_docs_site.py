"""The documentation is user documentation, and the site's configuration matches its pages.

* no page under ``docs/`` reads as a diary (commits, development rounds, load averages,
  sessions): that material belongs in ``benchmarks/HISTORY.md`` and the git log;
* ``mkdocs.yml`` lists every page, every page it lists exists, and every ``::: name`` of the
  API reference names something importable (what ``make docs`` would otherwise only find
  when mkdocs is installed);
* the README's links point at files of the repository, and its last line is not a link out.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

# what a page about the library, not about its making, never says
DIARY = [
    (r"\bcommits?\b", "names a commit"),
    (r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", "cites a commit hash"),
    (r"\b(this|previous|earlier|last|next|first|second|third|fourth) round\b",
     "a development round"),
    (r"\bload (average|avg)\b|\buptime\b", "a load average"),
    (r"\bthis (session|work)\b", "this session"),
    (r"\btried\b|\bdid not help\b|\bwere not kept\b", "a rejected experiment"),
]


@pytest.mark.parametrize("page", PAGES)
def test_page_is_user_documentation(page: str) -> None:
    text = (DOCS / page).read_text()
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in DIARY:
            if re.search(pattern, line, flags=re.I):
                found.append(f"docs/{page}:{n}: {what}: {line.strip()[:100]}")
    assert not found, "history belongs in benchmarks/HISTORY.md:\n" + "\n".join(found)


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n\S", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.M)


def test_mkdocs_nav_lists_every_page_and_only_pages_that_exist() -> None:
    nav = _nav_pages()
    assert sorted(nav) == PAGES
    assert len(nav) == len(set(nav))


def _api_targets() -> list[tuple[str, str]]:
    out = []
    for page in sorted((DOCS / "api").glob("*.md")):
        for name in re.findall(r"^:::\s+(\S+)\s*$", page.read_text(), flags=re.M):
            out.append((page.name, name))
    return out


def _resolve(name: str) -> object:
    """The object ``name`` documents; skips when its module needs an optional package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj: object = importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = e.name
            if missing is not None and missing.split(".")[0] != "liegroup":  # e.g. transformers
                pytest.skip(f"{module} needs {missing!r}, an optional dependency not installed")
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_api_reference_covers_every_public_package() -> None:
    names = {name for _, name in _api_targets()}
    for module in ("liegroup.groups", "liegroup.linalg", "liegroup.manifolds", "liegroup.tensor",
                   "liegroup.errors", "liegroup.peft"):
        assert module in names, f"docs/api has no '::: {module}'"


@pytest.mark.parametrize(("page", "name"), _api_targets())
def test_api_reference_names_exist(page: str, name: str) -> None:
    _resolve(name)


def test_readme_links_stay_in_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert "://" not in target, f"README links outside the repository: {target}"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README links to a missing file: {target}"
    last = text.rstrip().splitlines()[-1]
    assert "://" not in last and "../" not in last, f"README ends with a link out: {last}"
