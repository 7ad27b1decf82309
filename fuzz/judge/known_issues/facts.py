"""Facts about a case that any engine's records may read: which steps
failed and how, when a step changes a ``requires_grad``, and how often
reentrant checkpointing recomputes."""

from __future__ import annotations

from collections.abc import Callable

from fsdp_fuzz.data import Observations, Scenario, Violation
from fsdp_fuzz.data import ViolationKind as Kind
from fsdp_fuzz.models.spec import Choice, ModelSpec, Sequential, named_in, taken


def failures_from(start: int | None, violations: tuple[Violation, ...]) -> bool:
    """Every violation is a failed step or a silent pairing at or after ``start``."""
    if start is None:
        return False
    return all(
        v.kind in (Kind.STEP_FAILED, Kind.UNITS_PAIRED) and v.step is not None and v.step >= start for v in violations
    )


def all_failed_with(
    observations: Observations, violations: tuple[Violation, ...], kinds: tuple[Kind, ...], error_type: str, prefix: str
) -> bool:
    """Every violation is of one of ``kinds``, at a step where FSDP raised
    ``error_type`` with a message that starts with ``prefix``."""

    def failed_so(violation: Violation) -> bool:
        if violation.kind not in kinds or violation.step is None:
            return False
        return observations.ranks[violation.rank].steps[violation.step].failed_with(error_type, prefix)

    return all(failed_so(violation) for violation in violations)


MONITORED_BARRIER = "failed to pass monitoredBarrier"
"""How the collective checker (DETAIL groups) ends a wait for a rank that never comes."""


def freezes_after_wrapping(scenario: Scenario) -> bool:
    """Some step sets ``requires_grad`` on wrapped parameters: through
    ``freeze_untaken`` (each step's path) or a freezing schedule."""
    return scenario.freeze_untaken or bool(scenario.scheduled_frozen())


def refrozen(scenario: Scenario, before, after) -> bool:
    """Whether going from step ``before`` to step ``after`` may change a
    ``requires_grad``: another path under ``freeze_untaken``, or other
    blocks frozen by the schedule."""
    moved = scenario.freeze_untaken and dict(after.path) != dict(before.path)
    return moved or set(after.frozen) != set(before.frozen)


def path_changed_while(scenario: Scenario, step: int, pending: Callable[[bool, object], bool]) -> bool:
    """Up to ``step``, some rank changed a ``requires_grad`` (``refrozen``)
    while ``pending`` held; ``pending`` gets whether it held before a step
    and the step, and says whether it holds after."""
    for rank_steps in scenario.ranks:
        holds = False
        for index, current in enumerate(rank_steps[: step + 1]):
            if holds and refrozen(scenario, rank_steps[index - 1], current):
                return True
            holds = pending(holds, current)
    return False


def gradients_wrong_after(scenario: Scenario, violations: tuple[Violation, ...], cause: Callable) -> bool:
    return all(v.kind == Kind.GRADIENT_MISMATCH and cause(scenario, v.step) for v in violations)


def checkpointed_region_holds_a_unit(spec: ModelSpec, modes: tuple[str, ...]) -> bool:
    """A block checkpointed in one of ``modes`` has an FSDP unit inside it."""
    return any(
        isinstance(node, Sequential)
        and node.checkpoint in modes
        and any(inner.fsdp_unit for inner in named_in(node) if inner is not node)
        for node in spec.named()
    )


def reentrant_runs_since_backward(scenario: Scenario, rank: int, step: int) -> int:
    """Runs of reentrant-checkpointed blocks in the rank's forwards with
    grad since its last backward, ``step``'s included."""

    def runs(node, path) -> int:
        if isinstance(node, Sequential):
            own = int(node.checkpoint == "reentrant")
            return own + sum(runs(child, path) for child in node.children)
        if isinstance(node, Choice):
            return sum(runs(node.alternatives[index], path) for index in taken(path, node.name))
        return 0

    count = 0
    for index, current in enumerate(scenario.ranks[rank][: step + 1]):
        if current.grad_enabled:
            count += current.forwards * runs(scenario.model.root, current.path)
        if current.backward and index < step:
            count = 0
    return count
