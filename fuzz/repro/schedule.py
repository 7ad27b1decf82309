"""Each rank's steps as one loop: what a step does, written as an expression of ``rank`` and ``step``.

A scenario's schedule is a table, a ``Step`` per rank and step. A script runs it as ``for step in
range(STEPS)``, each field the table sets written as the shortest expression that gives it: a constant
where every step agrees, ``rank == 1`` where only the rank matters, ``step >= 2`` or ``step % 2 == 0``
where only the step does, both joined where a product of the two does, and a literal table only where
nothing shorter says it. ``forward_source`` writes ``forward(model, rank, step)``: the step's forwards
on the rank's batches (seeded by rank and step), which the ranks and the reference both call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fsdp_fuzz.data import Scenario, Step
from fsdp_fuzz.repro.text import literal

Cell = tuple[int, int]
"""(rank, step)."""

SEED_OF_BATCH = "100 * rank + step + 1"
"""The seed of a rank's batches in a step: every (rank, step) its own, none the model's."""


@dataclass(frozen=True)
class Grid:
    """The ranks and steps a table covers, and the names an expression reads them by."""

    world: int
    steps: int
    rank: str = "rank"
    step: str = "step"

    def cells(self) -> list[Cell]:
        return [(rank, step) for rank in range(self.world) for step in range(self.steps)]

    def named(self, rank: str, step: str = "step") -> Grid:
        return Grid(self.world, self.steps, rank, step)


def _member(name: str, values: Iterable[int], size: int) -> list[str]:
    """Ways to say ``name in values`` for ``name`` in ``range(size)``, shortest first."""
    chosen = sorted(set(values))
    if not chosen:
        return ["False"]
    if len(chosen) == size:
        return ["True"]
    rest = sorted(set(range(size)) - set(chosen))
    found = [f"{name} in ({', '.join(map(str, chosen))})" if len(chosen) > 1 else f"{name} == {chosen[0]}"]
    if len(rest) == 1:
        found.append(f"{name} != {rest[0]}")
    if chosen == list(range(len(chosen))):
        found.append(f"{name} < {len(chosen)}")
    if chosen == list(range(size - len(chosen), size)):
        found.append(f"{name} >= {size - len(chosen)}")
    if len(chosen) > 1 and size > 2 and all(value % 2 == chosen[0] % 2 for value in chosen):
        if len(chosen) == len(range(chosen[0] % 2, size, 2)):
            found.append(f"{name} % 2 == {chosen[0] % 2}")
    order = ("==", "<", ">=", "!=", "%", "in")  # of two as short, the plainer
    return sorted(found, key=lambda text: (len(text), next(i for i, op in enumerate(order) if f" {op} " in text)))


def condition(cells: set[Cell], grid: Grid, dont_care: set[Cell] = frozenset()) -> str:
    """An expression of ``grid.rank`` and ``grid.step`` true exactly on ``cells`` (anything on ``dont_care``)."""
    care = [cell for cell in grid.cells() if cell not in dont_care]
    wanted = {cell for cell in care if cell in cells}

    def holds(test: Callable[[int, int], bool]) -> bool:
        return all(test(rank, step) == ((rank, step) in wanted) for rank, step in care)

    ranks = {rank for rank, _ in wanted}
    steps = {step for _, step in wanted}
    options = []
    if holds(lambda rank, step: rank in ranks):
        options.append(_member(grid.rank, ranks, grid.world)[0])
    if holds(lambda rank, step: step in steps):
        options.append(_member(grid.step, steps, grid.steps)[0])
    if holds(lambda rank, step: rank in ranks and step in steps):
        options.append(f"{_member(grid.rank, ranks, grid.world)[0]} and {_member(grid.step, steps, grid.steps)[0]}")
    if options:
        return min(options, key=len)
    per_rank = {rank: {step for r, step in wanted if r == rank} for rank in sorted(ranks)}
    if len(per_rank) <= 2:
        terms = []
        for rank, chosen in per_rank.items():
            others = {step for r, step in care if r == rank}
            step_test = _member(grid.step, chosen, grid.steps)[0] if chosen != others else "True"
            terms.append(f"{grid.rank} == {rank}" + ("" if step_test == "True" else f" and {step_test}"))
        return " or ".join(f"({term})" if " and " in term and len(terms) > 1 else term for term in terms)
    return f"({grid.rank}, {grid.step}) in {{{', '.join(literal(cell) for cell in sorted(wanted))}}}".replace(
        "[", "("
    ).replace("]", ")")


def cases(
    table: dict[Cell, Any], grid: Grid, dont_care: set[Cell] = frozenset(), default: Any = None
) -> list[tuple[str | None, Any]]:
    """``table`` as ``if``/``elif`` arms: (condition, value) pairs, the last one's condition ``None`` (else),
    its value ``default`` where given, else the commonest."""
    care = [cell for cell in grid.cells() if cell not in dont_care]
    counts = Counter(table[cell] for cell in care)
    if not counts:
        return [(None, table[(0, 0)])]
    order = list(dict.fromkeys(table[cell] for cell in care))
    if default is None or default not in order:
        default = max(order, key=lambda value: counts[value])
    arms: list[tuple[str | None, Any]] = []
    handled = set(dont_care)
    for value in order:
        if value == default:
            continue
        cells = {cell for cell in care if table[cell] == value}
        arms.append((condition(cells, grid, handled), value))
        handled |= cells
    return [*arms, (None, default)]


def expression(
    table: dict[Cell, Any], grid: Grid, render: Callable[[Any], str] = literal, dont_care: set[Cell] = frozenset()
) -> str:
    """``table`` as one expression: a constant, a conditional or two, or a literal table indexed by rank and
    step where those would be longer."""
    arms = cases(table, grid, dont_care)
    if len(arms) == 1:
        return render(arms[0][1])
    if all(isinstance(value, bool) for _, value in arms):
        truth = {cell for cell in grid.cells() if table[cell]}
        falsity = {cell for cell in grid.cells() if not table[cell]}
        plain, negated = condition(truth, grid, dont_care), condition(falsity, grid, dont_care)
        return plain if len(plain) <= len(negated) + 6 else f"not ({negated})"
    if len(arms) <= 3:
        text = render(arms[-1][1])
        for test, value in reversed(arms[:-1]):
            text = f"{render(value)} if {test} else {text}"
        if len(text) <= 100:
            return text
    return _literal_table(table, grid, render)


def table_constant(
    name: str, table: dict[Cell, Any], grid: Grid, what: str, render: Callable[[Any], str] = literal
) -> tuple[list[str], str]:
    """``NAME = [...]``, a row per rank (or one for all), and the expression that reads it."""
    by_rank = [[table[(rank, step)] for step in range(grid.steps)] for rank in range(grid.world)]
    if all(row == by_rank[0] for row in by_rank):
        rows, index = [by_rank[0]], f"{name}[{grid.step}]"
        what += ", per step"
    else:
        rows, index = by_rank, f"{name}[{grid.rank}][{grid.step}]"
        what += ", per rank and step"
    lines = [f"{name} = [  # {what}"]
    for row in rows:
        items = [render(value) for value in row]
        if len(rows) == 1:
            lines += [f"    {item}," for item in items]
        else:
            row_lines = packed("    [", items, "],", indent="        ", width=116)
            lines += row_lines if len(row_lines) == 1 else [*row_lines[:-1], "    ],"]
    return [*lines, "]"], index


def _literal_table(table: dict[Cell, Any], grid: Grid, render: Callable[[Any], str]) -> str:
    by_rank = [[table[(rank, step)] for step in range(grid.steps)] for rank in range(grid.world)]
    if all(row == by_rank[0] for row in by_rank):
        return f"[{', '.join(render(value) for value in by_rank[0])}][{grid.step}]"
    if all(len(set(map(repr, row))) == 1 for row in by_rank):
        return f"[{', '.join(render(row[0]) for row in by_rank)}][{grid.rank}]"
    rows = ", ".join("[" + ", ".join(render(value) for value in row) + "]" for row in by_rank)
    return f"[{rows}][{grid.rank}][{grid.step}]"


@dataclass
class Schedule:
    """The scenario's steps, field by field, as expressions of ``rank`` and ``step``."""

    scenario: Scenario
    grid: Grid = field(init=False)

    def __post_init__(self) -> None:
        self.grid = Grid(self.scenario.world_size, self.scenario.num_steps)

    def table(self, read: Callable[[Step], Any]) -> dict[Cell, Any]:
        return {
            (rank, index): read(step)
            for rank, steps in enumerate(self.scenario.ranks)
            for index, step in enumerate(steps)
        }

    def varies(self, read: Callable[[Step], Any]) -> bool:
        return len(set(map(repr, self.table(read).values()))) > 1

    def constant(self, read: Callable[[Step], Any]) -> Any | None:
        values = list(self.table(read).values())
        return values[0] if all(value == values[0] for value in values) else None

    def of(self, read: Callable[[Step], Any], rank: str = "rank", render: Callable[[Any], str] = literal) -> str:
        """The field as an expression, its rank read from ``rank`` (``0``: rank 0's steps)."""
        table = self.table(read)
        if rank.isdigit():
            table = {(other, step): table[(int(rank), step)] for other, step in table}
            return expression(table, self.grid.named("rank"), render)
        return expression(table, self.grid.named(rank), render)

    def silent_steps(self) -> set[Cell]:
        """Cells whose forwards do not run: there the path says nothing."""
        return {cell for cell, forwards in self.table(lambda step: step.forwards).items() if not forwards}

    def when(self, read: Callable[[Step], bool], rank: str = "rank") -> str | None:
        """``read`` as a condition; ``None`` where it always holds."""
        text = self.of(read, rank)
        return None if text == "True" else text


