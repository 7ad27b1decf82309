"""Triage on recorded observations, both ways, for every known issue.

Each record's reproducers (the recorded runs named after it) must triage to
it, and a near miss must not: the same case with one fact changed, in the
scenario, the verdict or what FSDP did, so that the record's cause or symptom
is gone. A near miss is a realistic neighbour, the case a predicate that grew
too broad would swallow, so each one says what its record keys on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fsdp_fuzz.data import Status, StepOutcome
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES, triage
from fsdp_fuzz.judge.oracles import judge

RECORDED = Path(__file__).parent / "recorded"


def reproducers(name):
    """The recorded runs whose names start with the record's name."""
    stems = (path.stem for path in RECORDED.glob("*.json"))
    return sorted(stem for stem in stems if stem == name or stem.startswith(f"{name}-"))


TWO_ISSUE_CASES = {
    "two-known-issues-in-one-case": "refreeze-after-forward-without-backward",
    "two-known-issues-eval-order-and-unchecked-deviation": "unchecked-after-deviation",
}
"""Recorded runs that hit two records, each explaining some of the
violations: no record explains them all, and triage names the one that
explains the first."""

POSITIVES = sorted(
    [(name, stem) for name in KNOWN_ISSUES for stem in reproducers(name)]
    + [(name, stem) for stem, name in TWO_ISSUE_CASES.items()]
)


# Changing one fact ----------------------------------------------------------------


def with_steps(scenario, indices, ranks=None, **changes):
    """The scenario with ``changes`` made to the steps ``indices`` of
    ``ranks`` (every rank by default)."""
    ranks = range(scenario.world_size) if ranks is None else ranks
    return replace(
        scenario,
        ranks=tuple(
            tuple(
                replace(step, **changes) if rank in ranks and index in indices else step
                for index, step in enumerate(steps)
            )
            for rank, steps in enumerate(scenario.ranks)
        ),
    )


def with_fsdp(scenario, **changes):
    return replace(scenario, fsdp=replace(scenario.fsdp, **changes))


def with_outcome(observations, index, outcome):
    """The observations with every rank's step ``index`` ending as ``outcome``."""
    return replace(
        observations,
        ranks=tuple(
            replace(rank, steps=tuple(outcome if i == index else step for i, step in enumerate(rank.steps)))
            for rank in observations.ranks
        ),
    )


def rejudged(scenario, observations):
    """The case as the judge sees it, verdict included."""
    return scenario, observations, judge(scenario, observations)


GLOO_TIMEOUT = StepOutcome(
    Status.HANG,
    error_type="RuntimeError",
    error_message="[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete",
)


# The near misses, one per record --------------------------------------------------


def eval_forwards_agree(scenario, observations):
    """Rank 1's eval forward takes layer1, as rank 0's does: with no eval
    divergence, units paired silently are a new bug."""
    return rejudged(with_steps(scenario, [0], ranks=[1], path={"branch": (0,)}), observations)


def hang_before_the_deviation(scenario, observations):
    """The ranks hang one step early, in the eval step they agree on: no
    rank had deviated and been warned yet, so nothing was unchecked."""
    return scenario, observations, tuple(replace(v, step=1) for v in judge(scenario, observations))


def eval_forward_without_grad(scenario, observations):
    """The eval forward runs without grad, so it registers no post-backward
    hooks for the refreeze to strand: wrong gradients after it are a new bug."""
    return rejudged(with_steps(scenario, [1], grad_enabled=False), observations)


def node_diverges_internally(scenario, observations):
    """Rank 1 takes layer2 as well, so node 0 disagrees within itself: its
    own intra-node check sees the divergence, and its missing error is a
    new bug (only ranks of internally agreeing nodes are blind)."""
    return rejudged(with_steps(scenario, [0], ranks=[1], path={"branch": (1,)}), observations)


