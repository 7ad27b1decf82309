"""The scenario strategies: everything they generate is valid, round-trips,
builds on every rank, wraps in real FSDP, and the space they cover reaches
every dimension a statistics run reports."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.statistics import collector

from fsdp_fuzz.data import (
    FsdpSettings,
    Scenario,
    Status,
    dumps,
    scenario_from_json,
    validate_scenario,
)
from fsdp_fuzz.execute.model import BuiltModel, build_model, run_forwards
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.generate.seed_family import seed_scenarios
from fsdp_fuzz.generate.strategies import (
    HYBRID_STRATEGIES,
    PLAIN_STRATEGIES,
    Deviation,
    fsdp_settings,
    scenario_features,
    scenarios,
)
from fsdp_fuzz.models.seed import seed_model
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Sequential, features, numel, validate
from fsdp_fuzz.models.strategies import MAX_WIDTH, MIN_WIDTH, first_stacks, model_specs, stacks_by_numel
from fsdp_fuzz.profiles import PROFILES, profile_from_environment

GENERATE = settings(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def parameter_shapes(node: Node) -> tuple[tuple[int, ...], ...]:
    """Shapes of the parameters FSDP flattens, in module order."""
    if isinstance(node, Linear):
        return ((node.out_features, node.in_features),) + (((node.out_features,),) if node.bias else ())
    if isinstance(node, Sequential):
        return tuple(shape for child in node.children for shape in parameter_shapes(child))
    if isinstance(node, Choice):
        return tuple(shape for alternative in node.alternatives for shape in parameter_shapes(alternative))
    return ()


def assert_equal_numel_alternatives_of_different_shapes(model: ModelSpec) -> None:
    for choice in model.choices():
        assert len({numel(alternative) for alternative in choice.alternatives}) == 1
        shapes = [parameter_shapes(alternative) for alternative in choice.alternatives]
        assert len(set(shapes)) == len(shapes), f"{choice.name}: alternatives share a shape"
        assert numel(choice.alternatives[0]) > 0


@settings(GENERATE, max_examples=80)
@given(scenarios())
def test_every_scenario_is_valid_with_equal_numel_alternatives_of_different_shapes(scenario: Scenario):
    validate_scenario(scenario)
    validate(scenario.model)
    assert_equal_numel_alternatives_of_different_shapes(scenario.model)


@settings(GENERATE, max_examples=40)
@given(model_specs(max_depth=3))
def test_branch_points_nested_twice_keep_equal_numel_alternatives_of_different_shapes(model: ModelSpec):
    validate(model)
    assert_equal_numel_alternatives_of_different_shapes(model)


@settings(GENERATE, max_examples=80)
@given(scenarios())
def test_json_round_trip_is_the_identity(scenario: Scenario):
    assert scenario_from_json(json.loads(dumps(scenario))) == scenario


@settings(GENERATE, max_examples=80)
@given(scenarios(engine="fsdp2"))
def test_fsdp2_scenarios_are_valid_and_round_trip(scenario: Scenario):
    validate_scenario(scenario)
    assert scenario.engine == "fsdp2" and scenario.fsdp == FsdpSettings()
    assert scenario_from_json(json.loads(dumps(scenario))) == scenario
    for steps in scenario.ranks:
        unreduced = False
        for step in steps:
            unreduced = (not step.gradient_sync) if step.backward else unreduced
            assert not (step.optimizer_step and (unreduced or not step.gradient_sync)), "a step on unreduced gradients"
            unreduced = unreduced and not step.optimizer_step


def test_fsdp2_campaigns_mostly_run_one_program_on_every_rank():
    """FSDP2 promises nothing for most divergence: most of the budget goes where it does."""
    drawn = generated(200, engine="fsdp2")
    same = sum(all(steps == scenario.ranks[0] for steps in scenario.ranks) for scenario in drawn)
    assert same > len(drawn) / 2
    assert same < len(drawn), "divergent programs are still drawn"


def generated(count: int, **kwargs) -> list[Scenario]:
    found: list[Scenario] = []

    @settings(GENERATE, max_examples=count)
    @given(scenarios(**kwargs))
    def collect(scenario: Scenario) -> None:
        found.append(scenario)

    collect()
    return found


def test_the_same_choices_give_the_same_scenarios():
    first, second = generated(25), generated(25)
    assert len(first) == 25
    assert first == second


def drawn_settings(world_size: int, **kwargs) -> set[FsdpSettings]:
    found: set[FsdpSettings] = set()

    @settings(GENERATE, max_examples=100)
    @given(fsdp_settings(world_size, **kwargs))
    def collect(fsdp: FsdpSettings) -> None:
        found.add(fsdp)

    collect()
    return found


def test_hybrid_sharding_and_sync_module_states_only_where_asked_and_possible():
    def strategies(found: set[FsdpSettings]) -> set[str]:
        return {fsdp.sharding_strategy for fsdp in found}

    assert strategies(drawn_settings(4, hybrid=True)) == set(PLAIN_STRATEGIES + HYBRID_STRATEGIES)
    assert strategies(drawn_settings(3, hybrid=True)) == set(PLAIN_STRATEGIES)
    assert strategies(drawn_settings(4, hybrid=False)) == set(PLAIN_STRATEGIES)
    assert not any(fsdp.sync_module_states for fsdp in drawn_settings(2))
    assert any(fsdp.sync_module_states for fsdp in drawn_settings(2, device="cuda"))


def unit_modules(spec: ModelSpec, built: BuiltModel) -> dict[str, torch.nn.Module]:
    by_name = {qualified.rsplit(".", 1)[-1]: module for qualified, module in built.module.named_modules()}
    by_name[spec.root.name] = built.module
    return {unit.name: by_name[unit.name] for unit in spec.units()}


def assert_flat_parameters_uniform(spec: ModelSpec, built: BuiltModel) -> None:
    """What FSDP checks with ``use_orig_params=False``: the parameters a unit
    flattens (its own, not its nested units') agree on ``requires_grad``."""
    units = unit_modules(spec, built)
    owned = {name: {id(p): p for p in module.parameters()} for name, module in units.items()}
    for name, module in units.items():
        own = dict(owned[name])
        for other, other_module in units.items():
            if other != name and any(m is other_module for m in module.modules()):
                for key in owned[other]:
                    own.pop(key, None)
        assert len({p.requires_grad for p in own.values()}) <= 1, f"unit {name} mixes requires_grad"


# torch warns when a reentrant-checkpointed block's input needs no grad (a
# frozen block before it): the ranks report it; here it is noise.
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@settings(GENERATE, max_examples=40)
@given(scenarios())
def test_every_scenario_builds_identically_and_runs_on_every_rank_without_fsdp(scenario: Scenario):
    model = scenario.model
    width = features(model.root, model.in_features)
    reference = None
    for rank, steps in enumerate(scenario.ranks):
        built = build_model(scenario.model, scenario.seed, scenario.freeze_untaken)
        state = {key: value.detach().clone() for key, value in built.module.state_dict().items()}
        if reference is None:
            reference = state
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[key], reference[key]) for key in state)
        optimizer = torch.optim.SGD(built.module.parameters(), lr=0.01)
        for index, step in enumerate(steps):
            total = run_forwards(scenario, built, rank, index, torch.device("cpu")).total
            if not scenario.fsdp.use_orig_params:
                assert_flat_parameters_uniform(model, built)
            if step.forwards:
                probe = built.module(torch.zeros(scenario.batch_size, model.in_features))
                assert probe.shape == (scenario.batch_size, width)
            if step.backward:
                total.backward()
            if step.optimizer_step:
                optimizer.step()
                optimizer.zero_grad()


