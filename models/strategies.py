"""Hypothesis strategies for model specs: a stem, then stages, some of them
branch points whose alternatives have exactly equal numel and different shapes.

Equal numel is constructed, never searched for: ``stacks_by_numel`` lists
every small width-preserving stack of linears grouped by numel, and a branch
point takes distinct stacks from one group. Filtering random alternatives for
equal numel would throw away nearly every example. Nesting keeps it: every
alternative of a branch point gets a nested part of one numel, in each either
a branch point over distinct stacks of one group or the same alternatives in
a row (a branch point's numel is that of all its alternatives), so nesting
costs no filtering either.

The stem maps the input to the model width and is never frozen (nor frozen
by a schedule, nor reentrant-checkpointed) and never inside a branch point,
so every forward runs a trainable parameter and a backward always has
something to differentiate, whatever the path skips.
Every model has at least one branch point: without one there is no path to
diverge.

Everything shrinks toward the simple: one stage, a branch point of two
single-linear alternatives, narrow widths, no bias, no ReLUs, no nesting, no
units beyond those a rule requires, nothing frozen.

Hypothesis mutates an example by copying a part of it over another part drawn
by the same strategy; when the copy makes the rest of the example draw more
choices than it holds, the attempt is discarded as an overrun. So what
decides how much is drawn is drawn as few times as possible (the stages'
kinds once per model, a branch point's shape once per outer branch point),
and everything else draws as many choices whatever it decides: a stack is
one choice among all stacks of its length, its ReLUs one choice, a nested
branch point and the row that may stand in for it draw alike, and the flags
of a block that may not be used are drawn anyway.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache

from hypothesis import strategies as st

from fsdp_fuzz.generate.choices import chance
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, ReLU, Sequential

MIN_WIDTH = 2
MAX_WIDTH = 8
MAX_LINEARS = 3
ROOT_NAME = "model"
STEM_NAME = "stem"

Stack = tuple[Linear, ...]
"""Linears applied in turn, before ReLUs are placed after some of them."""

# Shrinking moves toward the front.
_STAGE_KINDS = ("relu", "linear", "block", "branch", "norm")


@dataclass(frozen=True)
class UnitRules:
    """Which nodes must be their own FSDP unit.

    With ``use_orig_params=False`` FSDP refuses a flat parameter that mixes
    ``requires_grad`` values, so a frozen subtree must be a unit of its own,
    and so must every alternative when the schedule freezes untaken ones.
    """

    frozen_are_units: bool = False
    alternatives_are_units: bool = False


@dataclass(frozen=True)
class Features:
    """Which of the training features a model may use: norm layers (batch
    norm, with running statistics), checkpoint modes for blocks, blocks
    tied to an earlier block's parameters, and frozen blocks."""

    norms: bool = False
    checkpoint_modes: tuple[str, ...] = ()
    ties: bool = False
    frozen_blocks: bool = True
    """Blocks frozen by the model (``requires_grad`` off before wrapping)."""


def width_preserving_stacks(width: int, min_hidden: int = MIN_WIDTH, max_hidden: int = MAX_WIDTH) -> Iterator[Stack]:
    """Every stack of 1 to ``MAX_LINEARS`` linears mapping ``width`` to ``width``."""
    for count in range(1, MAX_LINEARS + 1):
        yield from stacks_of(count, width, width, min_hidden, max_hidden)


def stacks_of(count: int, width_in: int, width_out: int, min_hidden: int, max_hidden: int) -> Iterator[Stack]:
    """Every stack of ``count`` linears mapping ``width_in`` to ``width_out``."""
    for hidden in itertools.product(range(min_hidden, max_hidden + 1), repeat=count - 1):
        sizes = (width_in, *hidden, width_out)
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
    features: Features = Features()


