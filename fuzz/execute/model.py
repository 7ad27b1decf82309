"""The model a scenario describes, and the user's program around it.

``build_model`` builds a spec (``fsdp_fuzz.models.spec.ModelSpec``) as
plain ``nn.Module`` classes, with parameters that depend on the
seed alone; ``run_forwards`` runs one step's forwards the way a user's
program does (mode, path, freezing, grad mode, entry point) on batches that
depend only on where they are used (``step_input``). The ranks
(``fsdp_fuzz.execute.rank``) and the single-process reference
(``fsdp_fuzz.execute.reference``) both use them, so they see the same
parameters, batches and forwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, ReLU, Sequential, blocks_below, taken

LEARNING_RATE = 0.01
"""The user's optimizer: SGD at this rate, on the ranks and in the reference."""


# Every branch point reads the path of the forward in progress from one dict
# shared by the whole model, set before each step, the way a user's model
# reads a flag (the seed test's ``use_alt_path``): FSDP sees the call
# signature a user's model has.

Block = Sequential | Choice


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside an activation-checkpoint wrapper (itself otherwise):
    where a child is set, so that the forward that runs sees it."""
    return getattr(module, "_checkpoint_wrapped_module", module)


class SequentialModule(nn.Module):
    """Children run one after another; sequentials and branch points are
    named, others numbered. ``checkpoint`` ``reentrant`` or ``non_reentrant``
    runs the children under ``torch.utils.checkpoint``."""

    def __init__(self, node: Sequential, path: dict[str, list[int]]) -> None:
        super().__init__()
        self.child_names: list[str] = []
        self.checkpoint_mode = node.checkpoint
        for index, child in enumerate(node.children):
            name = child.name if isinstance(child, (Sequential, Choice)) else str(index)
            self.add_module(name, _build_node(child, path))
            self.child_names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_mode in ("reentrant", "non_reentrant"):
            reentrant = self.checkpoint_mode == "reentrant"
            return torch.utils.checkpoint.checkpoint(self._run, x, self.child_names, use_reentrant=reentrant)
        return self._run(x, self.child_names)

    def _run(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x


class UnitModule(SequentialModule):
    """A sequential the spec makes an FSDP unit: a class of its own, so that
    a ``ModuleWrapPolicy`` finds the units by class, as it finds a
    transformer's blocks."""

    def __init__(self, node: Sequential, path: dict[str, list[int]]) -> None:
        super().__init__(node, path)
        self.unit_name = node.name


class RootModule(SequentialModule):
    """The model: ``forward`` runs every stage, ``encode`` all but the last,
    a second entry point as a ``generate`` or ``encode`` method is."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.child_names[:-1])


class ChoiceModule(nn.Module):
    """A branch point: runs the alternatives the path lists for it, in order."""

    unit_name: str | None = None

    def __init__(self, node: Choice, path: dict[str, list[int]]) -> None:
        super().__init__()
        self.choice_name = node.name
        self.path = path
        self.alternative_names = [alternative.name for alternative in node.alternatives]
        for alternative in node.alternatives:
            self.add_module(alternative.name, _build_node(alternative, path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.path[self.choice_name]:
            x = getattr(self, self.alternative_names[index])(x)
        return x


class UnitChoiceModule(ChoiceModule):
    """A branch point the spec makes an FSDP unit (see ``UnitModule``)."""

    def __init__(self, node: Choice, path: dict[str, list[int]]) -> None:
        super().__init__(node, path)
        self.unit_name = node.name


UNIT_CLASSES = frozenset({UnitModule, UnitChoiceModule})


def _build_node(node: Node, path: dict[str, list[int]]) -> nn.Module:
    if isinstance(node, Linear):
        return nn.Linear(node.in_features, node.out_features, bias=node.bias)
    if isinstance(node, ReLU):
        return nn.ReLU()
    if isinstance(node, Norm):
        return nn.BatchNorm1d(node.features)
    if isinstance(node, Choice):
        return (UnitChoiceModule if node.fsdp_unit else ChoiceModule)(node, path)
    module = (UnitModule if node.fsdp_unit else SequentialModule)(node, path)
    if node.checkpoint == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if node.checkpoint == "composable":
        from torch.distributed._composable import checkpoint

        checkpoint(module)
    return module


@dataclass
class BuiltModel:
    """A model and the handles a schedule needs to drive it."""

    spec: ModelSpec
    module: nn.Module
    """The root; the engine's wrapper once wrapped."""
    path: dict[str, list[int]]
    units: dict[str, nn.Module] = field(default_factory=dict)
    """Spec name -> the module the engine made a unit of, once wrapped."""
    ignored: frozenset[int] = frozenset()
    """ids of the parameters the engine was told to ignore: each rank's own."""

    def set_path(self, path: Mapping[str, Sequence[int]]) -> None:
        """Every branch point's alternatives for the forwards to come (the first where ``path`` is silent)."""
        self.path.clear()
        self.path.update({choice.name: list(taken(path, choice.name)) for choice in self.spec.choices()})

    def branch_points(self) -> Iterator[tuple[Choice, nn.Module, str]]:
        """(node, module, innermost enclosing alternative or the root) of
        every branch point, outer first; through wrappers once wrapped."""
        for node, module, enclosing in self.blocks():
            if isinstance(node, Choice):
                yield node, module, enclosing

    def blocks(self) -> Iterator[tuple[Block, nn.Module, str]]:
        """(node, module, innermost enclosing alternative or the root) of
        every sequential and branch point, outer first."""

        def walk(node: Block, module: nn.Module, enclosing: str) -> Iterator[tuple[Block, nn.Module, str]]:
            yield node, module, enclosing
            for child in blocks_below(node):
                if isinstance(child, (Sequential, Choice)):
                    inner = child.name if isinstance(node, Choice) else enclosing
                    yield from walk(child, getattr(module, child.name), inner)

        yield from walk(self.spec.root, self.module, self.spec.root.name)

    def block(self, name: str) -> nn.Module:
        return next(module for node, module, _ in self.blocks() if node.name == name)

    def ignore(self, names: Sequence[str]) -> list[nn.Module]:
        """The named blocks, whose parameters the engine is told to ignore."""
        blocks = [self.block(name) for name in names]
        self.ignored = frozenset(id(parameter) for block in blocks for parameter in block.parameters())
        return blocks