# Spawns real ranks: a few seconds per scenario ---------------------------------

SETUP_FEATURES = (
    "sharding FULL_SHARD",
    "sharding SHARD_GRAD_OP",
    "sharding NO_SHARD",
    "use_orig_params True",
    "use_orig_params False",
    "freeze_untaken True",
    "frozen block",
    "nested branch point",
    "branch point is a unit",
    "unit without parameters of its own",
    "forward_prefetch True",
    "backward_prefetch BACKWARD_POST",
    "backward_prefetch None",
    "limit_all_gathers False",
    "collective checker True",
)


def covering(pool: list[Scenario], wanted: tuple[str, ...], count: int) -> list[Scenario]:
    """Greedily the ``count`` scenarios of ``pool`` that cover most of ``wanted``."""
    chosen: list[Scenario] = []
    missing = set(wanted)
    for _ in range(count):
        best = max(pool, key=lambda scenario: len(missing & scenario_features(scenario)))
        chosen.append(best)
        missing -= scenario_features(best)
    return chosen


def test_spawned__generated_scenarios_wrap_in_fsdp_on_every_rank():
    """Three generated scenarios, chosen to cover the settings that change how
    FSDP wraps, run on two real ranks: setup (build and wrap) succeeds on
    every rank. Only scenarios whose ranks agree, so that no step waits out a
    hang; steps are the oracles' business, not this test's."""
    pool = [s for s in generated(100, max_world_size=2, max_steps=2) if "ranks identical" in scenario_features(s)]
    for scenario in covering(pool, SETUP_FEATURES, 3):
        observations = run_scenario(scenario)
        setups = [rank.setup for rank in observations.ranks]
        assert all(setup.status == Status.OK for setup in setups), (dumps(scenario), setups)


# Statistics --------------------------------------------------------------------

