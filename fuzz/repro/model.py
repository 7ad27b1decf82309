"""The scenario's model as plain ``nn.Module`` source: what runs, with named submodules.

The root is ``class Model`` whose ``forward`` calls its stages in order. A branch point right below the
root is no module of its own: its alternatives are the model's submodules, and ``forward`` calls the ones
the step runs (directly where every rank and step runs the same, under a condition on ``self.rank`` or
``self.step`` where they differ). A branch point that is an FSDP unit, or sits inside a block, stays a
module, ``Branch``, since FSDP wraps it or its block runs it: it runs the alternatives its ``choose()``
names. Every alternative is built, run or not: the executor builds them all, and FSDP's units and their
parameters are what a finding is about. Blocks nothing refers to (no unit, freezing, tie or branch point
inside) are plain ``nn.Sequential`` of their layers; the others are named.

The construction order is the executor's (``fsdp_fuzz.execute.model.build_model``), so the seed gives the
same parameters on every rank; ties, the model's own frozen blocks and the first path's freezing
(``freeze_untaken``) follow the construction, as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, ReLU, Sequential, taken
from fsdp_fuzz.repro.schedule import Cell, Schedule, cases, expression, packed, table_constant

CHECKPOINTED = """
class Checkpointed(nn.Sequential):  # layers run under torch.utils.checkpoint: recomputed in the backward
    def __init__(self, *layers, reentrant):
        super().__init__(*layers)
        self.reentrant = reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=self.reentrant)
"""

BRANCH = """
class Branch(nn.ModuleDict):  # a branch point: holds its alternatives, runs those choose() names, in order
    def __init__(self, choose, **alternatives):
        super().__init__(alternatives)
        self.choose = choose

    def forward(self, x):
        for name in self.choose():
            x = self[name](x)
        return x
"""

UNIT_CLASSES = {
    "Unit": ("nn.Sequential", "a block that is an FSDP unit: ModuleWrapPolicy finds the units by class"),
    "CheckpointedUnit": ("Checkpointed", "a checkpointed block that is an FSDP unit"),
    "UnitBranch": ("Branch", "a branch point that is an FSDP unit"),
}


@dataclass
class ModelSource:
    """The model's classes and what the rest of the script needs to know of them."""

    classes: list[str] = field(default_factory=list)
    model: str = ""
    imports: set[str] = field(default_factory=set)
    takes_rank: bool = False
    """``Model(rank)``: some branch point runs different alternatives on different ranks (``self.rank``)."""
    steps_choose: bool = False
    """Some branch point runs different alternatives in different steps: the loop sets ``step``."""
    paths: dict[str, str] = field(default_factory=dict)
    """Every named block, alternative and kept branch point -> its attribute path from the model."""
    wrapped: dict[str, str] = field(default_factory=dict)
    """Blocks under ``checkpoint_wrapper`` -> the path of the module inside, where assignments land."""
    unit_classes: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    """Tables the model reads where an expression would be too long."""
    constructor: str = "Model"
    """What builds the model: ``Model`` (its class) or ``build`` (a function returning an ``nn.Sequential``)."""
    trainable: list[tuple[str, dict[Cell, bool]]] = field(default_factory=list)

    """What each step makes trainable, in the executor's order: (path, rank and step -> requires_grad)."""


def layer_name(block: Sequential, index: int) -> str:
    """A child's attribute name: its own for blocks and branch points, else ``fc0``, ``relu1``, ``norm2`` by
    kind and position (``_`` appended where that would take a block's name)."""
    child = block.children[index]
    if isinstance(child, (Sequential, Choice)):
        return child.name
    kind = {Linear: "fc", ReLU: "relu", Norm: "norm"}[type(child)]
    name = f"{kind}{index}"
    names = {c.name for c in block.children if isinstance(c, (Sequential, Choice))}
    while name in names:
        name += "_"
    return name


def model_source(scenario: Scenario, schedule: Schedule) -> ModelSource:
    return _Writer(scenario, schedule).write()


