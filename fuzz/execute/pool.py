"""A pool of persistent ranks: started once per campaign, reused for every
scenario.

Spawning ranks costs seconds (Python, ``import torch``, a process group);
a scenario costs tens of milliseconds. Workers keep a default group for
their whole life, used only to create each scenario's own group (with its
own short timeout), so a hang the ranks time out themselves leaves the pool
usable. A worker that dies, one that stops answering outside any
collective, or ranks caught in a deadlock (``collect_outcomes``) take the
pool with it: the pool records what it saw and replaces every rank, since
their default group is broken or their collectives still pending.

Replacing ranks is cheap: workers are forked from a server that imported
torch and FSDP once (``forkserver`` with a preload), and the replacements
start at once, while the parent judges the scenario that broke the last
ones. ``FailureHandling`` names that choice; ``LEGACY``, the handling
before it (fresh interpreters, hangs waited out), stays for the benchmark.

Workers die with the pool's process, however it ends, and ignore
Ctrl-C, which is the campaign's to handle; their output goes to the pool's
log file, not the terminal.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp

from fsdp_fuzz.data import Observations, Scenario, scenario_to_json
from fsdp_fuzz.execute.executor import (
    CPU,
    DEADLOCK_AFTER_S,
    HANG,
    STARTUP_TIMEOUT_S,
    Placement,
    RankHandles,
    answer_inquiries,
    check_trace,
    collect_outcomes,
    join_default_group,
    serve_scenario,
)
from fsdp_fuzz.execute.observe import observations_of

DEFAULT_GROUP_TIMEOUT_S = 2.0

PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch._dynamo", "fsdp_fuzz.execute.executor"]
"""What the fork server imports once, so that no worker imports it again
(``torch._dynamo``: the optimizer's constructor imports it, half a second)."""


@dataclass(frozen=True)
class FailureHandling:
    start_method: str = "forkserver"
    """How workers start: ``forkserver`` forks them from a process that
    imported ``PRELOAD``; ``spawn`` starts fresh interpreters."""
    deadlock_after_s: float | None = DEADLOCK_AFTER_S
    """Call ranks deadlocked after this long blocked; None waits for the
    group's timeout."""


FAST = FailureHandling()
LEGACY = FailureHandling(start_method="spawn", deadlock_after_s=None)


@dataclass
class PoolStats:
    scenarios: int = 0
    respawns: int = 0
    hangs: int = 0
    """Scenarios in which some rank hung."""
    crashes: int = 0
    """Scenarios in which some rank died."""
    deadlocks: int = 0
    """Scenarios whose hang was recognised as a deadlock, before any timeout."""


class RankPool:
    """``world_size`` worker processes that run scenarios of that size."""

    def __init__(
        self,
        world_size: int,
        placement: Placement = CPU,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
        handling: FailureHandling = FAST,
        log_path: Path | None = None,
    ) -> None:
        placement.check(world_size)
        self.world_size = world_size
        self.placement = placement
        self.group_timeout_s = group_timeout_s
        self.handling = handling
        self.log_path = log_path
        """Where the workers' output goes; None: wherever the parent's goes."""
        self.stats = PoolStats()
        self._context = mp.get_context(handling.start_method)
        if handling.start_method == "forkserver":
            self._context.set_forkserver_preload(PRELOAD)
        self._workers: list = []
        self._commands: list = []
        self._inquiries: list = []
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
            RankHandles(self._workers, self._inquiries),
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=2 * self.group_timeout_s,
            deadlock_after_s=self.handling.deadlock_after_s,
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
        if collected.deadlocked:
            self.stats.deadlocks += 1
        if collected.silent or collected.crashed or collected.deadlocked:
            self._stop(at_once=True)
            if self.handling.start_method == "forkserver":
                self._start()
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
        self._inquiries = [self._context.Queue() for _ in range(self.world_size)]
        store = os.path.join(self._workdir, "store")
        log = None if self.log_path is None else str(self.log_path)
        self._workers = [
            self._context.Process(
                target=_worker_main,
                args=(rank, self.world_size, store, self._workdir, self.placement, self.group_timeout_s, log),
                kwargs={"commands": self._commands[rank], "inquiries": self._inquiries[rank], "reports": self._reports},
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for worker in self._workers:
            worker.start()

    def _stop(self, at_once: bool = False) -> None:
        """End the workers: asked to, or (``at_once``, when they are stuck
        or their group is broken) killed."""
        for commands, worker in zip(self._commands, self._workers, strict=True):
            if worker.pid is not None and worker.is_alive() and not at_once:
                commands.put(None)
        deadline = time.monotonic() + (0 if at_once else 2)
        for worker in self._workers:
            if worker.pid is None:
                continue  # never started
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
        for channel in [*self._commands, *self._inquiries, self._reports]:
            if channel is not None:
                channel.close()
                channel.join_thread()
        self._workers, self._commands, self._inquiries, self._reports = [], [], [], None
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

    def __init__(
        self,
        placement: Placement = CPU,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
        handling: FailureHandling = FAST,
        log_path: Path | None = None,
    ) -> None:
        self.placement = placement
        self.group_timeout_s = group_timeout_s
        self.handling = handling
        self.log_path = log_path
        self.pools: dict[int, RankPool] = {}

    def run(self, scenario: Scenario) -> Observations:
        pool = self.pools.get(scenario.world_size)
        if pool is None:
            pool = self.pools[scenario.world_size] = RankPool(
                scenario.world_size, self.placement, self.group_timeout_s, self.handling, self.log_path
            )
        return pool.run(scenario)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> PoolSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _die_with_campaign() -> None:
    """Exit when the process that started this worker dies, however it dies.

    Not ``PR_SET_PDEATHSIG``: a worker's parent is the fork server, which
    outlives a killed campaign as long as any worker holds its pipe.
    ``parent_process().sentinel`` is the campaign's own end of a pipe."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    if parent is not None:
        threading.Thread(target=watch, daemon=True, name="fsdp-fuzz-watch-campaign").start()


def _worker_main(
    rank, world_size, store_path, workdir, placement, group_timeout_s, log_path, *, commands, inquiries, reports
) -> None:
    import faulthandler

    _die_with_campaign()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_path is not None:
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    threading.Thread(target=answer_inquiries, args=(rank, inquiries, reports), daemon=True).start()
    stack_file = open(os.path.join(workdir, f"stack-{rank}.txt"), "w")  # noqa: SIM115 - lives as long as the worker
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    join_default_group(rank, world_size, store_path, placement)
    while (command := commands.get()) is not None:
        scenario_id, scenario = command
        serve_scenario(scenario, scenario_id, rank, placement, group_timeout_s, reports)
    reports.close()
    reports.join_thread()
    os._exit(0)
