"""The reducer's simplifications: each pass turns a scenario into candidates
one step simpler, in the scenario's own terms (steps, ranks, branch points,
blocks, layers, marks, widths, settings), as C-Reduce's passes know C.

A pass is a function ``(scenario, hint) -> Iterator[Candidate]``; ``PASSES``
lists them, cheapest and biggest cuts first. A candidate is valid by
construction where that is cheap and checked by ``valid`` otherwise, so the
reducer runs only scenarios the executor accepts. Every candidate is
strictly smaller by ``size``, so a reduction always ends. Nothing here
imports torch: a pass can be tested on a scenario alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

from fsdp_fuzz.data import Scenario, ScenarioError, Step, validate_scenario
from fsdp_fuzz.models.spec import (
    DEFAULT_ALTERNATIVES,
    Choice,
    Linear,
    ModelSpec,
    Node,
    Norm,
    ReLU,
    Sequential,
    SpecError,
    taken,
    validate,
)

_DEFAULT_STEP = Step()
_DEFAULT_SCENARIO = {"debug_level": "DETAIL", "collective_checker": False, "freeze_untaken": False, "seed": 0}
"""Scenario fields outside the engines' settings, and the defaults a reduction returns them to."""


@dataclass(frozen=True)
class Candidate:
    change: str
    """What the pass changed, as ``show`` and a report say it: ``drop rank 2``."""
    scenario: Scenario


@dataclass(frozen=True)
class Hint:
    """What the reducer knows of the current scenario's failing run."""

    first_failing_step: int | None = None
    """The earliest step a violation names; None where only setup failed or none is known."""


Pass = Callable[[Scenario, Hint], Iterator[Candidate]]


def valid(scenario: Scenario) -> bool:
    """Whether the executor would run it: the model well-typed, the scenario's
    rules kept, and every backward on a loss that can require grad (what the
    generator's trainable stem guarantees: a user's loop never calls
    backward on a loss without a ``grad_fn``, which fails without FSDP too)."""
    try:
        validate(scenario.model)
        validate_scenario(scenario)
    except (SpecError, ScenarioError):
        return False
    return all(
        _runs_a_trainable_parameter(scenario.model.root, step, frozen=False)
        for steps in scenario.ranks
        for step in steps
        if step.backward
    )


def _runs_a_trainable_parameter(node: Node, step: Step, frozen: bool) -> bool:
    """Whether ``step``'s forward through ``node`` runs a parameter that requires grad."""
    if isinstance(node, Linear):
        return not frozen
    if isinstance(node, Norm):
        return not frozen and node.numel > 0
    if isinstance(node, Sequential):
        frozen = frozen or node.frozen or node.name in step.frozen or node.tied_to in step.frozen
        return any(_runs_a_trainable_parameter(child, step, frozen) for child in node.children)
    if isinstance(node, Choice):
        return any(
            _runs_a_trainable_parameter(node.alternatives[index], step, frozen) for index in taken(step.path, node.name)
        )
    return False


def size(scenario: Scenario) -> int:
    """A well-founded measure every pass lowers: ranks, steps, forwards, path
    entries, nodes, marks and non-default values, widths and batch."""
    steps = [step for steps in scenario.ranks for step in steps]
    choices = [choice.name for choice in scenario.model.choices()]
    measure = scenario.world_size + len(steps) + scenario.batch_size
    for step in steps:
        measure += step.forwards + step.backward + len(step.frozen)
        measure += sum(len(taken(step.path, name)) for name in choices)
        measure += sum(getattr(step, name) != getattr(_DEFAULT_STEP, name) for name in _STEP_DEFAULTS)
    measure += sum(getattr(scenario, name) != default for name, default in _DEFAULT_SCENARIO.items())
    measure += _settings_size(scenario.runs_on.settings(scenario))
    return measure + _model_size(scenario.model.root) + scenario.model.in_features


