"""A pool of persistent ranks: spawned once per campaign, reused for every
scenario.

Spawning ranks costs seconds (Python, ``import torch``, a process group);
a scenario costs tens of milliseconds. Workers keep a default group for
their whole life, used only to create each scenario's own group (with its
own short timeout), so a hang costs one timeout and the pool goes on. A
worker that dies, or one that stops answering outside any collective, takes
the pool with it: the pool records what it saw, then respawns all ranks
before the next scenario, since their default group is broken.

Workers die with the pool's process (``PR_SET_PDEATHSIG``), so an
interrupted campaign leaves no rank behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

import torch.multiprocessing as mp

from fsdp_fuzz.data import Observations, Scenario, scenario_to_json
from fsdp_fuzz.execute.executor import (
    CPU,
    HANG,
    STARTUP_TIMEOUT_S,
    Placement,
    check_trace,
    collect_outcomes,
    join_default_group,
    serve_scenario,
)
from fsdp_fuzz.execute.observe import observations_of

DEFAULT_GROUP_TIMEOUT_S = 2.0


@dataclass
class PoolStats:
    scenarios: int = 0
    respawns: int = 0
    hangs: int = 0
    """Scenarios in which some rank hung."""
    crashes: int = 0
    """Scenarios in which some rank died."""


class RankPool:
    """``world_size`` worker processes that run scenarios of that size."""

    def __init__(
        self,
        world_size: int,
        placement: Placement = CPU,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
    ) -> None:
        placement.check(world_size)
        self.world_size = world_size
        self.placement = placement
        self.group_timeout_s = group_timeout_s
        self.stats = PoolStats()
        self._context = mp.get_context("spawn")
        self._workers: list = []
        self._commands: list = []
        self._reports = None
        self._workdir: str | None = None
        self._next_id = 1
        self._traced: set[str] = set()
        """Engines whose trace hooks this torch was checked to have."""
        self.last_timings: list[dict[str, float]] = []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self, scenario: Scenario) -> Observations:
        if scenario.world_size != self.world_size:
            raise ValueError(f"this pool runs {self.world_size} ranks, the scenario has {scenario.world_size}")
        if scenario.engine not in self._traced:
            check_trace(scenario.engine)
            self._traced.add(scenario.engine)
        if not self._workers:
            self._start()
        scenario_id, self._next_id = self._next_id, self._next_id + 1
        encoded = scenario_to_json(scenario, complete=True)
        for commands in self._commands:
            commands.put((scenario_id, encoded))
        collected = collect_outcomes(
            encoded,
            self._reports,
            scenario_id,
            is_alive=lambda rank: self._workers[rank].is_alive(),
            exit_code=lambda rank: self._workers[rank].exitcode,
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=2 * self.group_timeout_s,
        )
        self.stats.scenarios += 1
        self.last_timings = collected.timings
        if any(outcome["status"] == HANG for outcomes in collected.outcomes for outcome in outcomes):
            self.stats.hangs += 1
        if collected.silent:
            stacks = self._dump_stacks(collected.silent)
            for rank in collected.silent:
                hung = next(outcome for outcome in collected.outcomes[rank] if outcome["status"] == HANG)
                hung["stack"] = stacks[rank]
        if collected.crashed:
            self.stats.crashes += 1
        if collected.silent or collected.crashed:
            self._stop()
        return observations_of(scenario, self.placement, collected.outcomes)

    def close(self) -> None:
        self._stop()

    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def _start(self) -> None:
        if self._workdir is not None:
            self.stats.respawns += 1
        self._workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-pool-")
        self._reports = self._context.Queue()
        self._commands = [self._context.Queue() for _ in range(self.world_size)]
        store = os.path.join(self._workdir, "store")
        self._workers = [
            self._context.Process(
                target=_worker_main,
                args=(rank, self.world_size, store, self._workdir, self.placement, self.group_timeout_s),
                kwargs={"commands": self._commands[rank], "reports": self._reports},
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for worker in self._workers:
            worker.start()

    def _stop(self) -> None:
        for commands, worker in zip(self._commands, self._workers, strict=True):
            if worker.is_alive():
                commands.put(None)
        deadline = time.monotonic() + 2
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
        for channel in [*self._commands, self._reports]:
            if channel is not None:
                channel.close()
                channel.join_thread()
        self._workers, self._commands, self._reports = [], [], None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _dump_stacks(self, ranks: set[int]) -> dict[int, str]:
        """Ask silent workers for their Python stacks (``faulthandler`` on SIGUSR1)."""
        for rank in ranks:
            os.kill(self._workers[rank].pid, signal.SIGUSR1)
        time.sleep(0.5)
        stacks = {}
        for rank in ranks:
            path = os.path.join(self._workdir, f"stack-{rank}.txt")
            try:
                with open(path) as dump:
                    stacks[rank] = dump.read()
            except OSError:
                stacks[rank] = "(no stack: the worker did not answer SIGUSR1)"
        return stacks


class PoolSet:
    """One pool per world size, started on first use."""

    def __init__(self, placement: Placement = CPU, group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> None:
        self.placement = placement
        self.group_timeout_s = group_timeout_s
        self.pools: dict[int, RankPool] = {}

    def run(self, scenario: Scenario) -> Observations:
        pool = self.pools.get(scenario.world_size)
        if pool is None:
            pool = self.pools[scenario.world_size] = RankPool(scenario.world_size, self.placement, self.group_timeout_s)
        return pool.run(scenario)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> PoolSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(rank, world_size, store_path, workdir, placement, group_timeout_s, *, commands, reports) -> None:
    import faulthandler

    _die_with_parent()
    stack_file = open(os.path.join(workdir, f"stack-{rank}.txt"), "w")  # noqa: SIM115 - lives as long as the worker
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    join_default_group(rank, world_size, store_path, placement)
    while (command := commands.get()) is not None:
        scenario_id, scenario = command
        serve_scenario(scenario, scenario_id, rank, placement, group_timeout_s, reports)
    reports.close()
    reports.join_thread()
    os._exit(0)