def referenced(scenario: Scenario) -> set[str]:
    """Blocks the script refers to by name: units, the model's and the schedule's frozen blocks, ties,
    ignored blocks, and every alternative (the schedule may freeze it)."""
    spec = scenario.model
    names = {node.name for node in spec.named() if node.fsdp_unit}
    names |= {node.name for node in spec.named() if isinstance(node, Sequential) and (node.frozen or node.tied_to)}
    names |= set(spec.ties().values()) | set(scenario.scheduled_frozen()) | set(scenario.ignored_blocks)
    names |= {alternative.name for choice in spec.choices() for alternative in choice.alternatives}
    return names


class _Writer:
    def __init__(self, scenario: Scenario, schedule: Schedule) -> None:
        self.scenario = scenario
        self.spec: ModelSpec = scenario.model
        self.schedule = schedule
        self.auto_wrap = scenario.runs_on.wraps_by_class(scenario)
        self.out = ModelSource()
        self.runs = {choice.name: self._taken(choice) for choice in self.spec.choices()}
        self.used = {name for table in self.runs.values() for names in table.values() for name in names}
        self.named = self._named(referenced(scenario))

    def _named(self, names: set[str]) -> set[str]:
        """The referenced blocks and every block holding one or a branch point: these are named."""
        found: set[str] = set()

        def visit(node: Node) -> bool:
            if isinstance(node, Choice):
                for alternative in node.alternatives:
                    visit(alternative)
                found.add(node.name)
                return True
            if not isinstance(node, Sequential):
                return False
            inside = [visit(child) for child in node.children]
            if node.name in names or any(inside):
                found.add(node.name)
                return True
            return False

        visit(self.spec.root)
        return found

    def _taken(self, choice: Choice) -> dict[Cell, tuple[str, ...]]:
        names = [alternative.name for alternative in choice.alternatives]
        return {
            (rank, index): tuple(names[i] for i in taken(step.path, choice.name))
            for rank, steps in enumerate(self.scenario.ranks)
            for index, step in enumerate(steps)
        }

    def _note(self, text: str) -> str:
        self.out.takes_rank |= "self.rank" in text
        self.out.steps_choose |= "self.step" in text
        return text

    def _choose(self, choice: Choice) -> str:
        """What a kept branch point runs, as an expression of the model's rank and step."""
        table = self.runs[choice.name]
        grid = self.schedule.grid.named("self.rank", "self.step")
        text = expression(table, grid, dont_care=self.schedule.silent_steps())
        if len(text) > 95:  # the lambda's line would pass the line length
            lines, text = table_constant(choice.name.upper(), table, grid, f"what {choice.name} runs")
            self.out.constants += lines
        return self._note(text)

    # The root ---------------------------------------------------------------

    def write(self) -> ModelSource:
        root = self.spec.root
        init = [f"        torch.manual_seed({self.scenario.seed})  # the same parameters on every rank"]
        stages: list[list[tuple[str | None, list[str]]]] = []
        for index, child in enumerate(root.children):
            name = layer_name(root, index)
            if isinstance(child, ReLU):
                stages.append([(None, ["torch.relu({})"])])
            elif isinstance(child, Choice) and not child.fsdp_unit:
                for alternative in child.alternatives:
                    self.out.paths[alternative.name] = alternative.name
                    self._below(alternative, alternative.name)
                    note = "" if alternative.name in self.used else "  # never runs"
                    init.append(self._assign(alternative.name, alternative, note))
                stages.append(self._arms(child))
            else:
                if isinstance(child, (Sequential, Choice)):
                    self.out.paths[child.name] = name
                    self._below(child, name)
                init.append(self._assign(name, child))
                stages.append([(None, [f"self.{name}({{}})"])])
        after = self._ties() + self._frozen()
        init += after
        self._trainable()
        if self._as_sequential(after):
            self.out.classes = self._classes()
            return self.out
        head = [
            "    def __init__(self, rank):" if self.out.takes_rank else "    def __init__(self):",
            "        super().__init__()",
        ]
        if self.out.takes_rank and self.out.steps_choose:
            head.append("        self.rank, self.step = rank, 0  # the training loop sets the step")
        elif self.out.takes_rank:
            head.append("        self.rank = rank")
        elif self.out.steps_choose:
            head.append("        self.step = 0  # the training loop sets it")
        body = [*head, *init]
        if any(step.method == "encode" for steps in self.scenario.ranks for step in steps):
            body += ["", "    def encode(self, x):", *self._statements(stages[: self.spec.encoder_stages], "x")]
        body += ["", "    def forward(self, x):", *self._statements(stages, None)]
        self.out.model = "class Model(nn.Module):\n" + "\n".join(body)
        self.out.classes = self._classes()
        return self.out

    def _as_sequential(self, after: list[str]) -> bool:
        """Where the forward runs every stage once, in order (each branch point its alternatives in order), the
        model is an ``nn.Sequential`` of them, built by ``build()``."""
        if self.out.takes_rank or self.out.steps_choose or self.out.constants or self.auto_wrap:
            return False

        if any(step.method != "forward" for steps in self.scenario.ranks for step in steps):
            return False
        children: list[Node] = []
        for child in self.spec.root.children:
            if isinstance(child, Choice) and not child.fsdp_unit:
                everything = tuple(alternative.name for alternative in child.alternatives)
                if set(self.runs[child.name].values()) != {everything}:
                    return False
                children += child.alternatives
            else:
                children.append(child)
        root = Sequential(self.spec.root.name, tuple(children))
        self.out.imports.discard("from collections import OrderedDict")
        built = self.node(root, depth=1, lead=len("model = "))
        tail = [line[4:].replace("self.", "model.") for line in after]
        lines = ["def build():", f"    torch.manual_seed({self.scenario.seed})  # the same parameters on every rank"]

        lines += [f"    return {built}"] if not tail else [f"    model = {built}", *tail, "    return model"]
        self.out.model = "\n".join(lines)
        self.out.constructor = "build"
        return True

    def _assign(self, name: str, node: Node, note: str = "") -> str:
        lead = f"        self.{name} = "
        text = lead + self.node(node, depth=2, lead=len(lead) - 8)
        return text + note if "\n" not in text and len(text + note) <= 120 else text

    def _arms(self, choice: Choice) -> list[tuple[str | None, list[str]]]:
        """The branch point's alternatives as the forward calls them, per arm of the rank's and step's cases."""
        table = self.runs[choice.name]
        grid = self.schedule.grid.named("self.rank", "self.step")
        empty = () in table.values()  # the arm that runs nothing last: no `pass`
        arms = cases(table, grid, self.schedule.silent_steps(), default=() if empty else None)
        if len(arms) > 3 or any(test and len(test) > 60 for test, _ in arms):
            lines, index = table_constant(choice.name.upper(), table, grid, f"what {choice.name} runs")
            self.out.constants += lines
            return [(None, [f"LOOP {self._note(index)}"])]
        for test, _ in arms:
            self._note(test or "")
        return [(test, [f"self.{name}({{}})" for name in value]) for test, value in arms]

    def _statements(self, stages, returned: str | None) -> list[str]:
        """The stages as the forward's statements: one chained return where nothing is chosen."""
        pad = " " * 8
        if all(len(stage) == 1 and not stage[0][1][:1] == ["LOOP"] and not _loops(stage) for stage in stages):
            calls = [call for stage in stages for call in stage[0][1]]
            chained = "x"
            for call in calls:
                chained = call.format(chained)
            if len(calls) <= 3 and len(pad + "return " + chained) <= 100:
                return [f"{pad}return {chained}"]
        lines = []
        for stage in stages:
            if _loops(stage):
                lines += [f"{pad}for name in {stage[0][1][0][5:]}:", f"{pad}    x = getattr(self, name)(x)"]
            elif len(stage) == 1:
                lines += self._chained(stage[0][1], pad)

            elif len(stage) == 2 and all(len(calls) <= 1 for _, calls in stage) and stage[0][1]:
                (test, yes), (_, no) = stage  # the one call, or none (x as it is)
                otherwise = no[0].format("x") if no else "x"
                lines.append(f"{pad}x = {yes[0].format('x')} if {test} else {otherwise}")

            else:
                for index, (test, calls) in enumerate(stage):
                    if test is None and not calls:
                        continue
                    keyword = "if" if index == 0 else "elif"
                    lines.append(f"{pad}{keyword} {test}:" if test is not None else f"{pad}else:")
                    lines += self._chained(calls, f"{pad}    ") or [f"{pad}    pass"]
        if lines and lines[-1].startswith(f"{pad}x = ") and returned is None:
            lines[-1] = lines[-1].replace(f"{pad}x = ", f"{pad}return ", 1)
        else:
            lines.append(f"{pad}return x")
        return lines

    @staticmethod
    def _chained(calls: list[str], pad: str) -> list[str]:
        """``x = c(b(a(x)))`` where it fits on a line, else one call a line."""
        chained = "x"
        for call in calls:
            chained = call.format(chained)
        if calls and len(calls) <= 3 and len(f"{pad}x = {chained}") <= 100:
            return [f"{pad}x = {chained}"]
        return [f"{pad}x = {call.format('x')}" for call in calls]

    # Blocks -----------------------------------------------------------------

    def _below(self, node: Sequential | Choice, path: str) -> None:
        """Paths of the named blocks inside ``node`` (at ``path``)."""
        children = node.children if isinstance(node, Sequential) else node.alternatives
        for child in children:
            if isinstance(child, (Sequential, Choice)) and child.name in self.named:
                self.out.paths[child.name] = f"{path}.{child.name}"
                self._below(child, f"{path}.{child.name}")
        if isinstance(node, Sequential) and node.checkpoint == "wrapper":
            self.out.wrapped[node.name] = f"{path}._checkpoint_wrapped_module"

    def node(self, node: Node, depth: int, lead: int) -> str:
        """``node``'s constructor, on one line where it fits after ``lead`` characters at ``depth``, else its
        items packed into lines."""
        if isinstance(node, Linear):
            return f"nn.Linear({node.in_features}, {node.out_features}{'' if node.bias else ', bias=False'})"
        if isinstance(node, ReLU):
            return "nn.ReLU()"
        if isinstance(node, Norm):
            return f"nn.BatchNorm1d({node.features})"
        if isinstance(node, Choice):
            cls = self._unit_class("UnitBranch") if self.auto_wrap and node.fsdp_unit else "Branch"
            items = [f"lambda: {self._choose(node)}"]
            items += [f"{a.name}={self.node(a, depth + 1, len(a.name) + 1)}" for a in node.alternatives]
            return self._call(cls, items, depth, lead)
        inline = node.checkpoint in ("reentrant", "non_reentrant")
        if self.auto_wrap and node.fsdp_unit:
            cls = self._unit_class("CheckpointedUnit" if inline else "Unit")
        else:
            cls = "Checkpointed" if inline else "nn.Sequential"
        if any(isinstance(child, (Sequential, Choice)) and child.name in self.named for child in node.children):
            self.out.imports.add("from collections import OrderedDict")
            names = [layer_name(node, i) for i in range(len(node.children))]
            children = [
                f"{n}={self.node(child, depth + 1, len(n) + 1)}" for n, child in zip(names, node.children, strict=True)
            ]

            items = [f"OrderedDict({', '.join(children)})"]
        else:
            items = [self.node(child, depth + 1, 0) for child in node.children]
        if inline:
            items.append(f"reentrant={node.checkpoint == 'reentrant'}")
        built = self._call(cls, items, depth, lead)
        if node.checkpoint == "wrapper":
            self.out.imports.add(
                "from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper"
            )
            return self._call("checkpoint_wrapper", [built], depth, lead)
        if node.checkpoint == "composable":
            self.out.imports.add("from torch.distributed._composable import checkpoint")
            return self._call("checkpoint", [built], depth, lead)
        return built

    def _unit_class(self, name: str) -> str:
        if name not in self.out.unit_classes:
            self.out.unit_classes.append(name)
        return name

    @staticmethod
    def _call(function: str, items: list[str], depth: int, lead: int) -> str:
        """``function(items)`` on one line where it fits, else the items packed into lines one level in
        (``nn.Sequential(OrderedDict(`` opening as one)."""
        inline = f"{function}({', '.join(items)})"
        if "\n" not in inline and 4 * depth + lead + len(inline) + 1 <= 120:
            return inline
        opening, closing = f"{function}(", ")"
        if items and items[0].startswith("OrderedDict(") and items[0].endswith(")"):
            opening, closing = f"{function}(OrderedDict(", ")" + "".join(f", {item}" for item in items[1:]) + ")"
            items = _split_arguments(items[0][len("OrderedDict(") : -1])
        pad = "    " * (depth + 1)
        lines, current = [], pad
        for index, item in enumerate(items):
            if index == 1 and function in ("Branch", "UnitBranch"):  # the choice on a line of its own
                lines.append(current.rstrip())
                current = pad
            if "\n" in item:
                if current.strip():
                    lines.append(current.rstrip())
                lines.append(f"{pad}{item},")
                current = pad
            elif current.strip() and len(current) + len(item) + 2 > 120:
                lines.append(current.rstrip())
                current = f"{pad}{item}, "
            else:
                current += f"{item}, "
        if current.strip():
            lines.append(current.rstrip())
        return opening + "\n" + "\n".join(lines) + f"\n{'    ' * depth}{closing}"

    # After the construction ---------------------------------------------------

    def _path(self, name: str) -> str:
        return "self" if name == self.spec.root.name else f"self.{self.out.paths[name]}"

    def _leaf(self, block: str, index: int) -> str:
        inside = self.out.wrapped.get(block, self.out.paths[block])
        return f"self.{inside}[{index}]"

    def _ties(self) -> list[str]:
        lines = []
        for tied, source in self.spec.ties().items():
            for index, child in enumerate(self.spec.block(tied).children):
                if isinstance(child, (Linear, Norm)):
                    names = ["weight", "bias"] if not isinstance(child, Linear) or child.bias else ["weight"]
                    lines += [
                        f"        {self._leaf(tied, index)}.{name} = {self._leaf(source, index)}.{name}  # tied"
                        for name in names
                    ]
        return lines

    def _frozen(self) -> list[str]:
        """The model's frozen blocks, then (``freeze_untaken``) only the first path's alternatives trainable, as
        the executor leaves them before wrapping: the fewest calls that give its final state."""
        state: dict[int, bool] = {}
        owners: dict[str, list[int]] = {}

        def collect(node: Node, names: list[str]) -> None:
            if isinstance(node, (Linear, Norm)):
                state[id(node)] = True
                for name in names:
                    owners.setdefault(name, []).append(id(node))
            elif isinstance(node, (Sequential, Choice)):
                for child in node.children if isinstance(node, Sequential) else node.alternatives:
                    collect(child, [*names, node.name])

        collect(self.spec.root, [])
        self.state, self.owners = state, owners  # requires_grad after the construction, for _trainable
        calls: list[tuple[str, bool]] = []

        def assign(name: str, value: bool) -> None:
            leaves = owners.get(name, [])
            if any(state[leaf] != value for leaf in leaves):
                calls.append((name, value))
                for leaf in leaves:
                    state[leaf] = value

        for node in self.spec.named():
            if isinstance(node, Sequential) and node.frozen:
                assign(node.name, False)
        if self.scenario.freeze_untaken:
            for name, trainable in _alternatives_trainable(self.spec, lambda choice: (0,)):
                assign(name, trainable)
        note = "  # only what the first path runs trains" if self.scenario.freeze_untaken else "  # the model's own"
        if len(calls) > 2 and len({value for _, value in calls}) == 1:
            blocks = [self._path(name) for name, _ in calls]
            return [
                *(f"        {line}" for line in packed("for block in [", blocks, "]:", indent="    ", width=110)),
                f"            block.requires_grad_({calls[0][1]}){note}",
            ]

        return [f"        {self._path(name)}.requires_grad_({value}){note}" for name, value in calls]

    def _trainable(self) -> None:
        """The executor's per-step freezing: only the alternatives the path runs trainable (``freeze_untaken``,
        outer branch points first), then the blocks the schedule freezes (by name)."""
        if self.scenario.freeze_untaken:
            tables: dict[str, dict[Cell, bool]] = {}
            for rank, steps in enumerate(self.scenario.ranks):
                for index, step in enumerate(steps):
                    for name, trainable in _alternatives_trainable(self.spec, lambda c, s=step: taken(s.path, c.name)):
                        tables.setdefault(name, {})[(rank, index)] = trainable
            self.out.trainable += [(name, table) for name, table in tables.items()]
        for name in sorted(self.scenario.scheduled_frozen()):
            table = {
                (rank, index): name not in step.frozen
                for rank, steps in enumerate(self.scenario.ranks)
                for index, step in enumerate(steps)
            }
            self.out.trainable.append((name, table))
        flat = self.scenario.runs_on.flat_parameters(self.scenario)  # flat parameters: an equal value is no change
        if self.scenario.num_steps == 1 or flat:  # what the construction left as it is, FSDP's parameters leaves
            entries = self.out.trainable

            def alone(name: str) -> bool:  # no other entry sets its parameters (as an alternative around it does)
                mine = set(self.owners.get(name, []))
                return all(not mine & set(self.owners.get(other, [])) for other, _ in entries if other != name)

            self.out.trainable = [
                (name, table)
                for name, table in entries
                if not alone(name)
                or any(self.state[leaf] != value for value in table.values() for leaf in self.owners.get(name, []))
                or (flat and len(set(table.values())) > 1)
            ]

        self.out.trainable = [(self.out.paths[name], table) for name, table in self.out.trainable]

    def _classes(self) -> list[str]:
        named = list(self.spec.named())
        found = []
        if any(isinstance(n, Sequential) and n.checkpoint in ("reentrant", "non_reentrant") for n in named):
            found.append(CHECKPOINTED.strip("\n"))
        if "Branch(" in self.out.model or "UnitBranch" in self.out.unit_classes:
            found.append(BRANCH.strip("\n"))
        for name in self.out.unit_classes:
            base, doc = UNIT_CLASSES[name]
            found.append(f'class {name}({base}):\n    """{doc[0].upper()}{doc[1:]}."""')
        return found


