"""What the spawner and the pool share: where ranks run, how a rank reports
a scenario, and how the parent gathers those reports.

Reports travel as ``(kind, rank, scenario_id, payload)`` on one queue:
``outcome`` for each setup/step outcome as it ends, ``done`` when the rank
has run (or skipped) all its steps. Tagging reports with the scenario id
lets a pool drop anything a previous scenario left behind.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

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
from fuzz.reference import reference_run
from fuzz.scenario import Scenario, scenario_from_json

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

    def rank_device(self, rank: int) -> torch.device:
        """The rank's device, made current for it (NCCL needs that)."""
        if self.device == "cuda":
            torch.cuda.set_device(rank)
            return torch.device("cuda", rank)
        return torch.device("cpu")


CPU = Placement()


def join_default_group(rank: int, world_size: int, store_path: str, placement: Placement) -> None:
    """In a rank: the long-lived group that only creates each scenario's own.

    Created below DETAIL whatever the environment says, so it never carries
    the collective-checking wrapper: that is the scenario's choice.
    """
    import torch.distributed as dist

    dist.set_debug_level(dist.DebugLevel.OFF)
    dist.init_process_group(
        placement.backend,
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )


def serve_scenario(encoded: str, scenario_id: int, rank: int, placement: Placement, group_timeout_s: float, reports):
    """In a rank: run one scenario on groups of its own and report each outcome."""
    import torch.distributed as dist

    from fuzz.execute import new_scenario_groups, run_rank

    scenario = scenario_from_json(json.loads(encoded))
    started = time.perf_counter()
    groups = new_scenario_groups(scenario, rank, group_timeout_s)
    timings = {"group": time.perf_counter() - started}
    try:
        for outcome in run_rank(scenario, rank, placement.rank_device(rank), groups.for_fsdp, timings):
            reports.put(("outcome", rank, scenario_id, outcome_to_json(outcome)))
    finally:
        # A peer still inside a collective must end by its own timeout (a
        # hang), not by this rank closing the connection under it (an error).
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer died: nobody is left to wait for, and the pool replaces us all
        groups.destroy()
    reports.put(("done", rank, scenario_id, timings))


@dataclass
class Collected:
    outcomes: list[list[StepOutcome]]
    silent: set[int]
    """Ranks that stopped reporting without dying: stuck outside any collective timeout."""
    crashed: set[int]
    timings: list[dict[str, float]]
    """Per rank, seconds spent per phase (group, build, wrap, steps), where reported."""


def collect_outcomes(
    world_size: int,
    reports,
    scenario_id: int,
    is_alive: Callable[[int], bool],
    exit_code: Callable[[int], int | None],
    first_report_s: float,
    progress_s: float,
) -> Collected:
    """Gather reports until every rank is done, dies, or stops making progress.

    Progress means a report arrived. A rank stuck in a collective ends by its
    group's timeout and reports a hang itself; one silent for ``progress_s``
    is stuck elsewhere and is recorded as hung at the step it was in.
    """
    collected = Collected([[] for _ in range(world_size)], set(), set(), [{} for _ in range(world_size)])
    done: set[int] = set()
    anchor, limit = time.monotonic(), first_report_s
    while len(done) < world_size:
        try:
            kind, rank, tag, payload = reports.get(timeout=0.05)
        except queue.Empty:
            for rank in set(range(world_size)) - done:
                if not is_alive(rank):
                    message = f"rank {rank} died (exit code {exit_code(rank)})"
                    collected.outcomes[rank].append(StepOutcome(CRASH, error_message=message))
                    collected.crashed.add(rank)
                    done.add(rank)
            if time.monotonic() - anchor > limit:
                for rank in set(range(world_size)) - done:
                    message = f"no report from rank {rank} for {limit:.0f} s"
                    collected.outcomes[rank].append(StepOutcome(HANG, error_message=message))
                    collected.silent.add(rank)
                break
            continue
        if tag != scenario_id:
            continue
        anchor, limit = time.monotonic(), progress_s
        if kind == "outcome":
            collected.outcomes[rank].append(outcome_from_json(payload))
        elif kind == "done":
            collected.timings[rank] = payload
            done.add(rank)
    return collected


def observations_of(scenario: Scenario, placement: Placement, outcomes: Sequence[list[StepOutcome]]) -> Observations:
    return Observations(
        backend=placement.backend,
        device=placement.device,
        torch_version=torch.__version__,
        ranks=tuple(_rank_observation(scenario, reported) for reported in outcomes),
        reference=reference_run(scenario),
    )


def _rank_observation(scenario: Scenario, reported: list[StepOutcome]) -> RankObservation:
    """Pad what a rank reported: steps it never reached did not run."""
    total = 1 + scenario.num_steps
    padded = reported[:total] + [StepOutcome(NOT_RUN)] * (total - len(reported))
    return RankObservation(setup=padded[0], steps=tuple(padded[1:]))
