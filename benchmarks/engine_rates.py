"""Campaign rates of FSDP1 and FSDP2 side by side, and where each one's time goes.

    python benchmarks/engine_rates.py [--seconds 90] [--seed 7] [--slices 2] [--strict]

Runs the campaign itself (``run_campaign``: Hypothesis, the pool, the
oracles, saving findings) on the ``generated`` target for each engine in
turn, in this process, on the CPU with gloo: the same seed, the same fixed
time each, one worker, a fresh corpus, ledger and example database per
engine. ``--slices N`` cuts each engine's time into N slices and
alternates them (fsdp1, fsdp2, fsdp1, ...), so that a change in the
machine's load falls on both; each slice is a campaign of its own with its
own pools, which is how ``--engine both`` runs too.

Printed per engine: scenarios/s; the campaign's time by activity
(exploring, shrinking, replaying, other); the mean seconds of one scenario
split into the ranks' own phases (``group``: creating the scenario's
process groups, ``build``: the model, ``wrap``: FSDP, ``steps``: running
the steps, each the slowest rank's), the pool's overhead around them
(sending the scenario, collecting outcomes, replacing ranks), judging, and
Hypothesis (drawing and shrinking); and what the scenarios were (ranks,
steps, outcomes, hangs, crashes, rank sets replaced). Then the FSDP2/FSDP1
ratio of scenarios/s, which issue 18 wants at 0.8 or more. The last line is
the same as a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis.database import DirectoryBasedExampleDatabase

from fsdp_fuzz.campaign import Activity, Budget, deadline, run_campaign
from fsdp_fuzz.data import Observations, Scenario
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.ledger import Ledger
from fsdp_fuzz.report import CampaignReport
from fsdp_fuzz.verdict import ContractCheck
from fsdp_fuzz.workers import KeepingFindings

ENGINES = ("fsdp1", "fsdp2")
PHASES = ("group", "build", "wrap", "steps")
WANTED_RATIO = 0.8
"""Issue 18: FSDP2's campaign rate within 20% of FSDP1's."""


@dataclass
class Costs:
    """Seconds and counts over every scenario one engine ran."""

    scenarios: int = 0
    timed: int = 0
    """Scenarios that did not start a pool: those the per-scenario means are over."""
    starting: bool = False
    """Whether the scenario being judged started its pool (the campaign charges it to ``other``)."""
    wall_s: float = 0.0
    activities: Counter = field(default_factory=Counter)
    phases: Counter = field(default_factory=Counter)
    pool_s: float = 0.0
    judge_s: float = 0.0
    ranks: Counter = field(default_factory=Counter)
    steps: int = 0
    outcomes: Counter = field(default_factory=Counter)
    pool_events: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)

    def per_scenario(self, seconds: float) -> float:
        return seconds / self.timed if self.timed else 0.0


class TimedPools(PoolSet):
    """The campaign's pools, also adding up what each scenario cost them."""

    def __init__(self, costs: Costs, log_path: Path) -> None:
        super().__init__(log_path=log_path)
        self.costs = costs

    def run(self, scenario: Scenario) -> Observations:
        costs = self.costs
        costs.starting = scenario.world_size not in self.pools
        started = time.perf_counter()
        observations = super().run(scenario)
        if not costs.starting:
            costs.timed += 1
            costs.pool_s += time.perf_counter() - started
            timings = self.pools[scenario.world_size].last_timings
            for phase in PHASES:
                costs.phases[phase] += max((rank.get(phase, 0.0) for rank in timings), default=0.0)
            costs.ranks[scenario.world_size] += 1
            costs.steps += max(len(steps) for steps in scenario.ranks)
        return observations

    def close(self) -> None:
        for pool in self.pools.values():
            for name in ("respawns", "hangs", "crashes", "deadlocks"):
                self.costs.pool_events[name] += getattr(pool.stats, name)
        super().close()


class TimedCheck(ContractCheck):
    """The campaign's oracles, also timed."""

    costs: Costs

    def __call__(self, scenario: Scenario, observations: Observations):
        started = time.perf_counter()
        try:
            return super().__call__(scenario, observations)
        finally:
            if not self.costs.starting:
                self.costs.judge_s += time.perf_counter() - started


