"""A scenario on freshly spawned ranks: one process per rank per scenario.

This is how the seed's harness runs, and it costs a Python start, an
``import torch`` and a process group per case; ``fsdp_fuzz.execute.pool``
reuses ranks instead. It stays as the baseline the pool is measured against
and as the simplest faithful way to replay one scenario: ``run_fresh``
returns each rank's outcomes, ``run_scenario`` the ``Observations``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading

import torch.multiprocessing as mp

from fsdp_fuzz.data import Observations, Scenario, StepOutcome
from fsdp_fuzz.execute.collect import DEADLOCK_AFTER_S, RankHandles, collect_outcomes
from fsdp_fuzz.execute.devices import CPU, Placement, refuse_offload_on_cpu
from fsdp_fuzz.execute.groups import join_default_group
from fsdp_fuzz.execute.observe import observations_of
from fsdp_fuzz.execute.protocol import STARTUP_TIMEOUT_S, HarnessError
from fsdp_fuzz.execute.rank import answer_inquiries, serve_scenario
from fsdp_fuzz.execute.trace import check_trace

DEFAULT_GROUP_TIMEOUT_S = 5.0


def run_scenario(
    scenario: Scenario, placement: Placement = CPU, group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S
) -> Observations:
    """Run ``scenario`` on ``world_size`` freshly spawned ranks and observe it."""
    outcomes = run_fresh(scenario, placement, group_timeout_s)
    return observations_of(scenario, placement, outcomes)


def run_fresh(
    scenario: Scenario,
    placement: Placement = CPU,
    timeout_s: float = 5.0,
    deadlock_after_s: float | None = DEADLOCK_AFTER_S,
) -> list[list[StepOutcome]]:
    """Run the scenario on freshly spawned ranks, one process each, as the
    seed test's harness does; per rank, setup's outcome then each step's.

    The rendezvous is a file in a private temporary directory (no ports, so
    runs on one machine never collide). Ranks that finish wait for the others
    before exiting, so a rank stuck in a collective ends by its own timeout or
    by a deadlock the parent recognised, never by a peer's exit: the same
    scenario, the same outcomes.
    """
    placement.check(scenario.world_size)
    refuse_offload_on_cpu(scenario, placement)
    check_trace(scenario.engine)
    context = mp.get_context("spawn")
    reports, release = context.Queue(), context.Event()
    inquiries = [context.Queue() for _ in range(scenario.world_size)]
    workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-")
    store = os.path.join(workdir, "store")
    processes = [
        context.Process(
            target=_fresh_rank,
            args=(scenario, rank, store, placement, timeout_s, reports, release, inquiries[rank]),
            daemon=True,
        )
        for rank in range(scenario.world_size)
    ]
    collected = None
    try:
        for process in processes:
            process.start()
        collected = collect_outcomes(
            scenario,
            reports,
            scenario_id=0,
            ranks=RankHandles(processes, inquiries),
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=2 * timeout_s + 1,
            deadlock_after_s=deadlock_after_s,
        )
    finally:
        release.set()
        stuck = collected is None or collected.deadlocked or collected.no_groups is not None
        for process in processes:
            process.join(timeout=0 if stuck else 5)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (reports, *inquiries):
            channel.close()
            channel.join_thread()
        shutil.rmtree(workdir, ignore_errors=True)
    if collected.no_groups is not None:
        raise HarnessError(f"the scenario's process groups could not be created: {collected.no_groups}")
    return collected.outcomes


def _fresh_rank(scenario, rank, store_path, placement, timeout_s, reports, release, inquiries) -> None:
    threading.Thread(target=answer_inquiries, args=(rank, inquiries, reports), daemon=True).start()
    join_default_group(rank, scenario.world_size, store_path, placement)
    serve_scenario(scenario, 0, rank, placement, timeout_s, reports)
    release.wait(timeout=STARTUP_TIMEOUT_S)
    sys.stdout.flush()
    os._exit(0)
