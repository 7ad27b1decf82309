"""Readable JSON for files people read: small values stay on one line."""

from __future__ import annotations

import json
from typing import Any

WIDTH = 100


def format_json(value: Any, indent: int = 0) -> str:
    inline = json.dumps(value)
    if len(inline) + indent <= WIDTH or not isinstance(value, (dict, list)) or not value:
        return inline
    pad = " " * (indent + 2)
    if isinstance(value, list):
        items = [pad + format_json(item, indent + 2) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [f"{pad}{json.dumps(key)}: {format_json(item, indent + 2)}" for key, item in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
