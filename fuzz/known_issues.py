"""Known FSDP misbehaviours: failures the fuzzer has already triaged.

A failing case that matches an entry is counted and reported, not failed,
so a campaign keeps looking for the next new finding; ``--strict-contract``
fails them all again. Every entry has a corpus file under
``corpus/known/`` that reproduces it, and predicates are kept narrow (a
clause, a step range, a symptom) so that an entry never hides a different
bug in the same scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fuzz.observations import Observations
from fuzz.oracles import (
    CLEAN_RUN,
    EVAL_SILENCE,
    FIRST_ITERATION,
    GRADIENT_MISMATCH,
    LATER_ITERATION,
    LATER_WARNING,
    REFERENCE,
    SILENT_MISMATCH,
    Violation,
    expectations,
)
from fuzz.orders import deviates, eval_divergence_step, first_iteration_divergence, iterations
from fuzz.scenario import HYBRID_NODE_SIZE, HYBRID_STRATEGIES, Scenario

Predicate = Callable[[Scenario, Observations, tuple[Violation, ...]], bool]


@dataclass(frozen=True)
class KnownIssue:
    name: str
    description: str
    upstream: str | None
    matches: Predicate


def _eval_divergence_fails(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    """After an unchecked eval divergence the ranks' collectives are out of
    step, so any later clause may fail (a crash where the first-iteration
    error was due, say); an order warning in eval is a different bug."""
    start = eval_divergence_step(scenario)
    return start is not None and all(
        v.clause != EVAL_SILENCE and v.step is not None and v.step >= start for v in violations
    )


def _failures_from(start: int | None, violations: tuple[Violation, ...]) -> bool:
    """Every violation is a failed step or a silent mismatch at or after ``start``."""
    if start is None:
        return False
    return all(v.clause in (CLEAN_RUN, SILENT_MISMATCH) and v.step is not None and v.step >= start for v in violations)


def _fails_after_deviation_warning(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    warned_from = [min(e.warning_steps) for e in expectations(scenario) if e.warning_steps]
    return _failures_from(min(warned_from, default=None), violations)


HOOK_STATE_ASSERT = "Invalid: ``_post_backward_hook_state``"


def _refrozen_after_forward_without_backward(scenario: Scenario, step: int) -> bool:
    """Up to ``step``, some rank's path changed (``freeze_untaken`` changed
    some ``requires_grad``) after a forward with grad that no backward
    followed."""
    for rank_steps in scenario.ranks:
        pending = False
        for index, current in enumerate(rank_steps[: step + 1]):
            if pending and dict(current.path) != dict(rank_steps[index - 1].path):
                return True
            if current.backward:
                pending = False
            elif current.forwards and current.grad_enabled:
                pending = True
    return False


def _refreeze_after_forward_without_backward(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """The assertion, or (SHARD_GRAD_OP with use_orig_params) gradients that
    are silently wrong after such a refreeze."""
    if not scenario.freeze_untaken:
        return False
    if _all_failed_with(observations, violations, CLEAN_RUN, "AssertionError", HOOK_STATE_ASSERT):
        return True
    return scenario.fsdp.use_orig_params and all(
        v.clause == REFERENCE
        and v.message.startswith(GRADIENT_MISMATCH)
        and _refrozen_after_forward_without_backward(scenario, v.step)
        for v in violations
    )


def _all_failed_with(
    observations: Observations, violations: tuple[Violation, ...], clause: str, error_type: str, prefix: str
) -> bool:
    """Every violation is of ``clause``, at a step that raised ``error_type`` with this message prefix."""

    def failed_so(violation: Violation) -> bool:
        if violation.clause != clause or violation.step is None:
            return False
        outcome = observations.ranks[violation.rank].steps[violation.step]
        return outcome.error_type == error_type and (outcome.error_message or "").startswith(prefix)

    return all(failed_so(violation) for violation in violations)


def _hybrid_divergence_hidden_from_a_node(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Ranks diverge, and only ranks of nodes that agree within themselves
    miss the error (or pair different units silently)."""
    if scenario.fsdp.sharding_strategy not in HYBRID_STRATEGIES or first_iteration_divergence(scenario) is None:
        return False
    first_orders = [
        ranks[0].order if (ranks := iterations(scenario, rank)) else () for rank in range(scenario.world_size)
    ]
    blind = {
        rank
        for start in range(0, scenario.world_size, HYBRID_NODE_SIZE)
        if len(set(first_orders[start : start + HYBRID_NODE_SIZE])) == 1
        for rank in range(start, start + HYBRID_NODE_SIZE)
    }

    def explained(v: Violation) -> bool:
        if v.clause == SILENT_MISMATCH or (v.clause == FIRST_ITERATION and v.rank in blind):
            return True
        # The diverging node's own error, worded as order-error-key-error-with-orig-params words it.
        return _order_error_raises_key_error(scenario, observations, (v,))

    return all(explained(v) for v in violations)


