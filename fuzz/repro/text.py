"""Small helpers for writing Python source: literals, wrapped comments, blocks."""

from __future__ import annotations

import json
import textwrap
from typing import Any

WIDTH = 116
"""Within ruff's line length (120), which every generated script keeps."""


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


def comment(text: str, indent: str = "") -> list[str]:
    """``text`` as ``#`` lines wrapped at ``WIDTH``."""
    return [f"{indent}# {line}" for line in textwrap.wrap(text, WIDTH - len(indent) - 2, break_on_hyphens=False)]


def wrap(text: str, width: int = WIDTH) -> str:
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
    body = textwrap.indent(wrap(text, WIDTH - len(indent)), indent).lstrip()
    return f'{indent}"""{body}\n{indent}"""' if "\n" in body else f'{indent}"""{body}"""'


def call(function: str, *arguments: str, **keywords: str) -> str:
    """``function(a, b, k=v)`` from already-rendered argument text."""
    return f"{function}({', '.join([*arguments, *(f'{key}={value}' for key, value in keywords.items())])})"


def call_lines(indent: str, function: str, arguments: list[str], lead: str = "", limit: int = 120) -> list[str]:
    """``lead function(arguments)`` on one line where it fits in ``limit``, else one argument a line,
    long string literals split into adjacent pieces."""
    inline = f"{indent}{lead}{function}({', '.join(arguments)})"
    if len(inline) <= limit:
        return [inline]
    inner = indent + "    "
    hugged = f"{inner}{', '.join(arguments)}"
    if len(hugged) <= limit:
        return [f"{indent}{lead}{function}(", hugged, f"{indent})"]
    lines = [f"{indent}{lead}{function}("]
    for argument in arguments:
        if len(inner) + len(argument) + 1 > limit and argument.startswith('"') and argument.endswith('"'):
            text = json.loads(argument)
            pieces = textwrap.wrap(text, limit - len(inner) - 4, drop_whitespace=False, break_on_hyphens=False)
            lines += [f"{inner}{json.dumps(piece)}" for piece in pieces]
            lines[-1] += ","
        else:
            lines.append(f"{inner}{argument},")
    lines.append(f"{indent})")
    return lines
