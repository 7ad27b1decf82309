"""Applying the contract to one run: judge, triage, and explain."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fsdp_fuzz.data import Observations, Scenario, Violation, dumps
from fsdp_fuzz.judge.known_issues import KnownIssue, triage
from fsdp_fuzz.judge.oracles import describe, judge, order_warnings
from fsdp_fuzz.report import CampaignReport


@dataclass
class ContractCheck:
    """Fails a run that breaks the contract, unless a known issue explains it.

    Keeps count of the known issues it let through, for the end-of-run summary.
    """

    strict: bool = False
    report: CampaignReport = field(default_factory=CampaignReport)
    target: str = "(no target)"
    """The fuzz target being run; set by the pytest hooks."""
    last_failure: tuple[Scenario, Observations, tuple[Violation, ...], KnownIssue | None] | None = None
    """The latest run that failed: after shrinking, Hypothesis replays the minimal one last."""

    def __call__(self, scenario: Scenario, observations: Observations) -> KnownIssue | None:
        violations = judge(scenario, observations)
        known = triage(scenario, observations, violations) if violations else None
        failed = bool(violations) and (known is None or self.strict)
        self.report.record(self.target, scenario, observations, violations, known, failed)
        if failed:
            self.last_failure = (scenario, observations, violations, known)
            raise AssertionError(explain(scenario, observations, violations, known))
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
