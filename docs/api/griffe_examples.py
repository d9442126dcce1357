"""Griffe extension for the API reference: ``Example:`` read as an examples section.

The library's docstrings head their doctests with ``Example:`` (singular), which Google-style
parsing reads as an admonition, not as an examples section, so the ``>>>`` lines would render
as nested block quotes. Loaded by ``mkdocs.yml`` (mkdocstrings' python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrites ``Example:`` section headers to ``Examples:`` before the docstrings are parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite one object's docstring in place."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
