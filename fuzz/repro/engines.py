"""What the engines' ``source`` shares to write their calls out (each engine's
own rendering is its ``Engine.source``, in ``fsdp_fuzz.engines``): the units
in wrapping order, settings that differ from their defaults, mixed-precision
policies, and the simulated nodes' process groups."""

from __future__ import annotations

from dataclasses import fields

from fsdp_fuzz.data import HYBRID_NODE_SIZE, Scenario
from fsdp_fuzz.engines.base import EngineSource
from fsdp_fuzz.models.spec import Choice, ModelSpec, Sequential, blocks_below
from fsdp_fuzz.repro.model import block_paths
from fsdp_fuzz.repro.text import call_lines, literal


def engine_source(scenario: Scenario) -> EngineSource:
    """The calls of the engine the scenario runs on, written out (``Engine.source``)."""
    return scenario.runs_on.source(scenario)


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


def dtype(name: str | None) -> str:
    return "None" if name is None else f"torch.{name}"


def non_default(settings: object, skip: tuple[str, ...] = ()) -> dict[str, object]:
    default = type(settings)()
    return {
        f.name: getattr(settings, f.name)
        for f in fields(settings)
        if f.name not in skip and getattr(settings, f.name) != getattr(default, f.name)
    }


def policy_lines(variable: str, cls: str, policy: object, drop: tuple[str, ...] = ()) -> list[str]:
    """``variable = cls(...)``: the mixed-precision setting's non-default fields, dtypes as ``torch.*``."""
    changed = {name: value for name, value in non_default(policy).items() if name not in drop}
    rendered = [f"{name}={dtype(value) if name.endswith('_dtype') else repr(value)}" for name, value in changed.items()]
    return call_lines("    ", cls, rendered, lead=f"{variable} = ")


def parent_expression(spec: ModelSpec, name: str) -> tuple[str, str]:
    """(the expression of the module that holds ``name`` as an attribute, its attribute): through a
    checkpoint wrapper, the module inside it, where an assignment lands."""
    path = block_paths(spec)[name]
    parent, _, attribute = path.rpartition(".")
    expression = "model" + (f".{parent}" if parent else "")
    if parent and _checkpoint_wrapped(spec, parent.rsplit(".", 1)[-1]):
        expression += "._checkpoint_wrapped_module"
    return expression, attribute


def _checkpoint_wrapped(spec: ModelSpec, name: str) -> bool:
    node = spec.block(name)
    return isinstance(node, Sequential) and node.checkpoint == "wrapper"


def hybrid_groups(scenario: Scenario) -> list[str]:
    size, world = HYBRID_NODE_SIZE, scenario.world_size
    return [
        f"    # Simulated nodes of {size} consecutive ranks: sharded within a node, replicated across nodes.",
        f"    intras = [new_group(range(node * {size}, node * {size} + {size})) for node in range({world // size})]",
        f"    inters = [new_group(range(local, {world}, {size})) for local in range({size})]",
        f"    intra, inter = intras[rank // {size}], inters[rank % {size}]",
    ]


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


__all__ = [
    "EngineSource",
    "call_lines",
    "engine_source",
    "hybrid_groups",
    "literal",
    "nested_units",
    "non_default",
    "parent_expression",
    "policy_lines",
    "spec_order",
]