def build_model(spec: ModelSpec, seed: int, freeze_untaken: bool) -> BuiltModel:
    """Build ``spec`` with parameters that depend on ``seed`` alone.

    Every rank calls this with the same seed and gets the same parameters,
    as FSDP expects without ``sync_module_states``. A tied block takes the
    parameters of the block it is tied to, as weight tying does.
    """
    path: dict[str, list[int]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = RootModule(spec.root, path)
    built = BuiltModel(spec, module, path)
    built.set_path({})
    for node, block, _ in list(built.blocks()):
        if isinstance(node, Sequential) and node.tied_to:
            source = built.block(node.tied_to)
            for index, child in enumerate(node.children):
                if isinstance(child, (Linear, Norm)):
                    layer, origin = getattr(block, str(index)), getattr(source, str(index))
                    layer.weight = origin.weight
                    if getattr(origin, "bias", None) is not None:
                        layer.bias = origin.bias
    for node, block, _ in built.blocks():
        if isinstance(node, Sequential) and node.frozen:
            for parameter in block.parameters():
                parameter.requires_grad = False
    if freeze_untaken:
        freeze_untaken_alternatives(built, {})
    return built


def freeze_untaken_alternatives(built: BuiltModel, path: Mapping[str, Sequence[int]]) -> None:
    """Make trainable exactly the alternatives ``path`` runs, as the seed's
    ``flip_path`` does.

    Works through FSDP wrappers: an alternative that is its own unit yields
    its flat parameter (or its original parameters with ``use_orig_params``).
    Branch points come outer first, so an untaken outer alternative leaves
    everything inside it frozen.
    """
    active = {built.spec.root.name}
    for node, module, enclosing in built.branch_points():
        runs = set(taken(path, node.name))
        for index, alternative in enumerate(node.alternatives):
            trainable = enclosing in active and index in runs
            if trainable:
                active.add(alternative.name)
            for parameter in getattr(module, alternative.name).parameters():
                parameter.requires_grad = trainable


def freeze_scheduled(built: BuiltModel, scenario: Scenario, frozen: Sequence[str]) -> None:
    """Blocks some step of the scenario freezes: frozen in this step when
    ``frozen`` names them, trainable otherwise."""
    for name in sorted(scenario.scheduled_frozen()):
        for parameter in built.block(name).parameters():
            parameter.requires_grad = name not in frozen


def step_input(scenario: Scenario, rank: int, step: int, forward: int) -> torch.Tensor:
    """A batch that depends only on where it is used, never on RNG history."""
    generator = torch.Generator().manual_seed(((scenario.seed * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((scenario.batch_size, scenario.model.in_features), generator=generator)


@dataclass
class Forwards:
    """The step's forwards: the sum of their outputs (float32, what a
    backward differentiates) and of their absolute values."""

    total: torch.Tensor
    magnitude: float


def run_forwards(
    scenario: Scenario,
    built: BuiltModel,
    rank: int,
    index: int,
    device: torch.device,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> Forwards:
    """The step's forwards, as the user's program runs them: mode, path,
    freezing, grad mode, entry point. The dtypes are for a run without an
    engine to cast the inputs and outputs (the reference)."""
    step = scenario.ranks[rank][index]
    built.module.train(step.training)
    built.set_path(step.path)
    if scenario.freeze_untaken:
        freeze_untaken_alternatives(built, step.path)
    freeze_scheduled(built, scenario, step.frozen)
    entry = built.module if step.method == "forward" else getattr(built.module, step.method)
    outputs = []
    with torch.set_grad_enabled(step.grad_enabled):
        for k in range(step.forwards):
            batch = step_input(scenario, rank, index, k).to(device)
            output = entry(batch if input_dtype is None else batch.to(input_dtype))
            outputs.append((output if output_dtype is None else output.to(output_dtype)).float())
        total = sum((output.sum() for output in outputs), torch.zeros((), device=device))
    magnitude = sum(float(output.detach().abs().sum().cpu()) for output in outputs)
    return Forwards(total, magnitude)


def dtype_named(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)
