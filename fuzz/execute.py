"""The in-rank half of the *execute* stage: one rank runs its steps.

``run_rank`` assumes a process group exists and yields one ``StepOutcome``
for setup and then one per step as each finishes, so whoever drives the rank
learns how far it got even if a later step hangs. After a failed step the
rank runs nothing more: FSDP's state after an exception is undefined, and a
harness that pressed on would report noise.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fuzz.observations import ERROR, HANG, NOT_RUN, OK, StepOutcome, WarningRecord
from fuzz.scenario import HYBRID_NODE_SIZE, HYBRID_STRATEGIES, Scenario, Step
from fuzz.trace import CollectiveTrace, tracing
from models.build import BuiltModel, build_model, freeze_untaken_alternatives, wrap_fsdp

# How gloo and NCCL word a collective that outlived the group's timeout. A
# peer that timed out first closes its connections, so a rank waiting on it
# may hear "Connection closed by peer" first: which one wins is a race.
_TIMEOUT_MARKERS = (
    "Timed out",
    "timed out",
    "Watchdog caught collective operation timeout",
    "Connection closed by peer",
)


def step_input(scenario: Scenario, rank: int, step: int, forward: int) -> torch.Tensor:
    """A batch that depends only on where it is used, never on RNG history."""
    generator = torch.Generator().manual_seed(((scenario.seed * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((scenario.batch_size, scenario.model.in_features), generator=generator)


def fsdp_kwargs(scenario: Scenario, device: torch.device, group: dist.ProcessGroup) -> dict:
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    settings = scenario.fsdp
    prefetch = settings.backward_prefetch
    return {
        "process_group": group,
        "device_id": device,
        "sharding_strategy": ShardingStrategy[settings.sharding_strategy],
        "use_orig_params": settings.use_orig_params,
        "forward_prefetch": settings.forward_prefetch,
        "backward_prefetch": BackwardPrefetch[prefetch] if prefetch else None,
        "limit_all_gathers": settings.limit_all_gathers,
        "sync_module_states": settings.sync_module_states,
    }


@dataclass
class ScenarioGroups:
    """The scenario's own groups, so a hang there times out quickly and
    leaves the pool's default group usable.

    ``for_fsdp`` is what FSDP's ``process_group`` gets: one group, or for
    hybrid sharding the (intra-node, inter-node) pair of this rank.
    """

    for_fsdp: dist.ProcessGroup | tuple[dist.ProcessGroup, dist.ProcessGroup]
    created: list[dist.ProcessGroup]

    def destroy(self) -> None:
        for group in self.created:
            dist.destroy_process_group(group)


def new_scenario_groups(scenario: Scenario, rank: int, timeout_s: float) -> ScenarioGroups:
    """Every rank creates every group, in the same order, as ``new_group`` needs.

    The collective-checking wrapper is applied by torch to groups created
    while the debug level is DETAIL, so the level is set for the creation only.
    """
    previous = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.DETAIL if scenario.collective_checker else dist.DebugLevel.OFF)
    timeout = timedelta(seconds=timeout_s)
    try:
        if scenario.fsdp.sharding_strategy not in HYBRID_STRATEGIES:
            group = dist.new_group(timeout=timeout)
            return ScenarioGroups(group, [group])
        nodes = range(scenario.world_size // HYBRID_NODE_SIZE)
        local = range(HYBRID_NODE_SIZE)
        intra = [dist.new_group([n * HYBRID_NODE_SIZE + i for i in local], timeout=timeout) for n in nodes]
        inter = [dist.new_group([n * HYBRID_NODE_SIZE + i for n in nodes], timeout=timeout) for i in local]
        mine = (intra[rank // HYBRID_NODE_SIZE], inter[rank % HYBRID_NODE_SIZE])
        return ScenarioGroups(mine, list(mine))
    finally:
        dist.set_debug_level(previous)


def run_rank(
    scenario: Scenario,
    rank: int,
    device: torch.device,
    group: dist.ProcessGroup | tuple[dist.ProcessGroup, dist.ProcessGroup],
    timings: dict[str, float] | None = None,
) -> Iterator[StepOutcome]:
    """Yield setup's outcome, then each step's, for this rank.

    ``timings``, when given, receives seconds spent building, wrapping and
    stepping; they stay out of the outcomes, which must not vary run to run.
    """
    timings = {} if timings is None else timings
    built: BuiltModel | None = None
    unit_names: dict[int, str] = {}
    trace = CollectiveTrace(lambda handle: unit_names.get(id(handle)))
    with _recording() as caught, tracing(trace):
        try:
            started = time.perf_counter()
            built = build_model(scenario.model, scenario.seed, freeze_untaken=scenario.freeze_untaken)
            timings["build"] = time.perf_counter() - started
            dist.set_debug_level(getattr(dist.DebugLevel, scenario.debug_level))
            started = time.perf_counter()
            model = wrap_fsdp(built, **fsdp_kwargs(scenario, device, group))
            timings["wrap"] = time.perf_counter() - started
            unit_names.update(_unit_names(built))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            setup = StepOutcome(OK, warnings=_records(caught), collectives=trace.take())
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            setup = _failure(exc, caught, trace)
    yield setup
    steps = scenario.ranks[rank]
    if setup.status != OK:
        yield from (StepOutcome(NOT_RUN) for _ in steps)
        return
    started = time.perf_counter()
    for index, step in enumerate(steps):
        outcome = _run_step(scenario, built, model, optimizer, rank, index, step, device, trace)
        timings["steps"] = time.perf_counter() - started
        yield outcome
        if outcome.status != OK:
            yield from (StepOutcome(NOT_RUN) for _ in steps[index + 1 :])
            return


def _unit_names(built: BuiltModel) -> dict[int, str]:
    """id of each unit's flat-parameter handle -> the unit's spec name."""
    names = {}
    for name, unit in built.fsdp_units.items():
        handle = getattr(unit, "_handle", None)
        if handle is not None:
            names[id(handle)] = name
    return names


def _run_step(scenario, built, model, optimizer, rank, index, step: Step, device, trace) -> StepOutcome:
    with _recording() as caught, tracing(trace):
        try:
            model.train(step.training)
            built.set_path(step.path)
            if scenario.freeze_untaken:
                freeze_untaken_alternatives(built, step.path)
            with torch.set_grad_enabled(step.grad_enabled):
                outputs = [model(step_input(scenario, rank, index, k).to(device)) for k in range(step.forwards)]
            total = sum((output.sum() for output in outputs), torch.zeros((), device=device))
            grad_sum = None
            if step.backward:
                total.backward()
                grads = [p.grad.sum() for p in model.parameters() if p.grad is not None]
                grad_sum = float(sum(grads, torch.zeros((), device=device)).cpu())
            if step.optimizer_step:
                optimizer.step()
                optimizer.zero_grad()
            return StepOutcome(
                OK,
                warnings=_records(caught),
                output_sum=float(total.detach().cpu()),
                grad_sum=grad_sum,
                collectives=trace.take(),
            )
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            return _failure(exc, caught, trace)


class _recording:
    """``warnings.catch_warnings(record=True)`` that records repeats too."""

    def __enter__(self) -> list[warnings.WarningMessage]:
        self._context = warnings.catch_warnings(record=True)
        caught = self._context.__enter__()
        warnings.simplefilter("always")
        return caught

    def __exit__(self, *exc_info) -> None:
        self._context.__exit__(*exc_info)


def _records(caught: list[warnings.WarningMessage]) -> tuple[WarningRecord, ...]:
    return tuple(WarningRecord(w.category.__name__, str(w.message)) for w in caught)


def _failure(exc: BaseException, caught: list[warnings.WarningMessage], trace: CollectiveTrace) -> StepOutcome:
    message = str(exc)
    timed_out = any(marker in message for marker in _TIMEOUT_MARKERS)
    return StepOutcome(
        HANG if timed_out else ERROR,
        error_type=type(exc).__name__,
        error_message=message if message else "".join(traceback.format_exception_only(exc)).strip(),
        warnings=_records(caught),
        collectives=trace.take(),
        stack=_stack(exc) if timed_out else None,
    )


def _stack(exc: BaseException, depth: int = 12) -> str:
    """The innermost frames of the exception, as paths relative to their package."""
    frames = traceback.extract_tb(exc.__traceback__)[-depth:]
    return "".join(f"{_short(frame.filename)}:{frame.lineno} in {frame.name}: {frame.line}\n" for frame in frames)


def _short(filename: str) -> str:
    for package in ("/torch/", "/fuzz/", "/models/"):
        if package in filename:
            return package.strip("/") + "/" + filename.split(package, 1)[1]
    return filename