def one_forward_per_iteration(scenario, observations):
    """One forward before each backward, so no unit repeats in an iteration:
    warnings about the unchanged schedule are a new bug."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), forwards=1), observations)


def unit_replaced_not_dropped(scenario, observations):
    """The second iteration takes layer2 instead of skipping the branch: a
    different unit where layer1 was, which FSDP's later check compares, so
    the missing warning is a new bug."""
    return rejudged(with_steps(scenario, [1], path={"branch": (1,)}), observations)


def both_orders_reach_the_divergence(scenario, observations):
    """Rank 1 takes layer2 instead of skipping the branch: both ranks issue
    the check's collectives for position 1, they pair up, and the order
    error must come."""
    return rejudged(with_steps(scenario, [0], ranks=[1], path={"branch": (1,)}), observations)


def parameters_are_not_views(scenario, observations):
    """Without use_orig_params the module's parameters are not views of the
    unsharded flat parameter: setting requires_grad on them must work."""
    return rejudged(with_fsdp(scenario, use_orig_params=False), observations)


def at_detail(scenario, observations):
    """At DETAIL the first-iteration divergence is checked: a silent
    pairing instead of the order error is a new bug."""
    return rejudged(replace(scenario, debug_level="DETAIL"), observations)


def hang_instead_of_key_error(scenario, observations):
    """The ranks hang where the order error was due: the check went wrong,
    but not by looking the flat parameter up."""
    return rejudged(scenario, with_outcome(observations, 0, GLOO_TIMEOUT))


def one_process_group(scenario, observations):
    """Under FULL_SHARD FSDP's group is the world, so the rank it names is
    the global rank: a warning naming another is a new bug."""
    return rejudged(with_fsdp(scenario, sharding_strategy="FULL_SHARD"), observations)


def every_rank_runs_the_backward(scenario, observations):
    """Rank 0 runs the backward too: the ranks' collectives agree, so a
    hang is a new bug."""
    return rejudged(with_steps(scenario, [0], ranks=[0], backward=True), observations)


def every_rank_reduces(scenario, observations):
    """Rank 0 reduces in step 0 too: the ranks' collectives agree, so a hang
    is a new bug."""
    return rejudged(with_steps(scenario, [0], ranks=[0], gradient_sync=True), observations)


def every_rank_freezes_the_unit(scenario, observations):
    """Rank 1 freezes branch0_3 as rank 0 does: the ranks' collectives
    agree, so a hang is a new bug."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), ranks=[1], frozen=("branch0_3",)), observations)


def optimizer_step_before_the_freeze(scenario, observations):
    """Step 0 ends with an optimizer step, so no gradient is waiting when
    step 1 freezes branch1_0: wrong gradients then are a new bug."""
    return rejudged(with_steps(scenario, [0], optimizer_step=True), observations)


def untaken_parameters_stay_trainable(scenario, observations):
    """Without freeze_untaken the skipped unit keeps parameters that require
    grad (unused, which FSDP handles): the state error is a new bug."""
    return rejudged(replace(scenario, freeze_untaken=False), observations)


def optimizer_step_after_the_backward(scenario, observations):
    """The optimizer step moves from step 3 to the end of step 4, after its
    backward: no update comes before step 4's forward, so a wrong output
    there is a new bug."""
    moved = with_steps(with_steps(scenario, [3], optimizer_step=False), [4], optimizer_step=True)
    return rejudged(moved, observations)


def unused_parameters_reduce_scattered(scenario, observations):
    """With set_reduce_scatter_unused_params(True) the two experts in one
    unit are within FSDP2's promise: the same wrong outputs are then a bug."""
    flagged = replace(scenario, fsdp2=replace(scenario.fsdp2, reduce_scatter_unused_params=True))
    return rejudged(flagged, observations)


def resharded_after_backward(scenario, observations):
    """With resharding after backward on (FSDP2's default) the sharded
    parameters, gradients and all, are what the module holds after a
    backward: the same wrong numbers are then a bug of their own."""
    return rejudged(replace(scenario, fsdp2=replace(scenario.fsdp2, reshard_after_backward=True)), observations)


def root_resharded_after_forward(scenario, observations):
    """With reshard_after_forward=True the root is resharded after its
    forward too, so the next forward all-gathers the updated parameters."""
    return rejudged(replace(scenario, fsdp2=replace(scenario.fsdp2, reshard_after_forward=True)), observations)


