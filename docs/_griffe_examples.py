"""A griffe extension for the API reference: read ``Example:`` as an examples section.

Griffe's Google-style parser knows only ``Examples:`` (plural); a singular ``Example:`` becomes
an admonition whose doctest lines render as nested quotes (and break ``mkdocs build --strict``
when an output line looks like a Markdown link). Drop this once every docstring says
``Examples:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` before docstrings are parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE.sub(r"\1Examples:", docstring.value)
