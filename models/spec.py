"""Model specifications: the plain-data description of a multi-branch model.

A spec is a tree of frozen data classes that round-trips through JSON. It
says which submodules exist, which alternatives a branch point offers, and
which submodules are their own FSDP unit; it says nothing about torch, so
generators and oracles can reason about a model without building it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class SpecError(ValueError):
    """A model spec that cannot describe a valid model."""


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = True

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class Norm:
    """``BatchNorm1d(features)``: affine parameters and running statistics
    (buffers), normalising by the batch in training and by the running
    statistics in eval."""

    features: int

    @property
    def numel(self) -> int:
        return 2 * self.features


CHECKPOINT_MODES = ("non_reentrant", "reentrant", "wrapper", "composable")
"""How a block's forward is checkpointed, so that it runs again inside the
backward: ``torch.utils.checkpoint`` without and with reentrancy, FSDP1's
``checkpoint_wrapper`` and the composable ``checkpoint`` FSDP2 pairs with."""


@dataclass(frozen=True)
class Sequential:
    """Named children run one after another; may be its own FSDP unit.

    ``checkpoint``: one of ``CHECKPOINT_MODES``, or ``None``. ``tied_to``
    names an earlier block of the same layers whose parameters this block
    uses (weight tying): one set of parameters runs at two places."""

    name: str
    children: tuple[Node, ...]
    fsdp_unit: bool = False
    frozen: bool = False
    checkpoint: str | None = None
    tied_to: str | None = None


@dataclass(frozen=True)
class Choice:
    """A branch point: the path of each forward picks which alternatives run.

    Every alternative maps ``features -> features``, so a path may run any
    sequence of them (one, several, or none) and the model stays well-typed.
    """

    name: str
    alternatives: tuple[Sequential, ...]
    fsdp_unit: bool = False


Node = Linear | ReLU | Norm | Sequential | Choice

Path = Mapping[str, Sequence[int]]
"""Branch point name -> the alternatives one forward runs there, in order."""

DEFAULT_ALTERNATIVES = (0,)


def taken(path: Path, choice_name: str) -> Sequence[int]:
    """A branch point the path does not mention runs its first alternative."""
    return path.get(choice_name, DEFAULT_ALTERNATIVES)


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    root: Sequential

    def choices(self) -> Iterator[Choice]:
        """Every branch point, outer before inner."""
        yield from _choices(self.root)

    def units(self) -> Iterator[Sequential | Choice]:
        """Every submodule marked as its own FSDP unit, the root included."""
        yield from _units(self.root)

    def named(self) -> Iterator[Sequential | Choice]:
        """Every Sequential and Choice, outer before inner."""
        yield from named_in(self.root)

    def block(self, name: str) -> Sequential | Choice:
        for node in named_in(self.root):
            if node.name == name:
                return node
        raise KeyError(name)

    def ties(self) -> dict[str, str]:
        """Tied block -> the block whose parameters it uses."""
        blocks = (node for node in self.named() if isinstance(node, Sequential))
        return {block.name: block.tied_to for block in blocks if block.tied_to}

    def ties_across_units(self) -> dict[str, str]:
        """Tied block -> its source, where the two belong to different FSDP units."""
        owners = self.owning_units()
        return {tied: source for tied, source in self.ties().items() if owners[tied] != owners[source]}

    def owning_units(self) -> dict[str, str]:
        """Every Sequential and Choice -> the FSDP unit its own parameters
        belong to: itself if a unit, else its innermost enclosing unit."""
        owners: dict[str, str] = {}

        def visit(node: Node, unit: str) -> None:
            if isinstance(node, (Sequential, Choice)):
                unit = node.name if node.fsdp_unit or node is self.root else unit
                owners[node.name] = unit
                for child in blocks_below(node):
                    visit(child, unit)

        visit(self.root, self.root.name)
        return owners

    def has_norms(self) -> bool:
        """Whether some block holds a norm layer (running statistics)."""
        blocks = (node for node in self.named() if isinstance(node, Sequential))
        return any(isinstance(child, Norm) for block in blocks for child in block.children)

    def parents(self) -> dict[str, str]:
        """Every Sequential and Choice but the root -> the Sequential or
        Choice it sits directly in: blocks with one parent are siblings."""
        found: dict[str, str] = {}
        for node in named_in(self.root):
            for child in blocks_below(node):
                if isinstance(child, (Sequential, Choice)):
                    found[child.name] = node.name
        return found

    @property
    def encoder_stages(self) -> int:
        """How many of the root's children the ``encode`` method runs: all but the last."""
        return len(self.root.children) - 1


