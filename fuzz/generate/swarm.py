"""Swarms: each scenario draws which features it may use, the rest held at
their defaults (Groce et al., "Swarm Testing", ISSTA 2012; Hypothesis's
own ``featureflags``).

Drawn over the whole space at once, a scenario almost always has a
feature that fails early or masks the others (a first-iteration order
error, a refusal, a setting some record needs), so the rare combinations of
the rest hardly ever run alone. A swarm switches each feature of
``fsdp_fuzz.features`` on or off, one choice each; a feature off keeps the
default whatever the rest of the scenario draws, so the choice sequence
has the same length either way and Hypothesis's mutations stay valid. It
shrinks toward every feature off.

A campaign that has settled a class passes its trigger in ``avoid``: the
strategy draws ``TRIES`` swarms and takes the first of those that can meet
the fewest avoided triggers (with a dozen settled, hardly any swarm meets
none), so a settled class still comes up now and then (never weight zero:
a known issue that changes shape must still show as a new class).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from hypothesis import event
from hypothesis import strategies as st

from fsdp_fuzz.data import Step
from fsdp_fuzz.engines import Engine
from fsdp_fuzz.features import (
    FREEZING,
    SCENARIO_DEFAULTS,
    SCENARIO_FIELDS,
    STEP_DEFAULTS,
    Feature,
    Scope,
    Trigger,
    checkpoint,
    features_for,
    setting,
    step,
    step_fields,
)

TRIES = 4
"""Swarms drawn per scenario when a campaign avoids triggers: a trigger of
one feature then comes up in about one scenario in ``2**TRIES`` of those
it would otherwise."""


@dataclass(frozen=True)
class Swarm:
    """Which of ``offered`` a scenario may use; the others keep their defaults."""

    on: frozenset[Feature]
    offered: tuple[Feature, ...]

    @classmethod
    def everything(cls, engine: Engine) -> Swarm:
        """Every feature on: the space without swarms."""
        offered = features_for(engine)
        return cls(frozenset(offered), offered)

    def allows(self, feature: Feature) -> bool:
        return feature in self.on or feature not in self.offered

    def meets(self, trigger: Trigger) -> bool:
        """Whether a scenario of this swarm could meet ``trigger``."""
        return trigger.met_by(self.on)

    def settings(self, engine: Engine, settings: Any) -> Any:
        """An engine's settings with each field that is off back at its
        default, and each that depends on one off (``Engine.settings_depending``)."""
        default = type(settings)()
        held = {
            f.name: getattr(default, f.name)
            for f in fields(settings)
            if not self.allows(setting(engine.settings_depending.get(f.name, f.name)))
        }
        return replace(settings, **held)

    def scenario_fields(self, drawn: dict[str, Any]) -> dict[str, Any]:
        """Scenario fields (``SCENARIO_FIELDS``) as drawn, or their defaults where off."""
        return {
            name: value
            if name not in SCENARIO_FIELDS or self.allows(Feature(Scope.SCENARIO, name))
            else SCENARIO_DEFAULTS[name]
            for name, value in drawn.items()
        }

    def held_step(self, engine: Engine, drawn: Step) -> Step:
        """A step with each step feature that is off back at its default, and nothing frozen without ``FREEZING``."""
        held = {name: getattr(STEP_DEFAULTS, name) for name in step_fields(engine) if not self.allows(step(name))}
        if not self.allows(FREEZING):
            held["frozen"] = ()
        return replace(drawn, **held)

    def checkpoint_modes(self, modes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(mode for mode in modes if self.allows(checkpoint(mode)))


@st.composite
def swarms(draw: st.DrawFn, engine: Engine, avoid: tuple[Trigger, ...] = ()) -> Swarm:
    """A swarm over ``engine``'s features, each on half the time; with
    ``avoid``, the first of ``TRIES`` that meets the fewest of them. One
    choice per feature per try whatever is avoided; shrinks to every
    feature off. Records each feature on as a Hypothesis event."""
    offered = features_for(engine)
    tries = TRIES if avoid else 1
    drawn = [Swarm(frozenset(f for f in offered if draw(st.booleans())), offered) for _ in range(tries)]
    swarm = min(drawn, key=lambda one: sum(one.meets(trigger) for trigger in avoid))
    for feature in sorted(swarm.on):
        event(f"swarm: {feature} on")
    return swarm