class _Names:
    """Unique names in draw order: ``block0``, ``branch0``, ``branch0_1`` ..."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def __call__(self, kind: str) -> str:
        number = self._counts[kind]
        self._counts[kind] += 1
        return f"{kind}{number}"


@cache
def _layouts(count: int) -> st.SearchStrategy[tuple[str, ...]]:
    """``count`` stage kinds: a branch point at some stage, any kind at the
    others; shrinks to the branch point first, then bare ReLUs."""
    return st.sampled_from(
        [
            (*others[:anchor], "branch", *others[anchor:])
            for others in itertools.product(_STAGE_KINDS, repeat=count - 1)
            for anchor in range(count)
        ]
    )


@cache
def _free_stacks(
    width_in: int, width_out: int, count: int, min_hidden: int, max_hidden: int
) -> st.SearchStrategy[Stack]:
    """One of every stack of ``count`` linears from ``width_in`` to ``width_out``, simplest first."""
    return st.sampled_from(sorted(stacks_of(count, width_in, width_out, min_hidden, max_hidden), key=_simplicity))


@cache
def _relu_patterns(count: int) -> st.SearchStrategy[tuple[bool, ...]]:
    """Which of ``count`` linears a ReLU follows; shrinks to none."""
    return st.sampled_from(tuple(itertools.product((False, True), repeat=count)))


@cache
def _branch_shapes(most: int, nestable: bool) -> st.SearchStrategy[tuple[int, int | None]]:
    """A branch point's shape in one choice: its number of alternatives, and
    that of a branch point nested in them or ``None``; two in three not
    nested where nesting is allowed; shrinks to two alternatives, no nesting."""
    counts = range(2, most + 1)
    flat = tuple((count, None) for count in counts)
    nested = tuple((count, inner) for count in counts for inner in counts)
    return st.sampled_from(flat * (2 * len(counts)) + nested if nestable else flat)


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
    features: Features = Features(),
) -> ModelSpec:
    """Valid specs: ``model`` = stem, then 1 to ``max_stages`` stages.

    A stage is a bare ReLU or Linear, a plain block, or a branch point of 2 to
    ``max_alternatives`` alternatives, one stage at least a branch point;
    branch points nest up to ``max_depth`` levels. Every Sequential and Choice
    may be a unit, any block below the stem may be frozen, both within
    ``rules``. ``features`` adds norm stages and norms closing blocks,
    checkpointed blocks, and block stages tied to an earlier block stage of
    the same widths; each shrinks away.
    """
    if not 2 <= max_alternatives <= 4:
        raise ValueError("max_alternatives must be 2 to 4 (what models.spec.validate accepts)")
    if max_stages < 1 or max_depth < 1 or not 1 <= min_width <= max_width:
        raise ValueError("need max_stages >= 1, max_depth >= 1 and 1 <= min_width <= max_width")
    bounds = _Bounds(max_stages, max_depth, max_alternatives, min_width, max_width, rules, features)
    names = _Names()
    in_features = draw(st.integers(min_width, max_width))
    width = draw(st.integers(min_width, max_width))
    stem = Sequential(
        STEM_NAME,
        _layers(draw, _free_stack(draw, in_features, width, bounds)),
        fsdp_unit=draw(st.booleans()),
        checkpoint=_checkpoint(draw, bounds, stem=True),
    )
    children: list[Node] = [stem]
    blocks: list[tuple[int, int, Sequential]] = [(in_features, width, stem)]
    layout = draw(_layouts(draw(st.sampled_from(range(1, max_stages + 1)))))
    for kind in layout:
        if kind == "relu" or (kind == "norm" and not features.norms):
            children.append(ReLU())
        elif kind == "norm":
            children.append(Norm(width))
        elif kind == "branch":
            children.append(_branch(draw, names, width, 1, bounds))
        else:
            changes_width = draw(st.booleans())
            other = draw(st.integers(min_width, max_width))
            out = other if changes_width else width
            if kind == "linear":
                children.append(Linear(width, out, draw(st.booleans())))
            else:
                stack = _free_stack(draw, width, out, bounds)
                layers = _layers(draw, stack) + ((Norm(out),) if draw(chance(1, 3)) and features.norms else ())
                block = _block(draw, names("block"), layers, bounds)
                tie = draw(chance(1, 2)) and features.ties
                sources = [source for source_in, _, source in blocks if source_in == width]
                if tie and sources:
                    source = sources[-1]
                    out = next(source_out for _, source_out, candidate in blocks if candidate is source)
                    children.append(_tied(block, source, bounds))
                else:
                    blocks.append((width, out, block))
                    children.append(block)
                    if tie and out == width:
                        children.append(_tied(replace(block, name=names("block")), block, bounds))
            width = out
    return ModelSpec(in_features, Sequential(ROOT_NAME, tuple(children)))


def _tied(block: Sequential, source: Sequential, bounds: _Bounds) -> Sequential:
    """``block`` made a repeat of ``source`` that uses its parameters."""
    forced = source.frozen and bounds.rules.frozen_are_units
    return replace(
        block, children=source.children, tied_to=source.name, frozen=source.frozen, fsdp_unit=block.fsdp_unit or forced
    )


def _checkpoint(draw: st.DrawFn, bounds: _Bounds, stem: bool = False) -> str | None:
    """A block's checkpoint mode: none about three times in four; one choice
    either way. Never reentrant on the stem: its input requires no grad, so
    torch's reentrant checkpoint would give its parameters no gradient and
    the output of a forward that runs nothing else no grad_fn."""
    modes = tuple(mode for mode in bounds.features.checkpoint_modes if not (stem and mode == "reentrant"))
    return draw(st.sampled_from((None,) * (3 * max(1, len(modes))) + modes))


def _free_stack(draw: st.DrawFn, width_in: int, width_out: int, bounds: _Bounds) -> Stack:
    count = draw(st.integers(1, MAX_LINEARS))
    return draw(_free_stacks(width_in, width_out, count, bounds.min_width, bounds.max_width))


def _layers(draw: st.DrawFn, stack: Stack) -> tuple[Linear | ReLU, ...]:
    """The stack's linears, each maybe followed by a ReLU."""
    relus = draw(_relu_patterns(len(stack)))
    return tuple(
        layer for linear, relu in zip(stack, relus, strict=True) for layer in ((linear, ReLU()) if relu else (linear,))
    )


