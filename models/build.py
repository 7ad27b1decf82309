"""Turns a ``ModelSpec`` into an ``nn.Module`` and wraps its units in FSDP.

The forward reads its path from a ``PathState`` shared by every branch point,
set by the caller before each forward, the way a user's model reads a flag
(the seed's ``use_alt_path``). Keeping the path out of ``forward``'s
arguments means FSDP sees exactly the call signature a user's model has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.spec import Choice, Linear, ModelSpec, Node, Path, ReLU, Sequential, taken


@dataclass
class PathState:
    """The path of the forward in progress: branch point -> alternatives run."""

    path: Path = field(default_factory=dict)

    def alternatives(self, choice_name: str) -> Sequence[int]:
        return taken(self.path, choice_name)


class SequentialModule(nn.Module):
    def __init__(self, spec: Sequential, state: PathState) -> None:
        super().__init__()
        self.child_names: list[str] = []
        for index, child in enumerate(spec.children):
            name = child.name if isinstance(child, (Sequential, Choice)) else str(index)
            self.add_module(name, _build_node(child, state))
            self.child_names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.child_names:
            x = getattr(self, name)(x)
        return x


class ChoiceModule(nn.Module):
    def __init__(self, spec: Choice, state: PathState) -> None:
        super().__init__()
        self.choice_name = spec.name
        self.state = state
        self.alternative_names = [alternative.name for alternative in spec.alternatives]
        for alternative in spec.alternatives:
            self.add_module(alternative.name, SequentialModule(alternative, state))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.state.alternatives(self.choice_name):
            x = getattr(self, self.alternative_names[index])(x)
        return x


def _build_node(node: Node, state: PathState) -> nn.Module:
    if isinstance(node, Linear):
        return nn.Linear(node.in_features, node.out_features, bias=node.bias)
    if isinstance(node, ReLU):
        return nn.ReLU()
    if isinstance(node, Sequential):
        return SequentialModule(node, state)
    return ChoiceModule(node, state)


@dataclass
class BuiltModel:
    """A model and the handles a schedule needs to drive it."""

    spec: ModelSpec
    module: nn.Module
    state: PathState
    modules_by_name: dict[str, nn.Module]
    fsdp_units: dict[str, nn.Module] = field(default_factory=dict)
    """Spec name -> its FSDP wrapper, once ``wrap_fsdp`` ran."""

    def set_path(self, path: Path) -> None:
        self.state.path = path


def build_model(spec: ModelSpec, seed: int, freeze_untaken: bool = False) -> BuiltModel:
    """Build ``spec`` with parameters that depend on ``seed`` alone.

    Every rank calls this with the same seed and gets the same parameters,
    as FSDP expects without ``sync_module_states``.
    """
    state = PathState()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = SequentialModule(spec.root, state)
    modules_by_name = {spec.root.name: module}
    modules_by_name.update(_named_modules(spec.root, module))
    built = BuiltModel(spec, module, state, modules_by_name)
    for node in _frozen(spec.root):
        for parameter in modules_by_name[node.name].parameters():
            parameter.requires_grad = False
    if freeze_untaken:
        freeze_untaken_alternatives(built, {})
    return built


def _named_modules(node: Sequential | Choice, module: nn.Module) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    children = node.children if isinstance(node, Sequential) else node.alternatives
    for child in children:
        if isinstance(child, (Sequential, Choice)):
            child_module = getattr(module, child.name)
            found[child.name] = child_module
            found.update(_named_modules(child, child_module))
    return found


def _frozen(node: Node) -> list[Sequential]:
    if isinstance(node, Sequential):
        found = [node] if node.frozen else []
        for child in node.children:
            found.extend(_frozen(child))
        return found
    if isinstance(node, Choice):
        return [frozen for alternative in node.alternatives for frozen in _frozen(alternative)]
    return []


def freeze_untaken_alternatives(built: BuiltModel, path: Path) -> None:
    """Make trainable exactly the alternatives ``path`` runs, as the seed's
    ``flip_path`` does.

    Works through FSDP wrappers: an alternative that is its own unit yields its
    flat parameter (or its original parameters with ``use_orig_params``).
    Branch points are visited outer first, so an untaken outer alternative
    leaves everything inside it frozen.
    """
    active = {built.spec.root.name}
    for choice in built.spec.choices():
        choice_module = built.modules_by_name[choice.name]
        runs = set(taken(path, choice.name))
        reachable = _enclosing_alternative(built.spec, choice.name) in active
        for index, alternative in enumerate(choice.alternatives):
            trainable = reachable and index in runs
            if trainable:
                active.add(alternative.name)
            for parameter in getattr(choice_module, alternative.name).parameters():
                parameter.requires_grad = trainable


def _enclosing_alternative(spec: ModelSpec, choice_name: str) -> str:
    """Name of the innermost alternative (or the root) that contains the choice."""

    def search(node: Node, enclosing: str) -> str | None:
        if isinstance(node, Choice):
            if node.name == choice_name:
                return enclosing
            for alternative in node.alternatives:
                found = search(alternative, alternative.name)
                if found is not None:
                    return found
        elif isinstance(node, Sequential):
            for child in node.children:
                found = search(child, enclosing)
                if found is not None:
                    return found
        return None

    found = search(spec.root, spec.root.name)
    if found is None:
        raise KeyError(choice_name)
    return found


def wrap_fsdp(built: BuiltModel, **fsdp_kwargs: Any) -> nn.Module:
    """Wrap every unit of the spec in FSDP, innermost first, then the root."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap_children(node: Sequential | Choice, module: nn.Module) -> None:
        children = node.children if isinstance(node, Sequential) else node.alternatives
        for child in children:
            if not isinstance(child, (Sequential, Choice)):
                continue
            child_module = getattr(module, child.name)
            wrap_children(child, child_module)
            if child.fsdp_unit:
                wrapped = built.fsdp_units[child.name] = FSDP(child_module, **fsdp_kwargs)
                setattr(module, child.name, wrapped)

    wrap_children(built.spec.root, built.module)
    root = built.fsdp_units[built.spec.root.name] = FSDP(built.module, **fsdp_kwargs)
    return root
