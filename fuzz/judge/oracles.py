"""The *judge* stage: what FSDP promised, given what the scenario did.

``expectations`` states the contract from the scenario alone (see
``fuzz.orders`` for the definitions), and ``judge`` compares it with the
observations. Every violation names its clause, the rank and the step, so a
failing fuzz case reads as a sentence about FSDP, not about the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fsdp_fuzz.data import (
    HYBRID_NODE_SIZE,
    UNIT_ROUNDOFF,
    Clause,
    Observations,
    Purpose,
    Scenario,
    Status,
    Step,
    StepOutcome,
    Violation,
    ViolationKind,
    WarningRecord,
    first_step_on_unreduced_gradients,
)
from fsdp_fuzz.engines import Promise
from fsdp_fuzz.features import NOTHING, TIES, Feature, Scope, Trigger, needs
from fsdp_fuzz.judge.orders import (
    deviates,
    first_iteration_divergence,
    fsdp2_promises,
    iterations,
    unregistered_calls,
)
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, Path, Sequential, taken

FIRST_ITERATION_ERROR = "Forward order differs across ranks"
LATER_WARNING = (
    "Forward order differs from that of the first iteration on rank {rank}. "
    "Collectives are unchecked and may give incorrect results or hang"
)
ORDER_MARKER = "Forward order differs"
SHARDED_CALL = ("RuntimeError", "got mixed torch.Tensor and DTensor")
"""How torch refuses a module call that meets FSDP2's sharded parameters."""

RELATIVE_TOLERANCE = 1e-4
"""Clause 4's floor: a sum may differ from the reference's by this much
times (1 + its magnitude). The reference reduces in another order, so bit
equality is not promised; a wrong unit or a lost update is far larger."""

ROUNDOFF_FACTOR = 1.0
"""Clause 4's bound in low precision is this factor times the derived one
(``rounding_bound``); calibrated on clean runs (see the README)."""


@dataclass(frozen=True)
class Refusal:
    """An error the engine documents for what the scenario does: where it
    must come (``step`` ``None``: setup), and how FSDP words it."""

    step: int | None
    error_type: str
    words: str
    """A phrase the error message contains."""
    reason: str
    trigger: Trigger = NOTHING
    """The features without which it cannot come: what a campaign that has
    met it steers away from, as from a settled class."""

    def seen_in(self, outcome: StepOutcome) -> bool:
        return outcome.error_type == self.error_type and self.words in (outcome.error_message or "")


@dataclass(frozen=True)
class RankExpectation:
    """What one rank is promised.

    ``error_steps``: the first-iteration error must come in one of these
    steps (empty: no error is due). ``warning_steps``: the steps of the rank's
    first deviating iteration, the only ones where the later-order warning may
    come and where it must come (empty: no warning is due).
    """

    error_steps: frozenset[int] = frozenset()
    warning_steps: frozenset[int] = frozenset()
    reason: str = ""
    refusal: Refusal | None = None


def refusal(scenario: Scenario, rank: int) -> Refusal | None:
    """FSDP2's documented refusals, each at the rank's first step that
    needs what it refuses: parameters tied across units not sharded
    together (at its lazy
    initialisation, the first step that unshards or runs a forward), and an
    entry point other than ``forward`` that is not registered
    (``register_fsdp_forward_method``) and runs the root's own parameters
    while they are certainly sharded: as the rank's first call, without an
    explicit unshard. Later unregistered calls may find the root unsharded
    and run; FSDP2 promises nothing of them (``unregistered_calls``)."""
    engine = scenario.runs_on
    steps = scenario.ranks[rank]
    first = next((index for index, step in enumerate(steps) if step.forwards or step.unshard), None)
    if first is None:
        return None
    call = steps[first]
    if not engine.registers(scenario, call.method) and call.forwards and not call.unshard:
        # No root hook runs, so no lazy initialisation checks the ties: the
        # call meets the root's sharded parameters, or runs its units alone.
        if _encoder_runs_root_parameters(scenario.model):
            return Refusal(
                first,
                *SHARDED_CALL,
                f"{call.method!r}, the rank's first call, is not registered with register_fsdp_forward_method and "
                "runs root parameters that are still sharded",
                needs(Feature(Scope.STEP, "method")),
            )
        return None
    if not engine.refuses_ties_across_units(scenario):
        return None
    owners = scenario.model.owning_units()
    group_of = {unit: group for group in scenario.fsdp2.sharded_together for unit in group}
    across = {  # sharded together, the two share one parameter group: FSDP2's own advice for ties
        tied: source
        for tied, source in scenario.model.ties_across_units().items()
        if group_of.get(owners[tied], (owners[tied],)) != group_of.get(owners[source], (owners[source],))
    }
    if across:
        tied, source = next(iter(across.items()))
        return Refusal(
            first,
            "ValueError",
            "is shared with a parameter already managed by another FSDP group",
            f"{tied!r} (unit {owners[tied]!r}) is tied to {source!r} (unit {owners[source]!r})",
            needs(TIES),
        )
    return None


