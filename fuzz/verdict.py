"""Applying the contract to one run: judge, triage, and explain."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from fuzz.known_issues import KnownIssue, triage
from fuzz.observations import Observations
from fuzz.oracles import Violation, describe, judge, order_warnings
from fuzz.scenario import Scenario, dumps


@dataclass
class ContractCheck:
    """Fails a run that breaks the contract, unless a known issue explains it.

    Keeps count of the known issues it let through, for the end-of-run summary.
    """

    strict: bool = False
    runs: int = 0
    known_hits: Counter = field(default_factory=Counter)

    def __call__(self, scenario: Scenario, observations: Observations) -> KnownIssue | None:
        self.runs += 1
        violations = judge(scenario, observations)
        if not violations:
            return None
        known = triage(scenario, observations, violations)
        if known is None or self.strict:
            raise AssertionError(explain(scenario, observations, violations, known))
        self.known_hits[known.name] += 1
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
