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

On GPUs (``fsdp_fuzz.execute.devices``): the fork server imports torch but
never initialises CUDA, so that every forked worker can (``fork_server_state``
checks); a worker gives its cached GPU memory back after each scenario; and
a rank set whose scenario ended in a CUDA or NCCL error, or in an NCCL
collective that timed out, is killed and replaced, since its CUDA contexts
or communicators cannot be trusted with the next scenario
(``needs_fresh_ranks``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fsdp_fuzz.data import Observations, Scenario, Status
from fsdp_fuzz.execute.collect import DEADLOCK_AFTER_S, Collected, RankHandles, collect_outcomes
from fsdp_fuzz.execute.devices import (
    CPU,
    DeviceRequest,
    Placement,
    as_request,
    needs_fresh_ranks,
    refuse_offload_on_cpu,
    release_memory,
)
from fsdp_fuzz.execute.groups import join_default_group
from fsdp_fuzz.execute.observe import observations_of
from fsdp_fuzz.execute.protocol import STARTUP_TIMEOUT_S, HarnessError
from fsdp_fuzz.execute.rank import answer_inquiries, serve_scenario
from fsdp_fuzz.execute.trace import check_trace

DEFAULT_GROUP_TIMEOUT_S = 1.0
GROUP_ATTEMPTS = 2
"""Tries, each on fresh ranks, to create a scenario's groups before the
machine, not the scenario, is blamed (``GroupsNotCreated``)."""
SCENARIOS_PER_RANK_SET = 50
"""A rank set is replaced by the spare after this many scenarios: each
scenario leaves three of gloo's threads behind in every rank (torch 2.13;
destroying the groups and collecting garbage does not free them), and a
rank with hundreds of threads slows the machine and the deadlock watch."""

PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch._dynamo",
    "torch.utils.checkpoint",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
    "torch.distributed._composable",
    "fsdp_fuzz.execute.devices",
    "fsdp_fuzz.execute.model",
    "fsdp_fuzz.engines",
    "fsdp_fuzz.execute.trace",
    "fsdp_fuzz.execute.groups",
    "fsdp_fuzz.execute.rank",
]
"""What the fork server imports once, so that no worker imports it again
(``torch._dynamo``: the optimizer's constructor imports it, half a second;
the checkpointing modules: a checkpointed block imports them). Importing
them must not initialise CUDA: a process forked after CUDA is initialised
cannot use it (tests/test_devices.py spies on ``torch.cuda`` while they load)."""


@dataclass(frozen=True)
class FailureHandling:
    start_method: str = "forkserver"
    """How workers start: ``forkserver`` forks them from a process that
    imported ``PRELOAD``; ``spawn`` starts fresh interpreters."""
    deadlock_after_s: float | None = DEADLOCK_AFTER_S
    """Call ranks deadlocked after this long blocked; None waits for the
    group's timeout."""

    @property
    def keeps_spare(self) -> bool:
        """Whether a spare rank set waits ready: forked ranks start in
        milliseconds, fresh interpreters would take seconds of CPU each."""
        return self.start_method == "forkserver"


FAST = FailureHandling()
LEGACY = FailureHandling(start_method="spawn", deadlock_after_s=None)


@dataclass
class PoolStats:
    scenarios: int = 0
    respawns: int = 0
    """Rank sets replaced after a crash, a silent rank or a deadlock."""
    hangs: int = 0
    """Scenarios in which some rank hung."""
    crashes: int = 0
    """Scenarios in which some rank died."""
    deadlocks: int = 0
    """Scenarios whose hang was recognised as a deadlock, before any timeout."""
    device_resets: int = 0
    """Rank sets replaced because a CUDA or NCCL failure may have broken them
    (counted in ``respawns`` too)."""
    last_device_reset: str | None = None
    """Why the last of those was replaced."""