def _block(
    draw: st.DrawFn, name: str, children: tuple[Node, ...], bounds: _Bounds, alternative: bool = False
) -> Sequential:
    rules = bounds.rules
    frozen = draw(chance(1, 4)) and bounds.features.frozen_blocks
    unit = draw(st.booleans())
    checkpoint = _checkpoint(draw, bounds)
    forced = (frozen and rules.frozen_are_units) or (alternative and rules.alternatives_are_units)
    return Sequential(name, children, fsdp_unit=forced or unit, frozen=frozen, checkpoint=checkpoint)


def _segment(draw: st.DrawFn, names: _Names, stack: Stack, bounds: _Bounds) -> tuple[Node, ...]:
    """A stack inside an alternative: its layers inline, or wrapped in a block
    of its own that may be a unit or frozen."""
    layers = _layers(draw, stack)
    wrapped = draw(chance(1, 3))
    block = _block(draw, "", layers, bounds)
    if wrapped:
        return (replace(block, name=names("block")),)
    return layers


def _distinct(draw: st.DrawFn, group: tuple[Stack, ...], count: int) -> tuple[Stack, ...]:
    """``count`` distinct stacks of ``group``, in drawn order."""
    left = list(group)
    return tuple(left.pop(draw(st.integers(0, len(left) - 1))) for _ in range(count))


def _alternative_stacks(draw: st.DrawFn, width: int, count: int, bounds: _Bounds) -> tuple[Stack, ...]:
    """``count`` distinct stacks of one numel. The first is drawn by its number
    of linears, so single-linear alternatives stay common though most stacks
    have three."""
    by_linears = first_stacks(width, count, bounds.min_width, bounds.max_width)
    first = draw(st.sampled_from(by_linears[draw(st.sampled_from(tuple(by_linears)))]))
    group = stacks_by_numel(width, bounds.min_width, bounds.max_width)[stack_numel(first)]
    return (first, *_distinct(draw, tuple(stack for stack in group if stack != first), count - 1))


