"""The oracles on recorded observations (real two-rank CPU runs, saved by
``tests/record_observations.py``), as recorded and with one fact changed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fuzz.known_issues import triage
from fuzz.observations import ERROR, HANG, NOT_RUN, OK, Observations, StepOutcome, WarningRecord
from fuzz.oracles import (
    CLEAN_RUN,
    EVAL_SILENCE,
    FIRST_ITERATION,
    LATER_ITERATION,
    LATER_WARNING,
    SILENT_MISMATCH,
    expectations,
    judge,
    silent_mismatch,
)

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
    violations = judge(scenario, with_step(observations, 1, 0, StepOutcome(OK)))
    assert [(v.clause, v.rank, v.step) for v in violations] == [(FIRST_ITERATION, 1, 0)]


def test_a_hang_instead_of_the_first_iteration_error_is_a_violation(recorded):
    scenario, observations = recorded("invalid_first_iter_order-shard_grad_op")
    violations = judge(scenario, with_step(observations, 0, 0, StepOutcome(HANG, error_message="Timed out")))
    assert [(v.clause, v.rank, v.step) for v in violations] == [(FIRST_ITERATION, 0, 0)]
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
        (LATER_ITERATION, 1, 1),
        (SILENT_MISMATCH, 1, 1),
    ]


def test_a_second_warning_on_the_next_iteration_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-shard_grad_op-iters1")
    again = with_step(observations, 1, 2, replace(observations.ranks[1].steps[2], warnings=(later_warning(1),)))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, again)] == [(LATER_ITERATION, 1, 2)]


def test_warning_the_rank_that_kept_its_order_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters1")
    wrong = with_step(observations, 0, 1, replace(observations.ranks[0].steps[1], warnings=(later_warning(0),)))
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, wrong)] == [(LATER_ITERATION, 0, 1)]


def test_a_warning_naming_another_rank_is_a_violation(recorded):
    scenario, observations = recorded("invalid_later_iter_order-full_shard-iters1")
    wrong = with_step(observations, 1, 1, replace(observations.ranks[1].steps[1], warnings=(later_warning(0),)))
    violations = judge(scenario, wrong)
    assert (violations[0].clause, violations[0].rank, violations[0].step) == (LATER_ITERATION, 1, 1)


def test_an_eval_warning_is_a_violation(recorded):
    scenario, observations = recorded("train_eval-full_shard")
    eval_step = 4
    assert scenario.ranks[0][eval_step].mode == "eval"
    warned = with_step(
        observations, 0, eval_step, replace(observations.ranks[0].steps[eval_step], warnings=(later_warning(0),))
    )
    assert [(v.clause, v.rank, v.step) for v in judge(scenario, warned)] == [(EVAL_SILENCE, 0, eval_step)]


def test_an_unexpected_error_is_a_clean_run_violation_naming_the_step(recorded):
    scenario, observations = recorded("train_eval-shard_grad_op")
    failed = with_step(observations, 1, 2, StepOutcome(ERROR, error_type="ValueError", error_message="boom"))
    for later in range(3, scenario.num_steps):
        failed = with_step(failed, 1, later, StepOutcome(NOT_RUN))
    violations = judge(scenario, failed)
    assert [(v.clause, v.rank, v.step) for v in violations] == [(CLEAN_RUN, 1, 2)]
    assert "ValueError: boom" in str(violations[0])


def test_no_expectations_below_detail(recorded):
    scenario, _ = recorded("invalid_first_iter_order-full_shard")
    assert all(not e.error_steps and not e.warning_steps for e in expectations(replace(scenario, debug_level="INFO")))


def test_the_recorded_eval_divergence_crash_matches_its_known_issue(recorded):
    scenario, observations = recorded("eval-order-unchecked-shard_grad_op")
    violations = judge(scenario, observations)
    assert violations and all(v.clause == CLEAN_RUN and v.step == 1 for v in violations)
    assert triage(scenario, observations, violations).name == "eval-order-unchecked"
    assert triage(scenario, observations, violations + (replace(violations[0], clause=EVAL_SILENCE),)) is None
    assert triage(scenario, observations, violations + (replace(violations[0], step=0),)) is None


def test_the_recorded_hang_after_a_deviation_warning_matches_its_known_issue(recorded):
    scenario, observations = recorded("unchecked-after-deviation-full_shard")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(CLEAN_RUN, 2)}
    assert triage(scenario, observations, violations).name == "unchecked-after-deviation"
    earlier = tuple(replace(v, step=1) for v in violations)
    assert triage(scenario, observations, earlier) is None


def test_the_recorded_hook_state_assert_matches_its_known_issue(recorded):
    scenario, observations = recorded("refreeze-after-forward-without-backward-full_shard")
    violations = judge(scenario, observations)
    assert {(v.clause, v.step) for v in violations} == {(CLEAN_RUN, 1)}
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
    assert (mismatch.clause, mismatch.rank, mismatch.step) == (SILENT_MISMATCH, 1, 1)
    assert "layer1" in mismatch.message and "layer2" in mismatch.message


def test_the_recorded_hybrid_cross_node_divergence_matches_its_known_issue(recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    violations = judge(scenario, observations)
    assert {v.clause for v in violations} == {FIRST_ITERATION, SILENT_MISMATCH}
    mismatch = silent_mismatch(observations)
    assert mismatch.message.startswith("collective #0 on ranks [0, 2]") and "all_reduce" in mismatch.message
    assert triage(scenario, observations, violations).name == "hybrid-order-check-intra-node-only"
    ranks = scenario.ranks
    within_a_node = replace(scenario, ranks=(ranks[0], ranks[2], ranks[1], ranks[3]))
    assert triage(within_a_node, observations, violations) is None