class RankSet:
    """One rank process per rank of a world, with the queues to reach them
    and a private directory (their rendezvous file and stack dumps)."""

    def __init__(self, pool: RankPool) -> None:
        context = pool._context
        self.workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-pool-")
        self.reports = context.Queue()
        self.commands = [context.Queue() for _ in range(pool.world_size)]
        self.inquiries = [context.Queue() for _ in range(pool.world_size)]
        store = os.path.join(self.workdir, "store")
        log = None if pool.log_path is None else str(pool.log_path)
        self.scenarios = 0
        self.workers = [
            context.Process(
                target=_worker_main,
                args=(rank, pool.world_size, store, self.workdir, pool.placement, pool.group_timeout_s, log),
                kwargs={"commands": self.commands[rank], "inquiries": self.inquiries[rank], "reports": self.reports},
                daemon=True,
            )
            for rank in range(pool.world_size)
        ]
        self._starting = threading.Thread(target=self._start_workers, daemon=True)

    def start(self, background: bool = False) -> RankSet:
        """Start the processes; in the background, the parent goes on at once
        (starting a process from the fork server takes tens of milliseconds)."""
        self._starting.start()
        if not background:
            self._starting.join()
        return self

    def _start_workers(self) -> None:
        for worker in self.workers:
            worker.start()

    def handles(self) -> RankHandles:
        self._starting.join()
        return RankHandles(self.workers, self.inquiries)

    def stop(self, at_once: bool = False) -> None:
        """End the workers: asked to, or (``at_once``, when they are stuck
        or their group is broken) killed."""
        if self._starting.ident is not None:
            self._starting.join()
        for commands, worker in zip(self.commands, self.workers, strict=True):
            if worker.pid is not None and worker.is_alive() and not at_once:
                commands.put(None)
        deadline = time.monotonic() + (0 if at_once else 2)
        for worker in self.workers:
            if worker.pid is None:
                continue  # never started
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
        for channel in [*self.commands, *self.inquiries, self.reports]:
            channel.close()
            channel.join_thread()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def dump_stacks(self, ranks: set[int]) -> dict[int, str]:
        """Ask silent workers for their Python stacks (``faulthandler`` on SIGUSR1)."""
        for rank in ranks:
            try:
                os.kill(self.workers[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass  # died since: no stack to read
        time.sleep(0.5)
        stacks = {}
        for rank in ranks:
            path = os.path.join(self.workdir, f"stack-{rank}.txt")
            try:
                with open(path) as dump:
                    stacks[rank] = dump.read()
            except OSError:
                stacks[rank] = "(no stack: the worker did not answer SIGUSR1, or died)"
        return stacks


class RankPool:
    """``world_size`` worker processes that run scenarios of that size, and
    with ``FAST`` handling a spare set started ahead to replace them."""

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
        self._active: RankSet | None = None
        self._spare: RankSet | None = None
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
        refuse_offload_on_cpu(scenario, self.placement)
        for _ in range(GROUP_ATTEMPTS):
            collected = self._collect(scenario)
            if collected.no_groups is None:
                return observations_of(scenario, self.placement, collected.outcomes)
        raise HarnessError(
            f"the scenario's process groups could not be created {GROUP_ATTEMPTS} times on fresh ranks: "
            f"{collected.no_groups}"
        )

    def _collect(self, scenario: Scenario) -> Collected:
        ranks = self._ranks()
        scenario_id, self._next_id = self._next_id, self._next_id + 1
        for commands in ranks.commands:
            commands.put((scenario_id, scenario))
        collected = collect_outcomes(
            scenario,
            ranks.reports,
            scenario_id,
            ranks.handles(),
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=3 * self.group_timeout_s + 2,
            deadlock_after_s=self.handling.deadlock_after_s,
        )
        self.stats.scenarios += 1
        self.last_timings = collected.timings
        if any(outcome.status is Status.HANG for outcomes in collected.outcomes for outcome in outcomes):
            self.stats.hangs += 1
        if collected.silent:
            stacks = ranks.dump_stacks(collected.silent)
            for rank in collected.silent:
                collected.outcomes[rank] = [
                    replace(outcome, stack=stacks[rank])
                    if outcome.status is Status.HANG and outcome.stack is None
                    else outcome
                    for outcome in collected.outcomes[rank]
                ]
        if collected.crashed:
            self.stats.crashes += 1
        if collected.deadlocked:
            self.stats.deadlocks += 1
        ranks.scenarios += 1
        device_failure = needs_fresh_ranks(self.placement, collected.outcomes)
        if device_failure is not None:
            self.stats.device_resets += 1
            self.stats.last_device_reset = device_failure
        broken = collected.silent or collected.crashed or collected.deadlocked or collected.no_groups is not None
        if broken or device_failure is not None:
            # Killing the processes is the abort that cannot wedge: their
            # communicators and CUDA contexts go with them.
            ranks.stop(at_once=True)
            self._active = None
            self.stats.respawns += 1
        elif ranks.scenarios >= SCENARIOS_PER_RANK_SET and self.handling.keeps_spare:
            ranks.stop()
            self._active = None
        return collected

    def _ranks(self) -> RankSet:
        """The active set; a replacement comes from the spare, and a new spare
        starts in the background at once."""
        if self._active is None:
            if self._spare is not None:
                self._active, self._spare = self._spare, None
            else:
                self._active = RankSet(self).start()
        if self.handling.keeps_spare and self._spare is None:
            self._spare = RankSet(self).start(background=True)
        return self._active

    def close(self) -> None:
        for ranks in (self._active, self._spare):
            if ranks is not None:
                ranks.stop()
        self._active = self._spare = None

    def pids(self) -> list[int]:
        return [worker.pid for worker in self._active.workers] if self._active is not None else []


class PoolSet:
    """One pool per world size, started on first use, each on the placement
    the request gives its world size (with 2 GPUs, 2 ranks get NCCL and 3
    get gloo); a fixed ``Placement`` is used for every world size it can run."""

    def __init__(
        self,
        placement: DeviceRequest | Placement = CPU,
        group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
        handling: FailureHandling = FAST,
        log_path: Path | None = None,
    ) -> None:
        self.request = as_request(placement)
        self.group_timeout_s = group_timeout_s
        self.handling = handling
        self.log_path = log_path
        self.pools: dict[int, RankPool] = {}

    def run(self, scenario: Scenario) -> Observations:
        pool = self.pools.get(scenario.world_size)
        if pool is None:
            pool = self.pools[scenario.world_size] = RankPool(
                scenario.world_size,
                self.request.place(scenario.world_size),
                self.group_timeout_s,
                self.handling,
                self.log_path,
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


def die_with_parent() -> None:
    """Exit when the process that started this one dies, however it dies.

    Not ``PR_SET_PDEATHSIG``: a worker's parent is the fork server, which
    outlives a killed campaign as long as any worker holds its pipe.
    ``parent_process().sentinel`` is the campaign's own end of a pipe."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    if parent is not None:
        threading.Thread(target=watch, daemon=True, name="fsdp-fuzz-watch-parent").start()


def _worker_main(
    rank, world_size, store_path, workdir, placement, group_timeout_s, log_path, *, commands, inquiries, reports
) -> None:
    import faulthandler

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the campaign ends the pool, whatever signal it gets
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_path is not None:
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    # A rank set may be killed when it is replaced, and a rank leaves with
    # os._exit: lines must reach the log as they are printed.
    sys.stdout.reconfigure(line_buffering=True)
    threading.Thread(target=answer_inquiries, args=(rank, inquiries, reports), daemon=True).start()
    stack_file = open(os.path.join(workdir, f"stack-{rank}.txt"), "w")  # noqa: SIM115 - lives as long as the worker
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    if placement.device == "cuda" and torch.cuda._is_in_bad_fork():
        # Reported by the parent as a crash at setup; the log says why.
        print("fsdp-fuzz: this worker was forked after CUDA was initialised: it cannot use the GPU", flush=True)
        os._exit(1)
    join_default_group(rank, world_size, store_path, placement)
    while (command := commands.get()) is not None:
        scenario_id, scenario = command
        serve_scenario(scenario, scenario_id, rank, placement, group_timeout_s, reports)
        release_memory(placement)
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    os._exit(0)


def fork_server_state(start_method: str = "forkserver") -> dict[str, bool]:
    """What a worker inherits from the pool's fork server (loaded with
    ``PRELOAD``, started if it is not running): whether CUDA was initialised
    there before the fork. Both must be False for a worker to use a GPU."""
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    answers = context.Queue()
    probe = context.Process(target=_report_fork_state, args=(answers,), daemon=True)
    probe.start()
    try:
        return answers.get(timeout=STARTUP_TIMEOUT_S)
    finally:
        probe.join(timeout=5)
        if probe.is_alive():
            probe.kill()
            probe.join()
        answers.close()
        answers.join_thread()


def _report_fork_state(answers) -> None:
    answers.put(
        {
            # After a fork torch resets ``is_initialized`` and marks the child bad instead.
            "bad_fork": torch.cuda._is_in_bad_fork(),
            "cuda_initialized": torch.cuda.is_initialized(),
            "preloaded": all(module in sys.modules for module in PRELOAD),
        }
    )