@dataclass(frozen=True)
class _Nesting:
    """What the nested part of every alternative of a branch point holds: as
    many stacks as ``stacks`` of their numel, each alternative of which may
    hold a nested part of its own, ``deeper``. Fixed per branch point, so its
    alternatives keep equal numel."""

    stacks: tuple[Stack, ...]
    deeper: _Nesting | None


def _nesting(draw: st.DrawFn, width: int, depth: int, count: int, bounds: _Bounds) -> _Nesting:
    """The nested part of the alternatives of a branch point at ``depth``."""
    stacks = _alternative_stacks(draw, width, count, bounds)
    deeper = None
    if depth + 1 < bounds.max_depth:
        most = min(bounds.max_alternatives, most_alternatives(width, bounds.min_width, bounds.max_width))
        _, inner_count = draw(_branch_shapes(most, nestable=True))
        if inner_count is not None:
            deeper = _nesting(draw, width, depth + 1, inner_count, bounds)
    return _Nesting(stacks, deeper)


def _branch(
    draw: st.DrawFn,
    names: _Names,
    width: int,
    depth: int,
    bounds: _Bounds,
    stacks: tuple[Stack, ...] | None = None,
    nesting: _Nesting | None = None,
) -> Choice:
    """A branch point at nesting level ``depth`` (1 = outermost). ``stacks``
    and ``nesting`` fix the alternatives' stacks and nested parts (a nested
    branch point whose numel its siblings' rows already match)."""
    name = names("branch")
    if stacks is None:
        most = min(bounds.max_alternatives, most_alternatives(width, bounds.min_width, bounds.max_width))
        count, inner_count = draw(_branch_shapes(most, depth < bounds.max_depth))
        stacks = _alternative_stacks(draw, width, count, bounds)
        if inner_count is not None:
            nesting = _nesting(draw, width, depth, inner_count, bounds)
    alternatives = _alternatives(draw, names, width, depth, bounds, stacks, nesting, name)
    return Choice(name, alternatives, fsdp_unit=draw(st.booleans()))


def _alternatives(
    draw: st.DrawFn,
    names: _Names,
    width: int,
    depth: int,
    bounds: _Bounds,
    stacks: tuple[Stack, ...],
    nesting: _Nesting | None,
    branch: str | None,
) -> tuple[Sequential, ...]:
    """The alternatives of branch point ``branch`` at nesting level ``depth``,
    one per stack, or with ``branch=None`` the same blocks for a row that
    stands in for a nested branch point."""
    # The nested part goes on the same side in every alternative: then two
    # alternatives could only share a shape by sharing their own stack.
    nested_first = nesting is not None and draw(st.booleans())
    alternatives = []
    for index, stack in enumerate(stacks):
        parts = [_segment(draw, names, stack, bounds)]
        if nesting is not None:
            parts.append(_balance(draw, names, width, depth, bounds, nesting))
            if nested_first:
                parts.reverse()
        children = tuple(node for part in parts for node in part)
        name = names("block") if branch is None else f"{branch}_{index}"
        alternatives.append(_block(draw, name, children, bounds, alternative=branch is not None))
    return tuple(alternatives)


def _balance(
    draw: st.DrawFn, names: _Names, width: int, depth: int, bounds: _Bounds, nesting: _Nesting
) -> tuple[Node, ...]:
    """The nested part of one alternative of a branch point at ``depth``: a
    branch point over as many distinct stacks of ``nesting``'s numel as it
    says, or the same alternatives in a row, the same numel with no branch
    point. Both draw the same choices (the row ignores a unit flag)."""
    group = stacks_by_numel(width, bounds.min_width, bounds.max_width)[stack_numel(nesting.stacks[0])]
    nested = draw(st.booleans())
    stacks = _distinct(draw, group, len(nesting.stacks))
    if nested:
        return (_branch(draw, names, width, depth + 1, bounds, stacks, nesting.deeper),)
    row = _alternatives(draw, names, width, depth + 1, bounds, stacks, nesting.deeper, None)
    draw(st.booleans())  # the unit flag of the branch point the row stands in for
    return row