def guarded(test: str | None, lines: list[str]) -> list[str]:
    """``lines`` under ``if test:`` (as they are where it always holds, none where it never does)."""
    if test is None or test == "True":
        return lines
    if test == "False":
        return []
    if len(lines) == 1 and len(f"if {test}: {lines[0]}") <= 100 and ":" not in lines[0]:
        return [f"if {test}:", f"    {lines[0]}"]
    return [f"if {test}:", *(f"    {line}" for line in lines)]


def forward_lines(
    scenario: Scenario,
    schedule: Schedule,
    trainable: list[tuple[str, dict[Cell, bool]]],
    *,
    step_setter: str | None,
    cast: bool,
    cuda: bool,
    returned: bool,
    used: bool = True,
    loss: bool = False,
    indent: int = 4,
) -> list[str]:
    """The step's forwards, as the user's program runs them: mode, path, freezing, this rank's batches
    (seeded by rank and step), grad mode, entry point; ``outputs`` assigned, or ``returned``; written to be
    indented by ``indent``."""
    lines = []
    if any(step.mode == "eval" for steps in scenario.ranks for step in steps):
        lines.append(f"model.train({schedule.of(lambda step: step.mode == 'train')})")
    if step_setter:
        lines.append(f"{step_setter}  # what some branch point runs depends on the step")
    if trainable:
        pairs = [f"(model.{path}, {expression(table, schedule.grid)})" for path, table in trainable]
        lines += [
            *packed("for block, trainable in [", pairs, "]:", indent="    ", width=120 - indent),
            "    for parameter in block.parameters():  # set each step, as a fine-tuning loop does",
            "        parameter.requires_grad = trainable",
        ]
    seed = SEED_OF_BATCH if schedule.grid.steps > 1 or returned else "100 * rank + 1"
    lines.append(f"torch.manual_seed({seed})  # this rank's batches in this step")
    batch = f"torch.randn({scenario.batch_size}, {scenario.model.in_features})"
    if cuda:
        batch += ".cuda()"
    if cast:
        batch += ".to(dtype)"
    entry = "model"
    if any(step.method != "forward" for steps in scenario.ranks for step in steps):
        entry = "(model.encode if " + schedule.of(lambda step: step.method == "encode") + " else model)"
    forwards = schedule.of(lambda step: step.forwards)
    calls = f"[{entry}({batch})]" if forwards == "1" else f"[{entry}({batch}) for _ in range({forwards})]"
    result = f"return {calls}" if returned else f"outputs = {calls}"
    if not returned and not used:  # nothing reads them: the forwards alone
        result = f"{entry}({batch})" if forwards == "1" else f"for _ in range({forwards}):\n    {entry}({batch})"
    elif loss:  # every step's backward, of the forwards' outputs summed
        each = f"{entry}({batch}).sum()"
        result = f"{each}.backward()" if forwards == "1" else f"sum({each} for _ in range({forwards})).backward()"
    if schedule.varies(lambda step: step.grad_enabled) or schedule.constant(lambda step: step.grad_enabled) is False:
        lines += [f"with torch.set_grad_enabled({schedule.of(lambda step: step.grad_enabled)}):"]
        lines += [f"    {line}" for line in result.splitlines()]
    else:
        lines += result.splitlines()
    return lines


def forward_source(lines: list[str], cast: str | None) -> str:
    """``forward(model, rank, step)``, which the ranks and the reference both run."""
    head = "def forward(model, rank, step" + (", dtype=torch.float32" if cast else "") + "):"
    head += "  # the step's forwards" + (" (the reference's in its dtype)" if cast else " on this rank's batches")

    return "\n".join([head, *(f"    {line}" for line in lines)])


def packed(opening: str, items: list[str], closing: str, indent: str, width: int = 100) -> list[str]:
    """``opening items closing`` on one line where it fits in ``width``, else the items packed into lines."""
    inline = opening + ", ".join(items) + closing
    if len(inline) <= width:
        return [inline]
    lines, current = [opening], indent
    for item in items:
        if current.strip() and len(current) + len(item) + 2 > width:
            lines.append(current.rstrip())
            current = indent
        current += item + ", "
    lines.append(current.rstrip())
    return [*lines, closing.lstrip(", ")]
