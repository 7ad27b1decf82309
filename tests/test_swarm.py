"""Swarms (``fsdp_fuzz.generate.swarm``), the feature vocabulary they draw
over (``fsdp_fuzz.features``), and how a campaign steers them: drawing
only, no ranks; ``ContractCheck`` judges recorded observations."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.database import InMemoryExampleDatabase

from fsdp_fuzz.campaign import ReplayedOnce
from fsdp_fuzz.data import validate_scenario
from fsdp_fuzz.engines import ENGINES
from fsdp_fuzz.features import (
    DIVERGENCE,
    FREEZES_AFTER_WRAPPING,
    NOTHING,
    Feature,
    Scope,
    features_for,
    features_of,
    needs,
    setting,
    step,
)
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.generate.swarm import TRIES, Swarm, swarms
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
from fsdp_fuzz.report import Ending
from fsdp_fuzz.verdict import ContractCheck
from tests.conftest import RECORDED, load_recorded

DRAWING = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_setting_is_a_feature_or_follows_one(engine):
    runs_on = ENGINES[engine]
    offered = features_for(runs_on)
    for field in fields(runs_on.settings_type):
        assert setting(runs_on.settings_depending.get(field.name, field.name)) in offered
    assert len(set(offered)) == len(offered)
    assert all(Feature.parse(str(feature)) == feature for feature in offered)


def test_a_feature_that_names_no_scope_is_refused_with_the_scopes():
    with pytest.raises(ValueError, match="SCOPE.NAME, SCOPE one of setting, scenario"):
        Feature.parse("use_orig_params")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_scenario_exercises_only_what_its_swarm_switched_on(engine):
    runs_on = ENGINES[engine]

    @DRAWING
    @given(st.data())
    def check(data):
        swarm = data.draw(swarms(runs_on))
        scenario = data.draw(scenarios(engine=engine, swarm=swarm))
        validate_scenario(scenario)
        following = {  # a setting valid only beside another follows it
            setting(dependent): setting(needed) for dependent, needed in runs_on.settings_depending.items()
        }
        exercised = {following.get(feature, feature) for feature in features_of(scenario)}
        assert exercised <= swarm.on, sorted(map(str, exercised - swarm.on))

    check()


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_swarm_and_its_scenario_shrink_toward_every_feature_off(engine):
    assert find(swarms(ENGINES[engine]), lambda swarm: True).on == frozenset()
    assert features_of(find(scenarios(engine=engine), lambda scenario: True)) == frozenset()


def test_the_whole_space_at_once_still_draws_every_kind_of_feature():
    runs_on = ENGINES["fsdp2"]
    seen: set[Feature] = set()

    @settings(DRAWING, max_examples=300)
    @given(scenarios(engine="fsdp2", swarm=Swarm.everything(runs_on)))
    def collect(scenario):
        seen.update(features_of(scenario))

    collect()
    assert {DIVERGENCE, step("reset_iter_state"), setting("mp_policy"), Feature(Scope.MODEL, "norms")} <= seen


def _share_meeting(trigger, avoid) -> float:
    met = []

    @settings(DRAWING, max_examples=200, derandomize=True)
    @given(swarms(ENGINES["fsdp1"], avoid))
    def draw(swarm):
        met.append(swarm.meets(trigger))

    draw()
    return sum(met) / len(met)


def test_an_avoided_trigger_comes_up_less_but_still_comes_up():
    trigger = needs(DIVERGENCE)
    free = _share_meeting(trigger, ())
    avoided = _share_meeting(trigger, (trigger,))
    assert free > 0.3
    assert 0 < avoided < free / 3, (free, avoided, TRIES)


def test_a_trigger_needs_each_of_its_features_and_one_of_each_group():
    trigger = needs(setting("use_orig_params"), FREEZES_AFTER_WRAPPING)
    assert trigger.met_by(frozenset({setting("use_orig_params"), Feature(Scope.SCHEDULE, "freezing")}))
    assert not trigger.met_by(frozenset({setting("use_orig_params")}))
    assert not trigger.met_by(frozenset({Feature(Scope.SCENARIO, "freeze_untaken")}))
    assert NOTHING.met_by(frozenset())


def _recorded_with_trigger():
    """A recorded run named after a record whose trigger is not empty."""
    for name, record in sorted(KNOWN_ISSUES.items()):
        if record.trigger != NOTHING and (RECORDED / f"{name}.json").exists():
            return load_recorded(name), record
    raise AssertionError("no recorded run of a record with a trigger")


def test_a_known_issue_met_twice_is_settled_and_steered_away_from_where_known_issues_do_not_fail():
    (scenario, observations), record = _recorded_with_trigger()
    check = ContractCheck(strict=False)
    check(scenario, observations)
    check(scenario, observations)
    (tally,) = check.report.targets.values()
    assert tally.endings == {Ending.UNSETTLED.value: 1, Ending.SETTLED.value: 1}
    assert record.trigger in check.avoided()
    assert record.trigger not in ContractCheck(strict=True).avoided()
    assert record.trigger in ContractCheck(strict=True).avoided([record.name])


def test_each_primary_case_is_replayed_once_and_the_secondary_corpus_by_the_first_run_only():
    shared = InMemoryExampleDatabase()
    shared.save(b"k", b"one")
    shared.save(b"k.secondary", b"big")
    worker = ReplayedOnce(shared)
    assert list(worker.fetch(b"k")) == [b"one"]
    assert list(worker.fetch(b"k.secondary")) == [b"big"]
    shared.save(b"k", b"two")
    shared.save(b"k.secondary", b"bigger")
    assert list(worker.fetch(b"k")) == [b"two"]
    assert list(worker.fetch(b"k.secondary")) == []
    worker.delete(b"k", b"one")
    assert list(shared.fetch(b"k")) == [b"two"]
