"""What a scenario exercises, in one vocabulary for every stage: the
features a swarm switches on or off (``fsdp_fuzz.generate.swarm``), the
triggers of the known-issue records and of documented refusals
(``fsdp_fuzz.judge``), and the campaign's statistics.

A feature is a scenario fact that has a default, named after the field that
holds it: an engine setting (``setting.use_orig_params``), a scenario field
(``scenario.collective_checker``), a step field set in some step of some
rank (``step.gradient_sync``), a part of the model (``model.ties``,
``model.checkpoint.reentrant``), or a property of the schedule
(``schedule.divergence``: the ranks run different steps;
``schedule.freezing``: some step freezes a block). A scenario exercises a
feature where that fact differs from its default; held off, it keeps the
default. Torch-free and Hypothesis-free, so the judge may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from fsdp_fuzz.data import Scenario, Step
from fsdp_fuzz.engines import Engine
from fsdp_fuzz.models.spec import Norm, Sequential, named_in


class Scope(str, Enum):
    """Where a feature lives in the scenario (a stable id)."""

    SETTING = "setting"
    SCENARIO = "scenario"
    STEP = "step"
    MODEL = "model"
    SCHEDULE = "schedule"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class Feature:
    scope: Scope
    name: str

    def __str__(self) -> str:
        return f"{self.scope}.{self.name}"

    @classmethod
    def parse(cls, text: str) -> Feature:
        scope, _, name = text.partition(".")
        try:
            return cls(Scope(scope), name)
        except ValueError:
            raise ValueError(
                f"unknown feature {text!r}: a feature is SCOPE.NAME, SCOPE one of "
                f"{', '.join(scope.value for scope in Scope)}"
            ) from None


def setting(name: str) -> Feature:
    return Feature(Scope.SETTING, name)


def step(name: str) -> Feature:
    return Feature(Scope.STEP, name)


def model(name: str) -> Feature:
    return Feature(Scope.MODEL, name)


def checkpoint(mode: str) -> Feature:
    return Feature(Scope.MODEL, f"checkpoint.{mode}")


DIVERGENCE = Feature(Scope.SCHEDULE, "divergence")
FREEZING = Feature(Scope.SCHEDULE, "freezing")
NORMS = model("norms")
TIES = model("ties")
FROZEN_BLOCKS = model("frozen")

SCENARIO_FIELDS = ("debug_level", "collective_checker", "freeze_untaken")
"""The scenario's own fields that are features (the rest are the model, the
schedule, the engine's settings, or carry no behaviour)."""

SHARED_STEP_FIELDS = ("mode", "forwards", "grad_enabled", "optimizer_step", "gradient_sync")
"""``Step`` fields every engine draws; ``path`` and ``backward`` are the
schedule itself, ``frozen`` is ``FREEZING``."""


def step_fields(engine: Engine) -> tuple[str, ...]:
    """The ``Step`` fields that are features of ``engine``'s scenarios."""
    method = ("method",) if len(engine.methods) > 1 else ()
    return SHARED_STEP_FIELDS + method + engine.step_controls


def features_for(engine: Engine) -> tuple[Feature, ...]:
    """Every feature a scenario of ``engine`` may exercise, in a fixed order:
    what a swarm draws over."""
    return (
        *(setting(field.name) for field in fields(engine.settings_type) if field.name not in engine.settings_depending),
        *(Feature(Scope.SCENARIO, name) for name in SCENARIO_FIELDS),
        *(step(name) for name in step_fields(engine)),
        NORMS,
        TIES,
        FROZEN_BLOCKS,
        *(checkpoint(mode) for mode in ("non_reentrant", "reentrant", engine.checkpoint_wrapper)),
        DIVERGENCE,
        FREEZING,
    )


STEP_DEFAULTS = Step()
SCENARIO_DEFAULTS = {name: field.default for field in fields(Scenario) if (name := field.name) in SCENARIO_FIELDS}
"""What a feature held off keeps: the defaults a scenario is compared with."""


def features_of(scenario: Scenario) -> frozenset[Feature]:
    """The features ``scenario`` exercises: each fact that differs from its default."""
    engine = scenario.runs_on
    settings = engine.settings(scenario)
    default = engine.settings_type()
    found = {setting(f.name) for f in fields(settings) if getattr(settings, f.name) != getattr(default, f.name)}
    found |= {
        Feature(Scope.SCENARIO, name) for name in SCENARIO_FIELDS if getattr(scenario, name) != SCENARIO_DEFAULTS[name]
    }
    every_step = [one for rank_steps in scenario.ranks for one in rank_steps]
    found |= {
        step(name)
        for name in step_fields(engine)
        if any(getattr(one, name) != getattr(STEP_DEFAULTS, name) for one in every_step)
    }
    blocks = [node for node in named_in(scenario.model.root) if isinstance(node, Sequential)]
    if any(isinstance(layer, Norm) for block in blocks for layer in block.children):
        found.add(NORMS)
    if any(block.tied_to for block in blocks):
        found.add(TIES)
    if any(block.frozen for block in blocks):
        found.add(FROZEN_BLOCKS)
    found |= {checkpoint(block.checkpoint) for block in blocks if block.checkpoint}
    if any(rank_steps != scenario.ranks[0] for rank_steps in scenario.ranks):
        found.add(DIVERGENCE)
    if any(one.frozen for one in every_step):
        found.add(FREEZING)
    return frozenset(found)


@dataclass(frozen=True)
class Trigger:
    """The features a known issue (or a documented refusal) needs before any
    observation matters: every one of ``all_of``, and at least one of each
    set in ``one_of`` (freezing after wrapping comes from ``freeze_untaken``
    or from a freezing schedule). A scenario that lacks them cannot show
    it, so a swarm that holds them off cannot either."""

    all_of: frozenset[Feature] = frozenset()
    one_of: tuple[frozenset[Feature], ...] = ()

    def met_by(self, features: frozenset[Feature]) -> bool:
        return self.all_of <= features and all(group & features for group in self.one_of)

    def __str__(self) -> str:
        parts = [str(feature) for feature in sorted(self.all_of)]
        parts += ["(" + " or ".join(str(feature) for feature in sorted(group)) + ")" for group in self.one_of]
        return " and ".join(parts) or "nothing"


def needs(*all_of: Feature | frozenset[Feature]) -> Trigger:
    """A trigger from features, each needed, and sets of features, one of each needed."""
    return Trigger(
        frozenset(one for one in all_of if isinstance(one, Feature)),
        tuple(frozenset(group) for group in all_of if not isinstance(group, Feature)),
    )


def either(*features: Feature) -> frozenset[Feature]:
    return frozenset(features)


FREEZES_AFTER_WRAPPING = either(Feature(Scope.SCENARIO, "freeze_untaken"), FREEZING)
"""``requires_grad`` set on wrapped parameters: by each step's path or by a schedule."""

NOTHING = Trigger()
"""The trigger of a record that needs no particular feature."""
