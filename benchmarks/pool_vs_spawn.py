"""Scenarios per second: the persistent pool against fresh processes per scenario.

    python benchmarks/pool_vs_spawn.py [--rounds N] [--device cuda] [--spawn-rounds 0]

Both run the same scenarios (the seed corpus: two ranks; on the CPU with
gloo unless ``--device cuda``), one after the other in this process.
``--spawn-rounds 0`` measures the pool alone (``spawn_per_s`` null). The last line printed is a JSON object with
``pool_per_s``, ``spawn_per_s``, ``speedup``, and the cost of one pooled
scenario split into group creation, model build, FSDP wrap and steps (mean
seconds, slowest rank of each scenario).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fsdp_fuzz.execute.devices import BACKENDS, DEVICES, DeviceRequest
from fsdp_fuzz.execute.pool import RankPool
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.generate.seed_family import seed_scenarios

PHASES = ("group", "build", "wrap", "steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="passes of the pool over the scenarios (default 10)")
    parser.add_argument("--spawn-rounds", type=int, default=1, help="passes with fresh processes (default 1)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the ranks run (default cpu)")
    parser.add_argument("--backend", choices=BACKENDS, help="default: the device's (fsdp_fuzz.execute.devices)")
    arguments = parser.parse_args()
    scenarios = list(seed_scenarios().values())
    placement = DeviceRequest(arguments.device, arguments.backend).place(2)

    started = time.perf_counter()
    for _ in range(arguments.spawn_rounds):
        for scenario in scenarios:
            run_scenario(scenario, placement)
    spawn_s = time.perf_counter() - started
    spawn_count = arguments.spawn_rounds * len(scenarios)
    print(f"spawn: {spawn_count} scenarios in {spawn_s:.2f} s", flush=True)

    split: dict[str, list[float]] = {phase: [] for phase in PHASES}
    with RankPool(2, placement) as pool:
        started = time.perf_counter()
        pool.run(scenarios[0])
        pool_start_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(arguments.rounds):
            for scenario in scenarios:
                pool.run(scenario)
                for phase in PHASES:
                    split[phase].append(max(timings.get(phase, 0.0) for timings in pool.last_timings))
        pool_s = time.perf_counter() - started
    pool_count = arguments.rounds * len(scenarios)
    print(f"pool: started in {pool_start_s:.2f} s, then {pool_count} scenarios in {pool_s:.2f} s", flush=True)

    pool_per_s = pool_count / pool_s
    spawn_per_s = spawn_count / spawn_s if spawn_count else None
    result = {
        "world_size": 2,
        "placement": placement.to_json(),
        "scenarios": len(scenarios),
        "pool_per_s": round(pool_per_s, 2),
        "spawn_per_s": None if spawn_per_s is None else round(spawn_per_s, 3),
        "speedup": None if spawn_per_s is None else round(pool_per_s / spawn_per_s, 1),
        "pool_start_s": round(pool_start_s, 2),
        "split_s": {phase: round(statistics.mean(values), 4) for phase, values in split.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
