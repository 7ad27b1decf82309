"""Small helpers for writing Python source: literals, docstrings, long strings split into pieces."""

from __future__ import annotations

import json
import textwrap
from typing import Any

LINE_LENGTH = 120
"""ruff's line length, which every generated script keeps."""


def literal(value: Any) -> str:
    """``value`` as a one-line Python literal: tuples as lists, strings in double quotes."""
    if isinstance(value, str):
        return json.dumps(value) if value.isascii() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(key)}: {literal(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return repr(value)


def wrap(text: str, width: int = LINE_LENGTH) -> str:
    """Wrap each paragraph of ``text``; lines that start with spaces are kept as they are."""
    out = []
    for line in text.splitlines():
        if line.startswith("  ") or not line.strip():
            out.append(line.rstrip())
        else:
            out.extend(textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def docstring(text: str, indent: str = "") -> str:
    """A triple-quoted docstring for ``text``, escaped."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    width = LINE_LENGTH - len(indent)
    body = wrap('"""' + text, width)  # the opening quotes share the first line's width
    if "\n" not in body and len(body) + 3 <= width:
        return f'{indent}{body}"""'
    return f'{textwrap.indent(body, indent)}\n{indent}"""'


def split_literal(name: str, text: str, indent: str = "") -> list[str]:
    """``name = "text"``, as adjacent literals in parentheses where one line would be too long."""
    line = f"{indent}{name} = {literal(text)}"
    if len(line) <= LINE_LENGTH:
        return [line]
    inner = indent + "    "
    pieces = textwrap.wrap(text, LINE_LENGTH - len(inner) - 2, drop_whitespace=False, break_on_hyphens=False)
    return [f"{indent}{name} = (", *(f"{inner}{literal(piece)}" for piece in pieces), f"{indent})"]