def _encoder_runs_root_parameters(model: ModelSpec) -> bool:
    """Whether ``encode`` runs a parameter the root unit itself shards,
    whatever the path: one outside every nested unit, in a stage it runs."""

    def owned(node: Node) -> bool:
        if isinstance(node, (Linear, Norm)):
            return True
        if isinstance(node, Sequential):
            return not node.fsdp_unit and not node.tied_to and any(owned(child) for child in node.children)
        if isinstance(node, Choice):
            return not node.fsdp_unit and any(owned(alternative) for alternative in node.alternatives)
        return False

    return any(owned(child) for child in model.root.children[: model.encoder_stages])


def expectations(scenario: Scenario) -> tuple[RankExpectation, ...]:
    """FSDP1 checks the forward order at DETAIL only; FSDP2 never does, but
    refuses some arrangements (``refusal``)."""
    if not scenario.runs_on.checks_order(scenario):
        return tuple(RankExpectation(refusal=refusal(scenario, rank)) for rank in range(scenario.world_size))
    divergence = first_iteration_divergence(scenario)
    if divergence is not None:
        reason = "first-iteration orders differ at position {}: {}".format(
            divergence.position,
            ", ".join(f"rank {r} uses {unit or 'nothing'}" for r, unit in enumerate(divergence.units)),
        )
        return tuple(
            RankExpectation(error_steps=_error_steps(scenario, rank, divergence.position), reason=reason)
            for rank in range(scenario.world_size)
        )
    return tuple(_later_expectation(scenario, rank) for rank in range(scenario.world_size))


def _error_steps(scenario: Scenario, rank: int, position: int) -> frozenset[int]:
    rank_iterations = iterations(scenario, rank)
    if not rank_iterations:
        return frozenset()  # never in a training forward: FSDP has nowhere to raise on this rank
    first = rank_iterations[0]
    if position < len(first.uses):
        return frozenset({first.uses[position].step})
    # This rank's order ended first: it can only learn of the divergence from
    # here to the end of its first iteration.
    start = first.uses[-1].step if first.uses else 0
    return frozenset(step for step in first.steps if step >= start)


def _later_expectation(scenario: Scenario, rank: int) -> RankExpectation:
    rank_iterations = iterations(scenario, rank)
    if not rank_iterations or not rank_iterations[0].complete:
        return RankExpectation()
    first = rank_iterations[0]
    for number, later in enumerate(rank_iterations[1:], start=1):
        if deviates(first, later):
            reason = f"iteration {number} uses {list(later.order)}, the first iteration used {list(first.order)}"
            return RankExpectation(warning_steps=frozenset(later.steps), reason=reason)
    return RankExpectation()


def judge(scenario: Scenario, observations: Observations) -> tuple[Violation, ...]:
    found: list[Violation] = []
    for rank, expectation in enumerate(expectations(scenario)):
        found.extend(_judge_rank(scenario, observations, rank, expectation))
    mismatch = silent_mismatch(observations)
    if mismatch is not None:
        found.append(mismatch)
    drift = replica_drift(scenario, observations)
    if drift is not None and all(v.step is not None and drift.step < v.step for v in found):
        found.insert(0, drift)
    numbers = reference_mismatch(scenario, observations)
    if numbers is not None and all(v.step is not None and numbers.step < v.step for v in found):
        found.insert(0, numbers)
    return tuple(found)