def _alternatives_trainable(spec: ModelSpec, runs) -> list[tuple[str, bool]]:
    """(alternative, trainable) in the order the executor assigns them (``freeze_untaken_alternatives``):
    branch points outer first; an alternative trains where its branch point runs it and everything
    around it trains."""
    found: list[tuple[str, bool]] = []
    active = {spec.root.name}

    def walk(node: Node, enclosing: str) -> list[tuple[Choice, str]]:
        points = []
        if isinstance(node, Choice):
            points.append((node, enclosing))
            for alternative in node.alternatives:
                points += walk(alternative, alternative.name)
        elif isinstance(node, Sequential):
            for child in node.children:
                points += walk(child, enclosing)
        return points

    for choice, enclosing in walk(spec.root, spec.root.name):
        chosen = set(runs(choice))
        for index, alternative in enumerate(choice.alternatives):
            trainable = enclosing in active and index in chosen
            if trainable:
                active.add(alternative.name)
            found.append((alternative.name, trainable))
    return found


def _loops(stage) -> bool:
    """A stage that loops over a table of the alternatives to run."""
    return len(stage) == 1 and bool(stage[0][1]) and stage[0][1][0].startswith("LOOP ")


def _split_arguments(text: str) -> list[str]:
    """The top-level, comma-separated arguments of a call's text."""
    found, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            found.append(text[start:index].strip())
            start = index + 1
    found.append(text[start:].strip())
    return [item for item in found if item]


__all__ = ["ModelSource", "layer_name", "model_source", "referenced"]
