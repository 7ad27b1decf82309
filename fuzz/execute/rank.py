"""One rank's run of a scenario: build, wrap, run each step, and report each
outcome as it ends, as the typed ``StepOutcome`` the judge reads.

``serve_scenario`` runs a scenario on groups of its own and puts each
outcome on the parent's queue as it ends; ``answer_inquiries`` answers the
parent's "where are you?" while the rank sits blocked in a collective. An
outcome is ``ok``, ``error`` (type and message) or ``hang`` (a collective
that outlived the group's timeout, with the Python stack where it waited),
with every warning in order, the sum of its outputs and local gradients,
a digest of its local parameters, and the collective trace. After a failed
step the rank runs nothing more. The pool's workers and the fresh-process
spawner both run this code.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fsdp_fuzz.data import Scenario, Status, StepOutcome, WarningRecord
from fsdp_fuzz.engines import ENGINES
from fsdp_fuzz.execute.devices import Placement
from fsdp_fuzz.execute.groups import GroupsNotCreated, ScenarioGroups, new_scenario_groups
from fsdp_fuzz.execute.model import LEARNING_RATE, BuiltModel, build_model, run_forwards
from fsdp_fuzz.execute.trace import CollectiveTrace, tracing

# How gloo and NCCL word a collective that outlived the group's timeout. A peer
# that timed out first closes its connections, so a rank waiting on it may hear
# "Connection closed by peer" first: which one wins is a race.
TIMEOUT_MARKERS = (
    "Timed out",
    "timed out",
    "Watchdog caught collective operation timeout",
    "Connection closed by peer",
)


@dataclass
class Doing:
    """What this rank's main thread is doing: read by ``answer_inquiries``
    while the main thread sits blocked in a collective."""

    scenario_id: int | None = None
    caught: list | None = None
    """The warnings of the setup or step under way."""
    trace: CollectiveTrace | None = None


_doing = Doing()


def run_rank(
    scenario: Scenario,
    rank: int,
    device: torch.device,
    groups: ScenarioGroups,
    timings: dict[str, float] | None = None,
) -> Iterator[StepOutcome]:
    """Yield setup's outcome, then each step's, for this rank, as each ends.

    Whoever drives the rank learns how far it got even if a later step hangs.
    After a failed step the rank runs nothing more: FSDP's state after an
    exception is undefined, and a harness that pressed on would report noise.
    ``timings`` receives seconds spent building, wrapping and stepping; they
    stay out of the outcomes, which must not vary from run to run.
    """
    timings = {} if timings is None else timings
    engine = ENGINES[scenario.engine]
    trace = CollectiveTrace()
    with _recording() as caught, tracing(trace, scenario.engine):
        _doing.caught, _doing.trace = caught, trace
        try:
            started = time.perf_counter()
            built = build_model(scenario.model, scenario.seed, scenario.freeze_untaken)
            timings["build"] = time.perf_counter() - started
            dist.set_debug_level(getattr(dist.DebugLevel, scenario.debug_level))
            started = time.perf_counter()
            with groups.adopting():
                engine.wrap(built, scenario, groups.for_fsdp, device)
            timings["wrap"] = time.perf_counter() - started
            trace.unit_keys = engine.unit_keys(built)
            optimizer = torch.optim.SGD(built.module.parameters(), lr=LEARNING_RATE)
            setup = _outcome(Status.OK, caught, trace)
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            setup = _failure(exc, caught, trace)
    yield setup
    steps = scenario.ranks[rank]
    if setup.status is not Status.OK:
        yield from (StepOutcome(Status.NOT_RUN) for _ in steps)
        return
    started = time.perf_counter()
    for index in range(len(steps)):
        outcome = _run_step(scenario, built, optimizer, rank, index, device, trace)
        timings["steps"] = time.perf_counter() - started
        yield outcome
        if outcome.status is not Status.OK:
            yield from (StepOutcome(Status.NOT_RUN) for _ in steps[index + 1 :])
            return


def _run_step(scenario: Scenario, built: BuiltModel, optimizer, rank: int, index: int, device, trace) -> StepOutcome:
    step = scenario.ranks[rank][index]
    engine = ENGINES[scenario.engine]
    with _recording() as caught, tracing(trace, scenario.engine):
        _doing.caught, _doing.trace = caught, trace
        try:
            with engine.stepping(built, step):
                total = run_forwards(scenario, built, rank, index, device).total
                grad_sum = None
                if step.backward:
                    total.backward()
                    # On the CPU: offloaded gradients live there whatever the device.
                    grads = [
                        _local(p.grad).float().sum().cpu() for p in built.module.parameters() if p.grad is not None
                    ]
                    grad_sum = float(sum(grads, torch.zeros(())))
                if step.optimizer_step:
                    optimizer.step()
                    optimizer.zero_grad()
            return _outcome(
                Status.OK,
                caught,
                trace,
                output_sum=float(total.detach().cpu()),
                grad_sum=grad_sum,
                param_digest=param_digest(built.module, built.ignored),
            )
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            return _failure(exc, caught, trace)


def param_digest(module: nn.Module, ignored: frozenset[int] = frozenset()) -> float:
    """A fingerprint of the rank's local parameters, the ignored ones (each
    rank's own) left out: equal values, equal digests; each element
    weighted by its position, so a permutation shows."""
    total = 0.0
    for parameter in module.parameters():
        if id(parameter) in ignored:
            continue
        values = _local(parameter).detach().reshape(-1).double().cpu()
        weights = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
        total += float((values * weights).sum())
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: FSDP2's gradients are sharded DTensors,
    whose own ``sum`` would be a collective."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextmanager
def _recording() -> Iterator[list[warnings.WarningMessage]]:
    """``warnings.catch_warnings(record=True)`` that records repeats too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _outcome(
    status: Status, caught: list[warnings.WarningMessage], trace: CollectiveTrace, **fields: Any
) -> StepOutcome:
    return StepOutcome(
        status,
        warnings=tuple(WarningRecord(w.category.__name__, str(w.message)) for w in caught),
        collectives=tuple(trace.take()),
        **fields,
    )