def unsharded_by_the_forward_itself(scenario, observations):
    """Without the explicit unshard() the path changes while the parameters
    are sharded, as FSDP2 expects."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), unshard=False), observations)


def eval_forward_on_the_training_path(scenario, observations):
    """The eval step runs branch0_0 alone, as the training steps do: FSDP's
    recorded order equals the training order, so the warnings about an
    unchanged schedule are a new bug."""
    return rejudged(with_steps(scenario, [0], path={"branch0": (0,)}), observations)


def eval_step_without_backward(scenario, observations):
    """The eval step runs no backward, so FSDP's first iteration is the first
    training step and its check runs there: a hang instead of the order error
    is a new bug (on live ranks this schedule raises the error)."""
    return rejudged(with_steps(scenario, [0], backward=False), observations)


def every_rank_uses_the_unit(scenario, observations):
    """Rank 1 runs branch0_1 instead of the empty path: branch0 gets a
    gradient on both ranks and both reduce-scatter it, so a crash is a new
    bug (on live ranks this schedule passes)."""
    return rejudged(with_steps(scenario, [0], ranks=[1], path={"branch0": (1,)}), observations)


def same_path_on_every_rank(scenario, observations):
    """Rank 0 takes branch0_0 as rank 1 does: both freeze branch0_1 alone, so
    every shard owner's flag agrees with every rank's gradient, and wrong
    gradients are a new bug (on live ranks this schedule matches)."""
    return rejudged(with_steps(scenario, [0], ranks=[0], path={"branch0": (0,)}), observations)


def eval_step_in_training_mode(scenario, observations):
    """Step 1 runs in training mode on every rank: its forwards are checked,
    so rank 1 reaches the divergence with no unchecked all-gathers between
    and the checks pair up (on live ranks both raise the order error)."""
    return rejudged(with_steps(scenario, [1], mode="train"), observations)


def same_frozen_alternative_on_every_rank(scenario, observations):
    """Rank 1 runs the frozen branch0_1 too: both ranks give branch0's flat
    parameter a gradient and both reduce-scatter it, so a crash is a new bug
    (on live ranks this schedule passes)."""
    return rejudged(with_steps(scenario, [0], ranks=[1], path={"branch0": (1,)}), observations)


def optimizer_step_after_the_next_backward(scenario, observations):
    """The optimizer step moves from the eval step 4 to the end of step 5,
    after its backward: no update comes between a forward and the next
    forward, so a wrong output is a new bug (on live ranks this matches)."""
    moved = with_steps(with_steps(scenario, [4], optimizer_step=False), [5], optimizer_step=True)
    return rejudged(moved, observations)


def one_forward_before_the_backward(scenario, observations):
    """A single forward before each backward: the reentrant recompute runs
    while the unit is still unsharded, so the error is a new bug (on live
    ranks this schedule passes)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), forwards=1), observations)


def tie_inside_one_unit(scenario, observations):
    """Neither block0 nor block1 is a unit of its own, so both share the root
    unit, the arrangement FSDP1 supports: a failure is a new bug (on live
    ranks this matches the reference: corpus/features/fsdp1-tied-within-one-unit.json)."""
    root = scenario.model.root
    children = tuple(
        replace(child, fsdp_unit=False) if getattr(child, "name", None) in ("block0", "block1") else child
        for child in root.children
    )
    model = replace(scenario.model, root=replace(root, children=children))
    return rejudged(replace(scenario, model=model), observations)


def same_freezing_on_every_rank(scenario, observations):
    """Rank 1 freezes the stem in step 0 as rank 0 does: every rank drops
    the same gradient, so a mismatch is a new bug."""
    return rejudged(with_steps(scenario, [0], ranks=[1], frozen=("stem",)), observations)


def peer_fails_otherwise(scenario, observations):
    """Rank 1's step fails with an error of its own instead of hanging: not a
    wait for the refreezing rank, a new bug."""
    failed = StepOutcome(Status.ERROR, error_type="RuntimeError", error_message="something else")
    ranks = list(observations.ranks)
    ranks[1] = replace(ranks[1], steps=tuple(failed if i == 1 else o for i, o in enumerate(ranks[1].steps)))
    return rejudged(scenario, replace(observations, ranks=tuple(ranks)))


def method_registered(scenario, observations):
    """encode is registered with register_fsdp_forward_method: the root's
    hooks run first and it initialises as the root, so the error is a new bug."""
    return rejudged(replace(scenario, fsdp2=replace(scenario.fsdp2, register_encode=True)), observations)


