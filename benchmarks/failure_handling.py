"""Scenarios per second on the generated target: today's failure handling
against the old one, on the same scenarios, side by side.

    python benchmarks/failure_handling.py [--examples N] [--seed S] [--engine fsdp1|fsdp2]

Hypothesis draws ``N`` scenarios of the generated target once (seeded, so
every run draws the same ones); each handling then runs and judges all of
them on its own pools, as a campaign does. ``legacy`` is the handling before
issue 13: workers are fresh interpreters, a hang waits out the group timeout
(2 s then) and a crash waits for a respawn. ``fast`` forks workers from a preloaded
server, replaces them at once and recognises deadlocks from the ranks'
threads. The last line printed is a JSON object: per handling, scenarios per
second and the mean seconds per scenario by its worst
step outcome (ok, error, hang, crash).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from fsdp_fuzz.data import Observations, Status
from fsdp_fuzz.execute.pool import DEFAULT_GROUP_TIMEOUT_S, FAST, LEGACY, FailureHandling, PoolSet
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import judge

RANK_LOG = Path(tempfile.gettempdir()) / "fsdp-fuzz-benchmark-ranks.log"
HANDLINGS: dict[str, tuple[FailureHandling, float]] = {
    "legacy": (LEGACY, 2.0),
    "fast": (FAST, DEFAULT_GROUP_TIMEOUT_S),
}
"""Each handling with its group timeout: 2 s was the default before issue 13."""
WORST_FIRST = (Status.CRASH, Status.HANG, Status.ERROR, Status.OK)


def draw(count: int, random_seed: int, engine: str) -> list:
    drawn = []

    @seed(random_seed)
    @settings(
        max_examples=count,
        phases=(Phase.generate,),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(scenarios(engine=engine))
    def collect(scenario) -> None:
        drawn.append(scenario)

    collect()
    return drawn[:count]


def worst_outcome(observations: Observations) -> str:
    seen = {step.status for rank in observations.ranks for step in (rank.setup, *rank.steps)}
    return next((status.value for status in WORST_FIRST if status in seen), Status.OK.value)


def run_share(handling: FailureHandling, group_timeout_s: float, share: list) -> list[tuple[str, float]]:
    """Run and judge scenarios on one set of pools: (worst outcome, seconds) each."""
    costs = []
    with PoolSet(group_timeout_s=group_timeout_s, handling=handling, log_path=RANK_LOG) as pools:
        for scenario in share:
            began = time.perf_counter()
            observations = pools.run(scenario)
            triage(scenario, observations, judge(scenario, observations))
            costs.append((worst_outcome(observations), time.perf_counter() - began))
    return costs


def measure(name: str, handling: FailureHandling, group_timeout_s: float, drawn: list, workers: int) -> dict:
    """Scenario ``i`` goes to worker ``i % workers``; the wall time is the
    slowest worker's."""
    started = time.perf_counter()
    if workers == 1:
        costs = run_share(handling, group_timeout_s, drawn)
    else:
        shares = [drawn[index::workers] for index in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.map(run_share, [handling] * workers, [group_timeout_s] * workers, shares)
            costs = [cost for share in done for cost in share]
    run_s = time.perf_counter() - started
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for outcome, cost in costs:
        by_outcome[outcome].append(cost)
    per_s = len(drawn) / run_s
    means = {outcome: round(statistics.mean(values), 3) for outcome, values in sorted(by_outcome.items())}
    counts = {outcome: len(values) for outcome, values in sorted(by_outcome.items())}
    print(
        f"{name}: {len(drawn)} scenarios in {run_s:.1f} s on {workers} worker(s): {per_s:.2f}/s; "
        f"mean s by outcome {means}; count {counts}",
        flush=True,
    )
    return {
        "workers": workers,
        "per_s": round(per_s, 2),
        "run_s": round(run_s, 1),
        "mean_s_by_outcome": means,
        "count_by_outcome": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="scenarios drawn (default 300)")
    parser.add_argument("--seed", type=int, default=7, help="Hypothesis seed for the drawing (default 7)")
    parser.add_argument("--engine", choices=("fsdp1", "fsdp2"), default="fsdp1")
    parser.add_argument("--only", choices=sorted(HANDLINGS), help="measure one handling only")
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure the fast handling on this many workers (default 2)"
    )
    arguments = parser.parse_args()
    started = time.perf_counter()
    drawn = draw(arguments.examples, arguments.seed, arguments.engine)
    print(f"drew {len(drawn)} scenarios in {time.perf_counter() - started:.1f} s (not counted below)", flush=True)
    names = [arguments.only] if arguments.only else list(HANDLINGS)
    result = {name: measure(name, *HANDLINGS[name], drawn, 1) for name in names}
    if arguments.workers > 1 and "fast" in names:
        result[f"fast_{arguments.workers}_workers"] = measure(
            f"fast on {arguments.workers} workers", *HANDLINGS["fast"], drawn, arguments.workers
        )
    if "legacy" in result:
        for name in result:
            if name != "legacy":
                result[name]["speedup"] = round(result[name]["per_s"] / result["legacy"]["per_s"], 1)
    print(json.dumps({"engine": arguments.engine, "examples": len(drawn), "seed": arguments.seed, **result}))


if __name__ == "__main__":
    main()