def _failure(exc: BaseException, caught: list[warnings.WarningMessage], trace: CollectiveTrace) -> StepOutcome:
    message = str(exc)
    timed_out = any(marker in message for marker in TIMEOUT_MARKERS)
    return _outcome(
        Status.HANG if timed_out else Status.ERROR,
        caught,
        trace,
        error_type=type(exc).__name__,
        error_message=message if message else "".join(traceback.format_exception_only(exc)).strip(),
        stack=_stack(traceback.extract_tb(exc.__traceback__)) if timed_out else None,
    )


def _stack(frames: traceback.StackSummary, depth: int = 12) -> str:
    """The innermost frames, as paths relative to their package."""
    return "".join(
        f"{_short(frame.filename)}:{frame.lineno} in {frame.name}: {frame.line}\n" for frame in frames[-depth:]
    )


def _short(filename: str) -> str:
    for package in ("/torch/", "/fsdp_fuzz/", "/fuzz/"):
        if package in filename:
            return package.strip("/") + "/" + filename.split(package, 1)[1]
    return os.path.basename(filename)


def serve_scenario(scenario: Scenario, scenario_id: int, rank: int, placement: Placement, timeout_s: float, reports):
    """Run one scenario on groups of its own, putting ``(kind, rank,
    scenario_id, payload)`` on ``reports``: ``outcome`` for each outcome as
    it ends, then ``done`` with the rank's timings; ``no-groups`` instead if
    its groups could not be created. The id lets a pool drop what a
    previous scenario left behind."""
    started = time.perf_counter()
    _doing.scenario_id, _doing.caught, _doing.trace = scenario_id, None, None
    try:
        groups = new_scenario_groups(scenario, rank, timeout_s)
    except GroupsNotCreated as exc:
        reports.put(("no-groups", rank, scenario_id, str(exc)))
        return
    timings = {"group": time.perf_counter() - started}
    try:
        for outcome in run_rank(scenario, rank, placement.rank_device(rank), groups, timings):
            reports.put(("outcome", rank, scenario_id, outcome))
        _doing.caught, _doing.trace = None, None
    finally:
        # A peer still inside a collective must end by its own timeout (a
        # hang), not by this rank closing the connection under it (an error).
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer died: nobody is left to wait for
        groups.destroy()
    reports.put(("done", rank, scenario_id, timings))


def answer_inquiries(rank: int, inquiries, reports) -> None:
    """Answer the parent's "where are you?" (a scenario id) with the outcome
    this rank would report had its blocked collective timed out: the step's
    warnings and collectives so far, and where the main thread waits.

    Runs on a thread of its own: the main thread, blocked inside torch's C++
    collective, has released the GIL. ``None`` ends the thread.
    """
    main = threading.main_thread().ident
    while (scenario_id := inquiries.get()) is not None:
        answer = None
        if scenario_id == _doing.scenario_id and _doing.trace is not None:
            caught, trace = list(_doing.caught or ()), _doing.trace
            frame = sys._current_frames().get(main)
            stack = _stack(traceback.extract_stack(frame)) if frame is not None else None
            answer = _outcome(Status.HANG, caught, trace, error_type="Deadlock", stack=stack)
        reports.put(("where", rank, scenario_id, answer))