def unit_numel(spec: ModelSpec) -> dict[str, int]:
    """Parameters each FSDP unit flattens: its subtree minus nested units; a
    tied block's parameters count once, with the block it is tied to."""

    def own(node: Node, unit_root: bool) -> int:
        if isinstance(node, (Sequential, Choice)) and node.fsdp_unit and not unit_root:
            return 0
        if isinstance(node, Sequential) and node.tied_to:
            return 0
        if isinstance(node, Sequential):
            return sum(own(child, False) for child in node.children)
        if isinstance(node, Choice):
            return sum(own(alternative, False) for alternative in node.alternatives)
        return numel(node)

    return {unit.name: own(unit, True) for unit in spec.units()}


def numel(node: Node) -> int:
    if isinstance(node, (Linear, Norm)):
        return node.numel
    if isinstance(node, ReLU):
        return 0
    if isinstance(node, Sequential):
        return sum(numel(child) for child in node.children)
    return sum(numel(alternative) for alternative in node.alternatives)


def features(node: Node, in_features: int) -> int:
    """Output width of ``node`` given its input width; raises on a mismatch."""
    if isinstance(node, Linear):
        if node.in_features != in_features:
            raise SpecError(f"Linear({node.in_features}, {node.out_features}) receives {in_features} features")
        return node.out_features
    if isinstance(node, ReLU):
        return in_features
    if isinstance(node, Norm):
        if node.features != in_features:
            raise SpecError(f"Norm({node.features}) receives {in_features} features")
        return in_features
    if isinstance(node, Sequential):
        for child in node.children:
            in_features = features(child, in_features)
        return in_features
    for alternative in node.alternatives:
        out_features = features(alternative, in_features)
        if out_features != in_features:
            raise SpecError(
                f"alternative {alternative.name!r} of {node.name!r} maps {in_features} features to {out_features}; "
                f"alternatives must keep the width ({in_features})"
            )
    return in_features