def _later_warning_names_intra_node_rank(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Later-iteration verdicts only, each on a rank whose due warning came
    naming its rank within its node instead."""
    if scenario.fsdp.sharding_strategy not in HYBRID_STRATEGIES:
        return False
    due = expectations(scenario)

    def named_locally(rank: int) -> bool:
        local = LATER_WARNING.format(rank=rank % HYBRID_NODE_SIZE)
        steps = observations.ranks[rank].steps
        return rank >= HYBRID_NODE_SIZE and any(
            warning.message.startswith(local) for step in due[rank].warning_steps for warning in steps[step].warnings
        )

    return all(v.clause == LATER_ITERATION and named_locally(v.rank) for v in violations)


def backward_steps_differ(scenario: Scenario) -> int | None:
    """First step where some ranks run a backward and others do not."""
    for index in range(scenario.num_steps):
        if len({steps[index].backward for steps in scenario.ranks}) > 1:
            return index
    return None


def _backward_on_some_ranks_only(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return first_iteration_divergence(scenario) is None and _failures_from(backward_steps_differ(scenario), violations)


def _thawed_or_frozen_since_accumulating(scenario: Scenario, step: int) -> bool:
    """Up to ``step``, some rank's path changed (so ``freeze_untaken`` changed
    some ``requires_grad``, eval steps included) while gradients from an
    earlier backward were waiting for an optimizer step."""
    for rank_steps in scenario.ranks:
        accumulating = False
        for index, current in enumerate(rank_steps[: step + 1]):
            if accumulating and dict(current.path) != dict(rank_steps[index - 1].path):
                return True
            accumulating = (accumulating or current.backward) and not current.optimizer_step
    return False


def _refreeze_drops_accumulated_grads(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not (scenario.freeze_untaken and scenario.fsdp.use_orig_params):
        return False
    return all(
        v.clause == REFERENCE
        and v.message.startswith(GRADIENT_MISMATCH)
        and _thawed_or_frozen_since_accumulating(scenario, v.step)
        for v in violations
    )


TRAINING_STATE_ERROR = "expected to be in states [<TrainingState.IDLE"


def _whole_unit_frozen_with_orig_params(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not (scenario.freeze_untaken and scenario.fsdp.use_orig_params):
        return False
    return _all_failed_with(observations, violations, CLEAN_RUN, "ValueError", TRAINING_STATE_ERROR)


def _stepped_while_unsharded(scenario: Scenario, step: int) -> bool:
    """Before ``step``, an optimizer step came after a training-mode forward
    with grad that no backward had followed."""
    for rank_steps in scenario.ranks:
        pending = False
        for current in rank_steps[:step]:
            if current.backward:
                pending = False
            elif current.training and current.forwards and current.grad_enabled:
                pending = True
            if pending and current.optimizer_step:
                return True
    return False


def _optimizer_step_leaves_stale_unsharded_params(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return all(v.clause == REFERENCE and _stepped_while_unsharded(scenario, v.step) for v in violations)


def _later_check_ignores_repeats(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Only later-iteration verdicts, and only on ranks whose iterations use a unit more than once."""

    def repeats(rank: int) -> bool:
        return any(len(set(it.order)) < len(it.order) for it in iterations(scenario, rank))

    return all(v.clause == LATER_ITERATION and repeats(v.rank) for v in violations)


