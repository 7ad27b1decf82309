"""What a reduction leaves with a finding: the simplifications it kept (what
the finding does not need) and the one-step flips of the result, each run
live (what it needs). Plain data that round-trips through JSON, saved in a
corpus file under ``"reduction"`` and read by ``show`` and ``report``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLEAN = "clean"
"""A flip's outcome when the run keeps the contract."""


@dataclass(frozen=True)
class Flip:
    """One change to the reduced scenario and what its run gave."""

    change: str
    """What changed, in the scenario's terms: ``use_orig_params back to False``."""
    outcome: str
    """The run's failure class (``FailureClass.name``), ``clean``, or why it
    could not run (``invalid: ...``)."""

    def keeps(self, failure_class: str) -> bool:
        return self.outcome == failure_class


@dataclass(frozen=True)
class Reduction:
    failure_class: str
    """The class every kept simplification preserved."""
    removed: tuple[str, ...]
    """The simplifications kept, in the order applied: what the finding does not need."""
    flips: tuple[Flip, ...]
    """Every one-step simplification of the result, run live; at a fixpoint none keeps the class."""
    complete: bool
    """Whether no flip keeps the class (a fixpoint); False where the budget ended the reduction first."""
    runs: int
    """Live runs spent, repeats included."""
    seconds: float

    def needs(self) -> tuple[Flip, ...]:
        """The flips that lose the class: each names something the finding needs."""
        return tuple(flip for flip in self.flips if not flip.keeps(self.failure_class))

    def summary(self) -> list[str]:
        """Lines for ``show`` and reports: what it needs, what it does not."""
        needs = self.needs()
        lines = [f"needs (each change below, alone, loses {self.failure_class}):"]
        lines += [f"  - {flip.change}: {flip.outcome}" for flip in needs if not flip.outcome.startswith("invalid")]
        if not self.complete:
            lines.append("  (the reduction's budget ended before a fixpoint: some flips still keep the class)")
        if self.removed:
            lines.append("does not need (removed with the class kept):")
            lines += [f"  - {change}" for change in self.removed]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "failure_class": self.failure_class,
            "removed": list(self.removed),
            "flips": [{"change": flip.change, "outcome": flip.outcome} for flip in self.flips],
            "complete": self.complete,
            "runs": self.runs,
            "seconds": round(self.seconds, 1),
        }

    @classmethod
    def from_json(cls, encoded: Mapping[str, Any]) -> Reduction:
        return cls(
            failure_class=str(encoded["failure_class"]),
            removed=tuple(str(change) for change in encoded["removed"]),
            flips=tuple(Flip(str(flip["change"]), str(flip["outcome"])) for flip in encoded["flips"]),
            complete=bool(encoded["complete"]),
            runs=int(encoded["runs"]),
            seconds=float(encoded["seconds"]),
        )