BOTH = (True, False)
EXPECTED_FEATURES = (
    *(f"world size {n}" for n in (2, 3, 4)),
    *(f"sharding {s}" for s in PLAIN_STRATEGIES + HYBRID_STRATEGIES),
    *(f"{name} {value}" for name in ("use_orig_params", "forward_prefetch", "limit_all_gathers") for value in BOTH),
    *(f"backward_prefetch {p}" for p in (None, "BACKWARD_PRE", "BACKWARD_POST")),
    *(f"debug level {level}" for level in ("DETAIL", "INFO", "OFF")),
    *(f"{name} {value}" for name in ("collective checker", "freeze_untaken") for value in BOTH),
    *(f"steps {n}" for n in range(1, 7)),
    *(f"branch points {n}" for n in ("1", "2", "3+")),
    *(f"{n} alternatives" for n in (2, 3, 4)),
    "nested branch point",
    "branch point is a unit",
    "alternative is a unit",
    "alternative is not a unit",
    "units beyond the root",
    "unit without parameters of its own",
    "frozen block",
    "mode train",
    "mode eval",
    "grad disabled",
    "zero forwards",
    "several forwards",
    "backward",
    "backward in eval",
    "optimizer step",
    "branch point skipped",
    "several alternatives",
    "repeated alternative",
    "ranks identical",
    "ranks differ, then agree again",
)
MAX_DISCARDED = 0.05
"""Of the examples Hypothesis generates, the share it may throw away."""


def statistics_examples() -> int:
    """500, or as many as the profile ``HYPOTHESIS_PROFILE`` names runs where
    that is more: ``HYPOTHESIS_PROFILE=nightly`` measures a run of nightly size."""
    return max(500, PROFILES[profile_from_environment()].max_examples)


def test_statistics_every_dimension_is_exercised_and_few_examples_are_discarded():
    """Every dimension shows up, and Hypothesis discards under 5% of what it
    generates. Nothing filters, so nothing is "invalid"; an "overrun" is an
    attempt that wanted more choices than Hypothesis allowed it (mostly a
    mutation that copied one part of an example over another, see
    ``fuzz.strategies.schedules``). ``-s`` prints the numbers."""
    seen: Counter[str] = Counter()
    runs = []

    @settings(GENERATE, max_examples=statistics_examples())
    @given(scenarios())
    def count(scenario: Scenario) -> None:
        seen.update(scenario_features(scenario))

    with collector.with_value(runs.append):
        count()
    (statistics,) = runs
    statuses = Counter(case["status"] for case in statistics["generate-phase"]["test-cases"])
    generated = sum(statuses.values())
    discarded = statuses["invalid"] + statuses["overrun"]
    print(
        f"\n{generated} examples generated: {statuses['valid']} valid, {statuses['invalid']} invalid, "
        f"{statuses['overrun']} overrun; {discarded / generated:.2%} discarded"
    )
    for feature, times in sorted(seen.items()):
        print(f"{times:6d}  {feature}")
    assert not [feature for feature in EXPECTED_FEATURES if not seen[feature]]
    assert len([feature for feature in seen if feature.startswith("ranks differ from step")]) >= 4
    assert statuses["invalid"] == 0
    assert discarded < MAX_DISCARDED * generated


# The seed ----------------------------------------------------------------------


def test_the_seed_model_lies_within_the_model_space_up_to_names():
    """Each construction step of ``model_specs`` can produce the seed's part:
    the stem, a branch point whose first stack can be drawn first and whose
    stacks share one numel group, alternatives that are units (as the rules
    force with ``freeze_untaken``), a bare ReLU. Only the names differ: the
    strategy names nodes itself (``stem``, ``branch0``, ``branch0_1``)."""
    spec: ModelSpec = seed_model()
    stem, branch, relu = spec.root.children
    assert MIN_WIDTH <= spec.in_features <= MAX_WIDTH
    assert [type(layer) for layer in stem.children] == [Linear, type(relu)] and not stem.frozen
    width = stem.children[0].out_features
    stacks = [tuple(layer for layer in alt.children if isinstance(layer, Linear)) for alt in branch.alternatives]
    assert stacks[0] in first_stacks(width, len(stacks), MIN_WIDTH, MAX_WIDTH)[1]
    assert all(stack in stacks_by_numel(width)[numel(branch.alternatives[0])] for stack in stacks)
    assert all(alternative.fsdp_unit for alternative in branch.alternatives)


@pytest.mark.parametrize("name", sorted(seed_scenarios()))
def test_the_seed_schedules_are_shared_steps_plus_deviations(name: str):
    scenario = seed_scenarios()[name]
    shared = scenario.ranks[0]
    for steps in scenario.ranks:
        for base, step in zip(shared, steps, strict=True):
            changes = {
                field.name: getattr(step, field.name)
                for field in fields(Deviation)
                if getattr(step, field.name) != getattr(base, field.name)
            }
            assert Deviation(**changes).apply(base) == step
