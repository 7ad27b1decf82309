"""The scenario's model as ``nn.Module`` source: named blocks, branch points
that read the path of the step under way, checkpointing, ties and frozen
blocks, built the way the executor builds it (``build_model``): the same
construction order under the same seed, hence the same parameters."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, ReLU, Sequential, blocks_below

CHECKPOINTED = '''
class Checkpointed(nn.Sequential):
    """Layers run in order under torch.utils.checkpoint: recomputed in the backward."""

    def __init__(self, layers, checkpoint=None):
        super().__init__(layers)
        self.checkpoint = checkpoint

    def forward(self, x):
        if self.checkpoint is None:
            return super().forward(x)
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=self.checkpoint == "reentrant")
'''

BRANCH = '''
class Branch(nn.ModuleDict):
    """A branch point: runs the alternatives PATH[point] lists, in order (each keeps the width)."""

    def __init__(self, point, **alternatives):
        super().__init__(alternatives)
        self.point = point

    def forward(self, x):
        for index in PATH[self.point]:
            x = list(self.values())[index](x)
        return x
'''

UNIT_CLASSES = '''
class Unit({base}):
    """A block that is an FSDP unit: ModuleWrapPolicy finds the units by class."""


class UnitBranch(Branch):
    """A branch point that is an FSDP unit."""
'''

ENCODE = '''
class Model(nn.Sequential):
    def encode(self, x):
        """Every stage but the last: a second entry point, as an encode or generate method is."""
        for stage in list(self.children())[:-1]:
            x = stage(x)
        return x
'''

FREEZE_UNTAKEN = '''
def freeze_untaken(model):
    """Only the alternatives the path runs are trainable, as the seed test's flip_path does."""
    untaken = set()
    for branch in [module for module in model.modules() if isinstance(module, Branch)]:
        for index, alternative in enumerate(branch.children()):
            taken = id(branch) not in untaken and index in PATH[branch.point]
            for parameter in alternative.parameters():  # as a user writes it (requires_grad_ skips no-ops)
                parameter.requires_grad = taken
            untaken |= set() if taken else {id(module) for module in alternative.modules()}
