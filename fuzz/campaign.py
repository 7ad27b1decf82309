"""A campaign outside pytest: Hypothesis runs against the pool until a budget
of scenarios or seconds is spent, saving one shrunk finding per failure class
and going on.

Each Hypothesis run ends when it has shrunk what it found, one minimal case
per class (``fsdp_fuzz.verdict``). The campaign saves each class once (the
``Ledger`` says who saves it when workers share a campaign), settles it so
that later runs count it without failing on it, and starts the next run with
a fresh seed. Settled classes still count, so a known issue that changes
shape shows up as a new class. A spent budget never cuts a shrink short: an
unshrunk finding is worth less than the time it saves.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase
from hypothesis.errors import Flaky

from fsdp_fuzz.corpus import save_finding, scenario_id
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.generate.seed_family import seed_family_scenarios
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.ledger import Ledger
from fsdp_fuzz.report import TargetTally
from fsdp_fuzz.verdict import ContractCheck, failures_in, only_contract_violations

TARGETS: dict[str, Callable[[str], st.SearchStrategy]] = {
    "generated": lambda engine: scenarios(engine=engine),
    "seed": lambda engine: seed_family_scenarios(engine=engine),
}
"""What ``--target`` names, as a strategy for the given engine."""

RUN_EXAMPLES = 400
"""Scenarios per Hypothesis run at most: runs end regularly, so that the
target phase steers towards rare classes and new settled classes apply."""


def target_name(target: str, engine: str) -> str:
    return f"{target}[{engine}]"


class Stop(BaseException):
    """Ends a Hypothesis run at once: not an ``Exception``, so Hypothesis
    neither catches nor shrinks it."""


@dataclass
class Budget:
    examples: int | None = None
    seconds: float | None = None
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spent(self, examples: int) -> bool:
        return (self.examples is not None and examples >= self.examples) or (
            self.seconds is not None and self.elapsed() >= self.seconds
        )


@dataclass
class CampaignResult:
    examples: int
    wall_s: float
    findings: list[tuple[Path, bool]]
    """Saved corpus files, and whether each is new."""
    hypothesis_runs: int
    flaky: int = 0
    """Hypothesis runs that ended because a failure did not replay."""


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
    ``stop_requested``; ``note`` receives a line per saved finding,
    ``after_each`` is called after every scenario."""
    strategy = TARGETS[target](engine)
    name = target_name(target, engine)
    check.target = name
    tally = check.report.tally(name)
    started_examples = tally.examples
    rng = random.Random(random_seed)
    findings: list[tuple[Path, bool]] = []
    runs = flaky = 0

    saved_scenarios: frozenset[str] = frozenset()

    def one_scenario(scenario) -> None:
        if stop_requested() or (budget.spent(tally.examples - started_examples) and not check.failed):
            raise Stop
        if saved_scenarios and scenario_id(scenario) in saved_scenarios:
            tally.replayed_findings += 1
        try:
            check(scenario, pools.run(scenario))
        finally:
            after_each()

    one_scenario._hypothesis_internal_add_digest = name.encode()  # one database key per target, in every worker
    while not budget.spent(tally.examples - started_examples) and not stop_requested():
        done = tally.examples - started_examples
        remaining = budget.examples - done if budget.examples is not None else RUN_EXAMPLES
        runs += 1
        check.failed = False
        claims = ledger.claims()
        saved_scenarios = frozenset(claims.values())
        check.settled = claims.__contains__
        # The seed goes on first: applied last, ``seed`` would turn the database off.
        hypothesis_run = settings(
            max_examples=max(1, min(remaining, RUN_EXAMPLES)),
            deadline=None,
            database=database,
            phases=(Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            print_blob=False,
            verbosity=Verbosity.quiet,  # the campaign reports its findings itself
        )(seed(rng.getrandbits(64))(given(strategy)(one_scenario)))
        try:
            hypothesis_run()
        except Stop:
            break
        except Flaky as exc:
            flaky += 1
            note(f"a failure did not replay, run dropped (nondeterministic observation?): {str(exc).splitlines()[0]}")
        except Exception as exc:
            if not only_contract_violations(exc):
                note("the fuzzer itself failed (a harness bug, not an FSDP finding); its traceback follows")
                raise
            found_by = f"python -m fsdp_fuzz run --target {target} --engine {engine}"
            for failure in failures_in(exc):
                if not ledger.claim(failure.failure_class, scenario_id(failure.scenario)):
                    note(f"{failure.failure_class.name}: saved already by another worker")
                    continue
                path, new = save_finding(
                    corpus, failure.scenario, failure.observations, failure.violations, failure.known, found_by
                )
                findings.append((path, new))
                check.report.record_saved(name, failure.failure_class, str(path), new)
                where = "saved to" if new else "already in the corpus:"
                note(f"finding [{failure.failure_class.name}] {where} {path}")
    tally.wall_s += budget.elapsed()
    return CampaignResult(tally.examples - started_examples, budget.elapsed(), findings, runs, flaky)


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
    over = budget.spent(examples)
    return (
        f"[{elapsed:5.0f} s] {examples}{of} scenarios{on} ({rate:.1f}/s{left}); "
        f"classes: {len(seen)} seen, {len(saved)} saved; steps: {counts(outcomes)}"
        + ("; budget spent, shrinking what was found" if over else "")
    )


def counts(counter: Counter) -> str:
    """``Counter`` as "3 error, 5 ok", for progress and summary lines."""
    return ", ".join(f"{count} {name}" for name, count in sorted(counter.items()))