def validate(spec: ModelSpec) -> None:
    """Raise ``SpecError`` unless the spec is a model the fuzzer can run.

    Alternatives of one branch point may differ in numel: the generator
    draws them equal (``models.strategies``), since that is what lets their
    collectives pair up silently, but the reducer keeps a smaller model
    that fails the same way whether or not they still are. A branch point
    has 1 to 4 alternatives: with one, a path runs it, repeats it or skips it.
    """
    if spec.in_features < 1:
        raise SpecError("in_features must be positive")
    features(spec.root, spec.in_features)
    if numel(spec.root) == 0:
        raise SpecError("the model has no parameters: FSDP has nothing to shard; give it a linear or a norm")
    names = [node.name for node in named_in(spec.root)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SpecError(f"submodule names must be unique, repeated: {duplicates}")
    _validate_blocks(spec)
    for choice in spec.choices():
        if not 1 <= len(choice.alternatives) <= 4:
            raise SpecError(f"branch point {choice.name!r} needs 1 to 4 alternatives")


def _validate_blocks(spec: ModelSpec) -> None:
    """Checkpoint modes and ties: a tied block repeats an earlier block of
    the root's stages layer for layer, outside any branch point, and shares
    its freezing (it holds the same parameters)."""
    earlier: dict[str, Sequential] = {}
    stages = {child.name for child in spec.root.children if isinstance(child, Sequential)}
    for node in named_in(spec.root):
        if isinstance(node, Sequential):
            if node.checkpoint is not None and node.checkpoint not in CHECKPOINT_MODES:
                raise SpecError(f"block {node.name!r}: checkpoint {node.checkpoint!r} is not one of {CHECKPOINT_MODES}")
            if node.tied_to is not None:
                source = earlier.get(node.tied_to)
                where = f"block {node.name!r} is tied to {node.tied_to!r}"
                if source is None or node.name not in stages or source.name not in stages:
                    raise SpecError(f"{where}: both must be stages of the root, the source first")
                if source.tied_to is not None:
                    raise SpecError(f"{where}, itself tied: tie both to {source.tied_to!r}")
                if not all(isinstance(c, (Linear, ReLU, Norm)) for c in source.children) or tuple(
                    source.children
                ) != tuple(node.children):
                    raise SpecError(f"{where}: a tied block has exactly the source's layers (linears, ReLUs, norms)")
                if source.frozen != node.frozen:
                    raise SpecError(f"{where}: tied blocks share parameters, so both are frozen or neither")
            earlier[node.name] = node


def blocks_below(node: Sequential | Choice) -> tuple[Node, ...]:
    """A block's children: a sequential's layers and blocks, a branch point's alternatives."""
    return node.children if isinstance(node, Sequential) else node.alternatives


def named_in(node: Node) -> Iterator[Sequential | Choice]:
    """Every Sequential and Choice in the subtree, ``node`` included, outer first."""
    if isinstance(node, Sequential):
        yield node
        for child in node.children:
            yield from named_in(child)
    elif isinstance(node, Choice):
        yield node
        for alternative in node.alternatives:
            yield from named_in(alternative)


def _choices(node: Node) -> Iterator[Choice]:
    for named in named_in(node):
        if isinstance(named, Choice):
            yield named


def _units(node: Sequential) -> Iterator[Sequential | Choice]:
    for index, named in enumerate(named_in(node)):
        if index == 0 or named.fsdp_unit:
            yield named


# JSON ----------------------------------------------------------------------


def node_to_json(node: Node) -> dict[str, Any]:
    """Flags only where set."""
    if isinstance(node, Linear):
        return {"linear": [node.in_features, node.out_features], "bias": node.bias}
    if isinstance(node, ReLU):
        return {"relu": True}
    if isinstance(node, Norm):
        return {"norm": node.features}
    if isinstance(node, Sequential):
        encoded: dict[str, Any] = {
            "sequential": node.name,
            "children": [node_to_json(c) for c in node.children],
        }
        flags = {
            "fsdp_unit": node.fsdp_unit,
            "frozen": node.frozen,
            "checkpoint": node.checkpoint,
            "tied_to": node.tied_to,
        }
    else:
        encoded = {"choice": node.name, "alternatives": [node_to_json(a) for a in node.alternatives]}
        flags = {"fsdp_unit": node.fsdp_unit}
    encoded.update((flag, value) for flag, value in flags.items() if value)
    return encoded


def node_from_json(encoded: Any) -> Node:
    if not isinstance(encoded, dict):
        raise SpecError(f"a model node must be an object, got {encoded!r}")
    try:
        if "linear" in encoded:
            in_features, out_features = encoded["linear"]
            return Linear(int(in_features), int(out_features), bool(encoded.get("bias", True)))
        if "relu" in encoded:
            return ReLU()
        if "norm" in encoded:
            return Norm(int(encoded["norm"]))
        if "sequential" in encoded:
            checkpoint, tied_to = encoded.get("checkpoint"), encoded.get("tied_to")
            return Sequential(
                name=str(encoded["sequential"]),
                children=tuple(node_from_json(c) for c in encoded["children"]),
                fsdp_unit=bool(encoded.get("fsdp_unit", False)),
                frozen=bool(encoded.get("frozen", False)),
                checkpoint=None if checkpoint is None else str(checkpoint),
                tied_to=None if tied_to is None else str(tied_to),
            )
        if "choice" in encoded:
            alternatives = tuple(node_from_json(a) for a in encoded["alternatives"])
            if not all(isinstance(a, Sequential) for a in alternatives):
                raise SpecError(f"alternatives of {encoded['choice']!r} must be sequentials")
            return Choice(str(encoded["choice"]), alternatives, bool(encoded.get("fsdp_unit", False)))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"malformed model node {encoded!r}: {exc}") from None
    raise SpecError(f"unknown model node {encoded!r}: expected one of linear, relu, norm, sequential, choice")


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {"in_features": spec.in_features, "root": node_to_json(spec.root)}


def spec_from_json(encoded: Any) -> ModelSpec:
    if not isinstance(encoded, dict) or "root" not in encoded or "in_features" not in encoded:
        raise SpecError("a model must be an object with 'in_features' and 'root'")
    root = node_from_json(encoded["root"])
    if not isinstance(root, Sequential):
        raise SpecError("the model root must be a sequential")
    spec = ModelSpec(int(encoded["in_features"]), root)
    validate(spec)
    return spec
