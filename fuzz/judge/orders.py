"""Forward orders and iterations, derived from the scenario alone.

These are the user-level definitions the oracles judge by (the README
states them): a forward *uses* an FSDP unit when the unit's module runs and
the unit flattens at least one parameter of its own; a rank's *iteration* is
its training-mode forwards up to and including a backward; its *order* in an
iteration is the sequence of units those forwards use. Eval-mode forwards
belong to no iteration, and a backward with no training-mode forward since
the last iteration (after eval forwards only) ends none. Training-mode forwards with grad disabled do count:
FSDP is in training mode and the user asked for it.

Nothing here looks at what FSDP recorded; an oracle built on FSDP's own
bookkeeping could never disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.models.spec import Choice, ModelSpec, Node, Path, Sequential, taken, unit_numel


def forward_units(spec: ModelSpec, path: Path) -> tuple[str, ...]:
    """The units one forward along ``path`` uses, in the order they start."""
    flattening = {name for name, size in unit_numel(spec).items() if size > 0}
    order: list[str] = []

    def visit(node: Node, is_root: bool = False) -> None:
        if isinstance(node, (Sequential, Choice)) and (is_root or node.fsdp_unit) and node.name in flattening:
            order.append(node.name)
        if isinstance(node, Sequential):
            for child in node.children:
                visit(child)
        elif isinstance(node, Choice):
            for index in taken(path, node.name):
                visit(node.alternatives[index])

    visit(spec.root, is_root=True)
    return tuple(order)


@dataclass(frozen=True)
class UnitUse:
    step: int
    unit: str


@dataclass(frozen=True)
class Iteration:
    uses: tuple[UnitUse, ...]
    steps: tuple[int, ...]
    """Training steps with forwards in this iteration, and its closing backward's step."""
    complete: bool
    """Ended by a backward; the last iteration of a schedule may not be."""

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(use.unit for use in self.uses)


def iterations(scenario: Scenario, rank: int) -> tuple[Iteration, ...]:
    found: list[Iteration] = []
    uses: list[UnitUse] = []
    steps: list[int] = []
    for index, step in enumerate(scenario.ranks[rank]):
        if step.training and step.forwards:
            units = forward_units(scenario.model, step.path)
            uses.extend(UnitUse(index, unit) for _ in range(step.forwards) for unit in units)
            steps.append(index)
        if step.backward and steps:
            if index not in steps:
                steps.append(index)
            found.append(Iteration(tuple(uses), tuple(steps), complete=True))
            uses, steps = [], []
    if uses:
        found.append(Iteration(tuple(uses), tuple(steps), complete=False))
    return tuple(found)


def deviates(first: Iteration, later: Iteration) -> bool:
    """A later order differs from the first; an unfinished one only where it
    has already left the first order's track."""
    if later.complete:
        return later.order != first.order
    return later.order != first.order[: len(later.order)]


@dataclass(frozen=True)
class Divergence:
    """Where the ranks' first-iteration orders first disagree."""

    position: int
    units: tuple[str | None, ...]
    """Each rank's unit at ``position``; ``None`` where a rank's order has ended."""


def first_iteration_divergence(scenario: Scenario) -> Divergence | None:
    orders = []
    for rank in range(scenario.world_size):
        rank_iterations = iterations(scenario, rank)
        orders.append(rank_iterations[0].order if rank_iterations else ())
    longest = max(len(order) for order in orders)
    for position in range(longest):
        units = tuple(order[position] if position < len(order) else None for order in orders)
        if len(set(units)) > 1:
            return Divergence(position, units)
    return None


def eval_divergence_step(scenario: Scenario) -> int | None:
    """First step where some rank is in eval mode and the ranks' forwards
    differ in mode or in the units they use: FSDP checks nothing there."""
    for index in range(scenario.num_steps):
        steps = [steps[index] for steps in scenario.ranks]
        if all(step.training for step in steps):
            continue
        runs = {(step.mode, forward_units(scenario.model, step.path) * step.forwards) for step in steps}
        if len(runs) > 1:
            return index
    return None


def same_program(scenario: Scenario) -> bool:
    """Every rank runs the same steps, paths included."""
    return all(steps == scenario.ranks[0] for steps in scenario.ranks)


def same_units(scenario: Scenario) -> bool:
    """Step by step, the ranks agree on everything but the path, and their
    forwards use the same FSDP units in the same order: they may differ only
    in which parameters they use inside a unit."""

    def shape(step) -> tuple:
        pathless = tuple(value for name, value in vars(step).items() if name != "path")
        return pathless, forward_units(scenario.model, step.path) * step.forwards

    return all(len({shape(steps[index]) for steps in scenario.ranks}) == 1 for index in range(scenario.num_steps))


def unregistered_calls(scenario: Scenario) -> bool:
    """Some step calls a method other than ``forward`` that FSDP2 was not
    told of (``register_fsdp_forward_method``): its hooks do not run around
    it, and FSDP2 promises nothing of the numbers from there on."""
    return any(
        not scenario.runs_on.registers(scenario, step.method) and step.forwards
        for steps in scenario.ranks
        for step in steps
    )


def fsdp2_promises(scenario: Scenario) -> bool:
    """What ``fully_shard`` promises to run correctly: the same program on
    every rank, or with ``set_reduce_scatter_unused_params(True)`` the same
    units in the same order with different parameters used inside them."""
    return same_program(scenario) or (scenario.fsdp2.reduce_scatter_unused_params and same_units(scenario))
