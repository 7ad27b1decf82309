"""A campaign outside pytest: Hypothesis runs against the pool until a budget
of scenarios or seconds is spent, saving one shrunk finding per failure class
and going on.

Each Hypothesis run ends when it has shrunk what it found, one minimal case
per class (``fsdp_fuzz.verdict``). The campaign saves each class once (the
``Ledger`` says who saves it when workers share a campaign), settles it so
that later runs count it without failing on it, and starts the next run with
a fresh seed. Settled classes still count, so a known issue that changes
shape shows up as a new class.

``--time T`` is a budget and a deadline. Once T is spent, exploring stops
and no run starts; a shrink under way goes on, but only until the deadline
(``deadline``): T plus an allowance of a tenth of T, less the part of it
kept for ending the pools and writing the report. There the shrink is cut
short: each class it had not finished is saved as it stands, marked not
fully shrunk, and left unsettled, and Hypothesis's database keeps the
shrink's progress in a form the next run resumes from (``_resume_later``).
A nightly job with a hard limit gets its report either way.

Each scenario's time is charged to what it was for (``Activity``), so the
summary can say where a campaign's time went.

What the command shares with the pytest targets (the targets, saving a
finding, the summary) is ``fsdp_fuzz.core``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis.control import current_build_context
from hypothesis.database import ExampleDatabase, choices_to_bytes
from hypothesis.errors import Flaky
from hypothesis.internal.conjecture.shrinker import sort_key
from hypothesis.internal.reflection import function_digest

from fsdp_fuzz.core import SavedFinding, keep_finding
from fsdp_fuzz.core import target as fuzz_target
from fsdp_fuzz.corpus import save_finding, scenario_id
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.ledger import Ledger
from fsdp_fuzz.report import Activity, TargetTally, counts
from fsdp_fuzz.verdict import (
    ContractCheck,
    ContractViolation,
    Failure,
    FailureClass,
    failures_in,
    only_contract_violations,
)

RUN_EXAMPLES = 400
"""Scenarios per Hypothesis run at most: runs end regularly, so that the
target phase steers towards rare classes and new settled classes apply."""


ALLOWANCE = 0.1
"""How far past ``--time`` a campaign may end, as a share of it."""

TEARDOWN_S = 4.0
"""Kept from the allowance for what follows the deadline: the scenario in
flight (one that would likely end past the deadline does not start),
closing the pools, the workers' exit, the summary and report, the
command's exit. Measured on the 2-core machine (2 workers, torch
2.13.0+cpu, a strict ``--time 40s``): 3.5 s under a load of 5 while the
workers and the command tore down their interpreters, 1.5 s from the last
scenario to the command's end under a load of 10 to 20 now that they exit
at once; 4 s leaves room for a loaded machine. Never more than the
allowance: a ``--time`` under 40 s gets no shrinking past its budget."""


def allowance_s(seconds: float) -> float:
    return seconds * ALLOWANCE


def deadline(started: float, seconds: float) -> float:
    """The monotonic time at which a campaign of ``seconds`` stops running
    scenarios, shrinking or not: its end, ``seconds`` plus the allowance,
    less the larger of half the allowance and ``TEARDOWN_S``."""
    allowance = allowance_s(seconds)
    return started + seconds + allowance - min(allowance, max(allowance / 2, TEARDOWN_S))


SHRINK_S = 5.0
"""The most a Hypothesis run may spend shrinking what it found before the
campaign takes each class's best case as it stands and hands it to the
reducer (``fsdp_fuzz.reduce``), which knows scenarios and makes them smaller
for fewer runs; Hypothesis's own shrink spent most of a campaign before."""


class Stop(BaseException):
    """Ends a Hypothesis run at once: not an ``Exception``, so Hypothesis
    neither catches nor shrinks it."""


class ShrinkDone(Stop):
    """Ends a run whose shrink has had its ``SHRINK_S``: the campaign goes on."""