_STEP_DEFAULTS = tuple(
    item.name for item in fields(Step) if item.name not in ("path", "forwards", "backward", "frozen")
)
"""Step fields a pass returns to ``Step()``'s value; the others it shortens."""


def _settings_size(settings: object) -> int:
    default = type(settings)()
    measure = 0
    for item in fields(settings):
        value, fallback = getattr(settings, item.name), getattr(default, item.name)
        if isinstance(value, tuple):
            measure += len(value) + sum(len(v) for v in value if isinstance(v, tuple))
        elif dataclasses.is_dataclass(value):
            measure += 1 + _settings_size(value)
        else:
            measure += value != fallback
    return measure


def _model_size(node: Node) -> int:
    if isinstance(node, Linear):
        return 1 + node.bias + node.in_features + node.out_features
    if isinstance(node, Norm):
        return 1 + node.features
    if isinstance(node, ReLU):
        return 1
    if isinstance(node, Sequential):
        marks = node.fsdp_unit + node.frozen + (node.checkpoint is not None) + (node.tied_to is not None)
        return 1 + marks + sum(_model_size(child) for child in node.children)
    return 1 + node.fsdp_unit + sum(_model_size(alternative) for alternative in node.alternatives)


# Steps and ranks -----------------------------------------------------------------------------------