def consistent(scenario: Scenario) -> bool:
    """Clause 4's premise: no rank's first-iteration order differs from
    another's, and none deviates from its own later."""
    if first_iteration_divergence(scenario) is not None:
        return False
    for rank in range(scenario.world_size):
        rank_iterations = iterations(scenario, rank)
        if rank_iterations and any(deviates(rank_iterations[0], later) for later in rank_iterations[1:]):
            return False
    return True


def gradient_replicas(scenario: Scenario) -> int:
    """How many ranks hold each element of the averaged gradient once a
    backward is done: one where gradients are sharded, every rank for
    ``NO_SHARD``, one per node for hybrid sharding (HSDP)."""
    if scenario.runs_on.replicated(scenario):
        return scenario.world_size
    if scenario.hybrid:
        return scenario.world_size // HYBRID_NODE_SIZE
    return 1


def replica_groups(scenario: Scenario) -> tuple[tuple[int, ...], ...]:
    """Ranks that hold the same parameters (the same shards) once every
    rank has applied the same update: all of them for ``NO_SHARD``, the
    ranks at one position in every simulated node under hybrid sharding."""
    if scenario.runs_on.replicated(scenario):
        return (tuple(range(scenario.world_size)),)
    if scenario.hybrid:
        return tuple(tuple(range(local, scenario.world_size, HYBRID_NODE_SIZE)) for local in range(HYBRID_NODE_SIZE))
    return ()


def keeps_replicas(scenario: Scenario) -> bool:
    """The premise of the replica clause: the engine's promise holds (one
    order on every rank for FSDP1, ``fsdp2_promises`` for FSDP2)."""
    if scenario.runs_on.promise is Promise.ONE_ORDER:
        return consistent(scenario)
    return fsdp2_promises(scenario) and not unregistered_calls(scenario)


def replica_drift(scenario: Scenario, observations: Observations) -> Violation | None:
    """The first step after which ranks of a replica group hold different
    parameters, judged without the reference: it holds wherever the
    engine's promise does, whatever the schedules' alignment. Steps count
    while every rank of the group succeeded and has taken the same
    optimizer steps so far."""
    if not keeps_replicas(scenario):
        return None
    for group in replica_groups(scenario):
        for index in range(_promised_steps(scenario)):
            histories = {tuple(scenario.ranks[rank][i].optimizer_step for i in range(index + 1)) for rank in group}
            outcomes = [observations.ranks[rank].steps[index] for rank in group]
            if len(histories) > 1 or any(o.status != Status.OK or o.param_digest is None for o in outcomes):
                break
            digests = [o.param_digest for o in outcomes]
            if len(set(digests)) > 1:
                return Violation(
                    Clause.REPLICAS,
                    ViolationKind.REPLICAS_DIVERGED,
                    group[digests.index(next(d for d in digests if d != digests[0]))],
                    index,
                    f"replicas {list(group)} hold different parameters after this step (digests {digests})",
                )
    return None


def _promised_steps(scenario: Scenario) -> int:
    """Steps before some rank's first optimizer step on unreduced gradients
    (``first_step_on_unreduced_gradients``), after which the ranks'
    parameters are each their own by design."""
    found = (first_step_on_unreduced_gradients(steps) for steps in scenario.ranks)
    return min((index for index in found if index is not None), default=scenario.num_steps)


def rounding_bound(scenario: Scenario, path: Path, magnitude: float | None, backward: bool = False) -> float:
    """How far a sum may stray from the reference's in the scenario's
    dtypes: the unit roundoff of its coarsest dtype times the operations
    accumulated along the path (each linear's dot products, each norm's
    batch statistics; for gradients also the batch and the reduction over
    ranks) times the sum's magnitude (the sum of absolute values), times
    ``ROUNDOFF_FACTOR``. In float32 ``RELATIVE_TOLERANCE`` is the larger."""
    if magnitude is None:
        return 0.0
    roundoff = max(UNIT_ROUNDOFF[dtype] for dtype in scenario.dtypes)
    operations = accumulated_operations(scenario.model, path, scenario.batch_size)
    if backward:
        operations += scenario.batch_size + scenario.world_size
    return ROUNDOFF_FACTOR * roundoff * operations * magnitude


