"""Hypothesis strategies for model specs: a stem, then stages, some of them
branch points whose alternatives have exactly equal numel and different shapes.

Equal numel is constructed, never searched for: ``stacks_by_numel`` lists
every small width-preserving stack of linears grouped by numel, and a branch
point takes distinct stacks from one group. Filtering random alternatives for
equal numel would throw away nearly every example. A nested branch point
inside one alternative is balanced in the others by a filler of the same
numel (stacks from the nested branch point's own group), so nesting costs no
filtering either.

The stem maps the input to the model width and is never frozen and never
inside a branch point, so every forward runs a trainable parameter and a
backward always has something to differentiate, whatever the path skips.
Every model has at least one branch point: without one there is no path to
diverge.

Everything shrinks toward the simple: one stage, a branch point of two
single-linear alternatives, narrow widths, no bias, no ReLUs, no nesting, no
units beyond those a rule requires, nothing frozen.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from hypothesis import strategies as st

from models.spec import Choice, Linear, ModelSpec, Node, ReLU, Sequential

MIN_WIDTH = 2
MAX_WIDTH = 8
MAX_LINEARS = 3
ROOT_NAME = "model"
STEM_NAME = "stem"

Stack = tuple[Linear, ...]
"""Linears applied in turn, before ReLUs are placed after some of them."""

# Shrinking moves toward the front.
_STAGE_KINDS = ("relu", "linear", "block", "branch")


@dataclass(frozen=True)
class UnitRules:
    """Which nodes must be their own FSDP unit.

    With ``use_orig_params=False`` FSDP refuses a flat parameter that mixes
    ``requires_grad`` values, so a frozen subtree must be a unit of its own,
    and so must every alternative when the schedule freezes untaken ones.
    """

    frozen_are_units: bool = False
    alternatives_are_units: bool = False


def width_preserving_stacks(width: int, min_hidden: int = MIN_WIDTH, max_hidden: int = MAX_WIDTH) -> Iterator[Stack]:
    """Every stack of 1 to ``MAX_LINEARS`` linears mapping ``width`` to ``width``."""
    for count in range(1, MAX_LINEARS + 1):
        for hidden in itertools.product(range(min_hidden, max_hidden + 1), repeat=count - 1):
            sizes = (width, *hidden, width)
            for biases in itertools.product((False, True), repeat=count):
                yield tuple(Linear(a, b, bias) for (a, b), bias in zip(itertools.pairwise(sizes), biases, strict=True))


@cache
def stacks_by_numel(
    width: int, min_hidden: int = MIN_WIDTH, max_hidden: int = MAX_WIDTH
) -> dict[int, tuple[Stack, ...]]:
    """Numel -> the stacks with that numel, simplest first; only numels that
    at least two stacks share, since a branch point needs two."""
    groups: defaultdict[int, list[Stack]] = defaultdict(list)
    for stack in width_preserving_stacks(width, min_hidden, max_hidden):
        groups[stack_numel(stack)].append(stack)
    return {size: tuple(sorted(stacks, key=_simplicity)) for size, stacks in sorted(groups.items()) if len(stacks) >= 2}


def most_alternatives(width: int, min_hidden: int = MIN_WIDTH, max_hidden: int = MAX_WIDTH) -> int:
    """The most distinct equal-numel stacks one branch point at ``width`` can offer."""
    return max(len(group) for group in stacks_by_numel(width, min_hidden, max_hidden).values())


@cache
def first_stacks(width: int, count: int, min_hidden: int, max_hidden: int) -> dict[int, tuple[Stack, ...]]:
    """Number of linears -> stacks whose numel group holds at least ``count`` stacks."""
    found: defaultdict[int, list[Stack]] = defaultdict(list)
    for group in stacks_by_numel(width, min_hidden, max_hidden).values():
        if len(group) >= count:
            for stack in group:
                found[len(stack)].append(stack)
    return {linears: tuple(sorted(stacks, key=_simplicity)) for linears, stacks in sorted(found.items())}


def stack_numel(stack: Stack) -> int:
    return sum(linear.numel for linear in stack)


def _simplicity(stack: Stack) -> tuple:
    return (len(stack), stack_numel(stack), tuple((linear.out_features, linear.bias) for linear in stack))


@dataclass(frozen=True)
class _Bounds:
    max_stages: int
    max_depth: int
    max_alternatives: int
    min_width: int
    max_width: int
    rules: UnitRules


class _Names:
    """Unique names in draw order: ``block0``, ``branch0``, ``branch0_1`` ..."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def __call__(self, kind: str) -> str:
        number = self._counts[kind]
        self._counts[kind] += 1
        return f"{kind}{number}"


