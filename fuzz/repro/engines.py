"""What the engines' ``Engine.source`` shares to write their calls out (each engine's own rendering is in
``fsdp_fuzz.engines``): the units in wrapping order and where each is assigned, settings that differ from
their defaults, the simulated nodes' process groups, and the per-step controls as expressions of the
step."""

from __future__ import annotations

from dataclasses import fields

from fsdp_fuzz.data import HYBRID_NODE_SIZE, Scenario
from fsdp_fuzz.engines.base import EngineSource
from fsdp_fuzz.models.spec import Choice, ModelSpec, Sequential, blocks_below
from fsdp_fuzz.repro.model import ModelSource
from fsdp_fuzz.repro.schedule import Schedule, guarded, packed
from fsdp_fuzz.repro.text import literal


def nested_units(spec: ModelSpec) -> list[Sequential | Choice]:
    """The units below the root, innermost first: the order wrapping must take."""
    found: list[Sequential | Choice] = []

    def visit(node: Sequential | Choice) -> None:
        for child in blocks_below(node):
            if isinstance(child, (Sequential, Choice)):
                visit(child)
                if child.fsdp_unit:
                    found.append(child)

    visit(spec.root)
    return found


def spec_order(spec: ModelSpec) -> list[str]:
    """Units below the root, outer before inner, as the spec lists them (prefetch order)."""
    found: list[str] = []

    def visit(node: Sequential | Choice) -> None:
        for child in blocks_below(node):
            if isinstance(child, (Sequential, Choice)):
                if child.fsdp_unit:
                    found.append(child.name)
                visit(child)

    visit(spec.root)
    return found


def assigned(spec: ModelSpec, model: ModelSource, name: str) -> str:
    """Where a unit wrapped by name is assigned back: its path, through a checkpoint wrapper's inside."""
    path = model.paths[name]
    parent = spec.parents().get(name)
    if parent in model.wrapped:
        return f"model.{model.wrapped[parent]}.{path.rsplit('.', 1)[-1]}"
    return f"model.{path}"


def dtype(name: str | None) -> str:
    return "None" if name is None else f"torch.{name}"


def non_default(settings: object, skip: tuple[str, ...] = ()) -> dict[str, object]:
    default = type(settings)()
    return {
        f.name: getattr(settings, f.name)
        for f in fields(settings)
        if f.name not in skip and getattr(settings, f.name) != getattr(default, f.name)
    }


def policy(settings: object, drop: tuple[str, ...] = ()) -> list[str]:
    """A mixed-precision setting's non-default fields as keywords, dtypes as ``torch.*``."""
    changed = {name: value for name, value in non_default(settings).items() if name not in drop}
    return [f"{name}={dtype(value) if name.endswith('_dtype') else repr(value)}" for name, value in changed.items()]


def assignment(variable: str, function: str, arguments: list[str]) -> list[str]:
    """``variable = function(arguments)`` within the line length in ``run``'s body, the arguments packed into
    lines where one would be too long."""
    return packed(f"{variable} = {function}(", arguments, ")", indent="    ", width=116)


def hybrid_groups(scenario: Scenario) -> list[str]:
    """Simulated nodes of ``HYBRID_NODE_SIZE`` consecutive ranks: ``nodes`` (sharded within), ``across``
    (replicated across); every rank creates every group, in one order."""
    size, world = HYBRID_NODE_SIZE, scenario.world_size
    nodes = [list(range(node * size, node * size + size)) for node in range(world // size)]
    across = [list(range(local, world, size)) for local in range(size)]
    return [
        f"nodes = [dist.new_group(ranks, timeout=TIMEOUT) for ranks in {literal(nodes)}]  # simulated nodes",
        f"across = [dist.new_group(ranks, timeout=TIMEOUT) for ranks in {literal(across)}]",
    ]


INTRA, INTER = f"nodes[rank // {HYBRID_NODE_SIZE}]", f"across[rank % {HYBRID_NODE_SIZE}]"
"""This rank's node, and the ranks at its place in every node."""


def controls(schedule: Schedule, setters: dict[str, str]) -> list[str]:
    """``model.setter(value)`` each step for the controls some step sets (the engine calls them every step)."""
    lines = []
    for name, setter in setters.items():
        if (
            schedule.varies(lambda step, name=name: getattr(step, name))
            or schedule.constant(lambda step, name=name: getattr(step, name)) is not True
        ):
            lines.append(f"model.{setter}({schedule.of(lambda step, name=name: getattr(step, name))})")
    return lines


__all__ = [
    "INTER",
    "INTRA",
    "EngineSource",
    "assigned",
    "controls",
    "guarded",
    "hybrid_groups",
    "literal",
    "nested_units",
    "non_default",
    "assignment",
    "policy",
    "spec_order",
]
