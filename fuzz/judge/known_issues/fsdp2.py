"""The records of FSDP2 (``fully_shard``) misbehaviours, by priority, each
with the facts only it reads."""

from __future__ import annotations

from fsdp_fuzz.data import Clause, Observations, Scenario, Violation
from fsdp_fuzz.data import ViolationKind as Kind
from fsdp_fuzz.features import DIVERGENCE, FREEZES_AFTER_WRAPPING, FREEZING, checkpoint, either, needs, setting
from fsdp_fuzz.features import step as step_feature
from fsdp_fuzz.judge.known_issues.facts import (
    all_failed_with,
    checkpointed_region_holds_a_unit,
    freezes_after_wrapping,
    reentrant_runs_since_backward,
)
from fsdp_fuzz.judge.known_issues.registry import Relation, Upstream, known_issue
from fsdp_fuzz.judge.orders import fsdp2_promises
from fsdp_fuzz.models.spec import CHECKPOINT_MODES, Sequential, taken


@known_issue(
    "fsdp2-assumes-the-same-program",
    priority=5,
    trigger=needs(DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        FSDP2 (fully_shard) checks nothing about the forward paths of the ranks: it assumes every rank runs the
        same program, and with set_reduce_scatter_unused_params(True) at most different parameters inside the
        same units. Ranks that diverge otherwise (another unit, another order, a skipped backward, gradient sync
        or an explicit unshard on some ranks only) pair the collectives of different units: a hang, a crash, or
        silently wrong outputs and gradients, with no error naming the cause. By design; the fuzzer still
        records what happened.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#152964",
            "'FSDP2 assumes SPMD on every rank, meaning every rank needs to call forward/backward'; the maintainer: "
            "'I would recommend requiring users to make their programs SPMD'",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#148334",
            "an encoder that runs on some ranks only hangs in its all-gather; users add dummy forwards and backwards",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#158719",
            "parameters used differently across ranks (mixture of experts, conditional computation) hang; the fix "
            "discussion is on FSDP2's parameter groups",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#171355",
            "the issue that the open fix #174862 names: Qwen3-style mixture-of-experts models take different forward "
            "paths on different ranks, so the reduce-scatter inputs differ in size and the collective completes with "
            "wrong gradients (from #174862's description; the issue itself is not in the search index)",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#196996",
            "named in the fuzzer's tracker as a user report of hangs or wrong gradients under rank-divergent control "
            "flow; not in the search index, so unverified",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#174862",
            "an open fix ('Fixes #171355'): ranks of a mixture-of-experts model whose forward paths differ feed "
            "reduce-scatter inputs of different sizes, and 'the collective completes but sends incorrect "
            "weights/gradients'; it pads the missing gradients with zeros. torch 2.13 offers the padding as an "
            "opt-in, set_reduce_scatter_unused_params(True), the promise this record's predicate respects",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _fsdp2_divergence_outside_its_promise(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return not fsdp2_promises(scenario)


@known_issue(
    "fsdp2-reshard-after-backward-off-loses-the-optimizer-step",
    priority=160,
    trigger=needs(setting("reshard_after_backward")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        With set_reshard_after_backward(False), the parameters registered on the module after a backward are the
        unsharded ones, without gradients: the reduced gradients sit on the sharded parameters, which
        module.parameters() no longer returns (gradient clipping or inspection finds none). An optimizer step
        then updates the sharded parameters, but the next forward computes with the stale unsharded copy: the
        update is silently lost, the outputs differ from a single-process run, with no error or warning, the
        same program on every rank. Found by the first FSDP2 campaign (clause 4); the setter's own PR shows it
        switched off for all but the last microbatch of gradient accumulation, and nothing stops other uses.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#124319",
            "the PR adding set_reshard_after_backward: meant to be False only before the last microbatch (with "
            "set_requires_gradient_sync); nothing guards an optimizer step after a backward with it off",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#137348",
            "an unshard without a wait made the next unshard a no-op that 'can unexpectedly not propagate the "
            "optimizer update on the sharded parameters to the unsharded parameters'; fixed for that path",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#144800",
            "set_unshard_in_backward(False) with parameters left unsharded after forward gives misleading state",
            Relation.RELATED,
        ),
    ),
)
def _reshard_after_backward_off(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Only numbers against the reference, after a backward, with resharding after backward off."""
    if scenario.fsdp2.reshard_after_backward:
        return False

    def after_a_backward(step: int) -> bool:
        return any(steps[index].backward for steps in scenario.ranks for index in range(step + 1))

    return all(v.clause == Clause.REFERENCE and after_a_backward(v.step) for v in violations)


def _stepped_after_a_forward_without_backward(scenario: Scenario, step: int) -> bool:
    """Before ``step``, an optimizer step came after a forward, in either
    mode, that no backward followed."""
    for rank_steps in scenario.ranks:
        pending = False
        for current in rank_steps[:step]:
            if current.forwards:
                pending = not current.backward
            if pending and current.optimizer_step:
                return True
    return False


@known_issue(
    "fsdp2-optimizer-step-after-forward-uses-stale-params",
    priority=170,
    trigger=needs(step_feature("optimizer_step")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        FSDP2's counterpart of optimizer-step-before-backward-uses-stale-params, wider: the root unit is not
        resharded after its forward (reshard_after_forward left at its default), in training and in eval mode.
        An optimizer step after a forward that no backward followed updates the sharded parameters, and the next
        forward computes with the stale unsharded copy: outputs and gradients silently differ from a
        single-process run, every rank running the same program. Found by the first FSDP2 campaign (clause 4),
        twice: after a training forward without backward, and after an eval forward.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#131965",
            "'after forward before backward, root module parameters are unsharded ... want to confirm if this is by "
            "design' (torchtune), the precondition of this record",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#154655",
            "fully_shard(root, reshard_after_forward=True) did not reshard the root after forward; the maintainers "
            "agreed to stop clamping it to False",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#144289",
            "a maintainer: FSDP2 was designed so that sharded parameters updated by the user are always "
            "re-all-gathered, unlike FSDP1; this record is a case where they are not",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#155319",
            "'[FSDP2] keep root unsharded when not specifying reshard_after_forward' (closed after its merge command): "
            "fully_shard(model) "
            "without reshard_after_forward keeps the root unsharded after forward, an explicit value is respected: "
            "the default that leaves this record's stale copy",
            Relation.BY_DESIGN,
        ),
    ),
)
def _fsdp2_stepped_while_the_root_is_unsharded(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.fsdp2.reshard_after_forward is True:
        return False
    return all(
        v.clause == Clause.REFERENCE and _stepped_after_a_forward_without_backward(scenario, v.step) for v in violations
    )


def _thawed_while_unsharded(scenario: Scenario, step: int) -> bool:
    """Up to ``step``, a step changes the path (so ``freeze_untaken`` changes
    ``requires_grad``) while the units are unsharded: after an explicit
    ``unshard()`` in the same step, or after a step that left them unsharded
    (a forward without backward and without resharding after forward, a
    backward without resharding after backward)."""
    resharded_after_forward = scenario.fsdp2.reshard_after_forward is True
    resharded_after_backward = scenario.fsdp2.reshard_after_backward

    def runs(path) -> dict[str, frozenset[int]]:
        return {choice.name: frozenset(taken(path, choice.name)) for choice in scenario.model.choices()}

    for rank_steps in scenario.ranks:
        previous, unsharded = (runs({}), frozenset()), False
        for current in rank_steps[: step + 1]:
            state = (runs(current.path) if scenario.freeze_untaken else {}, frozenset(current.frozen))
            if (unsharded or current.unshard) and state != previous:
                return True
            previous = state
            kept_after_forward = current.forwards and not current.backward and not resharded_after_forward
            kept_after_backward = current.backward and not resharded_after_backward
            unsharded = not current.reshard and bool(
                kept_after_forward or kept_after_backward or (current.unshard and not current.forwards)
            )
    return False


@known_issue(
    "fsdp2-requires-grad-change-while-unsharded-loses-gradients",
    priority=180,
    trigger=needs(FREEZES_AFTER_WRAPPING),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        While a unit is unsharded (after an explicit unshard(), or after a forward that did not reshard it:
        reshard_after_forward=False, or the root by default), its module holds the unsharded parameters; making
        some of them trainable then (requires_grad=True, as the seed's flip_path does) gives them no reduced
        gradient: the ranks' gradients silently differ from a single-process run, every rank running the same
        program. With the parameters sharded, or without the requires_grad change, the same step matches. Found
        twice by the first FSDP2 campaigns (clause 4). FSDP1's counterpart is refreeze-hits-unsharded-views, which
        at least raises an error.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#105371",
            "FSDP1 with SHARD_GRAD_OP: requires_grad changes made while the unsharded views are registered were lost; "
            "the same hazard under fully_shard",
            Relation.RELATED,
        ),
    ),
)
def _fsdp2_thawed_while_unsharded(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not freezes_after_wrapping(scenario):
        return False
    return all(v.clause == Clause.REFERENCE and _thawed_while_unsharded(scenario, v.step) for v in violations)


LAZY_ROOT_ERROR = "FSDP state has already been lazily initialized for "
SEVERAL_ROOTS_ERROR = "FSDP requires a single root module but got "
"""When the method's units became roots and the real root has no parameters of its own."""


def _method_ran_before_the_root(scenario: Scenario) -> bool:
    """Some rank's first call into the model is an unregistered method
    other than ``forward``: the units it runs initialise without the root,
    whether or not every unit was explicitly unsharded first."""
    if scenario.fsdp2.register_encode:
        return False
    for steps in scenario.ranks:
        first = next((step for step in steps if step.forwards), None)
        if first is not None and first.method != "forward":
            return True
    return False


@known_issue(
    "fsdp2-method-before-forward-makes-a-unit-root",
    priority=250,
    trigger=needs(step_feature("method")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        FSDP2 makes root whichever fully_shard module runs first. A method other than forward that is not
        registered with register_fsdp_forward_method and runs only nested units (here encode, whose stages are
        units of their own), called before the first forward, runs and even trains cleanly with a nested unit as
        its own root; the next forward through the real root then fails on every rank with RuntimeError 'FSDP
        state has already been lazily initialized for <unit>'. Where the root has no parameters of its own, the
        method's first backward already fails, with 'FSDP requires a single root module but got (...)'.
        Registering the method, or one forward first, avoids it; nothing at the first call says so.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#117881",
            "FSDP2's lazy initialisation: 'the root FSDP module is the one whose forward runs first and ends last'",
            Relation.BY_DESIGN,
        ),
    ),
)
def _fsdp2_method_before_forward_makes_a_unit_root(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not _method_ran_before_the_root(scenario):
        return False
    return any(
        all_failed_with(observations, violations, (Kind.STEP_FAILED,), "RuntimeError", words)
        for words in (LAZY_ROOT_ERROR, SEVERAL_ROOTS_ERROR)
    )


@known_issue(
    "fsdp2-reentrant-checkpoint-around-a-unit-loses-gradients",
    priority=270,
    trigger=needs(checkpoint("reentrant")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        Under fully_shard, a block checkpointed with torch.utils.checkpoint(use_reentrant=True) that holds a
        nested FSDP unit, run twice before one backward (two forwards): the gradients come out silently wrong on
        every rank (the recomputes run the nested unit's forward inside backward, where its hooks see the
        backward's state), with no error or warning. One forward, non-reentrant checkpointing, or no unit inside
        the region match the reference. FSDP1's counterpart, reentrant-checkpoint-recompute-after-reshard, at
        least raises.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#171779",
            "FSDP2 fix (closed) for nested FSDP with activation checkpointing and several forwards before the "
            "backward: a nested unit's post_backward reshards before another recompute needs it ('got mixed "
            "torch.Tensor and DTensor', fixes #153354): same trigger; on torch 2.13 the reentrant variant is silent",
            Relation.RELATED,
        ),
        Upstream(
            "NVIDIA/Megatron-LM#6323",
            "'with reentrant activation checkpointing, a child module can begin its recomputed forward before that "
            "child module's backward-pre hook runs'; PyTorch FSDP2 is said to handle the ordering by checking for an "
            "active autograd GraphTask: the same hazard; here the check does not cover two regions",
            Relation.RELATED,
        ),
        Upstream(
            "facebookresearch/fairscale#617",
            "FSDP and checkpoint_wrapper with multiple forward passes through sub-modules: same trigger in "
            "fairscale's FSDP",
            Relation.RELATED,
        ),
    ),
)
def _fsdp2_reentrant_checkpoint_around_a_unit(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not checkpointed_region_holds_a_unit(scenario.model, ("reentrant",)):
        return False
    numbers = (Kind.GRADIENT_MISMATCH, Kind.OUTPUT_MISMATCH, Kind.REPLICAS_DIVERGED)
    return all(
        v.step is not None and v.kind in numbers and reentrant_runs_since_backward(scenario, v.rank, v.step) >= 2
        for v in violations
    )


CHECKPOINT_MISMATCH = "torch.utils.checkpoint: A different number of tensors was saved"


@known_issue(
    "fsdp2-explicit-unshard-breaks-checkpoint-recompute",
    priority=280,
    trigger=needs(step_feature("unshard"), either(*map(checkpoint, CHECKPOINT_MODES))),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        Under fully_shard, an explicit unshard() before a forward through a unit that holds a block checkpointed
        without reentrancy makes the recompute in backward save a different number of tensors than the forward
        did: CheckpointError 'torch.utils.checkpoint: A different number of tensors was saved during the original
        forward and recomputation' on every rank (the forward found the parameters unsharded and skipped the
        all-gather; the recompute, after the unit resharded, does not). Without the explicit unshard the same
        step runs cleanly.
    """,
    upstream=(),
)
def _fsdp2_explicit_unshard_breaks_checkpoint_recompute(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    checkpointed = any(isinstance(node, Sequential) and node.checkpoint for node in scenario.model.named())
    if not checkpointed:
        return False

    def explained(violation: Violation) -> bool:
        if violation.step is None or not scenario.ranks[violation.rank][violation.step].unshard:
            return False
        return all_failed_with(observations, (violation,), (Kind.STEP_FAILED,), "CheckpointError", CHECKPOINT_MISMATCH)

    return all(explained(violation) for violation in violations)


GRAD_DTYPE_ERROR = "attempting to assign a gradient with dtype"


@known_issue(
    "fsdp2-mixed-precision-unit-frozen-at-first-forward",
    priority=290,
    trigger=needs(setting("mp_policy"), FREEZES_AFTER_WRAPPING),
    seen_on=("2.13.0",),
    fixed_in="2.14.1",
    engines=("fsdp2",),
    description="""
        Under fully_shard with a MixedPrecisionPolicy, a unit whose parameters are all frozen during the first
        forward (lazy initialisation) takes no reduce dtype; once they are unfrozen (as freeze_untaken or a
        freezing schedule does), the next backward fails on every rank with RuntimeError 'attempting to assign a
        gradient with dtype BFloat16 to a tensor with grad_dtype Float'. Trainable at the first forward, or
        without mixed precision, the same schedule runs.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#186998",
            "'[FSDP2] Mixed precision breaks after unfreezing when the first forward ran with requires_grad=False "
            "(RuntimeError at backward)', the same error and trigger; closed with the fix #187376, which torch 2.13 "
            "does not have (the reproducer fails there)",
            Relation.SAME_BUG,
        ),
    ),
)
def _fsdp2_mixed_precision_unit_frozen_at_first_forward(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.fsdp2.mp_policy is None or not freezes_after_wrapping(scenario):
        return False
    return all_failed_with(observations, violations, (Kind.STEP_FAILED,), "RuntimeError", GRAD_DTYPE_ERROR)


COMM_CONTEXT_NOT_READY = "'FSDPCommContext' object has no attribute"


def _resets_before_initialisation(scenario: Scenario, rank: int, step: int) -> bool:
    """The rank's step ``step`` resets FSDP2's iteration state before any
    forward or explicit unshard (which lazily initialise the root)."""
    steps = scenario.ranks[rank]
    first = next((index for index, current in enumerate(steps) if current.forwards or current.unshard), None)
    return steps[step].reset_iter_state and (first is None or step <= first)


@known_issue(
    "fsdp2-reset-iter-state-before-first-forward",
    priority=300,
    trigger=needs(step_feature("reset_iter_state")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        FSDPModule.reset_iter_state() on the root before its first forward (before FSDP2's lazy initialisation)
        raises AttributeError "'FSDPCommContext' object has no attribute 'all_gather_state'" on every rank that
        calls it: the reset waits on communication state that only the first forward creates. Documented as the
        recovery step after a failed forward or backward, it is also what a training loop calls defensively at
        the top of each iteration; from the second step on the same call runs cleanly. Found by the first
        campaign over FSDP2's remaining settings.
    """,
)
def _fsdp2_reset_iter_state_before_first_forward(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    kinds = (Kind.STEP_FAILED, Kind.REFUSAL_MISSING)
    if not all(v.step is not None and _resets_before_initialisation(scenario, v.rank, v.step) for v in violations):
        return False
    return all_failed_with(observations, violations, kinds, "AttributeError", COMM_CONTEXT_NOT_READY)


def _partial_reduction_then_freeze(scenario: Scenario, step: int) -> bool:
    """Before ``step``, a backward without HSDP's all-reduce left partial
    reductions pending, and a freezing change came before the backward that
    all-reduces them."""
    for rank_steps in scenario.ranks:
        pending: set[str] | None = None
        for current in rank_steps[: step + 1]:
            if pending is not None and set(current.frozen) - pending:
                return True
            if current.backward:
                pending = set(current.frozen) if not current.all_reduce else None
    return False


@known_issue(
    "fsdp2-hsdp-partial-reduction-dropped-by-freezing",
    priority=310,
    trigger=needs(setting("hsdp"), step_feature("all_reduce"), FREEZING),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        HSDP gradient accumulation with set_requires_all_reduce(False) keeps each unit's reduce-scattered
        partial sums until the backward that all-reduces them. Freeze a block between the two (a freezing
        schedule, as fine-tuning recipes switch) and its partial sums never reach its gradients: the
        all-reducing backward skips the frozen unit, so the optimizer steps without the accumulated microbatch
        and the gradients silently differ from a single-process run on every rank. The other accumulation mode,
        set_requires_gradient_sync(False), keeps the same block's accumulated gradients through the same freeze.
        Found by the first campaign over FSDP2's remaining settings.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#126166",
            "the PR that added set_requires_all_reduce for HSDP: partial sums are kept and added before the "
            "all-reduce of the last microbatch, the promise this record finds broken",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#194628",
            "'the two no-sync modes take different code paths and only the first was covered': the HSDP partial "
            "sums' own accumulation path, fixed there for precision, not for freezing",
            Relation.RELATED,
        ),
    ),
)
def _fsdp2_hsdp_partial_reduction_dropped_by_freezing(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not scenario.fsdp2.hsdp:
        return False
    return all(
        v.clause == Clause.REFERENCE and v.step is not None and _partial_reduction_then_freeze(scenario, v.step)
        for v in violations
    )


SIZE_MISMATCH = "The size of tensor a ("


def _partial_reduction_pending(scenario: Scenario, rank: int, step: int) -> bool:
    """Up to ``step``, the rank's backward since its last all-reducing one
    ran without HSDP's all-reduce (``step``'s own included)."""
    for current in reversed(scenario.ranks[rank][: step + 1]):
        if current.backward:
            if not current.all_reduce:
                return True
            if current is not scenario.ranks[rank][step]:
                return False
    return False


@known_issue(
    "fsdp2-hsdp-partial-reduction-split-by-reentrant-checkpoint",
    priority=330,
    trigger=needs(setting("hsdp"), step_feature("all_reduce"), checkpoint("reentrant")),
    seen_on=("2.13.0", "2.14.1"),
    engines=("fsdp2",),
    description="""
        HSDP with set_requires_all_reduce(False), a unit holding a block checkpointed with
        torch.utils.checkpoint(use_reentrant=True), and two or more forwards before one backward: the reentrant
        recompute splits the unit's gradient reduction into parts over different parameters, and FSDP2 adds each
        part to the one partial-sum buffer it keeps per unit for the deferred all-reduce, so the backward fails on
        every rank with RuntimeError 'The size of tensor a (8) must match the size of tensor b (18)'. With the
        all-reduce on (the parts are reduced one by one), one forward, or non-reentrant checkpointing, the same
        schedule runs. Found by the fuzz targets' ci profile over FSDP2's remaining settings.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#126166",
            "the PR that added set_requires_all_reduce: one partial_reduce_output per parameter group, added to on "
            "each microbatch, assumes one reduction of the same parameters per backward",
            Relation.RELATED,
        ),
    ),
)
def _fsdp2_hsdp_partial_reduction_split_by_reentrant_checkpoint(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    reentrant = any(getattr(node, "checkpoint", None) == "reentrant" for node in scenario.model.named())
    if not (scenario.fsdp2.hsdp and reentrant):
        return False

    def explained(violation: Violation) -> bool:
        if violation.kind != Kind.STEP_FAILED or violation.step is None:
            return False
        outcome = observations.ranks[violation.rank].steps[violation.step]
        return (
            outcome.failed_with("RuntimeError", SIZE_MISMATCH)
            and _partial_reduction_pending(scenario, violation.rank, violation.step)
            and reentrant_runs_since_backward(scenario, violation.rank, violation.step) >= 2
        )

    return all(explained(violation) for violation in violations)
