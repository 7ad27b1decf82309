"""The reducer: after Hypothesis has shrunk a failure's choice sequence, make
the scenario itself small, on live ranks, keeping the failure's class.

Hypothesis shrinks what it drew, not the model: a shrunk case may keep
steps after the one that fails, ranks and alternatives nothing needs, marks
and settings that change nothing. The reducer applies the simplifications of
``fsdp_fuzz.reduce.passes`` one at a time, runs each candidate on the pool
and keeps it when the run's ``FailureClass`` (the known issue, or for an
unknown class its clauses and violation kinds) is the one it reduces;
a candidate it keeps is run twice, and dropped if the two verdicts differ.
Each pass goes through its candidates once, going on from where it kept
one, and the passes repeat until a round keeps nothing. After each kept
candidate the passes of ``AFTER_EACH_KEEP`` run at once: a kept step
simplification often leaves alternatives no rank takes, and each later
candidate would otherwise try the blocks, layers and marks inside them
one run at a time. The last round, which keeps nothing, runs every
one-step simplification of the result live: what the finding needs
(``Reduction.flips``). Deterministic for a
deterministic executor, and bounded by a deadline.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from fsdp_fuzz.corpus import scenario_id
from fsdp_fuzz.data import Observations, Scenario
from fsdp_fuzz.reduce.passes import AFTER_EACH_KEEP, PASSES, Candidate, Hint, Pass, size, valid
from fsdp_fuzz.reduce.record import Flip, Reduction
from fsdp_fuzz.verdict import JudgedRun, judged_run

NOT_REPEATABLE = "not repeatable"
"""A flip's outcome when its class came once and not on the run that checked it."""


class ReductionError(ValueError):
    """A scenario the reducer cannot reduce: it does not fail, or not as asked."""


class Runner(Protocol):
    """What runs a scenario on live ranks: ``PoolSet`` or ``RankPool``."""

    def run(self, scenario: Scenario) -> Observations: ...


@dataclass(frozen=True)
class Reduced:
    """The reduced scenario, its run, and the record of the reduction."""

    scenario: Scenario
    run: JudgedRun
    reduction: Reduction


def reduce(
    scenario: Scenario,
    runner: Runner,
    *,
    failure_class: str | None = None,
    observations: Observations | None = None,
    deadline: float | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Reduced:
    """Reduce ``scenario`` while its runs keep the outcome of its own run
    (``JudgedRun.outcome``: the class and, for a known issue, its symptom),
    which must be of ``failure_class`` where given. ``observations``: a run of ``scenario``
    already made, to save the first run. ``deadline`` (``time.monotonic``)
    ends the reduction where it stands; the record then says it is not
    complete. ``progress`` gets a line per kept simplification."""
    started = time.monotonic()
    runs = 0
    seen: dict[str, JudgedRun] = {}

    def run(candidate: Scenario, fresh: bool = False) -> JudgedRun:
        nonlocal runs
        key = scenario_id(candidate)
        if fresh or key not in seen:
            runs += 1
            seen[key] = judged_run(candidate, runner.run(candidate))
        return seen[key]

    if observations is not None:
        current = judged_run(scenario, observations)
        seen[scenario_id(scenario)] = current
    else:
        current = run(scenario)
    shown = current.failure_class
    if shown is None or (failure_class is not None and shown.name != failure_class):
        said = "keeps the contract" if shown is None else f"fails as {shown.name}"
        raise ReductionError(f"the scenario {said} on this run, not as {failure_class}: nothing to reduce")
    target = current.outcome

    removed: list[str] = []
    flips: list[Flip] = []
    complete = True

    def eligible(reduction_pass: Pass, position: int = 0) -> Iterator[tuple[int, Candidate]]:
        """The pass's candidates from ``position`` on that are valid and smaller."""
        bound = size(scenario)
        listed = reduction_pass(scenario, Hint(current.first_failing_step()))
        for index, candidate in enumerate(itertools.islice(listed, position, None), position):
            if size(candidate.scenario) < bound and valid(candidate.scenario):
                yield index, candidate

    def past_deadline() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def attempt(candidate: Candidate) -> str | None:
        """Keep ``candidate`` where two runs keep the target: None then,
        else the outcome that stopped it."""
        nonlocal scenario, current
        outcome = run(candidate.scenario).outcome
        if outcome != target:
            return outcome
        again = run(candidate.scenario, fresh=True)
        if again.outcome != target:
            return NOT_REPEATABLE
        scenario, current = candidate.scenario, again
        removed.append(candidate.change)
        progress(f"kept: {candidate.change}")
        return None

    def tidy() -> bool:
        """Apply ``AFTER_EACH_KEEP`` until it keeps nothing; False past the deadline."""
        kept_one = True
        while kept_one:
            kept_one = False
            for tidy_pass in AFTER_EACH_KEEP:
                for _, candidate in eligible(tidy_pass):
                    if past_deadline():
                        return False
                    if attempt(candidate) is None:
                        kept_one = True
                        break
        return True

    kept_in_round = True
    while kept_in_round and complete:
        kept_in_round = False
        flips = []
        for reduction_pass in PASSES:
            # After a kept candidate the pass goes on from the same position
            # of the new scenario's candidates, not from its first: those
            # before were tried already (a round that keeps nothing tries
            # them all again, so the result is still a fixpoint).
            position = 0
            while complete:
                kept_at = None
                for index, candidate in eligible(reduction_pass, position):
                    if past_deadline():
                        complete = False
                        break
                    outcome = attempt(candidate)
                    if outcome is None:
                        kept_at = index
                        break
                    flips.append(Flip(candidate.change, outcome))
                if kept_at is None:
                    break
                kept_in_round = True
                position = kept_at
                complete = tidy()
            if not complete:
                break
    reduction = Reduction(target, tuple(removed), tuple(flips), complete, runs, time.monotonic() - started)
    return Reduced(scenario, current, reduction)