def accumulated_operations(model: ModelSpec, path: Path, batch_size: int) -> int:
    """The longest chain of additions one output element passes through."""

    def depth(node: Node) -> int:
        if isinstance(node, Linear):
            return node.in_features + int(node.bias)
        if isinstance(node, Norm):
            return batch_size
        if isinstance(node, Sequential):
            return sum(depth(child) for child in node.children)
        if isinstance(node, Choice):
            return sum(depth(node.alternatives[index]) for index in taken(path, node.name))
        return 0

    return depth(model.root)


def reference_mismatch(scenario: Scenario, observations: Observations) -> Violation | None:
    """The first step whose outputs or gradients differ from the
    single-process reference run, when the ranks kept to one order.

    A rank's output sum must match the reference for its own batch; the
    local gradients of all ranks, summed and divided by
    ``gradient_replicas``, must match the reference's averaged gradient.
    Only steps that succeeded on the ranks compared are judged.
    """
    if observations.reference is None or not consistent(scenario) or unregistered_calls(scenario):
        return None
    replicas = gradient_replicas(scenario)
    for index, expected in enumerate(observations.reference[: _promised_steps(scenario)]):
        outcomes = [rank.steps[index] for rank in observations.ranks]
        for rank, outcome in enumerate(outcomes):
            if outcome.status != Status.OK or outcome.output_sum is None:
                continue
            step = scenario.ranks[rank][index]
            magnitude = None if expected.output_magnitudes is None else expected.output_magnitudes[rank]
            bound = rounding_bound(scenario, step.path, magnitude)
            if not _close(outcome.output_sum, expected.output_sums[rank], bound):
                return Violation(
                    Clause.REFERENCE,
                    ViolationKind.OUTPUT_MISMATCH,
                    rank,
                    index,
                    f"outputs sum to {outcome.output_sum!r}, the single-process reference gives "
                    f"{expected.output_sums[rank]!r} for this rank's batch",
                )
        if expected.grad_sum is None or any(o.status != Status.OK or o.grad_sum is None for o in outcomes):
            continue
        if not all(steps[index].reduces_gradients for steps in scenario.ranks):
            continue  # unreduced local gradients: compared once a synced backward reduces them
        if scenario.ignored_blocks:
            continue  # each rank's own gradients of ignored parameters: judged by the outputs after an update
        observed = sum(o.grad_sum for o in outcomes) / replicas
        bound = max(
            rounding_bound(scenario, steps[index].path, expected.grad_magnitude, backward=True)
            for steps in scenario.ranks
        )
        if not _close(observed, expected.grad_sum, bound):
            return Violation(
                Clause.REFERENCE,
                ViolationKind.GRADIENT_MISMATCH,
                0,
                index,
                f"the ranks' gradients sum to {observed!r} (local sums {[o.grad_sum for o in outcomes]} "
                f"over {replicas} replica(s)), the single-process reference's rank-averaged gradient "
                f"sums to {expected.grad_sum!r}",
            )
    return None


def _close(observed: float, expected: float, bound: float = 0.0) -> bool:
    return abs(observed - expected) <= max(RELATIVE_TOLERANCE * (1 + abs(expected)), bound)


def silent_mismatch(observations: Observations) -> Violation | None:
    """The first collective where ranks served different units, unless FSDP
    had already raised or warned about the order by then.

    Within a group, the k-th collective of every member meets the k-th of the
    others; the trace says which unit each one served, so this holds at every
    debug level. Pairs of order checks are left out: telling them apart is the
    order check's own job (clause 1).
    """
    groups = sorted({record.group for rank in observations.ranks for step in rank.steps for record in step.collectives})
    found = [mismatch for group in groups if (mismatch := _first_mismatch(observations, group)) is not None]
    unannounced = [(latest, violation) for latest, violation in found if not _announced(observations, latest)]
    if not unannounced:
        return None
    return min(unannounced, key=lambda mismatch: (mismatch[0], mismatch[1].rank))[1]


