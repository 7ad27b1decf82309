"""A campaign outside pytest: Hypothesis runs against the pool until a budget
of scenarios or seconds is spent, saving each shrunk finding and going on.

A finding ends one Hypothesis run (it shrinks, then raises); the campaign
saves it to the corpus and starts the next run with a fresh seed, so one
bug does not end the search for the next. A spent budget never cuts a
shrink short: an unshrunk finding is worth less than the time it saves.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fsdp_fuzz.corpus import save_finding
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.generate.seed_family import seed_family_scenarios
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.verdict import ContractCheck

TARGETS: dict[str, Callable[[str], st.SearchStrategy]] = {
    "generated": lambda engine: scenarios(engine=engine),
    "seed": lambda engine: seed_family_scenarios(engine=engine),
}
"""What ``--target`` names, as a strategy for the given engine."""


def target_name(target: str, engine: str) -> str:
    return f"{target}[{engine}]"


class BudgetSpent(BaseException):
    """Stops a Hypothesis run at once: not an ``Exception``, so Hypothesis
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


def run_campaign(
    target: str,
    pools: PoolSet,
    check: ContractCheck,
    budget: Budget,
    corpus: Path,
    progress: Callable[[str], None] = print,
    progress_every_s: float = 10.0,
    random_seed: int | None = None,
    engine: str = "fsdp1",
) -> CampaignResult:
    strategy = TARGETS[target](engine)
    name = target_name(target, engine)
    check.target = name
    tally = check.report.tally(name)
    rng = random.Random(random_seed)
    findings: list[tuple[Path, bool]] = []
    last_progress = time.monotonic()
    runs = 0

    def one_scenario(scenario) -> None:
        nonlocal last_progress
        shrinking = check.last_failure is not None
        if budget.spent(tally.examples) and not shrinking:
            raise BudgetSpent
        check(scenario, pools.run(scenario))
        if time.monotonic() - last_progress >= progress_every_s:
            last_progress = time.monotonic()
            progress(progress_line(check, name, budget))

    while not budget.spent(tally.examples):
        remaining = budget.examples - tally.examples if budget.examples is not None else 10**9
        runs += 1
        check.last_failure = None
        hypothesis_run = seed(rng.getrandbits(64))(
            settings(
                max_examples=max(1, remaining),
                deadline=None,
                database=None,
                phases=(Phase.generate, Phase.target, Phase.shrink),
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            )(given(strategy)(one_scenario))
        )
        try:
            hypothesis_run()
        except BudgetSpent:
            break
        except Exception as exc:
            if not _contract_failures(exc) or check.last_failure is None:
                progress("the fuzzer itself failed on the scenario above (a harness bug, not an FSDP finding)")
                raise
            found_by = f"python -m fsdp_fuzz run --target {target} --engine {engine}"
            path, new = save_finding(corpus, *check.last_failure, found_by=found_by)
            findings.append((path, new))
            progress(f"finding {'saved to' if new else 'already in the corpus:'} {path}")
        else:
            break
    tally.wall_s += budget.elapsed()
    return CampaignResult(tally.examples, budget.elapsed(), findings, runs)


def _contract_failures(exc: BaseException) -> bool:
    """Whether Hypothesis raised contract violations only (``ContractCheck``
    raises ``AssertionError``; several distinct ones come as a group)."""
    grouped = getattr(exc, "exceptions", None)  # an ExceptionGroup, also the backport's on Python 3.10
    if isinstance(grouped, tuple):
        return all(_contract_failures(inner) for inner in grouped)
    return isinstance(exc, AssertionError)


def progress_line(check: ContractCheck, target: str, budget: Budget) -> str:
    tally = check.report.tally(target)
    elapsed = budget.elapsed()
    rate = tally.examples / elapsed if elapsed else 0.0
    of = f"/{budget.examples}" if budget.examples is not None else ""
    left = f", {max(0.0, budget.seconds - elapsed):.0f} s left" if budget.seconds is not None else ""
    known = sum(tally.known_issues.values())
    return (
        f"[{elapsed:6.0f} s] {tally.examples}{of} scenarios ({rate:.1f}/s{left}); "
        f"known-issue runs {known}; {counts(tally.outcomes)}"
    )


def counts(counter: Counter) -> str:
    """``Counter`` as "3 error, 5 ok", for progress and summary lines."""
    return ", ".join(f"{count} {name}" for name, count in sorted(counter.items()))