def _chance(times: int, out_of: int) -> st.SearchStrategy[bool]:
    """True about ``times`` in ``out_of`` draws; shrinks to False."""
    return st.integers(1, out_of).map(lambda drawn: drawn > out_of - times)


@st.composite
def model_specs(
    draw: st.DrawFn,
    *,
    max_stages: int = 3,
    max_depth: int = 2,
    max_alternatives: int = 4,
    min_width: int = MIN_WIDTH,
    max_width: int = MAX_WIDTH,
    rules: UnitRules = UnitRules(),
) -> ModelSpec:
    """Valid specs: ``model`` = stem, then 1 to ``max_stages`` stages.

    A stage is a bare ReLU or Linear, a plain block, or a branch point of 2 to
    ``max_alternatives`` alternatives, one stage at least a branch point;
    branch points nest up to ``max_depth`` levels. Every Sequential and Choice
    may be a unit, any block below the stem may be frozen, both within
    ``rules``.
    """
    if not 2 <= max_alternatives <= 4:
        raise ValueError("max_alternatives must be 2 to 4 (what models.spec.validate accepts)")
    if max_stages < 1 or max_depth < 1 or not 1 <= min_width <= max_width:
        raise ValueError("need max_stages >= 1, max_depth >= 1 and 1 <= min_width <= max_width")
    bounds = _Bounds(max_stages, max_depth, max_alternatives, min_width, max_width, rules)
    names = _Names()
    in_features = draw(st.integers(min_width, max_width))
    width = draw(st.integers(min_width, max_width))
    stem = Sequential(
        STEM_NAME, _layers(draw, _free_stack(draw, in_features, width, bounds)), fsdp_unit=draw(st.booleans())
    )
    children: list[Node] = [stem]
    count = draw(st.integers(1, max_stages))
    anchor = draw(st.integers(0, count - 1))
    for index in range(count):
        kind = "branch" if index == anchor else draw(st.sampled_from(_STAGE_KINDS))
        if kind == "relu":
            children.append(ReLU())
        elif kind == "branch":
            children.append(_branch(draw, names, width, 1, bounds))
        else:
            out = draw(st.one_of(st.just(width), st.integers(min_width, max_width)))
            if kind == "linear":
                children.append(Linear(width, out, draw(st.booleans())))
            else:
                stack = _free_stack(draw, width, out, bounds)
                children.append(_block(draw, names("block"), _layers(draw, stack), bounds.rules))
            width = out
    return ModelSpec(in_features, Sequential(ROOT_NAME, tuple(children)))


def _free_stack(draw: st.DrawFn, width_in: int, width_out: int, bounds: _Bounds) -> Stack:
    count = draw(st.integers(1, MAX_LINEARS))
    hidden = [draw(st.integers(bounds.min_width, bounds.max_width)) for _ in range(count - 1)]
    sizes = (width_in, *hidden, width_out)
    return tuple(Linear(a, b, draw(st.booleans())) for a, b in itertools.pairwise(sizes))


def _layers(draw: st.DrawFn, stack: Stack) -> tuple[Linear | ReLU, ...]:
    """The stack's linears, each maybe followed by a ReLU."""
    layers: list[Linear | ReLU] = []
    for linear in stack:
        layers.append(linear)
        if draw(st.booleans()):
            layers.append(ReLU())
    return tuple(layers)