def _first_mismatch(observations: Observations, group: tuple[int, ...]) -> tuple[int, Violation] | None:
    """The group's first position where its members served different units,
    with the latest step any of them was in by then."""
    members = group or tuple(range(len(observations.ranks)))
    traces = [
        [
            (index, record)
            for index, step in enumerate(observations.ranks[rank].steps)
            for record in step.collectives
            if record.group == group
        ]
        for rank in members
    ]
    for position in range(min(len(trace) for trace in traces)):
        paired = [trace[position] for trace in traces]
        served = [(record.unit, record.purpose) for _, record in paired]
        if len(set(served)) == 1 or all(purpose == Purpose.ORDER_CHECK for _, purpose in served):
            continue
        at = next(i for i, pair in enumerate(served) if pair != served[0])
        described = ", ".join(
            f"rank {rank} {record.op}({record.numel}) for {record.unit or 'no unit'} ({record.purpose or 'other'})"
            for rank, (_, record) in zip(members, paired, strict=True)
        )
        message = f"collective #{position} on ranks {list(members)} paired different units without error or warning: "
        violation = Violation(
            Clause.SILENT_MISMATCH, ViolationKind.UNITS_PAIRED, members[at], paired[at][0], message + described
        )
        return max(index for index, _ in paired), violation
    return None


def _announced(observations: Observations, up_to_step: int) -> bool:
    """FSDP raised or warned about the forward order on some rank by this step."""
    return any(
        order_warnings(outcome) or is_order_error(outcome)
        for rank in observations.ranks
        for outcome in rank.steps[: up_to_step + 1]
    )


def _judge_rank(
    scenario: Scenario, observations: Observations, rank: int, expectation: RankExpectation
) -> list[Violation]:
    observed = observations.ranks[rank]
    refused = expectation.refusal
    if refused is not None and (refused.step is None or observed.setup.status != Status.OK):
        return _judge_refusal(observed.setup, rank, refused)
    if observed.setup.status != Status.OK:
        failed = f"building or wrapping the model failed: {describe(observed.setup)}"
        return [Violation(Clause.CLEAN_RUN, ViolationKind.SETUP_FAILED, rank, None, failed)]
    if refused is not None:
        before = scenario.ranks[rank][: refused.step]
        found = _judge_rank(
            replace(scenario, ranks=(*scenario.ranks[:rank], before, *scenario.ranks[rank + 1 :])),
            replace(observations, ranks=_truncated(observations, rank, refused.step)),
            rank,
            replace(expectation, refusal=None),
        )
        return found or _judge_refusal(observed.steps[refused.step], rank, refused)
    if expectation.error_steps:
        return _judge_first_iteration_error(observed.steps, rank, expectation)
    found: list[Violation] = []
    warned: list[int] = []
    ran = len(observed.steps)
    for index, (step, outcome) in enumerate(zip(scenario.ranks[rank], observed.steps, strict=True)):
        for warning in order_warnings(outcome):
            if not step.training:
                warned_in_eval = f"eval-mode step warned: {first_line(warning.message)}"
                found.append(Violation(Clause.EVAL_SILENCE, ViolationKind.EVAL_WARNED, rank, index, warned_in_eval))
            elif not warning.message.startswith(LATER_WARNING.format(rank=rank)):
                found.append(
                    Violation(
                        Clause.LATER_ITERATION,
                        ViolationKind.WARNING_MISWORDED,
                        rank,
                        index,
                        f"warning does not match the contract's: {first_line(warning.message)}",
                    )
                )
            elif index not in expectation.warning_steps:
                why = expectation.reason or "every iteration's order equals the first iteration's"
                found.append(
                    Violation(
                        Clause.LATER_ITERATION,
                        ViolationKind.WARNING_UNEXPECTED,
                        rank,
                        index,
                        f"warned outside the first deviating iteration ({why}): {first_line(warning.message)}",
                    )
                )
            else:
                warned.append(index)
        if outcome.status == Status.NOT_RUN:
            ran = index
            break
        if outcome.status != Status.OK:
            if _meets_sharded_parameters(scenario, step, outcome):
                break
            if not is_order_error(outcome):
                clause, kind = Clause.CLEAN_RUN, ViolationKind.STEP_FAILED
            else:
                clause = Clause.FIRST_ITERATION if step.training else Clause.EVAL_SILENCE
                kind = ViolationKind.ORDER_ERROR_UNEXPECTED
            found.append(Violation(clause, kind, rank, index, f"expected success, got {describe(outcome)}"))
            break
    # A warning due in a step the rank never ran (a peer's crash ended it) is not missing.
    steps = sorted(step for step in expectation.warning_steps if step < ran)
    if steps and not warned and not any(v.clause == Clause.CLEAN_RUN for v in found):
        missing = f"no warning in steps {steps} though {expectation.reason}"
        found.append(Violation(Clause.LATER_ITERATION, ViolationKind.WARNING_MISSING, rank, steps[0], missing))
    return found