def _later_check_misses_dropped_units(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Missing warnings only, each on a rank whose first deviating order is a
    strict prefix of its first order."""

    def dropped_only(rank: int) -> bool:
        first, *later = iterations(scenario, rank)
        deviating = next((it for it in later if deviates(first, it)), None)
        return (
            deviating is not None
            and len(deviating.order) < len(first.order)
            and first.order[: len(deviating.order)] == deviating.order
        )

    return all(
        v.clause == LATER_ITERATION and v.message.startswith("no warning") and dropped_only(v.rank) for v in violations
    )


def _first_iteration_order_ends_early(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.debug_level != "DETAIL":
        return False
    divergence = first_iteration_divergence(scenario)
    if divergence is None or None not in divergence.units:
        return False
    return all(v.clause in (FIRST_ITERATION, CLEAN_RUN, SILENT_MISMATCH) for v in violations)


NON_LEAF_REQUIRES_GRAD = "you can only change requires_grad flags of leaf variables"


def _refreeze_hits_unsharded_views(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """The error where a step was due to succeed, or where it preempts a due
    first-iteration error (the flip comes before the forward's check)."""
    if not (scenario.freeze_untaken and scenario.fsdp.use_orig_params):
        return False
    return all(
        v.clause in (CLEAN_RUN, FIRST_ITERATION)
        and _all_failed_with(observations, (v,), v.clause, "RuntimeError", NON_LEAF_REQUIRES_GRAD)
        for v in violations
    )


def _unchecked_below_detail(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    ranks_differ = any(steps != scenario.ranks[0] for steps in scenario.ranks)
    return (
        scenario.debug_level != "DETAIL"
        and ranks_differ
        and all(v.clause in (CLEAN_RUN, SILENT_MISMATCH) for v in violations)
    )


def _order_error_raises_key_error(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not scenario.fsdp.use_orig_params:
        return False
    return _all_failed_with(observations, violations, FIRST_ITERATION, "KeyError", "Parameter")


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        name="eval-order-unchecked",
        description=(
            "FSDP does not check the forward order in eval mode, so ranks whose eval forwards use different "
            "units pair the all-gathers of different units without any error or warning: with equal numel "
            "and the same sharding state the results are silently wrong; otherwise (e.g. SHARD_GRAD_OP, "
            "where one rank's unit is still unsharded) gloo aborts the process ('Received data size doesn't "
            "match expected size') or the ranks hang."
        ),
        upstream="https://github.com/pytorch/pytorch/pull/77195 (eval checking removed by design, nothing replaced it)",
        matches=_eval_divergence_fails,
    ),
    KnownIssue(
        name="unchecked-after-deviation",
        description=(
            "Once a rank's forward order deviates from its first iteration, FSDP warns that rank and checks "
            "nothing more: ranks whose later orders differ pair the collectives of different units, silently "
            "when numel and sharding state agree, and hang otherwise (seen when an eval step precedes the "
            "diverging training step, with FULL_SHARD and SHARD_GRAD_OP). The warning says collectives 'may "
            "give incorrect results or hang'; no rank gets an error."
        ),
        upstream="https://github.com/pytorch/pytorch/issues/75373 (later iterations only warned about, by design)",
        matches=_fails_after_deviation_warning,
    ),
    KnownIssue(
        name="refreeze-after-forward-without-backward",
        description=(
            "A forward with grad enabled registers a post-backward hook on each trainable unit. If no backward "
            "follows (an eval forward, as in the seed's train/eval test) and the user then freezes that unit "
            "(requires_grad=False, as the seed's flip_path does) before the next backward, FSDP's "
            "_finalize_params asserts 'Invalid: ``_post_backward_hook_state``' on every rank. With "
            "SHARD_GRAD_OP and use_orig_params=True the same schedule raises nothing and the next backward's "
            "gradients are silently wrong instead (2% off the reference in the nightly finding). No divergence "
            "is involved: all ranks run the same schedule."
        ),
        upstream=(
            "none found; related: https://github.com/pytorch/pytorch/issues/104148 (re-registering hooks "
            "when parameters thaw), https://github.com/pytorch/pytorch/issues/105369 and, for the SHARD_GRAD_OP "
            "silent variant, https://github.com/pytorch/pytorch/issues/105371"
        ),
        matches=_refreeze_after_forward_without_backward,
    ),
    KnownIssue(
        name="hybrid-order-check-intra-node-only",
        description=(
            "With HYBRID_SHARD or _HYBRID_SHARD_ZERO2, FSDP validates the first-iteration forward order over "
            "the intra-node (sharding) group only (_exec_order_data.init gets state.process_group), so ranks "
            "that agree within their node are never told that another node's order differs. When every node "
            "agrees internally, no rank raises and the inter-node all-reduce pairs the gradients of different "
            "units of equal numel: replicas silently drift apart. When one node diverges internally, its ranks "
            "raise while the other nodes go on into backward and hang in the inter-node all-reduce."
        ),
        upstream=(
            "none found; same pattern as https://github.com/pytorch/pytorch/pull/108331 (a step meant for all "
            "replicas run over the intra-node group only)"
        ),
        matches=_hybrid_divergence_hidden_from_a_node,
    ),
    KnownIssue(
        name="later-check-ignores-repeats",
        description=(
            "FSDP records each unit's first use only in the first iteration and then compares every later "
            "pre-forward against that list. When a unit runs more than once per iteration (several forwards "
            "before a backward, or a branch repeated in one forward), an unchanged schedule is warned about "
            "('Expected to not all-gather any more parameters'), and a change in how often units repeat "
            "(two forwards, then one) is not warned about."
        ),
        upstream=(
            "none found; by construction in _ExecOrderData.record_pre_forward ('only record the first usage "
            "of a handles key'), see https://github.com/pytorch/pytorch/pull/110138 for a related fix there"
        ),
        matches=_later_check_ignores_repeats,
    ),
    KnownIssue(
        name="later-check-misses-dropped-units",
        description=(
            "After the first iteration FSDP compares each pre-forward with the recorded order and warns about "
            "a different or an extra unit, but never notices units that a later iteration leaves out at the "
            "end: a rank whose order becomes a strict prefix of its first order (a skipped branch, or a branch "
            "whose alternative is not a unit of its own) gets no warning."
        ),
        upstream="none found; _ExecOrderData._check_order has no end-of-iteration check",
        matches=_later_check_misses_dropped_units,
    ),
    KnownIssue(
        name="first-iteration-order-ends-early",
        description=(
            "The first-iteration check is a pair of all-gathers per unit a rank uses; a rank whose order has "
            "ended (it skipped a branch, or its alternative is no unit of its own) issues none and moves on, "
            "so the other ranks' checks meet its backward's reduce-scatters or its next step's collectives: "
            "a crash (gloo size mismatch), a hang, or a silent pairing instead of the promised error."
        ),
        upstream=(
            "none found; the check only compares ranks that reach it (see the TODO on 'number of valid "
            "indices' in _ExecOrderData._check_order)"
        ),
        matches=_first_iteration_order_ends_early,
    ),
    KnownIssue(
        name="refreeze-hits-unsharded-views",
        description=(
            "With use_orig_params=True and a strategy that keeps parameters unsharded after an eval forward "
            "(SHARD_GRAD_OP), the module's parameters are views of the unsharded flat parameter until the next "
            "training step, so the seed's flip_path pattern (setting requires_grad on them) raises 'you can only "
            "change requires_grad flags of leaf variables' on every rank. No divergence is involved."
        ),
        upstream=(
            "related: https://github.com/pytorch/pytorch/issues/105371 (closed: SHARD_GRAD_OP lost requires_grad "
            "changes after a no_grad step; this is the eval-forward-with-grad case, still failing in 2.13)"
        ),
        matches=_refreeze_hits_unsharded_views,
    ),
    KnownIssue(
        name="order-unchecked-below-detail",
        description=(
            "Below debug level DETAIL FSDP checks no forward order at all: ranks whose forwards diverge pair "
            "the collectives of different units silently when numel agree, and crash or hang otherwise."
        ),
        upstream="https://github.com/pytorch/pytorch/pull/79584 (checking made opt-in through DETAIL, by design)",
        matches=_unchecked_below_detail,
    ),
    KnownIssue(
        name="order-error-key-error-with-orig-params",
        description=(
            "With use_orig_params=True, a first-iteration divergence raises KeyError(<the FlatParameter>) "
            "instead of 'Forward order differs across ranks': building the message looks the flat parameter "
            "up in param_to_fqn (_ExecOrderData._get_names_from_handle_indices), which maps only the original "
            "parameters. The divergence is still stopped, but with an error that names nothing."
        ),
        upstream="none found",
        matches=_order_error_raises_key_error,
    ),
    KnownIssue(
        name="hybrid-warning-names-intra-node-rank",
        description=(
            "With HYBRID_SHARD or _HYBRID_SHARD_ZERO2, the later-iteration warning names the rank within its "
            "node ('... on rank 0' on global rank 2): _ExecOrderData takes its rank from the intra-node "
            "process group. In a multi-node job the warning points at the wrong process."
        ),
        upstream="none found; same root as hybrid-order-check-intra-node-only (the intra-node group is used)",
        matches=_later_warning_names_intra_node_rank,
    ),
    KnownIssue(
        name="backward-on-some-ranks-only",
        description=(
            "FSDP checks the order of forwards only. Ranks whose forwards agree but that disagree on whether "
            "a step runs a backward (one rank skips it, as a 'skip the step on a NaN loss' guard does) meet "
            "with unmatched collectives: one rank's reduce-scatter waits for the others, which have moved on "
            "to the next forward's all-gather. The result is a hang or a silent pairing, with no error "
            "naming the cause, at every debug level."
        ),
        upstream=(
            "https://github.com/pytorch/pytorch/issues/64629 (open: ranks whose gradient sets differ hang or "
            "give incorrect results; a check was proposed, none exists)"
        ),
        matches=_backward_on_some_ranks_only,
    ),
    KnownIssue(
        name="refreeze-drops-accumulated-grads-with-orig-params",
        description=(
            "With use_orig_params=True, freezing a parameter (requires_grad=False, as the seed's flip_path "
            "does) between two backwards that accumulate gradients drops the gradient it had accumulated: "
            "its .grad is None afterwards, so the ranks' gradients no longer match a local run, where "
            ".grad survives a requires_grad change and the optimizer still applies it. Every sharding "
            "strategy, NO_SHARD included."
        ),
        upstream=(
            "none found for this case; by design since https://github.com/pytorch/pytorch/issues/91167 "
            "(no gradient is forwarded to original parameters that do not require grad); related "
            "https://github.com/pytorch/pytorch/pull/104186"
        ),
        matches=_refreeze_drops_accumulated_grads,
    ),
    KnownIssue(
        name="frozen-unit-backward-state-error-with-orig-params",
        description=(
            "With use_orig_params=True, freezing every parameter of an FSDP unit after wrapping (here: a "
            "branch point that is its own unit, with all its alternatives untaken and frozen) and then running "
            "a forward and backward through the unit fails at the end of the backward on every rank with "
            "ValueError 'expected to be in states [<TrainingState.IDLE: 1>] but current state is "
            "TrainingState.FORWARD_BACKWARD': the unit was unsharded in the forward, but with no parameter "
            "requiring grad its post-backward never runs. Unfrozen but unused parameters are fine. Every "
            "sharding strategy."
        ),
        upstream=(
            "none found in pytorch/pytorch; same symptom in fairscale's FSDP: "
            "https://github.com/facebookresearch/fairscale/issues/643 (frozen nested units); related "
            "https://github.com/pytorch/pytorch/issues/104148"
        ),
        matches=_whole_unit_frozen_with_orig_params,
    ),
    KnownIssue(
        name="optimizer-step-before-backward-uses-stale-params",
        description=(
            "A training-mode forward with grad that no backward follows leaves the root unit's parameters "
            "unsharded (FSDP keeps the root unsharded for the backward it expects). An optimizer step then "
            "updates the sharded parameters, but the next forward does not all-gather again and computes "
            "with the stale unsharded ones: outputs and gradients are silently wrong, at any debug level. "
            "Found with FULL_SHARD, use_orig_params=False, an eval step between."
        ),
        upstream="none found",
        matches=_optimizer_step_leaves_stale_unsharded_params,
    ),
)


def triage(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> KnownIssue | None:
    """The known issue that explains every violation; failing that, when
    each violation is explained by some known issue on its own (a shrunk
    case that hits two of them), the one that explains the first."""
    for issue in KNOWN_ISSUES:
        if issue.matches(scenario, observations, violations):
            return issue
    explaining = [
        next((issue for issue in KNOWN_ISSUES if issue.matches(scenario, observations, (violation,))), None)
        for violation in violations
    ]
    return explaining[0] if explaining and all(explaining) else None


def known_issue(name: str) -> KnownIssue:
    for issue in KNOWN_ISSUES:
        if issue.name == name:
            return issue
    raise KeyError(f"no known issue named {name!r}; known: {[issue.name for issue in KNOWN_ISSUES]}")
