"""The campaign report: what the fuzz targets ran, saw and found.

Filled by ``ContractCheck`` as scenarios are judged, by the campaign
(``fsdp_fuzz.campaign``) and the pytest hooks that time each target;
written as JSON by ``--report PATH`` and ``--fuzz-report PATH`` and
summarised on the terminal at the end of every run (``fsdp_fuzz.core``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from fsdp_fuzz.data import Observations, Scenario, Violation, observations_to_json, scenario_to_json
from fsdp_fuzz.features import features_of
from fsdp_fuzz.judge.known_issues import KnownIssue

if TYPE_CHECKING:
    from fsdp_fuzz.verdict import FailureClass


class Activity(str, Enum):
    """What a scenario's time went to, in the report's words."""

    EXPLORING = "exploring"
    SHRINKING = "shrinking"
    """From a run's first failure on: the scenarios Hypothesis runs to shrink it."""
    REPLAYING = "replaying"
    """A scenario saved as a finding, or reused from the database."""
    REDUCING = "reducing"
    """The reducer's live runs on a saved finding (``fsdp_fuzz.reduce``)."""
    OTHER = "other"
    """Starting pools, saving findings, Hypothesis between runs; in the
    summary also starting workers and ending them."""


class Ending(str, Enum):
    """How a scenario ended, for the share of a campaign that looked
    somewhere new (a stable id)."""

    CLEAN = "clean"
    REFUSAL = "refusal"
    """A documented refusal came, as due (clause 7)."""
    SETTLED = "settled"
    """A class this campaign had settled before: saved already, or a known
    issue it had met already where known issues do not fail."""
    UNSETTLED = "unsettled"
    """A class met for the first time, or one being shrunk."""


@dataclass
class TargetTally:
    examples: int = 0
    wall_s: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    """Step outcomes over every rank and step: ok, error, hang, crash, not_run."""
    clauses: Counter = field(default_factory=Counter)
    """Violated clauses, known issues included."""
    known_issues: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)
    """Runs per failure class (``FailureClass.name``), failing or not."""
    endings: Counter = field(default_factory=Counter)
    """Scenarios by ``Ending``."""
    features: Counter = field(default_factory=Counter)
    """Scenarios by each feature they exercise (``fsdp_fuzz.features``)."""
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per class, when the campaign first ran into it: seconds and scenarios."""
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per class, when its shrunk finding was saved, and where."""
    replayed_findings: int = 0
    """Runs of a scenario this campaign saved as a finding (by any of its
    workers): Hypothesis replaying its database."""
    seconds: Counter = field(default_factory=Counter)
    """Seconds by activity: exploring, shrinking, replaying (scenarios saved
    as findings, or reused from Hypothesis's database), other (starting
    pools, saving findings); summed over workers."""
    finding: dict[str, Any] | None = None
    """The last unexplained failure: after shrinking, Hypothesis replays the minimal one last."""

    def merge(self, other: TargetTally) -> None:
        """Add another worker's tally of the same target."""
        self.examples += other.examples
        self.wall_s = max(self.wall_s, other.wall_s)
        for mine, theirs in ((self.outcomes, other.outcomes), (self.clauses, other.clauses)):
            mine.update(theirs)
        self.known_issues.update(other.known_issues)
        self.classes.update(other.classes)
        self.endings.update(other.endings)
        self.features.update(other.features)
        for mine, theirs in ((self.first_seen, other.first_seen), (self.saved, other.saved)):
            for name, when in theirs.items():
                if name not in mine or when["seconds"] < mine[name]["seconds"]:
                    mine[name] = when
        self.replayed_findings += other.replayed_findings
        self.seconds.update(other.seconds)
        self.finding = self.finding or other.finding


@dataclass
class CampaignReport:
    targets: dict[str, TargetTally] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def tally(self, target: str) -> TargetTally:
        return self.targets.setdefault(target, TargetTally())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record_saved(
        self,
        target: str,
        failure_class: FailureClass,
        path: str,
        new: bool,
        fully_shrunk: bool = True,
        shrink_s: float = 0.0,
        reduce_s: float = 0.0,
    ) -> None:
        tally = self.tally(target)
        saved = {"seconds": round(self.elapsed(), 1), "scenarios": tally.examples, "path": path, "new": new}
        saved |= {"shrink_s": round(shrink_s, 1), "reduce_s": round(reduce_s, 1)}
        tally.seconds[Activity.REDUCING.value] += reduce_s
        tally.saved.setdefault(failure_class.name, saved if fully_shrunk else {**saved, "fully_shrunk": False})

    def record(
        self,
        target: str,
        scenario: Scenario,
        observations: Observations,
        violations: tuple[Violation, ...],
        known: KnownIssue | None,
        failed: bool,
        failure_class: FailureClass | None = None,
        ending: Ending | None = None,
    ) -> None:
        tally = self.tally(target)
        tally.examples += 1
        if ending is not None:
            tally.endings[ending.value] += 1
        tally.features.update(str(feature) for feature in features_of(scenario))
        if failure_class is not None:
            tally.classes[failure_class.name] += 1
            tally.first_seen.setdefault(
                failure_class.name, {"seconds": round(self.elapsed(), 1), "scenarios": tally.examples}
            )
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

    def to_json(self, profile: str, backend: str, placement: dict[str, Any] | None = None) -> dict[str, Any]:
        """``backend``: the backends the ranks used, comma-separated;
        ``placement`` (``DeviceRequest.to_json``): the device, the backend
        asked for, the GPUs visible and the backend of each world size."""
        return {
            "torch_version": torch.__version__,
            "backend": backend,
            **({"placement": placement} if placement is not None else {}),
            "profile": profile,
            "targets": {
                name: {
                    "examples": tally.examples,
                    "wall_s": round(tally.wall_s, 2),
                    "outcomes": dict(tally.outcomes),
                    "clauses": dict(tally.clauses),
                    "known_issues": dict(tally.known_issues),
                    "classes": dict(tally.classes),
                    "endings": dict(tally.endings),
                    "features": dict(sorted(tally.features.items())),
                    "first_seen": tally.first_seen,
                    "saved": tally.saved,
                    "replayed_findings": tally.replayed_findings,
                    "seconds": {activity: round(seconds, 2) for activity, seconds in tally.seconds.items()},
                }
                for name, tally in self.targets.items()
            },
            "findings": [
                {"target": name, **tally.finding} for name, tally in self.targets.items() if tally.finding is not None
            ],
        }


def time_spent(report: CampaignReport, workers: int) -> dict[str, float]:
    """Where a campaign's time went, in seconds summed over its workers:
    each activity over every target, and ``other`` whatever no target ran
    (starting workers and pools, saving, ending pools, the report)."""
    spent = Counter()
    for tally in report.targets.values():
        spent.update(tally.seconds)
    charged = sum(spent[activity.value] for activity in Activity if activity is not Activity.OTHER)
    total = report.elapsed() * workers
    return {
        **{activity.value: round(spent[activity.value], 1) for activity in Activity if activity is not Activity.OTHER},
        Activity.OTHER.value: round(max(0.0, total - charged), 1),
        "wall": round(report.elapsed(), 1),
        "workers": workers,
    }


def counts(counter: Counter) -> str:
    """``Counter`` as "3 error, 5 ok", for progress and summary lines."""
    return ", ".join(f"{count} {name}" for name, count in sorted(counter.items()))
