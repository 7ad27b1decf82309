"""Applying the contract to one run: judge, triage, classify, and explain.

A failure reaches Hypothesis as an exception whose type names its class
(``FailureClass``): Hypothesis tells bugs apart by exception type and
location, so failures of different classes are shrunk and reported each on
its own instead of sliding into the simplest one. The exception carries the
failure itself, so whoever catches it saves exactly what Hypothesis replayed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import hypothesis

from fsdp_fuzz.data import Observations, Scenario, Status, Violation, dumps
from fsdp_fuzz.features import NOTHING, Trigger
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES, KnownIssue, triage
from fsdp_fuzz.judge.oracles import describe, judge, order_warnings, refusal
from fsdp_fuzz.reduce.record import CLEAN
from fsdp_fuzz.report import CampaignReport, Ending


@dataclass(frozen=True, order=True)
class FailureClass:
    """What makes two failing runs the same bug for a campaign: the known
    issue that explains them, or for an unexplained run the clauses it
    breaks and how (violation kinds)."""

    known_issue: str | None
    clauses: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    @classmethod
    def of(cls, violations: tuple[Violation, ...], known: KnownIssue | None) -> FailureClass:
        if known is not None:
            return cls(known.name)
        return cls(
            None,
            tuple(sorted({violation.clause.value for violation in violations})),
            tuple(sorted({violation.kind.value for violation in violations})),
        )

    @property
    def name(self) -> str:
        if self.known_issue is not None:
            return self.known_issue
        return f"unknown: {'+'.join(self.clauses)} ({', '.join(self.kinds)})"


@dataclass(frozen=True)
class Failure:
    scenario: Scenario
    observations: Observations
    violations: tuple[Violation, ...]
    known: KnownIssue | None
    failure_class: FailureClass


BY_ELIMINATION = " (with another record's violations)"
"""Said after a known issue that triage names because it explains the
first violation while another record explains the rest: a reduction keeps
such a case as it is, and does not turn a case one record explains whole
into one of these."""


@dataclass(frozen=True)
class JudgedRun:
    """One run, judged: its violations, the known issue triage names, its class as a reduction compares it."""

    scenario: Scenario
    observations: Observations
    violations: tuple[Violation, ...]
    known: KnownIssue | None

    @property
    def failure_class(self) -> FailureClass | None:
        return FailureClass.of(self.violations, self.known) if self.violations else None

    @property
    def outcome(self) -> str:
        """What a reduction keeps: ``clean``, or the class's name, for a known
        issue with its symptom (the violation kinds, as an unknown class's
        name has them): a record's predicate covers more than one symptom,
        and a reduced case that crashes where the finding computed silently
        wrong numbers is another report. An unknown class's outcome names
        how its failed steps ended (``error RuntimeError``, ``hang``), which
        its name does not. A known issue named by elimination says so."""
        failure_class = self.failure_class
        if failure_class is None:
            return CLEAN
        if self.known is None:
            symptoms = sorted(
                {
                    f"{outcome.status.value} {outcome.error_type}" if outcome.error_type else outcome.status.value
                    for violation in self.violations
                    if violation.step is not None
                    and (outcome := self.observations.ranks[violation.rank].steps[violation.step]).status
                    is not Status.OK
                }
            )
            return failure_class.name + (f" [{', '.join(symptoms)}]" if symptoms else "")
        kinds = ", ".join(sorted({violation.kind.value for violation in self.violations}))
        whole = self.known.explains(self.scenario, self.observations, self.violations)
        return f"{failure_class.name} ({kinds})" + ("" if whole else BY_ELIMINATION)

    def first_failing_step(self) -> int | None:
        steps = [violation.step for violation in self.violations if violation.step is not None]
        return min(steps) if steps else None


def judged_run(scenario: Scenario, observations: Observations) -> JudgedRun:
    violations = judge(scenario, observations)
    known = triage(scenario, observations, violations) if violations else None
    return JudgedRun(scenario, observations, violations, known)


class ContractViolation(AssertionError):
    """A run that broke the contract; subclassed once per ``FailureClass``."""

    failure: Failure


_VIOLATION_TYPES: dict[FailureClass, type[ContractViolation]] = {}


def violation_type(failure_class: FailureClass) -> type[ContractViolation]:
    """The exception type of a class: one per class, the same every time."""
    if failure_class not in _VIOLATION_TYPES:
        name = f"ContractViolation[{failure_class.name}]"
        _VIOLATION_TYPES[failure_class] = type(name, (ContractViolation,), {"__module__": __name__})
    return _VIOLATION_TYPES[failure_class]


def failures_in(exc: BaseException) -> Iterator[Failure]:
    """The failures an exception from Hypothesis carries: one, or one per
    class when several were found (an exception group)."""
    if isinstance(exc, ContractViolation):
        yield exc.failure
    for inner in getattr(exc, "exceptions", ()):
        yield from failures_in(inner)


def only_contract_violations(exc: BaseException) -> bool:
    """Whether an exception from Hypothesis holds contract violations only,
    not a bug of the fuzzer's own."""
    grouped = getattr(exc, "exceptions", None)
    if isinstance(grouped, tuple):
        return all(only_contract_violations(inner) for inner in grouped)
    return isinstance(exc, ContractViolation)


