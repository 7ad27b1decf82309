"""Observations: what each rank did, step by step, as plain data.

The *execute* stage produces them and the *judge* stage reads them; they
round-trip through JSON so a recorded run can be judged again without
running anything (the oracle unit tests do exactly that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

OK = "ok"
ERROR = "error"
HANG = "hang"
CRASH = "crash"
NOT_RUN = "not_run"


@dataclass(frozen=True)
class WarningRecord:
    category: str
    message: str


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective a rank issued: what, how big, and for which FSDP unit."""

    op: str
    dtype: str
    numel: int
    unit: str | None
    """The spec name of the FSDP unit served, ``None`` when not on a unit's behalf."""
    purpose: str | None
    """``unshard``, ``reduce_grad`` or ``order_check``."""
    group: tuple[int, ...] = ()
    """Global ranks of the group it ran on: collectives pair up within a group."""


@dataclass(frozen=True)
class StepOutcome:
    """One rank's step: how it ended, and every warning it raised, in order."""

    status: str
    error_type: str | None = None
    error_message: str | None = None
    warnings: tuple[WarningRecord, ...] = ()
    output_sum: float | None = None
    grad_sum: float | None = None
    """Sum of this rank's local gradients after the step's backward."""
    collectives: tuple[CollectiveRecord, ...] = ()
    stack: str | None = None
    """For a hang: where the rank was when its group timed out (innermost frames last)."""


@dataclass(frozen=True)
class RankObservation:
    """``setup`` covers building the model and wrapping it in FSDP."""

    setup: StepOutcome
    steps: tuple[StepOutcome, ...]


@dataclass(frozen=True)
class ReferenceStep:
    """What a single process computes for one step (``fuzz.reference``)."""

    output_sums: tuple[float, ...]
    """Per rank: the sum of its forwards' outputs."""
    grad_sum: float | None
    """Sum of the rank-averaged gradient after this step's backward,
    accumulated since the last optimizer step; ``None`` without a backward."""


@dataclass(frozen=True)
class Observations:
    backend: str
    device: str
    torch_version: str
    ranks: tuple[RankObservation, ...]
    reference: tuple[ReferenceStep, ...] | None = None
    """The single-process reference run, when the schedules allow one."""


def outcome_to_json(outcome: StepOutcome) -> dict[str, Any]:
    """Status always; the other fields only when they say something."""
    encoded = asdict(outcome)
    encoded["warnings"] = [asdict(w) for w in outcome.warnings]
    encoded["collectives"] = [list(asdict(c).values()) for c in outcome.collectives]
    return {key: value for key, value in encoded.items() if key == "status" or value not in (None, [])}


def outcome_from_json(encoded: dict[str, Any]) -> StepOutcome:
    return StepOutcome(
        status=encoded["status"],
        error_type=encoded.get("error_type"),
        error_message=encoded.get("error_message"),
        warnings=tuple(WarningRecord(**w) for w in encoded.get("warnings", ())),
        output_sum=encoded.get("output_sum"),
        grad_sum=encoded.get("grad_sum"),
        collectives=tuple(_collective_from_json(c) for c in encoded.get("collectives", ())),
        stack=encoded.get("stack"),
    )


def observations_to_json(observations: Observations) -> dict[str, Any]:
    return {
        "backend": observations.backend,
        "device": observations.device,
        "torch_version": observations.torch_version,
        "ranks": [
            {"setup": outcome_to_json(rank.setup), "steps": [outcome_to_json(s) for s in rank.steps]}
            for rank in observations.ranks
        ],
        "reference": None
        if observations.reference is None
        else [{"output_sums": list(step.output_sums), "grad_sum": step.grad_sum} for step in observations.reference],
    }


def observations_from_json(encoded: dict[str, Any]) -> Observations:
    return Observations(
        backend=encoded["backend"],
        device=encoded["device"],
        torch_version=encoded["torch_version"],
        ranks=tuple(
            RankObservation(
                setup=outcome_from_json(rank["setup"]),
                steps=tuple(outcome_from_json(s) for s in rank["steps"]),
            )
            for rank in encoded["ranks"]
        ),
        reference=None
        if encoded.get("reference") is None
        else tuple(ReferenceStep(tuple(step["output_sums"]), step["grad_sum"]) for step in encoded["reference"]),
    )


def _collective_from_json(encoded: list) -> CollectiveRecord:
    *fields, group = encoded
    return CollectiveRecord(*fields, group=tuple(group))