def _block(
    draw: st.DrawFn, name: str, children: tuple[Node, ...], rules: UnitRules, alternative: bool = False
) -> Sequential:
    frozen = draw(_chance(1, 4))
    forced = (frozen and rules.frozen_are_units) or (alternative and rules.alternatives_are_units)
    return Sequential(name, children, fsdp_unit=forced or draw(st.booleans()), frozen=frozen)


def _segment(draw: st.DrawFn, names: _Names, stack: Stack, rules: UnitRules) -> tuple[Node, ...]:
    """A stack inside an alternative: its layers inline, or wrapped in a block
    of its own that may be a unit or frozen."""
    layers = _layers(draw, stack)
    if draw(_chance(1, 3)):
        return (_block(draw, names("block"), layers, rules),)
    return layers


def _alternative_stacks(draw: st.DrawFn, width: int, count: int, bounds: _Bounds) -> tuple[Stack, ...]:
    """``count`` distinct stacks of one numel. The first is drawn by its number
    of linears, so single-linear alternatives stay common though most stacks
    have three."""
    by_linears = first_stacks(width, count, bounds.min_width, bounds.max_width)
    first = draw(st.sampled_from(by_linears[draw(st.sampled_from(tuple(by_linears)))]))
    group = stacks_by_numel(width, bounds.min_width, bounds.max_width)[stack_numel(first)]
    others = tuple(stack for stack in group if stack != first)
    rest = draw(st.lists(st.sampled_from(others), min_size=count - 1, max_size=count - 1, unique=True))
    return (first, *rest)


def _branch(
    draw: st.DrawFn, names: _Names, width: int, depth: int, bounds: _Bounds, stacks: tuple[Stack, ...] | None = None
) -> Choice:
    """A branch point at nesting level ``depth`` (1 = outermost). ``stacks``
    fixes the alternatives' stacks (a nested branch point whose numel its
    siblings' fillers already match)."""
    name = names("branch")
    most = min(bounds.max_alternatives, most_alternatives(width, bounds.min_width, bounds.max_width))
    if stacks is None:
        stacks = _alternative_stacks(draw, width, draw(st.integers(2, most)), bounds)
    inner = None
    if depth < bounds.max_depth and draw(_chance(1, 3)):
        inner = _alternative_stacks(draw, width, draw(st.integers(2, most)), bounds)
    alternatives = []
    for index, stack in enumerate(stacks):
        parts = [_segment(draw, names, stack, bounds.rules)]
        if inner is not None:
            parts.append(_balance(draw, names, width, depth, bounds, inner))
            if draw(st.booleans()):
                parts.reverse()
        children = tuple(node for part in parts for node in part)
        alternatives.append(_block(draw, f"{name}_{index}", children, bounds.rules, alternative=True))
    return Choice(name, tuple(alternatives), fsdp_unit=draw(st.booleans()))


def _balance(
    draw: st.DrawFn, names: _Names, width: int, depth: int, bounds: _Bounds, inner: tuple[Stack, ...]
) -> tuple[Node, ...]:
    """The part of one alternative that holds ``len(inner)`` stacks of
    ``inner``'s numel: a nested branch point over that many stacks of the
    group, or that many of them in a row, the same numel with no branch."""
    group = stacks_by_numel(width, bounds.min_width, bounds.max_width)[stack_numel(inner[0])]
    count = len(inner)
    if draw(st.booleans()):
        stacks = draw(st.lists(st.sampled_from(group), min_size=count, max_size=count, unique=True))
        return (_branch(draw, names, width, depth + 1, bounds, tuple(stacks)),)
    fillers = draw(st.lists(st.sampled_from(group), min_size=count, max_size=count))
    return tuple(node for stack in fillers for node in _segment(draw, names, stack, bounds.rules))
