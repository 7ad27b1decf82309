"""The campaign report: what the fuzz targets ran, saw and found.

Filled by ``ContractCheck`` as scenarios are judged and by the pytest hooks
that time each target; written as JSON by ``--fuzz-report PATH`` and
summarised on the terminal at the end of every run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from fsdp_fuzz.data import Observations, Scenario, Violation, observations_to_json, scenario_to_json
from fsdp_fuzz.judge.known_issues import KnownIssue


@dataclass
class TargetTally:
    examples: int = 0
    wall_s: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    """Step outcomes over every rank and step: ok, error, hang, crash, not_run."""
    clauses: Counter = field(default_factory=Counter)
    """Violated clauses, known issues included."""
    known_issues: Counter = field(default_factory=Counter)
    finding: dict[str, Any] | None = None
    """The last unexplained failure: after shrinking, Hypothesis replays the minimal one last."""


@dataclass
class CampaignReport:
    targets: dict[str, TargetTally] = field(default_factory=dict)

    def tally(self, target: str) -> TargetTally:
        return self.targets.setdefault(target, TargetTally())

    def record(
        self,
        target: str,
        scenario: Scenario,
        observations: Observations,
        violations: tuple[Violation, ...],
        known: KnownIssue | None,
        failed: bool,
    ) -> None:
        tally = self.tally(target)
        tally.examples += 1
        tally.outcomes.update(step.status.value for rank in observations.ranks for step in (rank.setup, *rank.steps))
        tally.clauses.update(violation.clause.value for violation in violations)
        if known is not None:
            tally.known_issues[known.name] += 1
        if failed:
            tally.finding = {
                "clauses": sorted({violation.clause.value for violation in violations}),
                "violations": [str(violation) for violation in violations],
                "known_issue": known.name if known else None,
                "scenario": scenario_to_json(scenario),
                "observations": observations_to_json(observations),
            }

    def to_json(self, profile: str, backend: str) -> dict[str, Any]:
        return {
            "torch_version": torch.__version__,
            "backend": backend,
            "profile": profile,
            "targets": {
                name: {
                    "examples": tally.examples,
                    "wall_s": round(tally.wall_s, 2),
                    "outcomes": dict(tally.outcomes),
                    "clauses": dict(tally.clauses),
                    "known_issues": dict(tally.known_issues),
                }
                for name, tally in self.targets.items()
            },
            "findings": [
                {"target": name, **tally.finding} for name, tally in self.targets.items() if tally.finding is not None
            ],
        }
