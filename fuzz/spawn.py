"""Run a scenario on freshly spawned ranks: one process per rank per scenario.

This is how the seed's harness runs, and it costs a Python start, an
``import torch`` and a process group per case; ``fuzz.pool`` reuses ranks
instead. It stays as the baseline the pool is measured against and as the
simplest faithful way to replay one scenario.

The rendezvous is a file in a private temporary directory (no ports, so
campaigns on one machine never collide). Ranks that finish wait for the
others before exiting, so a rank stuck in a collective always ends by its
group's timeout and never by a peer's exit: the same scenario gives the same
observation every time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch.multiprocessing as mp

from fuzz.observations import Observations
from fuzz.ranks import (
    CPU,
    STARTUP_TIMEOUT_S,
    DeviceError,
    Placement,
    collect_outcomes,
    join_default_group,
    observations_of,
    serve_scenario,
)
from fuzz.scenario import Scenario, scenario_to_json

__all__ = ["DEFAULT_GROUP_TIMEOUT_S", "CPU", "DeviceError", "Placement", "run_scenario"]

DEFAULT_GROUP_TIMEOUT_S = 5.0


def run_scenario(
    scenario: Scenario,
    placement: Placement = CPU,
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
) -> Observations:
    """Run ``scenario`` on ``world_size`` freshly spawned ranks and observe it."""
    placement.check(scenario.world_size)
    context = mp.get_context("spawn")
    reports = context.Queue()
    release = context.Event()
    workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-")
    encoded = json.dumps(scenario_to_json(scenario))
    store = os.path.join(workdir, "store")
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, scenario.world_size, encoded, store, placement, group_timeout_s, reports, release),
            daemon=True,
        )
        for rank in range(scenario.world_size)
    ]
    try:
        for process in processes:
            process.start()
        collected = collect_outcomes(
            scenario.world_size,
            reports,
            scenario_id=0,
            is_alive=lambda rank: processes[rank].is_alive(),
            exit_code=lambda rank: processes[rank].exitcode,
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=2 * group_timeout_s + 1,
        )
    finally:
        release.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        reports.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return observations_of(scenario, placement, collected.outcomes)


def _rank_main(rank, world_size, encoded, store_path, placement, group_timeout_s, reports, release) -> None:
    join_default_group(rank, world_size, store_path, placement)
    serve_scenario(encoded, 0, rank, placement, group_timeout_s, reports)
    release.wait(timeout=STARTUP_TIMEOUT_S)
    os._exit(0)