def one_forward_on_every_rank(scenario, observations):
    """Rank 0 runs one forward per step, as its node's peer does: node 0's
    orders agree, so its hang is a new bug."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), ranks=[0], forwards=1), observations)


def one_forward_through_the_region(scenario, observations):
    """One forward before the backward: the region recomputes once, so wrong
    gradients are a new bug (on live ranks this matches)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), forwards=1), observations)


def without_explicit_unshard(scenario, observations):
    """The forward finds the unit sharded, as usual: a checkpoint error is a
    new bug (on live ranks this schedule runs cleanly)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), unshard=False), observations)


def without_mixed_precision_policy(scenario, observations):
    """The same schedule without a MixedPrecisionPolicy: the dtype error is a
    new bug (on live ranks this schedule runs)."""
    return rejudged(replace(scenario, fsdp2=replace(scenario.fsdp2, mp_policy=None)), observations)


def reset_after_the_first_forward(scenario, observations):
    """The reset comes in step 1, after the first forward initialised the
    root: the AttributeError is a new bug (on live ranks this runs)."""
    steps = [[replace(step, reset_iter_state=index == 1) for index, step in enumerate(rank)] for rank in scenario.ranks]
    return rejudged(replace(scenario, ranks=tuple(tuple(rank) for rank in steps)), observations)


def no_freezing_schedule(scenario, observations):
    """block0 stays trainable: the all-reducing backward reduces its partial
    sums, so a gradient mismatch is a new bug (on live ranks this matches)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), frozen=()), observations)


