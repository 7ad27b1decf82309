"""The oracles on recorded observations (real two-rank CPU runs, saved by
``tests/record_observations.py``), as recorded and with one fact changed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fsdp_fuzz.data import (
    Clause,
    Fsdp2Settings,
    FsdpSettings,
    Observations,
    Scenario,
    Status,
    Step,
    StepOutcome,
    Violation,
    ViolationKind,
    WarningRecord,
)
from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import (
    LATER_WARNING,
    RELATIVE_TOLERANCE,
    consistent,
    expectations,
    gradient_replicas,
    judge,
    reference_mismatch,
    silent_mismatch,
)
from fsdp_fuzz.models.seed import seed_model

SEED_FILES = [
    "invalid_first_iter_order-full_shard",
    "invalid_first_iter_order-shard_grad_op",
    "invalid_later_iter_order-full_shard-iters1",
    "invalid_later_iter_order-full_shard-iters3",
    "invalid_later_iter_order-shard_grad_op-iters1",
    "invalid_later_iter_order-shard_grad_op-iters3",
    "train_eval-full_shard",
    "train_eval-shard_grad_op",
]


def with_step(observations: Observations, rank: int, step: int, outcome: StepOutcome) -> Observations:
    ranks = list(observations.ranks)
    steps = list(ranks[rank].steps)
    steps[step] = outcome
    ranks[rank] = replace(ranks[rank], steps=tuple(steps))
    return replace(observations, ranks=tuple(ranks))


def later_warning(rank: int) -> WarningRecord:
    return WarningRecord("UserWarning", LATER_WARNING.format(rank=rank) + ".\nExpected to all-gather for [...]")


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_runs_keep_the_contract(recorded, name):
    assert judge(*recorded(name)) == ()


def test_first_iteration_error_is_expected_on_every_rank_at_the_diverging_step(recorded):
    scenario, _ = recorded("invalid_first_iter_order-full_shard")
    assert [sorted(e.error_steps) for e in expectations(scenario)] == [[0], [0]]


def test_missing_first_iteration_error_is_a_violation(recorded):
    scenario, observations = recorded("invalid_first_iter_order-full_shard")
    violations = judge(scenario, with_step(observations, 1, 0, StepOutcome(Status.OK)))
    assert [(v.clause, v.rank, v.step) for v in violations] == [(Clause.FIRST_ITERATION, 1, 0)]


def test_a_hang_instead_of_the_first_iteration_error_is_a_violation(recorded):
    scenario, observations = recorded("invalid_first_iter_order-shard_grad_op")
    violations = judge(scenario, with_step(observations, 0, 0, StepOutcome(Status.HANG, error_message="Timed out")))
    assert [(v.clause, v.rank, v.step) for v in violations] == [(Clause.FIRST_ITERATION, 0, 0)]
    assert "a hang" in violations[0].message


def test_later_warning_is_expected_on_the_flipped_rank_only(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters3")
    assert [sorted(e.warning_steps) for e in expectations(scenario)] == [[], [3]]
    flipped = observations.ranks[1].steps[3]
    assert len(flipped.warnings) == 1


def test_missing_later_warning_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters1")
    silenced = with_step(observations, 1, 1, replace(observations.ranks[1].steps[1], warnings=()))
    # Unwarned, the pairing of layer1 with layer2 in that step is silent too.
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, silenced)] == [
        (Clause.LATER_ITERATION, 1, 1),
        (Clause.SILENT_MISMATCH, 1, 1),
    ]


def test_a_second_warning_on_the_next_iteration_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-shard_grad_op-iters1")
    again = with_step(observations, 1, 2, replace(observations.ranks[1].steps[2], warnings=(later_warning(1),)))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, again)] == [(Clause.LATER_ITERATION, 1, 2)]


def test_warning_the_rank_that_kept_its_order_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters1")
    wrong = with_step(observations, 0, 1, replace(observations.ranks[0].steps[1], warnings=(later_warning(0),)))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, wrong)] == [(Clause.LATER_ITERATION, 0, 1)]


def test_a_warning_naming_another_rank_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters1")
    wrong = with_step(observations, 1, 1, replace(observations.ranks[1].steps[1], warnings=(later_warning(0),)))
    violations = judge(scenario, wrong)
    assert (violations[0].clause, violations[0].rank, violations[0].step) == (Clause.LATER_ITERATION, 1, 1)


def test_an_eval_warning_is_a_violation(recorded):
    scenario, observations = recorded("train_eval-full_shard")
    eval_step = 4
    assert scenario.ranks[0][eval_step].mode == "eval"
    warned = with_step(
        observations, 0, eval_step, replace(observations.ranks[0].steps[eval_step], warnings=(later_warning(0),))
    )
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, warned)] == [(Clause.EVAL_SILENCE, 0, eval_step)]


def test_an_unexpected_error_is_a_clean_run_violation_naming_the_step(recorded):
    scenario, observations = recorded("train_eval-shard_grad_op")
    failed = with_step(observations, 1, 2, StepOutcome(Status.ERROR, error_type="ValueError", error_message="boom"))
    for later in range(3, scenario.num_steps):
        failed = with_step(failed, 1, later, StepOutcome(Status.NOT_RUN))
    violations = judge(scenario, failed)
    assert [(v.clause, v.rank, v.step) for v in violations] == [(Clause.CLEAN_RUN, 1, 2)]
    assert "ValueError: boom" in str(violations[0])


def test_no_expectations_below_detail(recorded):
    scenario, _ = recorded("invalid_first_iter_order-full_shard")
    assert all(not e.error_steps and not e.warning_steps for e in expectations(replace(scenario, debug_level="INFO")))


def test_the_recorded_eval_divergence_crash_matches_its_known_issue(recorded):
    scenario, observations = recorded("eval-order-unchecked-shard_grad_op")
    violations = judge(scenario, observations)
    assert violations and all(v.clause == Clause.CLEAN_RUN and v.step == 1 for v in violations)
    assert triage(scenario, observations, violations).name == "eval-order-unchecked"
    assert triage(scenario, observations, violations + (replace(violations[0], clause=Clause.EVAL_SILENCE),)) is None
    assert triage(scenario, observations, violations + (replace(violations[0], step=0),)) is None


def test_the_recorded_hang_after_a_deviation_warning_matches_its_known_issue(recorded):
    scenario, observations = recorded("unchecked-after-deviation-full_shard")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(Clause.CLEAN_RUN, 2)}
    assert triage(scenario, observations, violations).name == "unchecked-after-deviation"
    earlier = tuple(replace(v, step=1) for v in violations)
    assert triage(scenario, observations, earlier) is None


def test_the_recorded_hook_state_assert_matches_its_known_issue(recorded):
    scenario, observations = recorded("refreeze-after-forward-without-backward-full_shard")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(Clause.CLEAN_RUN, 1)}
    assert triage(scenario, observations, violations).name == "refreeze-after-forward-without-backward"
    assert triage(replace(scenario, freeze_untaken=False), observations, violations) is None


def test_the_recorded_seed_runs_pair_the_same_units_until_warned(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters3")
    assert silent_mismatch(observations) is None
    first = [record.unit for record in observations.ranks[1].steps[3].collectives]
    assert "layer2" in first, "the flipped rank all-gathers layer2 after its warning"


def test_a_mismatch_before_any_warning_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-shard_grad_op-iters1")
    unwarned = replace(observations.ranks[1].steps[1], warnings=())
    mismatch = silent_mismatch(with_step(observations, 1, 1, unwarned))
    assert (mismatch.clause, mismatch.rank, mismatch.step) == (Clause.SILENT_MISMATCH, 1, 1)
    assert "layer1" in mismatch.message and "layer2" in mismatch.message


def test_the_recorded_hybrid_cross_node_divergence_matches_its_known_issue(recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    violations = judge(scenario, observations)
    assert {v.clause for v in violations} == {Clause.FIRST_ITERATION, Clause.SILENT_MISMATCH}
    mismatch = silent_mismatch(observations)
    assert mismatch.message.startswith("collective #0 on ranks [0, 2]") and "all_reduce" in mismatch.message
    assert triage(scenario, observations, violations).name == "hybrid-order-check-intra-node-only"
    ranks = scenario.ranks
    within_a_node = replace(scenario, ranks=(ranks[0], ranks[2], ranks[1], ranks[3]))
    assert triage(within_a_node, observations, violations) is None


# Clause 4's numbers: the recorded runs carry the single-process reference
# that the executor computed next to them.


def scaled(outcome: StepOutcome, field: str, factor: float) -> StepOutcome:
    return replace(outcome, **{field: getattr(outcome, field) * factor})


@pytest.mark.parametrize("name", ["train_eval-full_shard", "clean-hybrid-shard-sgd", "clean-no-shard-sgd"])
def test_clean_runs_match_the_reference(recorded, name):
    scenario, observations = recorded(name)
    assert observations.reference is not None and consistent(scenario)
    assert reference_mismatch(scenario, observations) is None


def test_an_output_off_by_more_than_the_tolerance_is_a_violation(recorded):
    scenario, observations = recorded("clean-hybrid-shard-sgd")
    step = 2
    outcome = observations.ranks[3].steps[step]
    off = with_step(observations, 3, step, scaled(outcome, "output_sum", 1 + 10 * RELATIVE_TOLERANCE))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, off)] == [(Clause.REFERENCE, 3, step)]
    within = with_step(observations, 3, step, scaled(outcome, "output_sum", 1 + 1e-7))
    assert judge(scenario, within) == ()


def test_a_lost_gradient_contribution_is_a_violation(recorded):
    scenario, observations = recorded("clean-no-shard-sgd")
    step = 1
    assert scenario.ranks[0][step].backward
    halved = with_step(observations, 2, step, scaled(observations.ranks[2].steps[step], "grad_sum", 0.5))
    violations = judge(scenario, halved)
    assert [(v.clause, v.step) for v in violations] == [(Clause.REFERENCE, step)]
    assert "rank-averaged gradient" in violations[0].message


def test_gradients_are_counted_once_per_replica():
    def replicas(world_size: int, strategy: str = "FULL_SHARD", **fsdp2) -> int:
        scenario = Scenario(seed_model(), ((Step(),),) * world_size, FsdpSettings(sharding_strategy=strategy))
        if fsdp2:
            scenario = replace(scenario, fsdp=FsdpSettings(), engine="fsdp2", fsdp2=Fsdp2Settings(**fsdp2))
        return gradient_replicas(scenario)

    assert replicas(4) == 1
    assert replicas(3, "SHARD_GRAD_OP") == 1
    assert replicas(3, "NO_SHARD") == 3
    assert replicas(4, "HYBRID_SHARD") == 2
    assert replicas(4, "_HYBRID_SHARD_ZERO2") == 2
    assert replicas(4, hsdp=False) == 1
    assert replicas(4, hsdp=True) == 2


def test_numbers_are_not_judged_when_orders_differ(recorded):
    scenario, observations = recorded("invalid_first_iter_order-full_shard")
    assert not consistent(scenario)
    assert reference_mismatch(scenario, with_step(observations, 0, 0, StepOutcome(Status.OK, output_sum=1e9))) is None


def test_a_number_mismatch_after_another_failure_is_left_to_that_failure(recorded):
    scenario, observations = recorded("clean-hybrid-shard-sgd")
    failed = with_step(observations, 0, 1, StepOutcome(Status.ERROR, error_type="ValueError", error_message="boom"))
    failed = with_step(failed, 1, 2, scaled(observations.ranks[1].steps[2], "output_sum", 2.0))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, failed)] == [(Clause.CLEAN_RUN, 0, 1)]


def test_a_rank_that_never_trains_is_not_expected_to_raise():
    from fsdp_fuzz.data import Scenario, Step
    from fsdp_fuzz.models.seed import seed_model

    trains = (Step(path={"branch": (0,)}),)
    only_evals = (Step(mode="eval", path={"branch": (0,)}, backward=False),)
    scenario = Scenario(model=seed_model(), ranks=(trains, only_evals))
    assert [sorted(e.error_steps) for e in expectations(scenario)] == [[0], []]


def test_the_recorded_hang_of_an_internally_agreeing_node_matches_the_hybrid_known_issue(recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only-one-node-diverges")
    violations = judge(scenario, observations)
    assert {(v.clause, v.rank) for v in violations} == {(Clause.FIRST_ITERATION, 2), (Clause.FIRST_ITERATION, 3)}
    assert all("a hang" in v.message for v in violations)
    assert triage(scenario, observations, violations).name == "hybrid-order-check-intra-node-only"
    blamed_the_diverging_node = tuple(replace(v, rank=v.rank - 2) for v in violations)
    assert triage(scenario, observations, blamed_the_diverging_node) is None


def test_the_recorded_hybrid_warning_naming_the_local_rank_matches_its_known_issue(recorded):
    scenario, observations = recorded("hybrid-warning-names-intra-node-rank")
    violations = judge(scenario, observations)
    later = Clause.LATER_ITERATION
    assert {(v.clause, v.rank, v.step) for v in violations} == {(later, 2, 4), (later, 3, 4)}
    assert triage(scenario, observations, violations).name == "hybrid-warning-names-intra-node-rank"
    named_globally = replace(observations.ranks[2].steps[4], warnings=(later_warning(2),))
    globally_named = with_step(observations, 2, 4, named_globally)
    assert [(v.rank, v.step) for v in judge(scenario, globally_named)] == [(3, 4), (3, 4)]
    unsharded = replace(scenario, fsdp=replace(scenario.fsdp, sharding_strategy="FULL_SHARD"))
    assert triage(unsharded, observations, violations) is None


def test_the_recorded_hang_of_a_skipped_backward_matches_its_known_issue(recorded):
    scenario, observations = recorded("backward-on-some-ranks-only")
    violations = judge(scenario, observations)
    assert [(v.clause, v.rank, v.step) for v in violations] == [(Clause.CLEAN_RUN, 1, 0)]
    assert triage(scenario, observations, violations).name == "backward-on-some-ranks-only"
    both_backward = replace(scenario, ranks=(scenario.ranks[1], scenario.ranks[1]))
    assert triage(both_backward, observations, violations) is None


def test_a_backward_after_eval_forwards_only_ends_no_iteration():
    from fsdp_fuzz.data import Scenario, Step
    from fsdp_fuzz.judge.orders import iterations
    from fsdp_fuzz.models.seed import seed_model

    steps = (Step(mode="eval", path={"branch": (0,)}), Step(path={"branch": (0,)}))
    scenario = Scenario(model=seed_model(), ranks=(steps, steps))
    assert [iteration.steps for iteration in iterations(scenario, 0)] == [(1,)]
    assert all(not e.warning_steps for e in expectations(scenario))


def test_the_recorded_key_error_and_hang_of_hybrid_with_orig_params_match_the_hybrid_known_issue(recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only-with-orig-params")
    violations = judge(scenario, observations)
    assert {(v.clause, v.rank) for v in violations} == {(Clause.FIRST_ITERATION, rank) for rank in range(4)}
    assert triage(scenario, observations, violations).name == "hybrid-order-check-intra-node-only"
    without_orig_params = replace(scenario, fsdp=replace(scenario.fsdp, use_orig_params=False))
    assert triage(without_orig_params, observations, violations) is None


def test_the_recorded_lost_gradient_after_refreezing_matches_its_known_issue(recorded):
    scenario, observations = recorded("refreeze-drops-accumulated-grads-with-orig-params")
    violations = judge(scenario, observations)
    assert [(v.clause, v.step) for v in violations] == [(Clause.REFERENCE, 1)]
    assert triage(scenario, observations, violations).name == "refreeze-drops-accumulated-grads-with-orig-params"
    same_path = tuple((steps[0], replace(steps[1], path=steps[0].path)) for steps in scenario.ranks)
    assert triage(replace(scenario, ranks=same_path), observations, violations) is None
    stepped_between = tuple((replace(steps[0], optimizer_step=True), steps[1]) for steps in scenario.ranks)
    assert triage(replace(scenario, ranks=stepped_between), observations, violations) is None


def test_the_recorded_training_state_error_of_a_frozen_unit_matches_its_known_issue(recorded):
    scenario, observations = recorded("frozen-unit-backward-state-error-with-orig-params")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(Clause.CLEAN_RUN, 3)}
    assert triage(scenario, observations, violations).name == "frozen-unit-backward-state-error-with-orig-params"
    assert triage(replace(scenario, freeze_untaken=False), observations, violations) is None
    boom = StepOutcome(Status.ERROR, error_type="ValueError", error_message="boom")
    other_error = with_step(observations, 0, 3, boom)
    assert triage(scenario, other_error, judge(scenario, other_error)) is None


def test_silently_wrong_gradients_after_an_eval_forward_and_refreeze_match_the_refreeze_known_issue(recorded):
    scenario, observations = recorded("refreeze-after-forward-without-backward-shard_grad_op-silent")
    violations = judge(scenario, observations)
    assert [(v.clause, v.step) for v in violations] == [(Clause.REFERENCE, 2)]
    assert scenario.ranks[0][1].mode == "eval" and not scenario.ranks[0][1].backward
    assert triage(scenario, observations, violations).name == "refreeze-after-forward-without-backward"
    unchanged_path = tuple((steps[0], replace(steps[1], path=steps[2].path), *steps[2:]) for steps in scenario.ranks)
    assert triage(replace(scenario, ranks=unchanged_path), observations, violations) is None


def test_a_case_with_two_known_issues_is_triaged_violation_by_violation(recorded):
    from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES

    scenario, observations = recorded("two-known-issues-in-one-case")
    violations = judge(scenario, observations)
    assert {v.clause for v in violations} == {Clause.REFERENCE, Clause.LATER_ITERATION}
    assert not [issue for issue in KNOWN_ISSUES.values() if issue.explains(scenario, observations, violations)]
    assert triage(scenario, observations, violations).name == "refreeze-after-forward-without-backward"
    unexplained = Violation(Clause.CLEAN_RUN, ViolationKind.STEP_FAILED, 0, 3, "a failure no known issue explains")
    assert triage(scenario, observations, violations + (unexplained,)) is None


def test_the_refreeze_error_preempting_a_due_order_error_matches_its_known_issue(recorded):
    scenario, observations = recorded("refreeze-hits-unsharded-views-preempts-order-error")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(Clause.FIRST_ITERATION, 1)}
    assert triage(scenario, observations, violations).name == "refreeze-hits-unsharded-views"
    assert triage(replace(scenario, freeze_untaken=False), observations, violations) is None


def test_stale_parameters_after_an_optimizer_step_before_backward_match_their_known_issue(recorded):
    scenario, observations = recorded("optimizer-step-before-backward-uses-stale-params")
    violations = judge(scenario, observations)
    assert [(v.clause, v.rank, v.step) for v in violations] == [(Clause.REFERENCE, 0, 4)]
    unshards = [record for record in observations.ranks[0].steps[4].collectives if record.purpose == "unshard"]
    assert unshards == [], "the forward after the optimizer step gathered nothing"
    assert triage(scenario, observations, violations).name == "optimizer-step-before-backward-uses-stale-params"
    no_step = tuple(tuple(replace(step, optimizer_step=False) for step in steps) for steps in scenario.ranks)
    assert triage(replace(scenario, ranks=no_step), observations, violations) is None


def test_a_warning_due_in_a_step_never_run_is_not_missing(recorded):
    """Rank 1 crashes in step 0, so rank 0's later steps are recorded as not
    run: the order warning due in them cannot be missing."""
    scenario, observations = recorded("warning-due-in-a-step-never-run")
    assert [step.status for step in observations.ranks[0].steps[1:]] == [Status.NOT_RUN, Status.NOT_RUN]
    assert {violation.kind for violation in judge(scenario, observations)} == {ViolationKind.STEP_FAILED}