UNCAST_INPUTS = (("RuntimeError", "to have the same dtype"), ("RuntimeError", "must have the same dtype"))
"""How torch refuses float32 inputs meeting low-precision parameters: a
linear without a bias ("expected m1 and m2 to have the same dtype") and
one with a bias ("mat1 and mat2 must have the same dtype")."""


def documented_unregistered_failures(scenario: Scenario) -> tuple[tuple[str, str], ...]:
    """The errors, as (type, phrase), FSDP2 documents for a method it was
    not told of: its parameters met sharded, its inputs met uncast under a
    param dtype."""
    return (SHARDED_CALL, *(UNCAST_INPUTS if scenario.param_dtype != "float32" else ()))


def _meets_sharded_parameters(scenario: Scenario, step: Step, outcome: StepOutcome) -> bool:
    """An unregistered method call refused for what FSDP2's hooks would have
    done: FSDP2 runs none around such a call, so it finds the parameters as
    the last hook left them, unsharded (it runs) or sharded (torch refuses
    it), and under a param dtype its inputs uncast (torch refuses the
    dtypes); all of it is what FSDP2 documents. ``refusal`` demands the
    refusal where the parameters are certainly sharded."""
    unregistered = not scenario.runs_on.registers(scenario, step.method)
    message = outcome.error_message or ""
    return unregistered and any(
        outcome.error_type == kind and words in message for kind, words in documented_unregistered_failures(scenario)
    )


def _judge_refusal(outcome: StepOutcome, rank: int, refused: Refusal) -> list[Violation]:
    if refused.seen_in(outcome):
        return []
    where = "setup" if refused.step is None else f"step {refused.step}"
    message = (
        f"expected {refused.error_type} ('...{refused.words}...') in {where} because {refused.reason}, "
        f"got {describe(outcome)}"
    )
    return [Violation(Clause.REFUSAL, ViolationKind.REFUSAL_MISSING, rank, refused.step, message)]


def _truncated(observations: Observations, rank: int, steps: int) -> tuple:
    ranks = list(observations.ranks)
    ranks[rank] = replace(ranks[rank], steps=ranks[rank].steps[:steps])
    return tuple(ranks)


def _judge_first_iteration_error(
    steps: tuple[StepOutcome, ...], rank: int, expectation: RankExpectation
) -> list[Violation]:
    wanted = sorted(expectation.error_steps)
    for index, outcome in enumerate(steps):
        if outcome.status == Status.OK:
            if index > wanted[-1]:
                break
            continue
        if index in expectation.error_steps and is_order_error(outcome):
            return []
        return [
            Violation(
                Clause.FIRST_ITERATION,
                ViolationKind.ORDER_ERROR_REPLACED,
                rank,
                index,
                f"expected RuntimeError '{FIRST_ITERATION_ERROR}' in step(s) {wanted} "
                f"({expectation.reason}), got {describe(outcome)}",
            )
        ]
    missing = f"no error in step(s) {wanted} though {expectation.reason}"
    return [Violation(Clause.FIRST_ITERATION, ViolationKind.ORDER_ERROR_MISSING, rank, wanted[0], missing)]


def order_warnings(outcome: StepOutcome) -> list[WarningRecord]:
    return [w for w in outcome.warnings if w.message.startswith(ORDER_MARKER)]


def is_order_error(outcome: StepOutcome) -> bool:
    return outcome.error_type == "RuntimeError" and (outcome.error_message or "").startswith(FIRST_ITERATION_ERROR)


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def describe(outcome: StepOutcome) -> str:
    if outcome.status == Status.OK:
        return "success"
    if outcome.status == Status.HANG:
        return f"a hang ({first_line(outcome.error_message or '')})"
    kind = outcome.error_type or outcome.status
    return f"{outcome.status} {kind}: {first_line(outcome.error_message or '')}"