def run_slice(engine: str, seconds: float, seed: int, strict: bool, costs: Costs, where: Path) -> None:
    """One campaign of ``seconds`` for ``engine``, its costs added to ``costs``."""
    check = TimedCheck(strict=strict, report=CampaignReport())
    check.costs = costs
    where.mkdir(parents=True, exist_ok=True)
    database = KeepingFindings(DirectoryBasedExampleDatabase(where / "db"))
    started = time.monotonic()
    budget = Budget(seconds=seconds, started=started, deadline=deadline(started, seconds))
    with TimedPools(costs, log_path=where / "ranks.log") as pools:
        run_campaign(
            "generated",
            pools,
            check,
            budget,
            where / "corpus",
            Ledger(where / "ledger"),
            note=lambda text: None,
            random_seed=seed,
            engine=engine,
            database=database,
        )
    costs.wall_s += time.monotonic() - started
    (tally,) = check.report.targets.values()
    costs.scenarios += tally.examples
    costs.activities.update(tally.seconds)
    costs.outcomes.update(tally.outcomes)
    costs.classes.update(tally.classes)


def summary(engine: str, costs: Costs) -> dict:
    ran = sum(costs.activities[activity.value] for activity in Activity if activity is not Activity.OTHER)
    phases = {phase: costs.per_scenario(costs.phases[phase]) for phase in PHASES}
    return {
        "engine": engine,
        "scenarios": costs.scenarios,
        "wall_s": round(costs.wall_s, 1),
        "per_s": round(costs.scenarios / costs.wall_s, 2),
        "running_per_s": round(costs.timed / ran, 2) if ran else 0.0,
        "seconds": {activity.value: round(costs.activities[activity.value], 1) for activity in Activity},
        "per_scenario_s": {
            **{phase: round(value, 4) for phase, value in phases.items()},
            "pool_overhead": round(costs.per_scenario(costs.pool_s) - sum(phases.values()), 4),
            "judge": round(costs.per_scenario(costs.judge_s), 4),
            "hypothesis": round(costs.per_scenario(ran - costs.pool_s - costs.judge_s), 4),
            "all": round(costs.per_scenario(ran), 4),
        },
        "ranks": dict(sorted(costs.ranks.items())),
        "mean_steps": round(costs.per_scenario(costs.steps), 2),
        "outcomes": dict(costs.outcomes),
        "pool_events": dict(costs.pool_events),
        "classes": len([name for name in costs.classes if name is not None]),
    }


def show(result: dict) -> None:
    seconds, split = result["seconds"], result["per_scenario_s"]
    print(
        f"{result['engine']}: {result['scenarios']} scenarios in {result['wall_s']} s, {result['per_s']}/s "
        f"({result['running_per_s']}/s over the time scenarios ran, start-up and saving left out)"
    )
    print("  time: " + ", ".join(f"{name} {value} s" for name, value in seconds.items()))
    print(
        f"  mean s per scenario {split['all']}: "
        + ", ".join(f"{name} {split[name]}" for name in (*PHASES, "pool_overhead", "judge", "hypothesis"))
    )
    print(
        f"  scenarios by ranks {result['ranks']}, {result['mean_steps']} steps each; "
        f"step outcomes {result['outcomes']}; pool {result['pool_events']}; {result['classes']} failure classes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90, help="per engine (default %(default)s)")
    parser.add_argument("--seed", type=int, default=7, help="the campaigns' seed (default %(default)s)")
    parser.add_argument("--slices", type=int, default=2, help="alternating slices per engine (default %(default)s)")
    parser.add_argument("--strict", action="store_true", help="known issues count as findings (off by default)")
    arguments = parser.parse_args()
    costs = {engine: Costs() for engine in ENGINES}
    load = [round(os.getloadavg()[0], 1)]
    with tempfile.TemporaryDirectory(prefix="engine-rates-") as directory:
        for index in range(arguments.slices):
            for engine in ENGINES:
                print(f"slice {index + 1}/{arguments.slices}: {engine}", flush=True)
                where = Path(directory) / engine
                run_slice(
                    engine,
                    arguments.seconds / arguments.slices,
                    arguments.seed + index,
                    arguments.strict,
                    costs[engine],
                    where,
                )
    load.append(round(os.getloadavg()[0], 1))
    print(f"machine: {os.cpu_count()} cores, load average {load[0]} before, {load[1]} after")
    results = {engine: summary(engine, costs[engine]) for engine in ENGINES}
    for result in results.values():
        show(result)
    ratio = results["fsdp2"]["per_s"] / results["fsdp1"]["per_s"]
    running = results["fsdp2"]["running_per_s"] / results["fsdp1"]["running_per_s"]
    verdict = "within" if ratio >= WANTED_RATIO else "not within"
    print(
        f"fsdp2/fsdp1 scenarios/s: {ratio:.2f} ({verdict} issue 18's 20%); over the time scenarios ran: {running:.2f}"
    )
    print(
        json.dumps(
            {
                "seconds_each": arguments.seconds,
                "seed": arguments.seed,
                "load": load,
                "engines": results,
                "ratio": round(ratio, 3),
                "running_ratio": round(running, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
