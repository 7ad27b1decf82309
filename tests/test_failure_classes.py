"""Distinct bugs stay distinct: recorded observations of different known
issues reach Hypothesis as different failures, each shrunk and reported on
its own, and a settled class counts without failing. Judges recorded
observations (tests/recorded); nothing runs FSDP here."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fsdp_fuzz.verdict import ContractCheck, ContractViolation, FailureClass, failures_in, violation_type
from tests.conftest import load_recorded as recorded

KNOWN = [
    "first-iteration-order-ends-early",
    "later-check-misses-dropped-units",
    "order-unchecked-below-detail",
    "optimizer-step-before-backward-uses-stale-params",
]
CLEAN = "train_eval-full_shard"


def cases(stems):
    return [recorded(stem) for stem in stems]


def test_one_exception_type_per_class_the_same_every_time():
    first = FailureClass("first-iteration-order-ends-early")
    other = FailureClass("later-check-misses-dropped-units")
    unknown = FailureClass(None, ("clean-run",), ("step-failed",))
    assert violation_type(first) is violation_type(FailureClass("first-iteration-order-ends-early"))
    assert len({violation_type(first), violation_type(other), violation_type(unknown)}) == 3
    assert all(issubclass(violation_type(kind), AssertionError) for kind in (first, other, unknown))
    assert unknown.name == "unknown: clean-run (step-failed)"


def test_a_failure_carries_its_class_and_what_was_observed():
    scenario, observations = recorded(KNOWN[0])
    check = ContractCheck(strict=True)
    with pytest.raises(ContractViolation) as raised:
        check(scenario, observations)
    (failure,) = failures_in(raised.value)
    assert failure.failure_class == FailureClass(KNOWN[0])
    assert failure.scenario == scenario and failure.observations == observations
    assert type(raised.value).__name__ == f"ContractViolation[{KNOWN[0]}]"


def test_a_settled_class_counts_without_failing():
    scenario, observations = recorded(KNOWN[1])
    check = ContractCheck(strict=True, settled={KNOWN[1]}.__contains__)
    assert check(scenario, observations).name == KNOWN[1]
    assert check.report.tally(check.target).classes[KNOWN[1]] == 1
    assert not check.failed


def test_hypothesis_reports_every_class_found_in_one_run():
    """Four known issues and a clean case drawn by Hypothesis: one minimal
    failure per class comes out, in one exception group, none slid into
    another class while shrinking."""
    drawn = cases(KNOWN) + [recorded(CLEAN)]
    check = ContractCheck(strict=True)

    @settings(
        max_examples=200,
        database=None,
        derandomize=True,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(drawn))
    def campaign(case):
        check(*case)

    with pytest.raises(BaseException) as raised:  # noqa: PT011 - an ExceptionGroup of contract violations
        campaign()
    found = sorted(failure.failure_class.name for failure in failures_in(raised.value))
    assert found == sorted(KNOWN)


def test_the_report_says_when_each_class_was_first_seen():
    check = ContractCheck()
    for case in cases(KNOWN[:2]) * 2:
        check(*case)
    tally = check.report.tally(check.target)
    assert set(tally.first_seen) == set(KNOWN[:2])
    assert [tally.first_seen[name]["scenarios"] for name in KNOWN[:2]] == [1, 2]
    assert tally.classes == {KNOWN[0]: 2, KNOWN[1]: 2}