@dataclass
class Budget:
    examples: int | None = None
    seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    """When to stop even a shrink (``deadline()``); None: never."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spent(self, examples: int) -> bool:
        return (self.examples is not None and examples >= self.examples) or (
            self.seconds is not None and self.elapsed() >= self.seconds
        )

    def overdue(self, ahead_s: float = 0.0) -> bool:
        """Whether the deadline has come, or will have within ``ahead_s``."""
        return self.deadline is not None and time.monotonic() + ahead_s >= self.deadline


@dataclass
class CampaignResult:
    examples: int
    wall_s: float
    findings: list[SavedFinding]
    hypothesis_runs: int
    flaky: int = 0
    """Hypothesis runs that ended because a failure did not replay."""

    @property
    def unfinished(self) -> list[Path]:
        """Those of ``findings`` whose shrink the deadline cut short."""
        return [saved.path for saved in self.findings if not saved.fully_shrunk]


@dataclass
class Best:
    """A class's best failing run in the Hypothesis run under way: the one
    Hypothesis keeps in its database as the class's current minimal case."""

    failure: Failure
    choices: tuple
    """What Hypothesis drew for it."""
    order: tuple
    """Hypothesis's own order (shrinking only ever lowers it)."""


def run_campaign(
    target: str,
    pools: PoolSet,
    check: ContractCheck,
    budget: Budget,
    corpus: Path,
    ledger: Ledger,
    note: Callable[[str], None] = print,
    random_seed: int | None = None,
    engine: str = "fsdp1",
    database: ExampleDatabase | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    after_each: Callable[[], None] = lambda: None,
) -> CampaignResult:
    """Fuzz one target with one engine until the budget is spent or
    ``stop_requested``, finishing a shrink under way unless
    ``budget.deadline`` comes first; ``note`` receives a line per saved
    finding, ``after_each`` is called after every scenario."""
    fuzzed = fuzz_target(target, engine)
    name = fuzzed.name
    check.target = name
    tally = check.report.tally(name)
    started_examples = tally.examples
    charged_before = sum(tally.seconds.values())
    rng = random.Random(random_seed)
    result = CampaignResult(0, 0.0, [], 0)
    found_by = fuzzed.command

    replayed_once = None if database is None else ReplayedOnce(database)
    saved_scenarios: frozenset[str] = frozenset()
    stored: frozenset[bytes] = frozenset()
    """What the database held for this target when the run began."""
    best: dict[FailureClass, Best] = {}
    stopped_on: list[bytes] = []
    """The case a ``Stop`` refused to run: Hypothesis saves it as if it failed."""
    mark = time.monotonic()
    typical_s = 0.0
    """Recent scenarios' mean duration: one that would end past the deadline does not start."""
    failed_at: list[float] = []
    """When the run under way first failed: its shrink's clock."""

    def one_scenario(scenario) -> None:
        nonlocal mark, typical_s
        data = current_build_context().data
        encoded = choices_to_bytes(data.choices)
        if check.failed and failed_at and time.monotonic() - failed_at[0] >= SHRINK_S:
            stopped_on.append(encoded)
            raise ShrinkDone
        if (
            stop_requested()
            or budget.overdue(ahead_s=typical_s)
            or (budget.spent(tally.examples - started_examples) and not check.failed)
        ):
            stopped_on.append(encoded)
            raise Stop
        saved_before = bool(saved_scenarios) and scenario_id(scenario) in saved_scenarios
        tally.replayed_findings += saved_before
        if scenario.world_size not in pools.pools:
            activity = Activity.OTHER  # the first scenario of a world size starts its pool: seconds
        elif check.failed:
            activity = Activity.SHRINKING
        elif saved_before or encoded in stored:
            activity = Activity.REPLAYING
        else:
            activity = Activity.EXPLORING
        running = time.monotonic()
        try:
            check(scenario, pools.run(scenario))
        except ContractViolation as violation:
            failed_at[:] = failed_at or [time.monotonic()]
            order = sort_key(data.nodes)
            kept = best.get(violation.failure.failure_class)
            if kept is None or order <= kept.order:
                best[violation.failure.failure_class] = Best(violation.failure, tuple(data.choices), order)
            raise
        finally:
            # Hypothesis's own time since the last scenario (drawing this
            # one, shrinking bookkeeping) goes with the scenario it served.
            now = time.monotonic()
            tally.seconds[activity.value] += now - mark
            if activity is not Activity.OTHER:
                typical_s += 0.2 * (now - running - typical_s)
            mark = now
            after_each()

    def save(failure: Failure, fully_shrunk: bool, classes: int) -> None:
        """Reduce and save one of the run's ``classes`` findings, unless the deadline has come."""
        shrink_s = (time.monotonic() - failed_at[0]) / classes if failed_at else 0.0
        runner = None if budget.overdue() else pools
        saved = keep_finding(
            corpus,
            failure,
            found_by,
            check.report,
            name,
            fully_shrunk,
            runner=runner,
            reduce_by=budget.deadline,
            shrink_s=shrink_s,
        )
        result.findings.append(saved)
        note(saved.headline())

    one_scenario._hypothesis_internal_add_digest = name.encode()  # one database key per target, in every worker
    key = function_digest(one_scenario)  # the one Hypothesis files this target's cases under
    while not budget.spent(tally.examples - started_examples) and not stop_requested():
        done = tally.examples - started_examples
        remaining = budget.examples - done if budget.examples is not None else RUN_EXAMPLES
        result.hypothesis_runs += 1
        check.failed = False
        best.clear()
        stopped_on.clear()
        failed_at.clear()
        claims = ledger.claims()
        saved_scenarios = frozenset(claims.values())
        check.settled = claims.__contains__
        stored = _stored(database, key)
        # The seed goes on first: applied last, ``seed`` would turn the database off.
        hypothesis_run = settings(
            max_examples=max(1, min(remaining, RUN_EXAMPLES)),
            deadline=None,
            database=replayed_once,
            phases=(Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            print_blob=False,
            verbosity=Verbosity.quiet,  # the campaign reports its findings itself
        )(seed(rng.getrandbits(64))(given(fuzzed.strategy(check.avoided(claims)))(one_scenario)))
        mark = time.monotonic()
        try:
            hypothesis_run()
        except ShrinkDone:
            # Each class's best case goes to the reducer; the class is settled.
            _forget(database, key, [case for case in stopped_on if case not in stored])
            found = sorted(best.items(), key=lambda item: item[0].name)
            for failure_class, kept in found:
                if not ledger.claim(failure_class, scenario_id(kept.failure.scenario)):
                    note(f"{failure_class.name}: saved already by another worker")
                    continue
                save(kept.failure, fully_shrunk=True, classes=len(found))
        except Stop:
            _forget(database, key, [case for case in stopped_on if case not in stored])
            if check.failed:
                # Cut short mid-shrink: each class's best so far, as it stands.
                for failure_class, kept in sorted(best.items(), key=lambda item: item[0].name):
                    if failure_class.name in ledger.claims():
                        continue  # another worker finished this class's shrink
                    if not ledger.claim(failure_class, scenario_id(kept.failure.scenario), finished=False):
                        note(f"{failure_class.name}: saved already, unfinished, by another worker")
                        continue
                    save(kept.failure, fully_shrunk=False, classes=len(best))
                    _resume_later(database, key, kept.choices)
            break
        except Flaky as exc:
            result.flaky += 1
            note(f"a failure did not replay, run dropped (nondeterministic observation?): {str(exc).splitlines()[0]}")
            # A verdict that does not replay is a harness defect until shown
            # otherwise: keep what failed, unclaimed, for `replay` to retry.
            for kept in best.values():
                failure = kept.failure
                path, _ = save_finding(
                    corpus, failure.scenario, failure.observations, failure.violations, failure.known, found_by, False
                )
                note(f"  the run that failed ({failure.failure_class.name}) is kept in {path}: replay it to compare")
        except Exception as exc:
            if not only_contract_violations(exc):
                note("the fuzzer itself failed (a harness bug, not an FSDP finding); its traceback follows")
                raise
            found = list(failures_in(exc))
            for failure in found:
                if not ledger.claim(failure.failure_class, scenario_id(failure.scenario)):
                    note(f"{failure.failure_class.name}: saved already by another worker")
                    continue
                save(failure, fully_shrunk=True, classes=len(found))
    result.examples = tally.examples - started_examples
    result.wall_s = budget.elapsed()
    tally.wall_s += result.wall_s
    charged = sum(tally.seconds.values()) - charged_before
    tally.seconds[Activity.OTHER.value] += max(0.0, result.wall_s - charged)
    return result


class ReplayedOnce(ExampleDatabase):
    """The campaign's database as one worker's Hypothesis runs see it: each
    primary case is fetched once, by the first run that looks for it, and
    the secondary and Pareto corpora by the worker's first run only.

    Every run begins by replaying its database: the primary corpus, then a
    sample of the secondary one. In a campaign the primary corpus holds the
    classes already settled, and a case replayed once says all it will; the
    secondary corpus fills with the cases each shrink passed through, of
    classes settled since. Replayed by each of the dozens of runs, they took
    a quarter of a campaign's time. The first run still resumes what an
    earlier campaign left, and what another worker saves since is replayed
    by the next run; saves, moves and deletions pass through.
    """

    def __init__(self, shared: ExampleDatabase) -> None:
        super().__init__()
        self.shared = shared
        self.fetched: set[tuple[bytes, bytes]] = set()
        self.sampled: set[bytes] = set()
        """The secondary and Pareto keys fetched already."""

    def fetch(self, key: bytes):
        if key.endswith((b".secondary", b".pareto")):
            if key in self.sampled:
                return
            self.sampled.add(key)
            yield from self.shared.fetch(key)
            return
        for value in self.shared.fetch(key):
            if (key, value) not in self.fetched:
                self.fetched.add((key, value))
                yield value

    def save(self, key: bytes, value: bytes) -> None:
        self.shared.save(key, value)

    def delete(self, key: bytes, value: bytes) -> None:
        self.shared.delete(key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.shared.move(src, dest, value)


def _stored(database: ExampleDatabase | None, key: bytes) -> frozenset[bytes]:
    """Every case the database holds under ``key``: those Hypothesis may
    reuse before it generates anything (a replay, not exploring)."""
    if database is None:
        return frozenset()
    return frozenset(case for sub_key in (b"", b".secondary", b".pareto") for case in database.fetch(key + sub_key))


def _forget(database: ExampleDatabase | None, key: bytes, cases: list[bytes]) -> None:
    """Delete cases from the database's primary corpus, even from one that
    otherwise keeps findings (``KeepingFindings.forget``).

    Hypothesis saves the case a test was running when any ``BaseException``
    left it, ``Stop`` included, as if it were a failure: left there, a case
    that never ran would be replayed by every later run."""
    if database is None:
        return
    delete = getattr(database, "forget", database.delete)
    for case in cases:
        delete(key, case)


def _resume_later(database: ExampleDatabase | None, key: bytes, choices: tuple) -> None:
    """Leave a cut-short shrink's best case where the next run shrinks it
    further.

    Hypothesis does not shrink a case it replays from the database exactly
    (same choices drawn as stored): it takes it for a minimal case a
    finished shrink saved. Stored with one choice more than the test draws,
    the case replays as the same failure without being exact, so the next
    run resumes shrinking from it."""
    if database is not None:
        database.save(key, choices_to_bytes((*choices, 0)))


def progress_line(tallies: list[TargetTally], elapsed: float, budget: Budget, workers: int = 1) -> str:
    """One line for the terminal: scenarios, rate, classes seen and saved, outcomes."""
    examples = sum(tally.examples for tally in tallies)
    rate = examples / elapsed if elapsed else 0.0
    of = f"/{budget.examples}" if budget.examples is not None else ""
    left = f", {max(0.0, budget.seconds - elapsed):.0f} s left" if budget.seconds is not None else ""
    seen = {name for tally in tallies for name in tally.classes}
    saved = {name for tally in tallies for name in tally.saved}
    outcomes = sum((tally.outcomes for tally in tallies), Counter())
    on = f" on {workers} workers" if workers > 1 else ""
    over = ""
    if budget.spent(examples):
        over = "; budget spent, shrinking what was found"
        if budget.deadline is not None:
            over += f" for {max(0.0, budget.deadline - time.monotonic()):.0f} s at most"
    return (
        f"[{elapsed:5.0f} s] {examples}{of} scenarios{on} ({rate:.1f}/s{left}); "
        f"classes: {len(seen)} seen, {len(saved)} saved; steps: {counts(outcomes)}" + over
    )
