"""The process half of the *execute* stage: run a scenario on fresh ranks.

One ``torch.multiprocessing`` process per rank, a file-based rendezvous in a
private temporary directory (no ports, so campaigns on one machine never
collide), and a queue on which ranks report each step as it ends. Ranks
that finish wait for the others before tearing the group down, so a rank
stuck in a collective always ends by its group's timeout and never by a
peer's exit: the same scenario gives the same observation every time.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.multiprocessing as mp

from fuzz.observations import (
    CRASH,
    HANG,
    NOT_RUN,
    Observations,
    RankObservation,
    StepOutcome,
    outcome_from_json,
    outcome_to_json,
)
from fuzz.scenario import Scenario, scenario_from_json, scenario_to_json

DEFAULT_GROUP_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0


class DeviceError(RuntimeError):
    """The requested device cannot run the scenario (for instance too few GPUs)."""


@dataclass(frozen=True)
class Placement:
    """Where the ranks run: ``cpu`` with gloo, or ``cuda`` with NCCL, one GPU per rank."""

    device: str = "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def check(self, world_size: int) -> None:
        if self.device == "cpu":
            return
        if self.device != "cuda":
            raise DeviceError(f"unknown device {self.device!r}: use 'cpu' or 'cuda'")
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < world_size:
            raise DeviceError(
                f"the scenario needs {world_size} ranks and NCCL needs one GPU per rank, "
                f"but {available} GPU(s) are visible; run on CPU (device 'cpu') or on a machine "
                f"with {world_size} GPUs"
            )


def run_scenario(
    scenario: Scenario,
    placement: Placement = Placement(),
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
) -> Observations:
    """Run ``scenario`` on ``world_size`` freshly spawned ranks and observe it."""
    placement.check(scenario.world_size)
    context = mp.get_context("spawn")
    reports = context.Queue()
    release = context.Event()
    workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-")
    encoded = json.dumps(scenario_to_json(scenario))
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, encoded, os.path.join(workdir, "store"), placement.device, group_timeout_s, reports, release),
            daemon=True,
        )
        for rank in range(scenario.world_size)
    ]
    try:
        for process in processes:
            process.start()
        outcomes = _collect(scenario, processes, reports, group_timeout_s)
    finally:
        release.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        reports.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return Observations(
        backend=placement.backend,
        device=placement.device,
        torch_version=torch.__version__,
        ranks=tuple(_rank_observation(scenario, rank, outcomes[rank]) for rank in range(scenario.world_size)),
    )


def _collect(scenario: Scenario, processes, reports, group_timeout_s: float) -> list[list[StepOutcome]]:
    """Gather reports until every rank is done, dies, or stops making progress.

    Progress means a report arrived; a rank silent for twice the group timeout
    is stuck outside any collective (a deadlock in Python, say) and is
    recorded as hung at the step it was in.
    """
    outcomes: list[list[StepOutcome]] = [[] for _ in processes]
    done: set[int] = set()
    started = time.monotonic()
    last_progress: float | None = None
    while len(done) < len(processes):
        limit = STARTUP_TIMEOUT_S if last_progress is None else 2 * group_timeout_s + 1
        anchor = started if last_progress is None else last_progress
        try:
            kind, rank, payload = reports.get(timeout=0.05)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank not in done and not process.is_alive():
                    outcomes[rank].append(
                        StepOutcome(CRASH, error_message=f"rank {rank} exited with code {process.exitcode}")
                    )
                    done.add(rank)
            if time.monotonic() - anchor > limit:
                for rank in set(range(len(processes))) - done:
                    outcomes[rank].append(
                        StepOutcome(HANG, error_message=f"no report from rank {rank} for {limit:.0f} s")
                    )
                break
            continue
        last_progress = time.monotonic()
        if kind == "outcome":
            outcomes[rank].append(outcome_from_json(payload))
        elif kind == "done":
            done.add(rank)
    return outcomes


def _rank_observation(scenario: Scenario, rank: int, reported: list[StepOutcome]) -> RankObservation:
    """Pad what a rank reported: steps it never reached did not run."""
    total = 1 + scenario.num_steps
    padded = reported[:total] + [StepOutcome(NOT_RUN)] * (total - len(reported))
    return RankObservation(setup=padded[0], steps=tuple(padded[1:]))


def _rank_main(rank, encoded, store_path, device_name, group_timeout_s, reports, release) -> None:
    import torch.distributed as dist

    from fuzz.execute import new_scenario_group, run_rank

    scenario = scenario_from_json(json.loads(encoded))
    if device_name == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.set_debug_level(dist.DebugLevel.OFF)
    dist.init_process_group(
        Placement(device_name).backend,
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=scenario.world_size,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )
    group = new_scenario_group(scenario, group_timeout_s)
    for outcome in run_rank(scenario, rank, device, group):
        reports.put(("outcome", rank, outcome_to_json(outcome)))
    reports.put(("done", rank, None))
    release.wait(timeout=STARTUP_TIMEOUT_S)
    os._exit(0)
