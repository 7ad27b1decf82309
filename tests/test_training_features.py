"""The training features: mixed precision, batch norm, checkpointing, tied
blocks, the ``encode`` entry point and freezing schedules.

Scenario files and validation are checked on plain data; the oracles judge
recorded observations of real two- and four-rank CPU runs
(``tests/record_observations.py``) and doctored copies of them, saying what
each doctoring changes; the generator is checked for drawing every feature.
The live runs of each feature are the replays of ``corpus/features/``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from fsdp_fuzz.data import (
    Clause,
    MixedPrecision,
    MixedPrecisionPolicy,
    ScenarioError,
    Status,
    Step,
    ViolationKind,
    scenario_from_json,
    scenario_to_json,
    validate_scenario,
)
from fsdp_fuzz.generate.strategies import clean_runs, scenarios
from fsdp_fuzz.judge.oracles import judge, rounding_bound
from fsdp_fuzz.models.spec import Norm, Sequential, SpecError, spec_from_json, spec_to_json


def _doctored(observations, rank, step, **changes):
    ranks = list(observations.ranks)
    steps = list(ranks[rank].steps)
    steps[step] = replace(steps[step], **changes)
    ranks[rank] = replace(ranks[rank], steps=tuple(steps))
    return replace(observations, ranks=tuple(ranks))


# Scenario files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stem",
    ["fsdp1-mixed-precision-bf16-batch-norm", "fsdp2-tied-across-units-refused", "fsdp2-encode-unregistered-refused"],
)
def test_feature_scenarios_round_trip(recorded, stem):
    scenario, _ = recorded(stem)
    assert scenario_from_json(json.loads(json.dumps(scenario_to_json(scenario)))) == scenario


def test_a_tied_block_must_repeat_its_source(recorded):
    scenario, _ = recorded("fsdp2-tied-across-units-refused")
    encoded = spec_to_json(scenario.model)
    encoded["root"]["children"][3]["children"][0]["linear"] = [4, 4]
    encoded["root"]["children"][3]["children"][0]["bias"] = False
    with pytest.raises(SpecError, match="exactly the source's layers"):
        spec_from_json(encoded)
    encoded = spec_to_json(scenario.model)
    encoded["root"]["children"][3]["tied_to"] = "nowhere"
    with pytest.raises(SpecError, match="the source first"):
        spec_from_json(encoded)


def test_an_unknown_checkpoint_mode_names_the_choices(recorded):
    scenario, _ = recorded("fsdp2-tied-across-units-refused")
    encoded = spec_to_json(scenario.model)
    encoded["root"]["children"][1]["checkpoint"] = "sometimes"
    with pytest.raises(SpecError, match="non_reentrant"):
        spec_from_json(encoded)


def test_norm_weights_and_statistics_must_share_a_dtype(recorded):
    scenario, _ = recorded("fsdp1-mixed-precision-bf16-batch-norm")
    policy = replace(scenario.fsdp.mixed_precision, buffer_dtype=None)
    with pytest.raises(ScenarioError, match="set buffer_dtype to the param_dtype"):
        validate_scenario(replace(scenario, fsdp=replace(scenario.fsdp, mixed_precision=policy)))
    assert any(isinstance(c, Norm) for n in scenario.model.named() if isinstance(n, Sequential) for c in n.children)


def test_fsdp2_refuses_norms_under_a_param_dtype_and_encode_on_fsdp1(recorded):
    scenario, _ = recorded("fsdp1-mixed-precision-bf16-batch-norm")
    fsdp2 = replace(scenario, engine="fsdp2", fsdp=type(scenario.fsdp)())
    fsdp2 = replace(fsdp2, fsdp2=replace(fsdp2.fsdp2, mp_policy=MixedPrecisionPolicy("bfloat16")))
    with pytest.raises(ScenarioError, match="drop the param_dtype"):
        validate_scenario(fsdp2)
    encoding = replace(scenario, ranks=tuple((replace(s[0], method="encode"), *s[1:]) for s in scenario.ranks))
    with pytest.raises(ScenarioError, match="needs engine 'fsdp2'"):
        validate_scenario(encoding)


def test_only_freezable_blocks_may_be_frozen_by_schedule(recorded):
    scenario, _ = recorded("fsdp1-mixed-precision-bf16-batch-norm")  # use_orig_params off: units only
    frozen = replace(scenario, ranks=tuple((replace(s[0], frozen=("stem",)), *s[1:]) for s in scenario.ranks))
    with pytest.raises(ScenarioError, match="cannot freeze \\['stem'\\]"):
        validate_scenario(frozen)


def test_mixed_precision_belongs_to_its_engine(recorded):
    scenario, _ = recorded("fsdp2-encode-unregistered-refused")
    wrong = replace(scenario, fsdp=replace(scenario.fsdp, mixed_precision=MixedPrecision("bfloat16")))
    with pytest.raises(ScenarioError, match="engine 'fsdp2' takes 'fsdp2' settings"):
        validate_scenario(wrong)


# The oracles on recorded runs ---------------------------------------------------------


@pytest.mark.parametrize(
    "stem",
    [
        "fsdp1-mixed-precision-bf16-batch-norm",
        "fsdp1-mixed-precision-fp16-no-shard",
        "fsdp2-tied-across-units-refused",
        "fsdp2-encode-unregistered-refused",
        "fsdp2-encode-unregistered-after-unshard-uncast-inputs",
        "fsdp2-encode-unregistered-after-unshard-uncast-inputs-with-bias",
    ],
)
def test_recorded_feature_runs_keep_the_contract(recorded, stem):
    scenario, observations = recorded(stem)
    assert judge(scenario, observations) == ()


def test_uncast_inputs_are_documented_in_both_of_torchs_wordings(recorded):
    """A linear without a bias refuses mixed dtypes in other words than one
    with a bias: both are the documented failure of an unregistered method
    under a param dtype (a campaign flagged the second, 2026-11-30)."""
    wordings = set()
    for suffix in ("", "-with-bias"):
        scenario, observations = recorded(f"fsdp2-encode-unregistered-after-unshard-uncast-inputs{suffix}")
        wordings |= {rank.steps[0].error_message.split(",")[0] for rank in observations.ranks}
        assert judge(scenario, observations) == ()
    assert wordings == {"expected m1 and m2 to have the same dtype", "mat1 and mat2 must have the same dtype"}


def test_a_refusal_that_does_not_come_is_a_finding(recorded):
    """The doctored run succeeds where FSDP2 documents its error."""
    scenario, observations = recorded("fsdp2-tied-across-units-refused")
    doctored = _doctored(observations, 0, 0, status=Status.OK, error_type=None, error_message=None)
    violations = judge(scenario, doctored)
    assert [(v.clause, v.kind, v.rank, v.step) for v in violations][:1] == [
        (Clause.REFUSAL, ViolationKind.REFUSAL_MISSING, 0, 0)
    ]


def test_registering_encode_withdraws_the_refusal(recorded):
    """With encode registered FSDP2 promises the forward's behaviour: the
    recorded error is then a failed step."""
    scenario, observations = recorded("fsdp2-encode-unregistered-refused")
    registered = replace(scenario, fsdp2=replace(scenario.fsdp2, register_encode=True))
    kinds = {v.kind for v in judge(registered, observations)}
    assert kinds == {ViolationKind.STEP_FAILED}


def test_replicas_must_hold_equal_parameters(recorded):
    """NO_SHARD: every rank is a replica. A digest off in the last bit is drift."""
    scenario, observations = recorded("fsdp1-mixed-precision-fp16-no-shard")
    digests = [rank.steps[1].param_digest for rank in observations.ranks]
    assert len(set(digests)) == 1 and digests[0] is not None
    drifted = _doctored(observations, 1, 1, param_digest=digests[0] * (1 + 2**-50))
    violations = judge(scenario, drifted)
    assert [(v.clause, v.kind, v.rank, v.step) for v in violations] == [
        (Clause.REPLICAS, ViolationKind.REPLICAS_DIVERGED, 1, 1)
    ]


def test_low_precision_sums_are_judged_within_the_derived_bound(recorded):
    scenario, observations = recorded("fsdp1-mixed-precision-bf16-batch-norm")
    expected = observations.reference[0]
    bound = rounding_bound(scenario, scenario.ranks[0][0].path, expected.output_magnitudes[0])
    assert bound > 1e-4 * (1 + abs(expected.output_sums[0])), "bf16's bound exceeds the float32 floor"
    inside = _doctored(observations, 0, 0, output_sum=expected.output_sums[0] + 0.5 * bound)
    assert judge(scenario, inside) == ()
    outside = _doctored(observations, 0, 0, output_sum=expected.output_sums[0] + 2 * bound + 1e-3)
    assert [(v.kind, v.rank, v.step) for v in judge(scenario, outside)] == [(ViolationKind.OUTPUT_MISMATCH, 0, 0)]


def test_the_bound_grows_with_the_dtype_and_the_path(recorded):
    scenario, _ = recorded("fsdp1-mixed-precision-bf16-batch-norm")
    fp16 = replace(scenario.fsdp.mixed_precision, param_dtype="float16", reduce_dtype="float16", buffer_dtype="float16")
    as_fp16 = replace(scenario, fsdp=replace(scenario.fsdp, mixed_precision=fp16))
    assert rounding_bound(as_fp16, {}, 1.0) == rounding_bound(scenario, {}, 1.0) / 8
    assert rounding_bound(scenario, {"branch0": (1,)}, 1.0) > rounding_bound(scenario, {"branch0": (0,)}, 1.0)
    assert rounding_bound(scenario, {}, 1.0, backward=True) > rounding_bound(scenario, {}, 1.0)


# The generator ---------------------------------------------------------------------------


def _features(scenario) -> set[str]:
    found = set()
    if scenario.param_dtype != "float32":
        found.add("mixed precision")
    if scenario.model.ties():
        found.add("tie")
    if any(getattr(node, "checkpoint", None) for node in scenario.model.named()):
        found.add("checkpoint")
    if '"norm"' in json.dumps(scenario_to_json(scenario)):
        found.add("norm")
    steps = [step for steps in scenario.ranks for step in steps]
    if any(step.frozen for step in steps):
        found.add("freezing schedule")
    if any(step.method != "forward" for step in steps):
        found.add("encode")
    return found


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("fsdp1", {"mixed precision", "tie", "checkpoint", "norm", "freezing schedule"}),
        ("fsdp2", {"mixed precision", "tie", "checkpoint", "norm", "freezing schedule", "encode"}),
    ],
)
def test_the_generator_draws_every_feature_validly(engine, expected):
    seen: Counter[str] = Counter()

    @settings(max_examples=300, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(scenarios(engine=engine))
    def draw(scenario):
        validate_scenario(scenario)
        seen.update(_features(scenario))

    draw()
    assert set(seen) == expected, seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_clean_runs_are_one_program_in_the_dtype(dtype):
    @settings(max_examples=40, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(clean_runs("fsdp2" if dtype == "float16" else "fsdp1", dtype))
    def draw(scenario):
        validate_scenario(scenario)
        assert scenario.param_dtype == dtype and not scenario.model.ties()
        assert all(steps == scenario.ranks[0] for steps in scenario.ranks)
        assert all(step.backward and not step.frozen for step in scenario.ranks[0])
        assert Step() == replace(scenario.ranks[0][0], path={}, forwards=1, optimizer_step=False)

    draw()