@dataclass
class ContractCheck:
    """Fails a run that breaks the contract, unless a known issue explains it
    or its class is already ``settled`` (saved earlier in this campaign).

    Keeps count of what it let through, for the end-of-run summary, and
    steers Hypothesis (``target``) towards runs whose class is rare so far.
    """

    strict: bool = False
    report: CampaignReport = field(default_factory=CampaignReport)
    target: str = "(no target)"
    """The fuzz target being run; set by the pytest hooks."""
    settled: Callable[[str], bool] = lambda class_name: False
    """Classes (by name) that count but no longer fail: a campaign saved them already."""
    failed: bool = False
    """Whether a run failed since this was last reset (Hypothesis is shrinking)."""
    seen: Counter = field(default_factory=Counter)
    """Runs per class, clean runs under None: what ``target`` steers by."""
    refusals_met: set[Trigger] = field(default_factory=set)
    """The triggers of the documented refusals that came."""

    def avoided(self, claimed: Iterable[str] = ()) -> tuple[Trigger, ...]:
        """What a campaign steers its swarms away from: the triggers of the
        records it has settled (``claimed``, and where known issues do not
        fail, every one met), and of the refusals that came."""
        names = set(claimed)
        if not self.strict:
            names |= {failure_class.known_issue for failure_class in self.seen if failure_class is not None}
        triggers = {KNOWN_ISSUES[name].trigger for name in names if name in KNOWN_ISSUES} | self.refusals_met
        return tuple(sorted((trigger for trigger in triggers if trigger != NOTHING), key=str))

    def __call__(self, scenario: Scenario, observations: Observations) -> KnownIssue | None:
        run = judged_run(scenario, observations)
        violations, known, failure_class = run.violations, run.known, run.failure_class
        met_before = self.seen[failure_class] > 0
        self.seen[failure_class] += 1
        if hypothesis.currently_in_test_context():
            hypothesis.target(-math.log(self.seen[failure_class]), label="rarity of the run's class")
        settled = bool(violations) and self.settled(failure_class.name)
        failed = bool(violations) and (known is None or self.strict) and not settled
        if not violations:
            refused = [found for rank in range(scenario.world_size) if (found := refusal(scenario, rank)) is not None]
            ending = Ending.REFUSAL if refused else Ending.CLEAN
            self.refusals_met.update(found.trigger for found in refused)
        elif settled or (known is not None and not self.strict and met_before):
            ending = Ending.SETTLED
        else:
            ending = Ending.UNSETTLED
        self.report.record(self.target, scenario, observations, violations, known, failed, failure_class, ending)
        if failed:
            self.failed = True
            error = violation_type(failure_class)(explain(scenario, observations, violations, known))
            error.failure = Failure(scenario, observations, violations, known, failure_class)
            raise error
        return known


def explain(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...], known: KnownIssue | None = None
) -> str:
    """Violations first, then what each rank did, then the scenario to save."""
    lines = [f"{len(violations)} contract violation(s):"]
    lines += [f"  {violation}" for violation in violations]
    if known is not None:
        lines.append(f"matches known issue {known.name!r} (reported because --strict-contract is on)")
    lines.append("observed (rank: step outcomes):")
    for rank, observed in enumerate(observations.ranks):
        cells = []
        for index, outcome in enumerate(observed.steps):
            step = scenario.ranks[rank][index]
            warned = f" +{len(order_warnings(outcome))} order warning(s)" if order_warnings(outcome) else ""
            cells.append(
                f"{index}:{step.mode}{json.dumps(dict(step.path), separators=(',', ':'))} {describe(outcome)}{warned}"
            )
        lines.append(f"  rank {rank}: " + " | ".join(cells))
    lines.append("scenario:")
    lines.append(dumps(scenario))
    return "\n".join(lines)
