"""Standalone reproducers: a scenario as one Python script that needs only torch.

A reproducer is the executor (``fsdp_fuzz.execute.executor``) verbatim, under
a docstring that says what the scenario shows, followed by the scenario as a
literal and a call of the executor's ``main``: the script runs the ranks with
exactly the code the fuzzer ran them with, so it cannot drift from it.
``python -m fsdp_fuzz repro FILE`` writes one.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from typing import Any

from fsdp_fuzz.data import Scenario, scenario_to_json
from fsdp_fuzz.execute import devices, executor

__all__ = ["reproducer_script"]

WIDTH = 100
"""Within ruff's line length (120), which the whole script keeps."""


def reproducer_script(scenario: Scenario, *, title: str = "", notes: str = "") -> str:
    """The text of a self-contained script (torch and the standard library
    only) that runs ``scenario`` on freshly spawned ranks and reports what
    FSDP did. ``title`` and ``notes`` open its docstring."""
    return "\n".join(
        [
            _docstring(scenario, title, notes),
            _executor_body(),
            "",
            "# The scenario " + "-" * 85,
            "",
            _scenario_comment(),
            f"SCENARIO = {_literal(_without_description(scenario), 0, len('SCENARIO = '))}",
            "",
            "",
            'if __name__ == "__main__":',
            "    sys.exit(main(SCENARIO))",
            "",
        ]
    )


def _executor_body() -> str:
    """The executor's source without its module docstring, with the
    ``devices`` module inlined where the executor imports it."""
    source = inspect.getsource(executor)
    tree = ast.parse(source)
    (imported,) = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == devices.__name__]
    lines = source.splitlines()
    lines[imported.lineno - 1 : imported.end_lineno] = [devices_body(_bound_names(tree))]
    return "\n".join(lines[tree.body[0].end_lineno :]).strip("\n")


def devices_body(imported_by_executor: set[tuple[str | None, str, str | None]]) -> str:
    """``fsdp_fuzz.execute.devices`` without its docstring and imports,
    which must all be the executor's too: the script imports them once."""
    source = inspect.getsource(devices)
    tree = ast.parse(source)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    missing = _bound_names(tree) - imported_by_executor
    if missing:
        raise AssertionError(f"fsdp_fuzz.execute.devices imports what the executor does not: {sorted(missing)}")
    lines = source.splitlines()
    return "\n".join(lines[imports[-1].end_lineno :]).strip("\n")


def _bound_names(tree: ast.Module) -> set[tuple[str | None, str, str | None]]:
    """(module, name, alias) of each top-level import."""
    bound = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            bound |= {(None, alias.name, alias.asname) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            bound |= {(node.module, alias.name, alias.asname) for alias in node.names}
    return bound


def _docstring(scenario: Scenario, title: str, notes: str) -> str:
    paragraphs = [title.strip() or "FSDP forward-path reproducer"]
    if notes.strip():
        paragraphs.append(notes.strip())
    if scenario.description and scenario.description not in notes:
        paragraphs.append(f"Scenario: {scenario.description}")
    settings = "fsdp2" if scenario.engine == "fsdp2" else "fsdp"
    paragraphs.append(
        f"{scenario.world_size} ranks run the steps in SCENARIO['ranks'] on the model in SCENARIO['model'], its "
        f"units wrapped by engine {scenario.engine!r} with the settings in SCENARIO[{settings!r}], at distributed "
        f"debug level {scenario.debug_level}. Needs only torch:"
    )
    usage = (
        "    python repro.py                  # gloo on CPU\n"
        "    python repro.py --device cuda    # rank r on GPU r mod n: NCCL if each rank has its own, else gloo\n"
        "    python repro.py --device cuda --backend gloo    # force a backend (gloo or nccl)\n"
        "    python repro.py --timeout 30     # seconds before a collective counts as hung (default 10)"
    )
    closing = (
        "It prints each rank's outcome per step (ok, error, hang, crash or not_run, with the warnings FSDP "
        "raised) and ends with one line `REPRO-RESULT <json>`. The code below is the fuzzer's own executor, "
        "unchanged (fsdp_fuzz/execute/executor.py)."
    )
    text = "\n\n".join([*(_wrap(p) for p in paragraphs), usage, _wrap(closing)])
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'"""{text}\n"""\n'


def _wrap(text: str) -> str:
    """Wrap long lines, keep short ones (and their indentation) as they are."""
    lines = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        wrapped = textwrap.wrap(
            line.rstrip(), width=WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
        lines.extend(wrapped or [""])
    return "\n".join(lines)


def _scenario_comment() -> str:
    return "\n".join(
        [
            "# The model is a tree of sequentials (fsdp_unit: a unit of its own; the root always is one) and",
            "# branch points (choice), whose alternatives each step's path picks; linear: [in_features, out_features].",
            "# Per rank, one step per line; path: branch point -> the alternatives its forwards run, in order.",
        ]
    )


def _inline(value: Any) -> str:
    """``value`` as a one-line Python literal; strings in double quotes where that is exact."""
    if isinstance(value, str):
        return json.dumps(value) if value.isascii() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_inline(key)}: {_inline(item)}" for key, item in value.items()) + "}"
    return repr(value)


def _literal(value: Any, indent: int, column: int) -> str:
    """``value`` as a Python literal that starts at ``column``: on one line
    where it fits, else one item per line at ``indent + 4``."""
    inline = _inline(value)
    if column + len(inline) + 1 <= WIDTH or not isinstance(value, (dict, list, tuple)) or not value:
        return inline
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            head = f"{pad}{_inline(key)}: "
            items.append(head + _literal(item, indent + 4, len(head)) + ",")
        opener, closer = "{", "}"
    else:
        items = [pad + _literal(item, indent + 4, indent + 4) + "," for item in value]
        opener, closer = "[", "]"
    return opener + "\n" + "\n".join(items) + "\n" + " " * indent + closer


def _without_description(scenario: Scenario) -> dict[str, Any]:
    """The executor's input; the description opens the docstring instead."""
    encoded = scenario_to_json(scenario, complete=True)
    del encoded["description"]
    return encoded