def truncate_steps(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop the steps after the first failing one."""
    last = hint.first_failing_step
    if last is not None and last + 1 < scenario.num_steps:
        yield Candidate(
            f"drop the steps after step {last}", replace(scenario, ranks=tuple(s[: last + 1] for s in scenario.ranks))
        )


def drop_steps(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop one step from every rank's schedule, the last first."""
    if scenario.num_steps < 2:
        return
    for index in reversed(range(scenario.num_steps)):
        ranks = tuple(steps[:index] + steps[index + 1 :] for steps in scenario.ranks)
        yield Candidate(f"drop step {index}", replace(scenario, ranks=ranks))


def drop_ranks(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop a rank, the last first, down to two; a pair at once where the world size must stay even."""
    for width in (1, 2):
        for first in reversed(range(scenario.world_size - width + 1)):
            ranks = scenario.ranks[:first] + scenario.ranks[first + width :]
            if len(ranks) >= 2:
                dropped = f"rank {first}" if width == 1 else f"ranks {first} and {first + 1}"
                yield Candidate(f"drop {dropped}", replace(scenario, ranks=ranks))


def simplify_steps(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Per step: fewer forwards, shorter paths, no backward, fewer frozen
    blocks, and each other field back to ``Step()``'s value."""
    choices = [choice.name for choice in scenario.model.choices()]
    for rank, steps in enumerate(scenario.ranks):
        for index, step in enumerate(steps):
            for change, new in _step_edits(step, choices):
                schedule = steps[:index] + (new,) + steps[index + 1 :]
                ranks = scenario.ranks[:rank] + (schedule,) + scenario.ranks[rank + 1 :]
                yield Candidate(f"rank {rank}, step {index}: {change}", replace(scenario, ranks=ranks))


def _step_edits(step: Step, choices: list[str]) -> Iterator[tuple[str, Step]]:
    if step.forwards > 1:
        yield "one forward", replace(step, forwards=1)
    if step.backward:
        yield "no backward", replace(step, backward=False)
    for name in choices:
        runs = tuple(taken(step.path, name))
        for shorter in dict.fromkeys(runs[:position] + runs[position + 1 :] for position in range(len(runs))):
            yield f"{name} runs {list(shorter)} (not {list(runs)})", replace(step, path={**step.path, name: shorter})
    for name in step.frozen:
        yield f"{name} not frozen", replace(step, frozen=tuple(n for n in step.frozen if n != name))
    for name in _STEP_DEFAULTS:
        value, default = getattr(step, name), getattr(_DEFAULT_STEP, name)
        if value != default:
            yield f"{name} back to {default!r} (was {value!r})", replace(step, **{name: default})


# The model -----------------------------------------------------------------------------------------


def _rebuild(node: Node, edit: Callable[[Node], Node | None]) -> Node | None:
    """The tree with ``edit`` applied to every node, children first; None drops a node."""
    if isinstance(node, Sequential):
        children = tuple(kept for child in node.children if (kept := _rebuild(child, edit)) is not None)
        node = replace(node, children=children)
    elif isinstance(node, Choice):
        alternatives = tuple(kept for alt in node.alternatives if (kept := _rebuild(alt, edit)) is not None)
        node = replace(node, alternatives=alternatives)
    return edit(node)


def _with_root(scenario: Scenario, edit: Callable[[Node], Node | None], **changes) -> Scenario:
    root = _rebuild(scenario.model.root, edit)
    return replace(scenario, model=ModelSpec(scenario.model.in_features, root), **changes)


def _with_paths(scenario: Scenario, choice: str, remap: Callable[[tuple[int, ...]], tuple[int, ...] | None]) -> tuple:
    """Every step's path at ``choice`` through ``remap`` (None: the step no longer names it)."""
    ranks = []
    for steps in scenario.ranks:
        edited = []
        for step in steps:
            path = dict(step.path)
            runs = remap(tuple(taken(step.path, choice)))
            path.pop(choice, None)
            if runs is not None and runs != DEFAULT_ALTERNATIVES:
                path[choice] = runs
            edited.append(replace(step, path=path))
        ranks.append(tuple(edited))
    return tuple(ranks)


def _taken_anywhere(scenario: Scenario, choice: Choice) -> set[int]:
    return {index for steps in scenario.ranks for step in steps for index in taken(step.path, choice.name)}


def drop_untaken_alternatives(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop the alternatives no rank takes: all of a branch point's at once, then one at a time."""
    for choice in scenario.model.choices():
        used = _taken_anywhere(scenario, choice)
        untaken = [index for index in range(len(choice.alternatives)) if index not in used]
        if not untaken or len(untaken) == len(choice.alternatives):
            continue
        groups = [untaken] + ([[index] for index in untaken] if len(untaken) > 1 else [])
        for group in groups:
            kept = [index for index in range(len(choice.alternatives)) if index not in group]
            position = {old: new for new, old in enumerate(kept)}
            names = ", ".join(choice.alternatives[index].name for index in group)

            def edit(node: Node, choice=choice, kept=kept) -> Node:
                if isinstance(node, Choice) and node.name == choice.name:
                    return replace(node, alternatives=tuple(node.alternatives[index] for index in kept))
                return node

            ranks = _with_paths(scenario, choice.name, lambda runs, position=position: tuple(position[i] for i in runs))
            yield Candidate(
                f"drop {names} (no rank takes it) from {choice.name}", _with_root(scenario, edit, ranks=ranks)
            )


def collapse_branch_points(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """A branch point every rank takes the same single way becomes that
    alternative; one no rank runs goes."""
    for choice in scenario.model.choices():
        runs = {tuple(taken(step.path, choice.name)) for steps in scenario.ranks for step in steps}
        if runs == {()}:
            yield Candidate(
                f"drop {choice.name} (no rank runs it)",
                _with_root(
                    scenario,
                    lambda node, choice=choice: None if isinstance(node, Choice) and node.name == choice.name else node,
                    ranks=_with_paths(scenario, choice.name, lambda runs: None),
                ),
            )
        if len(runs) != 1 or len(next(iter(runs))) != 1:
            continue
        (index,) = next(iter(runs))
        chosen = choice.alternatives[index]

        def edit(node: Node, choice=choice, chosen=chosen) -> Node:
            if isinstance(node, Choice) and node.name == choice.name:
                return replace(chosen, fsdp_unit=chosen.fsdp_unit or choice.fsdp_unit)
            return node

        yield Candidate(
            f"{choice.name} becomes {chosen.name}, the one alternative every rank takes",
            _with_root(scenario, edit, ranks=_with_paths(scenario, choice.name, lambda runs: None)),
        )


def drop_blocks(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop a block of a sequential, or inline it into its parent."""
    root = scenario.model.root
    for block in scenario.model.named():
        if block is root or not isinstance(block, Sequential) or _is_alternative(scenario.model, block.name):
            continue
        yield Candidate(
            f"drop block {block.name}",
            _with_root(scenario, lambda node, name=block.name: None if _named(node, name) else node),
        )
        if not (block.fsdp_unit or block.frozen or block.checkpoint or block.tied_to):
            yield Candidate(f"inline block {block.name} into its parent", _with_root(scenario, _inliner(block.name)))


def _is_alternative(model: ModelSpec, name: str) -> bool:
    return any(alternative.name == name for choice in model.choices() for alternative in choice.alternatives)


def _named(node: Node, name: str) -> bool:
    return isinstance(node, (Sequential, Choice)) and node.name == name


def _inliner(name: str) -> Callable[[Node], Node]:
    def edit(node: Node) -> Node:
        if isinstance(node, Sequential) and any(_named(child, name) for child in node.children):
            children: list[Node] = []
            for child in node.children:
                children += list(child.children) if _named(child, name) else [child]
            return replace(node, children=tuple(children))
        return node

    return edit


def drop_layers(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop one layer (a linear, ReLU or norm) of a block."""
    for block in scenario.model.named():
        if not isinstance(block, Sequential):
            continue
        for position, child in enumerate(block.children):
            if isinstance(child, (Linear, ReLU, Norm)):

                def edit(node: Node, name=block.name, position=position) -> Node:
                    if _named(node, name):
                        return replace(node, children=node.children[:position] + node.children[position + 1 :])
                    return node

                yield Candidate(f"drop {block.name}'s layer {position} ({_layer(child)})", _with_root(scenario, edit))


def _layer(node: Node) -> str:
    if isinstance(node, Linear):
        return f"Linear({node.in_features}, {node.out_features}{', bias=False' if not node.bias else ''})"
    if isinstance(node, Norm):
        return f"BatchNorm1d({node.features})"
    return "ReLU"


def drop_marks(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Drop a unit mark, a frozen mark, a checkpoint, a tie, a bias."""
    marks = (("fsdp_unit", False, "not its own FSDP unit"), ("frozen", False, "not frozen"))
    marks += (("checkpoint", None, "not checkpointed"), ("tied_to", None, "not tied"))
    for block in scenario.model.named():
        for field_name, cleared, said in marks:
            if getattr(block, field_name, cleared) not in (cleared, False) and block is not scenario.model.root:

                def edit(node: Node, name=block.name, field_name=field_name, cleared=cleared) -> Node:
                    return replace(node, **{field_name: cleared}) if _named(node, name) else node

                was = getattr(block, field_name)
                yield Candidate(
                    f"{block.name} {said}" + ("" if was is True else f" (was {was})"), _with_root(scenario, edit)
                )
        if isinstance(block, Sequential):
            for position, child in enumerate(block.children):
                if isinstance(child, Linear) and child.bias:

                    def edit(node: Node, name=block.name, position=position) -> Node:
                        if not _named(node, name):
                            return node
                        layer = replace(node.children[position], bias=False)
                        return replace(
                            node, children=node.children[:position] + (layer,) + node.children[position + 1 :]
                        )

                    yield Candidate(f"{block.name}'s layer {position} without bias", _with_root(scenario, edit))


def narrow_widths(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Each width the model uses, everywhere at once, to 1 or to half; and a
    smaller batch. One width replaced at every place keeps every shape that
    matched matching, so the model stays well-typed."""
    widths = sorted(_widths(scenario.model.root) | {scenario.model.in_features}, reverse=True)
    for width in widths:
        for narrower in sorted({1, width // 2} - {0, width}):
            rename = {width: narrower}
            yield Candidate(f"width {width} narrowed to {narrower}", _narrowed(scenario, rename))
    for batch in sorted({2, scenario.batch_size // 2} - {0, 1, scenario.batch_size}):
        if batch < scenario.batch_size:
            yield Candidate(f"batch of {batch} (was {scenario.batch_size})", replace(scenario, batch_size=batch))


def _widths(node: Node) -> set[int]:
    if isinstance(node, Linear):
        return {node.in_features, node.out_features}
    if isinstance(node, Norm):
        return {node.features}
    if isinstance(node, Sequential):
        return set().union(*(_widths(child) for child in node.children))
    if isinstance(node, Choice):
        return set().union(*(_widths(alternative) for alternative in node.alternatives))
    return set()


def _narrowed(scenario: Scenario, rename: dict[int, int]) -> Scenario:
    def edit(node: Node) -> Node:
        if isinstance(node, Linear):
            return replace(
                node,
                in_features=rename.get(node.in_features, node.in_features),
                out_features=rename.get(node.out_features, node.out_features),
            )
        if isinstance(node, Norm):
            return replace(node, features=rename.get(node.features, node.features))
        return node

    narrowed = _with_root(scenario, edit)
    in_features = rename.get(scenario.model.in_features, scenario.model.in_features)
    return replace(narrowed, model=ModelSpec(in_features, narrowed.model.root))


# Settings ------------------------------------------------------------------------------------------


def default_settings(scenario: Scenario, hint: Hint) -> Iterator[Candidate]:
    """Each setting of the engine (and of a nested policy), and each of the
    scenario's own, back to its default; a list setting loses one entry."""
    engine = scenario.runs_on
    settings = engine.settings(scenario)
    for label, value, default, rebuilt in _setting_edits(settings, type(settings)(), ""):
        yield Candidate(
            f"{label} back to {default!r} (was {value!r})", replace(scenario, **{engine.settings_field: rebuilt})
        )
    for name, default in _DEFAULT_SCENARIO.items():
        value = getattr(scenario, name)
        if value != default:
            yield Candidate(f"{name} back to {default!r} (was {value!r})", replace(scenario, **{name: default}))


def _setting_edits(settings: object, default: object, prefix: str) -> Iterator[tuple[str, object, object, object]]:
    """(label, value, new value, the settings with it) for each one-field change toward the default."""
    for item in fields(settings):
        value, fallback = getattr(settings, item.name), getattr(default, item.name)
        if value == fallback:
            continue
        label = prefix + item.name
        yield label, value, fallback, replace(settings, **{item.name: fallback})
        if isinstance(value, tuple) and len(value) > 1:
            for position in range(len(value)):
                shorter = value[:position] + value[position + 1 :]
                yield label, value, shorter, replace(settings, **{item.name: shorter})
        if dataclasses.is_dataclass(value):
            for inner, was, becomes, rebuilt in _setting_edits(value, type(value)(), f"{label}."):
                yield inner, was, becomes, replace(settings, **{item.name: rebuilt})


PASSES: tuple[Pass, ...] = (
    truncate_steps,
    drop_ranks,
    drop_steps,
    drop_untaken_alternatives,
    collapse_branch_points,
    drop_blocks,
    simplify_steps,
    drop_layers,
    drop_marks,
    default_settings,
    narrow_widths,
)
"""In the order the reducer applies them: the biggest cuts first."""

AFTER_EACH_KEEP: tuple[Pass, ...] = (drop_untaken_alternatives,)
"""Run again right after each kept candidate: cheap, and what they drop
would cost the later passes a run per block, layer and mark inside it."""


def candidates(scenario: Scenario, hint: Hint = Hint()) -> Iterator[Candidate]:
    """Every valid candidate of every pass, each strictly smaller than ``scenario``."""
    bound = size(scenario)
    for reduction_pass in PASSES:
        for candidate in reduction_pass(scenario, hint):
            if size(candidate.scenario) < bound and valid(candidate.scenario):
                yield candidate