def synced_in_every_step(scenario, observations):
    """Step 0 reduce-scatters as it goes: nothing accumulates unsharded, so
    the assertion is a new bug (on live ranks this schedule runs)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), gradient_sync=True), observations)


def all_reduce_every_backward(scenario, observations):
    """Each backward all-reduces: nothing is deferred, so the size mismatch
    is a new bug (on live ranks this schedule runs)."""
    return rejudged(with_steps(scenario, range(scenario.num_steps), all_reduce=True), observations)


def every_sequential(scenario, **changes):
    """The scenario with ``changes`` made to every Sequential of its model."""
    from fsdp_fuzz.models.spec import Choice, Sequential

    def changed(node):
        if isinstance(node, Sequential):
            return replace(node, **changes, children=tuple(changed(child) for child in node.children))
        if isinstance(node, Choice):
            return replace(node, alternatives=tuple(changed(alternative) for alternative in node.alternatives))
        return node

    return replace(scenario, model=replace(scenario.model, root=changed(scenario.model.root)))


def unit_outside_the_checkpoint(scenario, observations):
    """Without the checkpoint around block0's region nothing recomputes: a
    warning is a new bug (on live ranks this schedule runs silently)."""
    return rejudged(every_sequential(scenario, checkpoint=None), observations)


def eval_forward_without_grad_first(scenario, observations):
    """The eval forward of step 0 runs under no_grad: nothing is set up for a
    backward that never comes, so unreduced gradients are a new bug (on live
    ranks this schedule matches)."""
    return rejudged(with_steps(scenario, [0], grad_enabled=False), observations)


def without_mixed_precision(scenario, observations):
    """The same schedule in float32: a replica drift is a new bug (on live
    ranks this schedule keeps the replicas equal)."""
    return rejudged(with_fsdp(scenario, mixed_precision=None), observations)


def block_runs_once(scenario, observations):
    """The path runs branch0_2 once: one reentrant region per backward, so
    the error is a new bug (on live ranks this passes)."""
    return rejudged(with_steps(scenario, [0], path={"branch0": (2,)}), observations)


def region_is_its_own_unit(scenario, observations):
    """block1, the reentrant region, is its own unit: its backward reshards
    only itself, so an error is a new bug (on live ranks this runs)."""
    from fsdp_fuzz.models.spec import Sequential

    def unit(node):
        if isinstance(node, Sequential):
            own = node.fsdp_unit or node.checkpoint == "reentrant"
            return replace(node, fsdp_unit=own, children=tuple(unit(child) for child in node.children))
        return node

    return rejudged(replace(scenario, model=replace(scenario.model, root=unit(scenario.model.root))), observations)


def every_rank_runs_the_forward(scenario, observations):
    """Rank 1 runs step 1's forward too: every all-gather has its partner,
    so a hang is a new bug (on live ranks this schedule runs cleanly)."""
    return rejudged(with_steps(scenario, [1], ranks=[1], forwards=1), observations)


def alternatives_trainable(scenario, observations):
    """The model freezes nothing: the unit's flat parameter requires grad, so
    the training-state error is a new bug (on live ranks leaving trainable
    alternatives untaken runs cleanly)."""
    return rejudged(every_sequential(scenario, frozen=False), observations)


def sharded_strategy(scenario, observations):
    """FULL_SHARD instead of NO_SHARD: the catch-all reshard restores the
    parameters, so wrong gradients are a new bug (on live ranks this
    schedule matches the reference)."""
    return rejudged(with_fsdp(scenario, sharding_strategy="FULL_SHARD"), observations)


def idle_step_takes_an_alternative(scenario, observations):
    """Step 0 takes branch0_0 too: the unit's post-backward runs, so the
    KeyError is a new bug (on live ranks this schedule runs cleanly)."""
    return rejudged(with_steps(scenario, [0], path={"branch0": (0,)}), observations)


def in_float32(scenario, observations):
    """The same schedule without a MixedPrecision policy: wrong gradients are
    a new bug (on live ranks float32 matches the reference)."""
    return rejudged(with_fsdp(scenario, mixed_precision=None), observations)


VARIANT_NEAR_MISSES = {
    "backward-on-some-ranks-only-frozen-unit": ("backward-on-some-ranks-only", every_rank_freezes_the_unit),
    "mixed-precision-eval-forward-first-skips-gradient-reduction-training-forward": (
        "mixed-precision-eval-forward-first-skips-gradient-reduction",
        eval_forward_without_grad_first,
    ),
    "fsdp2-method-before-forward-makes-a-unit-root-several-roots": (
        "fsdp2-method-before-forward-makes-a-unit-root",
        method_registered,
    ),
    "backward-on-some-ranks-only-no-sync": ("backward-on-some-ranks-only", every_rank_reduces),
    "mixed-precision-eval-forward-first-skips-gradient-reduction-no-shard": (
        "mixed-precision-eval-forward-first-skips-gradient-reduction",
        without_mixed_precision,
    ),
    "frozen-unit-backward-state-error-with-orig-params-frozen-by-the-model": (
        "frozen-unit-backward-state-error-with-orig-params",
        alternatives_trainable,
    ),
    "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params-info-key-error": (
        "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params",
        idle_step_takes_an_alternative,
    ),
    "reentrant-checkpoint-recompute-after-reshard-one-forward": (
        "reentrant-checkpoint-recompute-after-reshard",
        region_is_its_own_unit,
    ),
    "reentrant-checkpoint-recompute-after-reshard-twice-in-one-forward": (
        "reentrant-checkpoint-recompute-after-reshard",
        block_runs_once,
    ),
    "first-iteration-order-ends-early-within-a-node": ("first-iteration-order-ends-early", one_forward_on_every_rank),
    "rank-dependent-freeze-drops-grads-with-orig-params-freezing-schedule": (
        "rank-dependent-freeze-drops-grads-with-orig-params",
        same_freezing_on_every_rank,
    ),
    "refreeze-hits-unsharded-views-peer-hangs": ("refreeze-hits-unsharded-views", peer_fails_otherwise),
    "fsdp1-tie-across-units-with-orig-params": ("fsdp1-tie-across-units", tie_inside_one_unit),
    "first-iteration-order-ends-early-eval-between": (
        "first-iteration-order-ends-early",
        eval_step_in_training_mode,
    ),
    "first-iteration-order-ends-early-eval-between-collective-checker": (
        "first-iteration-order-ends-early",
        eval_step_in_training_mode,
    ),
    "unit-without-gradient-skips-reduce-scatter-frozen-with-orig-params": (
        "unit-without-gradient-skips-reduce-scatter",
        same_frozen_alternative_on_every_rank,
    ),
    "optimizer-step-before-backward-uses-stale-params-eval": (
        "optimizer-step-before-backward-uses-stale-params",
        optimizer_step_after_the_next_backward,
    ),
}
"""Near misses for reproducers that a record was widened to explain, by
reproducer: each undoes the fact the widening keys on."""


NEAR_MISSES = {
    "checkpoint-recompute-recorded-in-first-iteration-order": (
        "checkpoint-recompute-recorded-in-first-iteration-order",
        unit_outside_the_checkpoint,
    ),
    "fsdp2-hsdp-partial-reduction-split-by-reentrant-checkpoint": (
        "fsdp2-hsdp-partial-reduction-split-by-reentrant-checkpoint",
        all_reduce_every_backward,
    ),
    "no-sync-unit-unused-by-the-synced-backward": (
        "no-sync-unit-unused-by-the-synced-backward",
        synced_in_every_step,
    ),
    "fsdp2-reset-iter-state-before-first-forward": (
        "fsdp2-reset-iter-state-before-first-forward",
        reset_after_the_first_forward,
    ),
    "fsdp2-hsdp-partial-reduction-dropped-by-freezing": (
        "fsdp2-hsdp-partial-reduction-dropped-by-freezing",
        no_freezing_schedule,
    ),
    "fsdp2-mixed-precision-unit-frozen-at-first-forward": (
        "fsdp2-mixed-precision-unit-frozen-at-first-forward",
        without_mixed_precision_policy,
    ),
    "fsdp2-reentrant-checkpoint-around-a-unit-loses-gradients": (
        "fsdp2-reentrant-checkpoint-around-a-unit-loses-gradients",
        one_forward_through_the_region,
    ),
    "fsdp2-explicit-unshard-breaks-checkpoint-recompute": (
        "fsdp2-explicit-unshard-breaks-checkpoint-recompute",
        without_explicit_unshard,
    ),
    "mixed-precision-eval-forward-first-skips-gradient-reduction": (
        "mixed-precision-eval-forward-first-skips-gradient-reduction",
        eval_forward_without_grad_first,
    ),
    "fsdp2-method-before-forward-makes-a-unit-root": (
        "fsdp2-method-before-forward-makes-a-unit-root",
        method_registered,
    ),
    "reentrant-checkpoint-recompute-after-reshard": (
        "reentrant-checkpoint-recompute-after-reshard",
        one_forward_before_the_backward,
    ),
    "mixed-precision-reentrant-checkpoint-around-a-unit-loses-gradients": (
        "mixed-precision-reentrant-checkpoint-around-a-unit-loses-gradients",
        in_float32,
    ),
    "fsdp1-tie-across-units": ("fsdp1-tie-across-units", tie_inside_one_unit),
    "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params": (
        "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params",
        sharded_strategy,
    ),
    "eval-forwards-recorded-in-first-iteration-order": (
        "eval-forwards-recorded-in-first-iteration-order",
        eval_forward_on_the_training_path,
    ),
    "eval-backward-ends-first-iteration": ("eval-backward-ends-first-iteration", eval_step_without_backward),
    "unit-without-gradient-skips-reduce-scatter": (
        "unit-without-gradient-skips-reduce-scatter",
        every_rank_uses_the_unit,
    ),
    "rank-dependent-freeze-drops-grads-with-orig-params": (
        "rank-dependent-freeze-drops-grads-with-orig-params",
        same_path_on_every_rank,
    ),
    "fsdp2-optimizer-step-after-forward-uses-stale-params": (
        "fsdp2-optimizer-step-after-forward-uses-stale-params-eval",
        root_resharded_after_forward,
    ),
    "fsdp2-requires-grad-change-while-unsharded-loses-gradients": (
        "fsdp2-requires-grad-change-while-unsharded-loses-gradients-explicit-unshard",
        unsharded_by_the_forward_itself,
    ),
    "fsdp2-reshard-after-backward-off-loses-the-optimizer-step": (
        "fsdp2-reshard-after-backward-off-loses-the-optimizer-step",
        resharded_after_backward,
    ),
    "fsdp2-assumes-the-same-program": ("fsdp2-assumes-the-same-program-experts", unused_parameters_reduce_scattered),
    "eval-order-unchecked": ("eval-order-unchecked-full_shard-silent", eval_forwards_agree),
    "unchecked-after-deviation": ("unchecked-after-deviation-full_shard", hang_before_the_deviation),
    "refreeze-after-forward-without-backward": (
        "refreeze-after-forward-without-backward-shard_grad_op-silent",
        eval_forward_without_grad,
    ),
    "hybrid-order-check-intra-node-only": ("hybrid-order-check-intra-node-only", node_diverges_internally),
    "later-check-ignores-repeats": ("later-check-ignores-repeats", one_forward_per_iteration),
    "later-check-misses-dropped-units": ("later-check-misses-dropped-units", unit_replaced_not_dropped),
    "first-iteration-order-ends-early": ("first-iteration-order-ends-early", both_orders_reach_the_divergence),
    "refreeze-hits-unsharded-views": ("refreeze-hits-unsharded-views", parameters_are_not_views),
    "order-unchecked-below-detail": ("order-unchecked-below-detail", at_detail),
    "order-error-key-error-with-orig-params": ("order-error-key-error-with-orig-params", hang_instead_of_key_error),
    "hybrid-warning-names-intra-node-rank": ("hybrid-warning-names-intra-node-rank", one_process_group),
    "backward-on-some-ranks-only": ("backward-on-some-ranks-only", every_rank_runs_the_backward),
    "forward-on-some-ranks-only": ("forward-on-some-ranks-only", every_rank_runs_the_forward),
    "refreeze-drops-accumulated-grads-with-orig-params": (
        "refreeze-drops-accumulated-grads-with-orig-params",
        optimizer_step_before_the_freeze,
    ),
    "frozen-unit-backward-state-error-with-orig-params": (
        "frozen-unit-backward-state-error-with-orig-params",
        untaken_parameters_stay_trainable,
    ),
    "optimizer-step-before-backward-uses-stale-params": (
        "optimizer-step-before-backward-uses-stale-params",
        optimizer_step_after_the_backward,
    ),
}


# The tests ------------------------------------------------------------------------


def test_every_known_issue_is_tested_both_ways():
    """A new record fails here until it has a reproducer and a near miss."""
    assert set(NEAR_MISSES) == set(KNOWN_ISSUES)
    assert {name for name, _ in POSITIVES} == set(KNOWN_ISSUES)
    for name, (stem, _) in NEAR_MISSES.items():
        assert stem in reproducers(name), f"{name}'s near miss must start from one of its reproducers"


@pytest.mark.parametrize("name, stem", [pytest.param(name, stem, id=stem) for name, stem in POSITIVES])
def test_a_reproducer_triages_to_its_known_issue(recorded, name, stem):
    scenario, observations = recorded(stem)
    violations = judge(scenario, observations)
    assert violations, "a reproducer breaks the contract"
    assert triage(scenario, observations, violations).name == name
    explains_all = KNOWN_ISSUES[name].explains(scenario, observations, violations)
    if stem in TWO_ISSUE_CASES:
        assert not explains_all, "in a two-issue case the other record explains some violations"
    else:
        assert explains_all, "triage must name the record for its own reason, not by elimination"


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_a_near_miss_does_not_triage_to_the_known_issue(recorded, name):
    stem, near_miss = NEAR_MISSES[name]
    assert_near_miss(recorded, name, stem, near_miss)


@pytest.mark.parametrize("stem", sorted(VARIANT_NEAR_MISSES))
def test_a_variant_near_miss_does_not_triage_to_the_known_issue(recorded, stem):
    name, near_miss = VARIANT_NEAR_MISSES[stem]
    assert stem in reproducers(name), f"{stem} must be one of {name}'s reproducers"
    assert_near_miss(recorded, name, stem, near_miss)


def assert_near_miss(recorded, name, stem, near_miss):
    scenario, observations = recorded(stem)
    original = (scenario, observations, judge(scenario, observations))
    scenario, observations, violations = near_miss(scenario, observations)
    assert (scenario, observations, violations) != original, "a near miss changes a fact"
    assert violations, "a near miss still breaks the contract"
    assert not KNOWN_ISSUES[name].explains(scenario, observations, violations)
    triaged = triage(scenario, observations, violations)
    assert triaged is None or triaged.name != name