'''


@dataclass(frozen=True)
class ModelSource:
    """The model's classes and its ``build()``."""

    classes: str
    build: str
    imports: tuple[str, ...]


def model_source(scenario: Scenario) -> ModelSource:
    spec = scenario.model
    named = list(spec.named())
    checkpointed = {node.checkpoint for node in named if isinstance(node, Sequential) and node.checkpoint}
    auto_wrap = scenario.runs_on.wraps_by_class(scenario)
    encode = any(step.method == "encode" for steps in scenario.ranks for step in steps)
    imports = ["from collections import OrderedDict"]
    inline = bool(checkpointed & {"reentrant", "non_reentrant"})
    classes = [CHECKPOINTED] if inline else []
    if any(isinstance(node, Choice) for node in named):
        classes.append(BRANCH)
    if auto_wrap:
        classes.append(UNIT_CLASSES.format(base="Checkpointed" if inline else "nn.Sequential"))
    if encode:
        classes.append(ENCODE)
    if "wrapper" in checkpointed:
        imports.append(
            "from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper"
        )
    if "composable" in checkpointed:
        imports.append("from torch.distributed._composable import checkpoint as composable_checkpoint")
    if scenario.freeze_untaken:
        classes.append(FREEZE_UNTAKEN)
    renderer = _Renderer(auto_wrap, "Model" if encode else "nn.Sequential")
    root = renderer.node(spec.root, root=True, depth=1, lead=len("model = "))
    lines = [
        "def build():",
        '    """The model, its parameters drawn from SEED alone: every rank builds the same one."""',
        "    torch.manual_seed(SEED)",
        f"    model = {root}",
    ]
    paths = block_paths(spec)
    for tied, source in spec.ties().items():
        for index, child in enumerate(spec.block(tied).children):
            if isinstance(child, (Linear, Norm)):
                layer, origin = f"model.{paths[tied]}.{layer_name(spec.block(tied), index)}", ""
                origin = f"model.{paths[source]}.{layer_name(spec.block(source), index)}"
                attributes = ["weight", "bias"] if not isinstance(child, Linear) or child.bias else ["weight"]
                lines += [f"    {layer}.{name} = {origin}.{name}  # tied to {source}" for name in attributes]
    frozen = [node.name for node in named if isinstance(node, Sequential) and node.frozen]
    for name in frozen:
        lines += [f"    for parameter in model.{paths[name]}.parameters():", "        parameter.requires_grad = False"]
    if scenario.freeze_untaken:
        default = {choice.name: [0] for choice in spec.choices()}
        lines += [f"    PATH.update({_literal(default)})", "    freeze_untaken(model)"]
    if len(lines) == 4:  # nothing follows the construction
        lines[-1] = lines[-1].replace("    model = ", "    return ", 1)
    else:
        lines.append("    return model")
    return ModelSource("\n".join(classes).strip("\n"), "\n".join(lines), tuple(imports))


def _literal(value: object) -> str:
    from fsdp_fuzz.repro.text import literal

    return literal(value)


def layer_name(block: Sequential, index: int) -> str:
    """A child's attribute name: its own for blocks and branch points, else
    ``fc0``, ``relu1``, ``norm2`` by kind and position (``_`` appended where
    that would take a block's name)."""
    child = block.children[index]
    if isinstance(child, (Sequential, Choice)):
        return child.name
    kind = {Linear: "fc", ReLU: "relu", Norm: "norm"}[type(child)]
    name = f"{kind}{index}"
    taken = {c.name for c in block.children if isinstance(c, (Sequential, Choice))}
    while name in taken:
        name += "_"
    return name


def block_paths(spec: ModelSpec) -> dict[str, str]:
    """Every block and branch point -> its attribute path from the root (``branch.layer1``); ``""`` for the root."""
    found = {spec.root.name: ""}

    def visit(node: Sequential | Choice, prefix: str) -> None:
        children = blocks_below(node)
        for child in children:
            if isinstance(child, (Sequential, Choice)):
                found[child.name] = f"{prefix}{child.name}"
                visit(child, f"{prefix}{child.name}.")

    visit(spec.root, "")
    return found


class _Renderer:
    def __init__(self, auto_wrap: bool, root_class: str) -> None:
        self.auto_wrap = auto_wrap
        self.root_class = root_class

    def node(self, node: Node, root: bool = False, depth: int = 0, lead: int = 0) -> str:
        """``node``'s constructor, on one line where its line (``depth`` levels in, after ``lead`` characters)
        stays within the line length, else one child a line."""
        if isinstance(node, Linear):
            return f"nn.Linear({node.in_features}, {node.out_features}{'' if node.bias else ', bias=False'})"
        if isinstance(node, ReLU):
            return "nn.ReLU()"
        if isinstance(node, Norm):
            return f"nn.BatchNorm1d({node.features})"
        pad = "    " * (depth + 1)
        if isinstance(node, Choice):
            cls = "UnitBranch" if self.auto_wrap and node.fsdp_unit else "Branch"
            items = [f"{a.name}={self.node(a, depth=depth + 1, lead=len(a.name) + 1)}" for a in node.alternatives]
            return self._call(cls, [f'"{node.name}"', *items], pad, depth, lead)
        cls = self.root_class if root else ("Unit" if self.auto_wrap and node.fsdp_unit else "nn.Sequential")
        items = []
        for index, child in enumerate(node.children):
            name = layer_name(node, index)
            items.append(f"{name}={self.node(child, depth=depth + 1, lead=len(name) + 1)}")
        inline = node.checkpoint in ("reentrant", "non_reentrant")
        if inline and cls == "nn.Sequential":
            cls = "Checkpointed"
        suffix = f', checkpoint="{node.checkpoint}")' if inline else ")"
        built = f"{cls}(OrderedDict({', '.join(items)}){suffix}"
        if not _fits(built, depth, lead):
            built = (
                f"{cls}(OrderedDict(\n" + "".join(f"{pad}{item},\n" for item in items) + f"{'    ' * depth}){suffix}"
            )
        if node.checkpoint == "wrapper":
            return self._call(
                "checkpoint_wrapper", [built, "checkpoint_impl=CheckpointImpl.NO_REENTRANT"], pad, depth, lead
            )
        if node.checkpoint == "composable":
            return self._call("composable_checkpoint", [built], pad, depth, lead)
        return built

    @staticmethod
    def _call(cls: str, items: list[str], pad: str, depth: int, lead: int) -> str:
        inline = f"{cls}({', '.join(items)})"
        if _fits(inline, depth, lead):
            return inline
        closing = "    " * depth
        return f"{cls}(\n" + "".join(f"{pad}{item},\n" for item in items) + f"{closing})"


def _fits(source: str, depth: int, lead: int) -> bool:
    """Whether ``source`` fits on its line: ``depth`` indents, ``lead`` characters before it, a comma after."""
    return "\n" not in source and 4 * depth + lead + len(source) + 1 <= 120
