"""Each rank's program as straight-line code: ``step(index, path, ...)`` per
step, with the step's fields that differ from ``Step()`` as keywords (the
names are ``Step``'s own), ranks with the same program sharing one block."""

from __future__ import annotations

from fsdp_fuzz.data import Scenario, Step, step_to_json
from fsdp_fuzz.models.spec import taken
from fsdp_fuzz.repro.text import call_lines, literal


def step_arguments(scenario: Scenario, index: int, step: Step) -> list[str]:
    """``0, {"branch": [1]}, forwards=2``: the full path (every branch point), then the other fields."""
    path = {choice.name: list(taken(step.path, choice.name)) for choice in scenario.model.choices()}
    encoded = step_to_json(step)
    keywords = [f"mode={literal(step.mode)}"] if step.mode != "train" else []
    keywords += [f"{name}={literal(value)}" for name, value in encoded.items() if name not in ("mode", "path")]
    return [str(index), literal(path), *keywords]


def schedule_source(scenario: Scenario, inline: bool = False) -> str:
    """``def schedule(rank, step)`` (which the reference runs too), or, ``inline``, the same calls as the end of
    ``run_rank``."""
    doc = "Each rank's program: a step runs its forwards on the path, then a backward of their outputs' sum."
    lines = [f"    # {doc}"] if inline else ["def schedule(rank, step):", f'    """{doc}"""']
    programs: dict[tuple[tuple[str, ...], ...], list[int]] = {}
    for rank, steps in enumerate(scenario.ranks):
        calls = tuple(tuple(step_arguments(scenario, index, step)) for index, step in enumerate(steps))
        programs.setdefault(calls, []).append(rank)
    for calls, ranks in programs.items():
        indent = "    "
        if len(programs) > 1:
            condition = f"rank == {ranks[0]}" if len(ranks) == 1 else f"rank in {tuple(ranks)}"
            lines.append(f"    if {condition}:")
            indent = "        "
        for arguments in calls:
            lines += call_lines(indent, "step", list(arguments))
    return "\n".join(lines)
