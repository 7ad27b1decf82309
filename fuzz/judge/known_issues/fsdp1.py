"""The records of FSDP1 (``FullyShardedDataParallel``) misbehaviours, by
priority, each with the facts only it reads."""

from __future__ import annotations

from dataclasses import replace

from fsdp_fuzz.data import Clause, Observations, Scenario, Status, Violation
from fsdp_fuzz.data import ViolationKind as Kind
from fsdp_fuzz.engines import HYBRID_NODE_SIZE
from fsdp_fuzz.engines.fsdp1 import HYBRID_STRATEGIES
from fsdp_fuzz.features import (
    DIVERGENCE,
    FREEZES_AFTER_WRAPPING,
    FROZEN_BLOCKS,
    TIES,
    Feature,
    Scope,
    checkpoint,
    either,
    needs,
    setting,
)
from fsdp_fuzz.features import step as step_feature
from fsdp_fuzz.judge.known_issues.facts import (
    MONITORED_BARRIER,
    all_failed_with,
    checkpointed_region_holds_a_unit,
    failures_from,
    freezes_after_wrapping,
    gradients_wrong_after,
    path_changed_while,
    reentrant_runs_since_backward,
)
from fsdp_fuzz.judge.known_issues.registry import Relation, Upstream, known_issue
from fsdp_fuzz.judge.oracles import LATER_WARNING, expectations
from fsdp_fuzz.judge.orders import (
    Divergence,
    deviates,
    eval_divergence_step,
    first_iteration_divergence,
    forward_units,
    iterations,
)
from fsdp_fuzz.models.spec import (
    CHECKPOINT_MODES,
    Choice,
    Linear,
    ModelSpec,
    Norm,
    Path,
    Sequential,
    blocks_below,
    taken,
    unit_numel,
)


@known_issue(
    "eval-order-unchecked",
    priority=10,
    trigger=needs(step_feature("mode"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP does not check the forward order in eval mode, so ranks whose eval forwards use different units pair
        the all-gathers of different units without any error or warning: with equal numel and the same sharding
        state the results are silently wrong; otherwise (e.g. SHARD_GRAD_OP, where one rank's unit is still
        unsharded) gloo aborts the process ('Received data size doesn't match expected size') or the ranks hang.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#76949",
            "users evaluating an FSDP model got order warnings for every eval forward; the fix, #77195, removed all "
            "checking in eval mode ('without a backward pass, there is no reliable way to know the end of an "
            "iteration')",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "huggingface/transformers#30228",
            "generate() under FSDP deadlocks when ranks get batches of different sizes ('the different ranks will "
            "pause on different synchronization points'); worked around downstream by synced_gpus=True "
            "(transformers#33483); cross-posted as pytorch/pytorch#100069",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#101335",
            "FSDP training with the Seq2SeqTrainer gets stuck during evaluation; the maintainer points at generate() "
            "running outside forward, so FSDP never all-gathers: the symptom, likely another cause",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _eval_divergence_fails(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    """After an unchecked eval divergence the ranks' collectives are out of
    step, so any later clause may fail (a crash where the first-iteration
    error was due, say); an order warning in eval is a different bug."""
    start = eval_divergence_step(scenario)
    return start is not None and all(
        v.clause != Clause.EVAL_SILENCE and v.step is not None and v.step >= start for v in violations
    )


@known_issue(
    "unchecked-after-deviation",
    priority=20,
    trigger=needs(DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        Once a rank's forward order deviates from its first iteration, FSDP warns that rank and checks nothing
        more: ranks whose later orders differ pair the collectives of different units, silently when numel and
        sharding state agree, and hang otherwise (seen when an eval step precedes the diverging training step,
        with FULL_SHARD and SHARD_GRAD_OP). The warning says collectives 'may give incorrect results or hang'; no
        rank gets an error.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#75373",
            "the RFC behind the check: later orders are only warned about ('they are not validated to be the same "
            "across ranks')",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#83868",
            "'in multimodal training ... some modules go unused in certain iterations': the later-iteration detail "
            "was moved to debug mode",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "facebookresearch/fairscale#796",
            "LayerDrop with per-layer FSDP hangs when ranks skip different layers; the maintainer: 'This may not be "
            "easy to detect in FSDP'",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "huggingface/transformers#37186",
            "Qwen-VL training hangs when some ranks' batches hold no images (the vision tower runs on some ranks "
            "only), 'although I would expect it to error out'",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _fails_after_deviation_warning(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    warned_from = [min(e.warning_steps) for e in expectations(scenario) if e.warning_steps]
    return failures_from(min(warned_from, default=None), violations)


HOOK_STATE_ASSERT = "Invalid: ``_post_backward_hook_state``"


def _refrozen_after_forward_without_backward(scenario: Scenario, step: int) -> bool:
    """A path change after a forward with grad that no backward followed."""

    def pending(holds: bool, step) -> bool:
        return False if step.backward else holds or bool(step.forwards and step.grad_enabled)

    return path_changed_while(scenario, step, pending)


@known_issue(
    "refreeze-after-forward-without-backward",
    priority=30,
    trigger=needs(FREEZES_AFTER_WRAPPING),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        A forward with grad enabled registers a post-backward hook on each trainable unit. If no backward follows
        (an eval forward, as in the seed's train/eval test) and the user then freezes that unit
        (requires_grad=False, as the seed's flip_path does) before the next backward, FSDP's _finalize_params
        asserts 'Invalid: ``_post_backward_hook_state``' on every rank. With SHARD_GRAD_OP and
        use_orig_params=True the same schedule raises nothing and the next backward's gradients are silently
        wrong instead (2% off the reference in the nightly finding). No divergence is involved: all ranks run
        the same schedule.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#104186",
            "fixes #104148 (unfreezing parameters after n steps): post-backward hook state was not cleared for "
            "requires_grad=False; this record's eval-forward variant is not covered",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#105369",
            "hooks registered in a no_grad step are left behind and the next step fails in run_backward",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/xla#5484",
            "XLA's FSDP kept frozen parameters gathered after backward because post-backward hooks do not fire for "
            "requires_grad=False; the PR's author: freeze before sharding, setting requires_grad after wrapping may "
            "not behave as expected",
            Relation.RELATED,
        ),
        Upstream(
            "facebookresearch/fairscale#761",
            "a fairscale PR (for fairscale#758): parameters frozen after wrapping never get their post-backward "
            "hooks, ending in a training-state assertion",
            Relation.RELATED,
        ),
    ),
)
def _refreeze_after_forward_without_backward(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """The assertion, or (SHARD_GRAD_OP with use_orig_params) gradients that
    are silently wrong after such a refreeze."""
    if not freezes_after_wrapping(scenario):
        return False
    if all_failed_with(observations, violations, (Kind.STEP_FAILED,), "AssertionError", HOOK_STATE_ASSERT):
        return True
    return scenario.fsdp.use_orig_params and gradients_wrong_after(
        scenario, violations, _refrozen_after_forward_without_backward
    )


@known_issue(
    "hybrid-order-check-intra-node-only",
    priority=40,
    trigger=needs(setting("sharding_strategy"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With HYBRID_SHARD or _HYBRID_SHARD_ZERO2, FSDP validates the first-iteration forward order over the
        intra-node (sharding) group only (_exec_order_data.init gets state.process_group), so ranks that agree
        within their node are never told that another node's order differs. When every node agrees internally,
        no rank raises and the inter-node all-reduce pairs the gradients of different units of equal numel:
        replicas silently drift apart. When one node diverges internally, its ranks raise while the other nodes
        go on into backward and hang in the inter-node all-reduce.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#108331",
            "HSDP's sync_module_states broadcast ran over the intra-node group only, so other nodes never got rank "
            "0's weights ('broadcast semantics over only the sharding process group is an issue'): the same pattern "
            "in another feature; no report of the order check itself was found",
            Relation.RELATED,
        ),
    ),
)
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
        if v.kind == Kind.UNITS_PAIRED or (v.clause == Clause.FIRST_ITERATION and v.rank in blind):
            return True
        # The diverging node's own error, worded as order-error-key-error-with-orig-params words it.
        return _order_error_raises_key_error(scenario, observations, (v,))

    return all(explained(v) for v in violations)


@known_issue(
    "later-check-ignores-repeats",
    priority=50,
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP records each unit's first use only in the first iteration and then compares every later pre-forward
        against that list. When a unit runs more than once per iteration (several forwards before a backward, or
        a branch repeated in one forward), an unchanged schedule is warned about ('Expected to not all-gather any
        more parameters'), and a change in how often units repeat (two forwards, then one) is not warned about.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#84175",
            "TRL with accelerate's FSDP, several forwards and generate() per step after a dummy forward, warns "
            "'Forward order differs'; the maintainer blames the dummy forward being counted in the first iteration; "
            "the user believes it warns with a uniform schedule too ('I need to verify this'), which was never "
            "confirmed: the cause in that thread is not this record's",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "facebookresearch/fairscale#1056",
            "the same user's report, filed on fairscale first, with no diagnosis",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "meta-pytorch/torchtune#513",
            "LoRA distributed fine-tuning warns 'Forward order differs from that of the first iteration' ('Expected "
            "to not all-gather any more parameters ... lora_b') for every layer and rank; closed once the recipe was "
            "rewritten (torchtune#514: 'bugs which we don't know about (see #513)'), no cause named",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _later_check_ignores_repeats(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """Only later-iteration verdicts, and only on ranks whose iterations use a unit more than once."""

    def repeats(rank: int) -> bool:
        return any(len(set(it.order)) < len(it.order) for it in iterations(scenario, rank))

    return all(v.clause == Clause.LATER_ITERATION and repeats(v.rank) for v in violations)


@known_issue(
    "later-check-misses-dropped-units",
    priority=60,
    seen_on=("2.13.0", "2.14.1"),
    description="""
        After the first iteration FSDP compares each pre-forward with the recorded order and warns about a
        different or an extra unit, but never notices units that a later iteration leaves out at the end: a rank
        whose order becomes a strict prefix of its first order (a skipped branch, or a branch whose alternative
        is not a unit of its own) gets no warning.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#83868",
            "'some modules go unused in certain iterations' in multimodal training: related; no thread reports the "
            "missing warning for units left out at the end (_ExecOrderData._check_order has no end-of-iteration "
            "check)",
            Relation.RELATED,
        ),
    ),
)
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

    return all(v.kind == Kind.WARNING_MISSING and dropped_only(v.rank) for v in violations)


@known_issue(
    "first-iteration-order-ends-early",
    priority=70,
    trigger=needs(DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        The first-iteration check is a pair of all-gathers per unit a rank uses; a rank whose order has ended
        (it skipped a branch, or its alternative is no unit of its own) issues none and moves on, so the other
        ranks' checks meet its backward's reduce-scatters or its next step's collectives: a crash (gloo size
        mismatch), a hang, or a silent pairing instead of the promised error. Likewise when a rank's order only
        pauses: it used fewer units in a step and runs an eval step (all-gathers that are not checked) before
        its next training forward, while the others' checks for those positions come first; DETAIL's collective
        checker then reports 'Detected mismatch between collectives' instead. Without the eval step between,
        the same orders raise the error.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#75902",
            "the PR that added the check names the class it was to catch ('rank i's collective should not logically "
            "match with rank j's collective. This error silently'); it compares only ranks that reach it (see the "
            "TODO on 'number of valid indices' in _check_order)",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#158719",
            "parameters used differently across ranks (mixture, conditional computation) hang; only DETAIL's "
            "collective checker names a mismatch",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#83107",
            "FSDP crashes when no parameters are used in a forward",
            Relation.RELATED,
        ),
    ),
)
def _first_iteration_order_ends_early(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.debug_level != "DETAIL":
        return False
    if not any(_order_ends_early(case) for case in (scenario, *_nodes(scenario))):
        return False
    return all(v.clause in (Clause.FIRST_ITERATION, Clause.CLEAN_RUN, Clause.SILENT_MISMATCH) for v in violations)


def _order_ends_early(scenario: Scenario) -> bool:
    divergence = first_iteration_divergence(scenario)
    return divergence is not None and (None in divergence.units or _unchecked_before_divergence(scenario, divergence))


def _nodes(scenario: Scenario) -> tuple[Scenario, ...]:
    """Under hybrid sharding FSDP1 checks the order within each simulated
    node: each node's ranks, as a scenario of their own."""
    if not scenario.hybrid:
        return ()
    size = HYBRID_NODE_SIZE
    return tuple(
        replace(scenario, ranks=scenario.ranks[start : start + size]) for start in range(0, scenario.world_size, size)
    )


def _unchecked_before_divergence(scenario: Scenario, divergence: Divergence) -> bool:
    """The ranks run different eval steps with forwards (all-gathers that
    FSDP does not check) between their last agreeing use and their use at
    the divergence, so one rank's check meets another's unchecked collectives."""
    between = set()
    for rank in range(scenario.world_size):
        uses = iterations(scenario, rank)[0].uses
        after = uses[divergence.position - 1].step if divergence.position else -1
        before = uses[divergence.position].step
        steps = scenario.ranks[rank]
        unchecked = (index for index in range(after + 1, before) if steps[index].forwards and not steps[index].training)
        between.add(tuple(unchecked))
    return len(between) > 1


NON_LEAF_REQUIRES_GRAD = "you can only change requires_grad flags of leaf variables"


@known_issue(
    "refreeze-hits-unsharded-views",
    priority=80,
    trigger=needs(setting("use_orig_params"), FREEZES_AFTER_WRAPPING),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With use_orig_params=True and a strategy that keeps parameters unsharded after an eval forward
        (SHARD_GRAD_OP), the module's parameters are views of the unsharded flat parameter until the next
        training step, so the seed's flip_path pattern (setting requires_grad on them) raises 'you can only
        change requires_grad flags of leaf variables' on every rank, also where the first-iteration order error
        was due. No divergence is involved.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#105371",
            "with SHARD_GRAD_OP, requires_grad changes after a no_grad step were lost ('train for n steps / "
            "validation step / unfreeze additional parameters'); closed, but this eval-forward case still fails in "
            "2.13",
            Relation.RELATED,
        ),
        Upstream(
            "huggingface/peft#1442",
            "disable_adapter() on a LoRA model wrapped in FSDP with use_orig_params=True raises the leaf-variable "
            "error (fix proposed in peft#2692)",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "huggingface/peft#2977",
            "setting requires_grad=False on adapter parameters inside an FSDP training step raises 'you can only "
            "change requires_grad flags of leaf variables' (worked around in peft#3001)",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _refreeze_hits_unsharded_views(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """The error where a step was due to succeed, or where it preempts a due
    first-iteration error (the flip comes before the forward's check); a
    peer left waiting for the collectives the failed rank never issued
    hangs (in its own step, which may be earlier)."""
    if not (freezes_after_wrapping(scenario) and scenario.fsdp.use_orig_params):
        return False
    kinds = (Kind.STEP_FAILED, Kind.ORDER_ERROR_REPLACED)
    raised = [
        v for v in violations if all_failed_with(observations, (v,), kinds, "RuntimeError", NON_LEAF_REQUIRES_GRAD)
    ]
    raising = {v.rank for v in raised}

    def peer_hung(violation: Violation) -> bool:
        if violation.kind not in kinds or violation.step is None or violation.rank in raising:
            return False
        outcome = observations.ranks[violation.rank].steps[violation.step]
        return outcome.status == Status.HANG or MONITORED_BARRIER in (outcome.error_message or "")

    return bool(raised) and all(v in raised or peer_hung(v) for v in violations)


@known_issue(
    "order-unchecked-below-detail",
    priority=90,
    trigger=needs(Feature(Scope.SCENARIO, "debug_level"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        Below debug level DETAIL FSDP checks no forward order at all: ranks whose forwards diverge pair the
        collectives of different units silently when numel agree, and crash or hang otherwise.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#109049",
            "'[FSDP] Only check exec order if DETAIL': 'the execution order check seems to have been causing more "
            "problems than it prevents'",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#158719",
            "modules used differently across ranks hang at the default level; only DETAIL says 'Detected mismatch "
            "between collectives on ranks'",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _unchecked_below_detail(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    ranks_differ = any(steps != scenario.ranks[0] for steps in scenario.ranks)
    return (
        scenario.debug_level != "DETAIL"
        and ranks_differ
        and all(v.clause in (Clause.CLEAN_RUN, Clause.SILENT_MISMATCH) for v in violations)
    )


@known_issue(
    "order-error-key-error-with-orig-params",
    priority=100,
    trigger=needs(setting("use_orig_params"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With use_orig_params=True, a first-iteration divergence raises KeyError(<the FlatParameter>) instead of
        'Forward order differs across ranks': building the message looks the flat parameter up in param_to_fqn
        (_ExecOrderData._get_names_from_handle_indices), which maps only the original parameters; the
        later-iteration warning's lookup guards against that, this one does not. The divergence is still
        stopped, but with an error that names nothing.
    """,
    upstream=(),
)
def _order_error_raises_key_error(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not scenario.fsdp.use_orig_params:
        return False
    return all_failed_with(observations, violations, (Kind.ORDER_ERROR_REPLACED,), "KeyError", "Parameter")


@known_issue(
    "hybrid-warning-names-intra-node-rank",
    priority=110,
    trigger=needs(setting("sharding_strategy")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With HYBRID_SHARD or _HYBRID_SHARD_ZERO2, the later-iteration warning names the rank within its node
        ('... on rank 0' on global rank 2): _ExecOrderData takes its rank from the intra-node process group. In
        a multi-node job the warning points at the wrong process.
    """,
)
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

    return all(v.clause == Clause.LATER_ITERATION and named_locally(v.rank) for v in violations)


def backward_steps_differ(scenario: Scenario) -> int | None:
    """First step where some ranks run a backward and others do not, some
    reduce its gradients and others accumulate them inside ``no_sync()``,
    or some have frozen a whole unit that others train: any way, one
    rank's reduce-scatter has no partner."""
    units = {node.name for node in scenario.model.units()}

    def reduction(step) -> tuple:
        frozen_units = frozenset(units.intersection(step.frozen)) if step.backward else frozenset()
        return step.backward, step.backward and step.gradient_sync, frozen_units

    for index in range(scenario.num_steps):
        if len({reduction(steps[index]) for steps in scenario.ranks}) > 1:
            return index
    return None


@known_issue(
    "backward-on-some-ranks-only",
    priority=120,
    trigger=needs(DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP checks the order of forwards only. Ranks whose forwards agree but that disagree on whether a step
        runs a backward (one rank skips it, as a 'skip the step on a NaN loss' guard does) meet with unmatched
        collectives: one rank's reduce-scatter waits for the others, which have moved on to the next forward's
        all-gather. The result is a hang or a silent pairing, with no error naming the cause, at every debug
        level. The same when all ranks run the backward but some inside no_sync() (gradient accumulation
        decided per rank), found by the first campaign over FSDP1's no_sync, or when some ranks have frozen a
        whole unit that others train (a freezing schedule decided per rank).
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#64629",
            "a maintainer's open issue: ranks that train different subgraphs 'could break the assumptions and cause "
            "inaccurate results or hangs'; a check was proposed, none exists",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#152964",
            "FSDP2: ranks that skip forward and backward (torchtune's fully masked batches) hang; the maintainer: 'I "
            "would recommend requiring users to make their programs SPMD', by design there",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _backward_on_some_ranks_only(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return first_iteration_divergence(scenario) is None and failures_from(backward_steps_differ(scenario), violations)


def forward_steps_differ(scenario: Scenario) -> int | None:
    """First step, every rank in training mode, where some ranks run
    forwards and others none: the others issue no all-gather at all."""
    for index in range(scenario.num_steps):
        steps = [steps[index] for steps in scenario.ranks]
        if all(step.training for step in steps) and len({step.forwards > 0 for step in steps}) > 1:
            return index
    return None


@known_issue(
    "forward-on-some-ranks-only",
    priority=125,
    trigger=needs(step_feature("forwards"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        After the first iteration FSDP checks each rank's order against its own first one, on that rank alone. A
        rank that runs no forward in a step where the others run one (it skips a batch, without a backward in
        that step) has no order to check, and the others keep theirs, so no rank is warned, at any debug level:
        the all-gathers of the ranks that run the forward hang for a partner that never comes. With a backward on
        the running ranks, backward-on-some-ranks-only names the same case; in the first iteration,
        first-iteration-order-ends-early; a rank that runs fewer forwards, not none, deviates and is warned
        (unchecked-after-deviation).
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#152964",
            "FSDP2: ranks that skip forward and backward (fully masked batches, empty inputs on some ranks) hang; "
            "the maintainer: 'I would recommend requiring users to make their programs SPMD', by design there",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "lightseekorg/TorchSpec#126",
            "a data fetcher that skips a sample on one rank: 'the skipping rank runs one fewer micro-batch, then one "
            "fewer FSDP all-gather', and the next all-gather hangs until the watchdog",
            Relation.SAME_SYMPTOM,
        ),
    ),
)
def _forward_on_some_ranks_only(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if first_iteration_divergence(scenario) is not None or any(e.warning_steps for e in expectations(scenario)):
        return False
    running = all(
        v.kind != Kind.STEP_FAILED or v.step is None or scenario.ranks[v.rank][v.step].forwards > 0 for v in violations
    )
    return running and failures_from(forward_steps_differ(scenario), violations)


def _thawed_or_frozen_since_accumulating(scenario: Scenario, step: int) -> bool:
    """A path change (eval steps included) while gradients from an earlier
    backward were waiting for an optimizer step."""

    def pending(holds: bool, step) -> bool:
        return (holds or step.backward) and not step.optimizer_step

    return path_changed_while(scenario, step, pending)


@known_issue(
    "refreeze-drops-accumulated-grads-with-orig-params",
    priority=130,
    trigger=needs(setting("use_orig_params"), FREEZES_AFTER_WRAPPING),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With use_orig_params=True, freezing a parameter (requires_grad=False, as the seed's flip_path does)
        between two backwards that accumulate gradients drops the gradient it had accumulated: its .grad is None
        afterwards, so the ranks' gradients no longer match a local run, where .grad survives a requires_grad
        change and the optimizer still applies it. Every sharding strategy, NO_SHARD included.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#91167",
            "with use_orig_params, 'we can still avoid forwarding a gradient to any original parameter that does not "
            "require gradient' (done in #98221)",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#104186",
            "re-derives gradient state when requires_grad changes between steps",
            Relation.RELATED,
        ),
        Upstream(
            "facebookresearch/fairscale#605",
            "freezing prototype weights for the first iterations made FSDP's loss curve differ from DDP's, with no "
            "error",
            Relation.RELATED,
        ),
    ),
)
def _refreeze_drops_accumulated_grads(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not (freezes_after_wrapping(scenario) and scenario.fsdp.use_orig_params):
        return False
    return gradients_wrong_after(scenario, violations, _thawed_or_frozen_since_accumulating)


TRAINING_STATE_ERROR = "expected to be in states [<TrainingState.IDLE"


@known_issue(
    "frozen-unit-backward-state-error-with-orig-params",
    priority=140,
    trigger=needs(either(setting("use_orig_params"), FROZEN_BLOCKS), FREEZES_AFTER_WRAPPING | {FROZEN_BLOCKS}),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With use_orig_params=True, freezing every parameter of an FSDP unit after wrapping (here: a branch point
        that is its own unit, with all its alternatives untaken and frozen) and then running a forward and
        backward through the unit fails at the end of the backward on every rank with ValueError 'expected to be
        in states [<TrainingState.IDLE: 1>] but current state is TrainingState.FORWARD_BACKWARD': the unit was
        unsharded in the forward, but with no parameter requiring grad its post-backward never runs. Unfrozen
        but unused parameters are fine. Every sharding strategy. The same when the model froze the unit's
        parameters before wrapping (its flat parameter never requires grad), with use_orig_params either way,
        and the path runs none of its alternatives; a frozen alternative that runs is fine.
    """,
    upstream=(
        Upstream(
            "facebookresearch/fairscale#761",
            "a fairscale PR (for fairscale#758): parameters frozen after wrapping never get post-backward hooks: "
            "'expected to be in states [<TrainingState.BACKWARD_POST: 4>] but current state is "
            "TrainingState.BACKWARD_PRE', the same trigger in fairscale's FSDP",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "facebookresearch/fairscale#643",
            "a frozen trunk with nested FSDP units for linear evaluation: 'expected to be in states "
            "[<TrainingState.BACKWARD_PRE: 3>] but current state is TrainingState.IDLE'",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "facebookresearch/fairscale#610",
            "the earlier report of the frozen-trunk case",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#117510",
            "a frozen FSDP1 module with an input that requires grad reshards without an unshard",
            Relation.RELATED,
        ),
    ),
)
def _whole_unit_frozen_with_orig_params(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    frozen_later = freezes_after_wrapping(scenario) and scenario.fsdp.use_orig_params
    if not (frozen_later or _unit_frozen_by_the_model(scenario.model)):
        return False
    return all_failed_with(observations, violations, (Kind.STEP_FAILED,), "ValueError", TRAINING_STATE_ERROR)


def _unit_frozen_by_the_model(spec: ModelSpec) -> bool:
    """Some unit flattens parameters and every one of them is frozen by the
    model before wrapping (a frozen block around it, or around each of its
    own parameters outside nested units): its flat parameter never requires
    grad, whatever use_orig_params."""

    def trainable(node, frozen: bool, unit_root: bool) -> bool:
        if isinstance(node, (Sequential, Choice)) and node.fsdp_unit and not unit_root:
            return False
        if isinstance(node, Sequential):
            if node.tied_to:
                return False
            frozen = frozen or node.frozen
            return any(trainable(child, frozen, False) for child in node.children)
        if isinstance(node, Choice):
            return any(trainable(alternative, frozen, False) for alternative in node.alternatives)
        return isinstance(node, (Linear, Norm)) and not frozen

    frozen_above: dict[str, bool] = {}

    def visit(node, frozen: bool) -> None:
        if isinstance(node, (Sequential, Choice)):
            frozen = frozen or (isinstance(node, Sequential) and node.frozen)
            frozen_above[node.name] = frozen
            for child in blocks_below(node):
                visit(child, frozen)

    visit(spec.root, False)
    return any(
        size > 0 and not trainable(spec.block(name), frozen_above[name], True)
        for name, size in unit_numel(spec).items()
    )


def _stepped_while_unsharded(scenario: Scenario, step: int) -> bool:
    """Before ``step``, an optimizer step came after a forward that no
    backward had followed: in training or eval mode, with grad or without
    (FSDP1 keeps the root unsharded after every forward)."""
    for rank_steps in scenario.ranks:
        pending = False
        for current in rank_steps[:step]:
            if current.backward:
                pending = False
            elif current.forwards:
                pending = True
            if pending and current.optimizer_step:
                return True
    return False


@known_issue(
    "optimizer-step-before-backward-uses-stale-params",
    priority=150,
    trigger=needs(step_feature("optimizer_step")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        A forward that no backward follows leaves the root unit's parameters unsharded (FSDP keeps the root
        unsharded for the backward it expects, in eval mode and without grad too: _post_forward_reshard never
        frees the root's). An optimizer step then updates the sharded parameters, but the next forward does not
        all-gather again and computes with the stale unsharded ones: outputs and gradients are silently wrong,
        at any debug level. Found with FULL_SHARD, use_orig_params=False: after a training forward and an eval
        step, and after an eval forward alone (with or without grad) following a backward.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#144289",
            "a maintainer describes this FSDP1 hazard: 'the sharded parameters were registered and modified by the "
            "user but we did not re-all-gather unsharded parameters ... since the unsharded parameters were already "
            "allocated'; FSDP2 was designed to rule it out: a limitation of FSDP1's design",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#137348",
            "FSDP2: an unshard without a wait made the next unshard a no-op that 'can unexpectedly not propagate the "
            "optimizer update'; fixed there",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#131965",
            "the root staying unsharded after forward is by design, the precondition of this record",
            Relation.RELATED,
        ),
    ),
)
def _optimizer_step_leaves_stale_unsharded_params(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return all(v.clause == Clause.REFERENCE and _stepped_while_unsharded(scenario, v.step) for v in violations)


def _fsdp_first_iteration_units(scenario: Scenario, rank: int) -> tuple[str, ...]:
    """The units FSDP1 records as the rank's first-iteration order: the first
    use of each unit by any forward, eval mode and no-grad included, up to
    the first backward after a forward with grad (FSDP's end of an iteration,
    which its post-backward callback marks in eval mode too)."""
    recorded: list[str] = []
    with_grad = False
    for step in scenario.ranks[rank]:
        for unit in forward_units(scenario.model, step.path) * step.forwards:
            if unit not in recorded:
                recorded.append(unit)
        with_grad = with_grad or bool(step.forwards and step.grad_enabled)
        if step.backward and with_grad:
            break
    return tuple(recorded)


def _first_uses(order: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(order))


def _eval_units_recorded(scenario: Scenario, rank: int) -> bool:
    """FSDP's recorded order differs from the first uses of the rank's first
    (training) iteration, because eval-mode forwards ran before it ended."""
    rank_iterations = iterations(scenario, rank)
    if not rank_iterations:
        return False
    return _fsdp_first_iteration_units(scenario, rank) != _first_uses(rank_iterations[0].order)


@known_issue(
    "eval-forwards-recorded-in-first-iteration-order",
    priority=190,
    trigger=needs(step_feature("mode")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP records the order that later iterations are compared with during its whole first iteration, up to
        the first backward, in eval mode too: the check skips eval forwards, the recording does not
        (_ExecOrderData.record_pre_forward). Eval forwards before the first backward (an evaluation before
        training starts) put their units into the reference order, so an unchanged training schedule is warned
        about in its second iteration ('Forward order differs from that of the first iteration'), on every rank
        that ran them. By the same comparison a rank whose later order happens to match the eval forwards' units
        is not warned although it deviates (in the case found that rank crashed in the step, taking its warnings
        with it, so this half is read from the code, not observed).
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#84175",
            "a maintainer: a dummy forward before the first backward 'is being considered as part of the 1st "
            "iteration'; the end of an iteration is the end of a backward: this record's mechanism, there in training "
            "mode",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#110138",
            "a validation run before training leaves is_first_iter True and records the eval forwards' handles (fixed "
            "there: a handle recorded twice, wrong prefetching); the recording in eval mode itself stayed",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#77195",
            "the PR that stopped checking the order in eval mode ('no reliable way to know the end of an iteration'); "
            "it left the recording on",
            Relation.RELATED,
        ),
    ),
)
def _eval_forwards_recorded(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    """Later-iteration verdicts only, each on a rank whose eval forwards
    changed the order FSDP recorded."""
    return all(
        v.clause == Clause.LATER_ITERATION
        and v.kind in (Kind.WARNING_UNEXPECTED, Kind.WARNING_MISSING)
        and _eval_units_recorded(scenario, v.rank)
        for v in violations
    )


def _backward_ended_fsdp_first_iteration_in_eval(scenario: Scenario) -> bool:
    """Some rank ran a backward after eval-mode forwards with grad before its
    first training-mode forward: FSDP's first iteration (the only one it
    checks across ranks) ended there."""
    for rank_steps in scenario.ranks:
        with_grad = False
        for step in rank_steps:
            if step.training and step.forwards:
                break
            with_grad = with_grad or bool(step.forwards and step.grad_enabled)
            if step.backward and with_grad:
                return True
    return False


@known_issue(
    "eval-backward-ends-first-iteration",
    priority=200,
    trigger=needs(step_feature("mode"), DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP ends an iteration in its post-backward callback, which runs after a backward in eval mode too
        (gradients through an eval-mode forward). A backward after eval forwards before any training therefore
        ends FSDP's first iteration, the only one whose order it checks across ranks: the first training
        iteration is compared with the eval forwards' order on each rank alone, so ranks that diverge get
        'Forward order differs from that of the first iteration' warnings and hang or pair the collectives of
        different units, instead of the error 'Forward order differs across ranks'. Without the eval backward the
        same divergence raises the error. FSDP's own comment assumes it cannot happen ('the post-backward
        callback does not run' in eval mode).
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#77195",
            "the PR that stopped checking the order in eval mode reasons that without a backward pass there is no end "
            "of an iteration; an eval-mode backward is not considered",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#84175",
            "a maintainer: 'for FSDP, the end of an iteration is determined by the end of a backward pass': the "
            "mechanism; no report of an eval-mode backward was found",
            Relation.RELATED,
        ),
    ),
)
def _eval_backward_ends_first_iteration(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    """A first-iteration divergence whose error never came, or a silent
    pairing, after an eval backward ended FSDP's first iteration."""
    if first_iteration_divergence(scenario) is None or not _backward_ended_fsdp_first_iteration_in_eval(scenario):
        return False
    return all(v.clause in (Clause.FIRST_ITERATION, Clause.SILENT_MISMATCH) for v in violations)


def _units_with_gradients(spec: ModelSpec, path: Path | None, use_orig_params: bool = False) -> frozenset[str]:
    """The units one forward along ``path`` (``None``: every alternative)
    gives a gradient: those that flatten a trainable parameter the forward
    uses. With use_orig_params=True a unit may mix frozen and trainable
    parameters; its flat parameter then requires grad and the forward's
    views of it carry a gradient into it from a frozen parameter too."""
    mixed = _units_with_gradients(spec, None) if use_orig_params else frozenset()
    found: set[str] = set()

    def visit(node, unit: str, frozen: bool) -> None:
        if isinstance(node, Linear):
            if not frozen or unit in mixed:
                found.add(unit)
        elif isinstance(node, Sequential):
            inner = node.name if node.fsdp_unit else unit
            for child in node.children:
                visit(child, inner, frozen or node.frozen)
        elif isinstance(node, Choice):
            inner = node.name if node.fsdp_unit else unit
            indices = range(len(node.alternatives)) if path is None else taken(path, node.name)
            for index in indices:
                visit(node.alternatives[index], inner, frozen)

    visit(spec.root, spec.root.name, False)
    return frozenset(found)


def gradient_units_differ(scenario: Scenario) -> int | None:
    """First step whose backward, run by every rank after forwards that ran
    the same units, gives some unit a gradient on some ranks only: the ranks
    ran its module, but on the others none of its own parameters."""
    ran: list[set[str]] = [set() for _ in scenario.ranks]
    graded: list[set[str]] = [set() for _ in scenario.ranks]
    for index in range(scenario.num_steps):
        steps = [rank_steps[index] for rank_steps in scenario.ranks]
        for rank, step in enumerate(steps):
            if step.forwards and step.grad_enabled:
                ran[rank].update(forward_units(scenario.model, step.path))
                graded[rank].update(_units_with_gradients(scenario.model, step.path, scenario.fsdp.use_orig_params))
        if all(step.backward for step in steps):
            if len({frozenset(units) for units in ran}) == 1 and len({frozenset(units) for units in graded}) > 1:
                return index
            ran = [set() for _ in scenario.ranks]
            graded = [set() for _ in scenario.ranks]
    return None


@known_issue(
    "unit-without-gradient-skips-reduce-scatter",
    priority=210,
    trigger=needs(DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP1 reduce-scatters a unit's gradient from the post-backward hook on its flat parameter, which fires
        only when the backward reaches one of the unit's own parameters. When every rank runs the unit's module
        (so the forward orders agree and the first-iteration check passes) but on some ranks the forward uses none
        of its parameters (an empty path through a branch point that the unit holds), those ranks issue no
        reduce-scatter for it while the others do: the next collectives pair a reduce-scatter with another
        unit's or the next step's, and gloo aborts ('Received data size doesn't match expected size'), the ranks
        hang, or they pair silently; no error names the cause. With use_orig_params=True a unit may mix frozen
        and trainable parameters, and a forward through its frozen ones alone still gives its flat parameter a
        gradient (the forward uses views of it), so a rank that runs only frozen parameters of the unit
        reduce-scatters it while a rank that runs none of them does not.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#65195",
            "filed by a maintainer: 'the unused parameters also could be different on different FSDP ranks, which "
            "will lead to desync with current FSDP code'; closed as avoided ('unflatten_parameters feature is not "
            "supported'), without a fix for FSDP1",
            Relation.SAME_BUG,
        ),
        Upstream(
            "pytorch/pytorch#158719",
            "open: 'FSDP fails if a parameter is used differently between different GPU ranks' (mixture models, "
            "conditional computation): hangs, or DETAIL's collective mismatch; there under FSDP2",
            Relation.SAME_SYMPTOM,
        ),
        Upstream(
            "pytorch/pytorch#83129",
            "'_post_backward_hook will not fire if ... all parameters in an FSDP module were unused'; fixed the "
            "resharding only, on every rank alike",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#91167",
            "the design of non-uniform requires_grad under use_orig_params (done in #98221): the flat parameter "
            "requires grad when any original does, and a frozen parameter's gradient is computed and reduced, only "
            "not handed to it; why a forward through frozen parameters alone reduce-scatters",
            Relation.BY_DESIGN,
        ),
    ),
)
def _unit_without_gradient_skips_reduce_scatter(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    return failures_from(gradient_units_differ(scenario), violations)


def _trainable_alternatives(spec: ModelSpec, path: Path) -> frozenset[tuple[str, int]]:
    """The alternatives ``freeze_untaken`` leaves trainable for ``path``: those
    it runs, inside alternatives that run (as the executor's flip_path does)."""
    found: set[tuple[str, int]] = set()

    def visit(node, active: bool) -> None:
        if isinstance(node, Sequential):
            for child in node.children:
                visit(child, active)
        elif isinstance(node, Choice):
            runs = set(taken(path, node.name))
            for index, alternative in enumerate(node.alternatives):
                trainable = active and index in runs
                if trainable:
                    found.add((node.name, index))
                visit(alternative, trainable)

    visit(spec.root, True)
    return frozenset(found)


def _ranks_froze_differently(scenario: Scenario, step: int) -> bool:
    """Up to ``step``, a backward ran while the ranks' paths (under
    ``freeze_untaken``) or freezing schedules left different parameters
    trainable."""
    for index in range(step + 1):
        steps = [rank_steps[index] for rank_steps in scenario.ranks]
        frozen = {
            (_trainable_alternatives(scenario.model, s.path) if scenario.freeze_untaken else None, frozenset(s.frozen))
            for s in steps
        }
        if any(s.backward for s in steps) and len(frozen) > 1:
            return True
    return False


@known_issue(
    "rank-dependent-freeze-drops-grads-with-orig-params",
    priority=220,
    trigger=needs(setting("use_orig_params"), FREEZES_AFTER_WRAPPING, DIVERGENCE),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With use_orig_params=True, FSDP1 hands a parameter its reduced gradient only where the parameter requires
        grad on the rank that holds its shard (FlatParamHandle._use_sharded_grad_views). When ranks freeze
        different parameters of one unit (requires_grad set by each rank's path, as the seed's flip_path does),
        the gradient other ranks computed for a parameter is dropped wherever its shard sits on a rank that froze
        it, and kept where the shard sits on a rank that trains it, so how much of it survives depends on the
        sharding layout: the ranks' gradients silently differ from a single-process run, with no error or
        warning, though every rank's forward order agrees. With the same paths on every rank, or without the
        freezing, the same step matches.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#91167",
            "the design of non-uniform requires_grad under use_orig_params: 'we can still avoid forwarding a gradient "
            "to any original parameter that does not require gradient' (done in #98221), assuming the flag is the "
            "same on every rank",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/pytorch#99779",
            "with use_orig_params=True each rank's parameters() shows a different slice (a weight split across ranks, "
            "the bias on one): the layout that decides which gradients survive",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#170667",
            "an FSDP2 fix for ranks using different parameters; the maintainer asks for a practical example of a "
            "parameter that requires grad on rank 0 but not on rank 1 ('a param should either require grad on all "
            "ranks or does not require grad on all ranks')",
            Relation.RELATED,
        ),
    ),
)
def _rank_dependent_freeze_drops_grads(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not (freezes_after_wrapping(scenario) and scenario.fsdp.use_orig_params):
        return False
    return gradients_wrong_after(scenario, violations, _ranks_froze_differently)


RECOMPUTE_ON_FREED_PARAMETERS = ("setStorage:", "mat2 must be a matrix, got 1-D tensor", "size mismatch, got input")
"""How the recomputed forward meets the unit's freed flat parameter, or
with use_orig_params its sharded 1-D views (as a weight, or as a bias of
the wrong length)."""


@known_issue(
    "reentrant-checkpoint-recompute-after-reshard",
    priority=230,
    trigger=needs(checkpoint("reentrant")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With a sharding strategy that frees parameters (FULL_SHARD, SHARD_GRAD_OP, hybrid), a block inside an
        FSDP1 unit checkpointed with torch.utils.checkpoint(use_reentrant=True), and two or more runs of it before
        one backward (two forwards, or the block twice in one forward): the backward of the first region reshards
        the unit, and the reentrant recompute of the second re-runs the block's forward on the freed flat
        parameter (RuntimeError 'setStorage: ... out of
        bounds for storage of size 0', or with use_orig_params 'mat2 must be a matrix, got 1-D tensor' on the
        sharded views) on every rank. One run is enough where the unit's parameters also run before the region
        on an input that requires grad: the region's backward comes first and reshards the unit, and the outer
        backward then meets the freed parameters of the layers before it (setStorage). One forward through a
        region whose unit runs nothing before it on such an input, non-reentrant checkpointing, the region as
        its own unit, or NO_SHARD run cleanly. Found by the first campaign over the training features.
    """,
    upstream=(
        Upstream(
            "facebookresearch/fairscale#617",
            "FSDP(checkpoint_wrapper(module)) with two forward passes before the backward asserts on training states "
            "in fairscale's FSDP: the same trigger, another symptom",
            Relation.RELATED,
        ),
        Upstream(
            "facebookresearch/fairscale#777",
            "errors with multiple passes through a checkpointed module under fairscale's FSDP, a race with freeing "
            "the full parameters: the same trigger",
            Relation.RELATED,
        ),
        Upstream(
            "NVIDIA/Megatron-LM#6323",
            "Megatron's FSDP learns to recognise a reentrant recompute that runs before the block's backward-pre hook "
            "and keeps its parameters materialised: the same hazard, fixed elsewhere",
            Relation.RELATED,
        ),
    ),
)
def _reentrant_checkpoint_recompute_after_reshard(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    reentrant = any(getattr(node, "checkpoint", None) == "reentrant" for node in scenario.model.named())
    if not reentrant or scenario.fsdp.sharding_strategy == "NO_SHARD":
        return False

    def explained(violation: Violation) -> bool:
        if violation.kind not in (Kind.STEP_FAILED, Kind.ORDER_ERROR_REPLACED) or violation.step is None:
            return False
        outcome = observations.ranks[violation.rank].steps[violation.step]
        said = any(outcome.failed_with("RuntimeError", words) for words in RECOMPUTE_ON_FREED_PARAMETERS)
        runs = reentrant_runs_since_backward(scenario, violation.rank, violation.step)
        return said and (runs >= 2 or _unit_needed_before_its_region(scenario, violation.rank, violation.step))

    return all(explained(violation) for violation in violations)


def _unit_needed_before_its_region(scenario: Scenario, rank: int, step: int) -> bool:
    """In the step's forward (with grad), a unit's linear runs on an input
    that requires grad (a layer ran before it that is trainable or, with
    use_orig_params, computes with a differentiable view of a flat
    parameter, frozen or not), so the outer backward needs that weight, and
    then a reentrant region runs trainable parameters of the same unit: the
    region's own backward, which comes first, fires the unit's post-backward
    hook and reshards it."""
    current = scenario.ranks[rank][step]
    if not current.grad_enabled:
        return False
    owners = scenario.model.owning_units()
    frozen_blocks = set(current.frozen)
    needed: set[str] = set()
    grad_flows = False
    found = False

    def visit(node, unit: str, frozen: bool, in_region: bool) -> None:
        nonlocal grad_flows, found
        if isinstance(node, Linear):
            if in_region and not frozen and unit in needed:
                found = True
            if grad_flows and not in_region:
                needed.add(unit)
            grad_flows = grad_flows or not frozen or scenario.fsdp.use_orig_params
        elif isinstance(node, Sequential):
            frozen = frozen or node.frozen or node.name in frozen_blocks
            region = in_region or node.checkpoint == "reentrant"
            for child in node.children:
                visit(child, owners[node.name], frozen, region)
        elif isinstance(node, Choice):
            for index in taken(current.path, node.name):
                visit(node.alternatives[index], owners[node.name], frozen, in_region)

    for _ in range(current.forwards):
        visit(scenario.model.root, scenario.model.root.name, False, False)
    return found


@known_issue(
    "mixed-precision-reentrant-checkpoint-around-a-unit-loses-gradients",
    priority=235,
    trigger=needs(setting("mixed_precision"), checkpoint("reentrant")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With a MixedPrecision policy (float16 or bfloat16 parameters, whatever the reduce dtype), a sharding
        strategy that shards (FULL_SHARD, SHARD_GRAD_OP, hybrid; use_orig_params either way), and a block
        checkpointed with torch.utils.checkpoint(use_reentrant=True) that holds a nested FSDP1 unit, run two or
        more times before one backward: the gradients come out silently wrong on every rank (from a tenth to over half
        of the sum lost), with no error or warning. The first region's backward runs the nested unit's post-backward
        hook (reduce-scatter, reshard, handle in BACKWARD_POST), so each later recompute runs the unit's full
        pre-forward instead of the recompute shortcut. The same schedule in float32, one forward per backward,
        NO_SHARD, non-reentrant checkpointing, or no unit inside the region match the reference. FSDP2's
        counterpart is fsdp2-reentrant-checkpoint-around-a-unit-loses-gradients (silent in float32 too).
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#153354",
            "FSDP2 'got mixed torch.Tensor and DTensor' with activation checkpointing and two forwards before the "
            "backward: 'when trying to recompute activations the second time, the weights are not correctly "
            "allgathered': the same trigger in FSDP2, another symptom",
            Relation.RELATED,
        ),
        Upstream(
            "facebookresearch/fairscale#617",
            "FSDP and checkpoint_wrapper with multiple forward passes through sub-modules: the same trigger in "
            "fairscale's FSDP, asserting on training states",
            Relation.RELATED,
        ),
    ),
)
def _mixed_precision_reentrant_checkpoint_around_a_unit(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    mixed = scenario.fsdp.mixed_precision is not None and scenario.fsdp.mixed_precision.param_dtype is not None
    if not mixed or scenario.fsdp.sharding_strategy == "NO_SHARD":
        return False
    if not checkpointed_region_holds_a_unit(scenario.model, ("reentrant",)):
        return False
    numbers = (Kind.GRADIENT_MISMATCH, Kind.OUTPUT_MISMATCH)
    return all(
        v.step is not None and v.kind in numbers and reentrant_runs_since_backward(scenario, v.rank, v.step) >= 2
        for v in violations
    )


@known_issue(
    "fsdp1-tie-across-units",
    priority=240,
    trigger=needs(TIES),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        FSDP1 supports shared parameters only inside one unit. Tied across units, nothing is refused: with
        use_orig_params=False each unit flattens the shared parameter on its own, so the tie silently comes
        apart (each copy gets only its own use's gradient, and from the first optimizer step the outputs differ
        from a single-process run); with use_orig_params=True the module outside the unit that sharded the
        parameter computes with its 1-D shard ('mat2 must be a matrix, got 1-D tensor') on every rank. FSDP2
        refuses the same arrangement at its lazy initialisation, naming the fix.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#77724",
            "'only limited shared param support exists for FSDP, i.e., they must be part of the same FSDP unit': the "
            "documented limitation, open; FSDP1 does not check it",
            Relation.BY_DESIGN,
        ),
        Upstream(
            "pytorch/torchtitan#2522",
            "tied parameters are put in one FSDP group (FSDP2 refuses otherwise): the arrangement users must make by "
            "hand",
            Relation.RELATED,
        ),
    ),
)
def _fsdp1_tie_across_units(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
    if not scenario.model.ties_across_units():
        return False

    def explained(violation: Violation) -> bool:
        if violation.clause in (Clause.REFERENCE, Clause.REPLICAS):
            return not scenario.fsdp.use_orig_params
        if violation.kind not in (Kind.STEP_FAILED, Kind.ORDER_ERROR_REPLACED) or violation.step is None:
            return False
        outcome = observations.ranks[violation.rank].steps[violation.step]
        return scenario.fsdp.use_orig_params and outcome.failed_with("RuntimeError", RECOMPUTE_ON_FREED_PARAMETERS[1])

    return all(explained(violation) for violation in violations)


def _eval_forward_with_grad_first(scenario: Scenario, step: int) -> bool:
    """Up to ``step``, some rank ran a forward with grad enabled that no
    backward followed (an eval-mode one, or a training step without
    backward) before its first backward."""
    for rank_steps in scenario.ranks:
        for current in rank_steps[: step + 1]:
            if current.forwards and current.grad_enabled and (current.mode == "eval" or not current.backward):
                return True
            if current.backward:
                break
    return False


SHARD_SIZE_MISMATCH = "The size of tensor a"


@known_issue(
    "mixed-precision-eval-forward-first-skips-gradient-reduction",
    priority=260,
    trigger=needs(setting("mixed_precision")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With FSDP1 MixedPrecision (any param_dtype, reduce_dtype or keep_low_precision_grads), an eval-mode
        forward with grad enabled before the first backward leaves the next backward's gradients unreduced and
        unsharded: with FULL_SHARD and SHARD_GRAD_OP every rank holds its own full local gradient (the ranks'
        gradients add up to world_size times the average; a later reduction then fails on the size, 'The size of
        tensor a (N) must match the size of tensor b (2N)'), with NO_SHARD the replicas silently take different
        optimizer steps, with use_orig_params the gradients are lost. No error or warning. A training-mode
        forward that no backward follows does the same (found by the dev profile over this session's space).
        Without mixed precision, with the eval forward under no_grad, or with a training backward first, it
        matches.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#106858",
            "FSDP1's mixed precision mishandled a train -> EMA -> eval sequence of forwards: the low-precision state "
            "set up by a forward that no backward follows",
            Relation.RELATED,
        ),
        Upstream(
            "pytorch/pytorch#186998",
            "FSDP2 mixed precision breaks after unfreezing when the first forward ran with requires_grad=False: the "
            "first forward fixing the precision state, in FSDP2",
            Relation.RELATED,
        ),
    ),
)
def _mixed_precision_eval_forward_first(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.engine != "fsdp1" or scenario.fsdp.mixed_precision is None:
        return False

    def explained(violation: Violation) -> bool:
        if violation.step is None or not _eval_forward_with_grad_first(scenario, violation.step):
            return False
        if violation.kind in (Kind.GRADIENT_MISMATCH, Kind.OUTPUT_MISMATCH, Kind.REPLICAS_DIVERGED):
            return True
        outcome = observations.ranks[violation.rank].steps[violation.step]
        return violation.kind == Kind.STEP_FAILED and outcome.failed_with("RuntimeError", SHARD_SIZE_MISMATCH)

    return all(explained(violation) for violation in violations)


SAVED_GRAD_SHARD = "All sharded parameters that received a gradient in the post-backward should use `_saved_grad_shard`"


def _unit_left_out_of_the_synced_backward(scenario: Scenario, rank: int, step: int) -> bool:
    """Before ``step``, the rank ran a backward inside ``no_sync()`` through
    a unit that the forwards since the last such backward, up to the
    synced backward of ``step``, do not use."""
    steps = scenario.ranks[rank]
    if not (steps[step].backward and steps[step].gradient_sync):
        return False
    accumulated: set[str] = set()
    used: set[str] = set()
    for current in steps[:step]:
        used |= set(forward_units(scenario.model, current.path)) if current.forwards else set()
        if current.backward:
            accumulated = accumulated | used if not current.gradient_sync else set()
            used = set()
    used |= set(forward_units(scenario.model, steps[step].path)) if steps[step].forwards else set()
    return bool(accumulated - used)


@known_issue(
    "no-sync-unit-unused-by-the-synced-backward",
    priority=320,
    trigger=needs(step_feature("gradient_sync")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        Gradient accumulation with no_sync(): a backward inside no_sync() runs through a unit (its gradient is
        kept unsharded), and the synced backward that ends the accumulation does not use that unit (the
        microbatches took different paths, as mixture-of-experts routing or alternating encoders do, on every
        rank alike). FSDP1 then fails the synced backward on every rank with AssertionError 'All sharded
        parameters that received a gradient in the post-backward should use `_saved_grad_shard`': the unused
        unit's accumulated gradient was never reduced. With the same path in every microbatch, or without
        no_sync (reduce-scatter every microbatch), the schedule runs. Found by the first campaign over FSDP1's
        no_sync.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#83107",
            "an FSDP assertion when a unit's parameters require grad but take no part in an iteration, met 'when "
            "encoders take turns being used across iterations': the same kind of trigger, without no_sync",
            Relation.RELATED,
        ),
    ),
)
def _no_sync_unit_unused_by_the_synced_backward(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if not all(
        v.step is not None and _unit_left_out_of_the_synced_backward(scenario, v.rank, v.step) for v in violations
    ):
        return False
    return all_failed_with(observations, violations, (Kind.STEP_FAILED,), "AssertionError", SAVED_GRAD_SHARD)


@known_issue(
    "checkpoint-recompute-recorded-in-first-iteration-order",
    priority=340,
    trigger=needs(either(*map(checkpoint, CHECKPOINT_MODES))),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        A checkpointed block (torch.utils.checkpoint, reentrant or not, or checkpoint_wrapper) that holds a
        nested FSDP1 unit: the recompute in the first backward runs the unit's
        forward again, FSDP1's order check records it in the first iteration's order, and the second iteration,
        identical on every rank, is warned at DETAIL as 'Forward order differs from that of the first
        iteration'. From then on FSDP1 checks nothing (the warning says collectives are unchecked). Without
        checkpointing, or with the unit outside the checkpointed block, no warning. Found by the dev profile over
        this session's space.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#84175",
            "'Forward order differs from that of first run' with Hugging Face models (gradient checkpointing is "
            "common there); the reporter: 'I believe I encounter this warning even if all iterations follow the "
            "first iteration's format', never confirmed",
            Relation.RELATED,
        ),
    ),
)
def _checkpoint_recompute_recorded_in_first_iteration_order(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.debug_level != "DETAIL" or not checkpointed_region_holds_a_unit(scenario.model, CHECKPOINT_MODES):
        return False
    return all(v.kind == Kind.WARNING_UNEXPECTED for v in violations)


def _unit_ran_without_its_parameters(scenario: Scenario, before: int) -> bool:
    """Before step ``before``, some rank ran a backward after forwards (with
    grad) that entered a unit without using any parameter of its own (a
    branch point that is a unit, none of whose own alternatives the path
    takes): the unit's post-backward hook never runs."""
    sizes = unit_numel(scenario.model)

    def idle_units(path: Path) -> bool:
        used: dict[str, bool] = {}

        def visit(node, unit: str) -> None:
            if isinstance(node, (Linear, Norm)):
                used[unit] = True
            elif isinstance(node, Sequential):
                unit = node.name if node.fsdp_unit or node is scenario.model.root else unit
                used.setdefault(unit, False)
                for child in node.children:
                    visit(child, unit)
            elif isinstance(node, Choice):
                unit = node.name if node.fsdp_unit else unit
                used.setdefault(unit, False)
                for index in taken(path, node.name):
                    visit(node.alternatives[index], unit)

        visit(scenario.model.root, scenario.model.root.name)
        return any(not use and sizes.get(unit, 0) > 0 for unit, use in used.items())

    return any(
        step.training and step.forwards and step.grad_enabled and step.backward and idle_units(step.path)
        for steps in scenario.ranks
        for step in steps[:before]
    )


@known_issue(
    "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params",
    priority=350,
    trigger=needs(setting("sharding_strategy"), setting("use_orig_params")),
    seen_on=("2.13.0", "2.14.1"),
    description="""
        With NO_SHARD and use_orig_params=True, a backward after a forward that enters a unit without using
        any of its own parameters (a branch point that is its own unit, the path taking none of its
        alternatives) leaves that unit's original parameters swapped out for the plain tensor views the forward
        computes with: its post-backward hook never runs, and the post-backward callback's catch-all reshard
        returns early for NO_SHARD, whose flat parameter is its own shard. The next forward's writeback then
        takes the plain views for user-replaced parameters (flat_param._params). When a later step uses the
        unit's parameters, the gradients are silently wrong; at debug level INFO the post-backward hook's log
        line instead fails on every rank with KeyError(<the tensor>) looking it up in param_to_fqn. Other
        sharding strategies, use_orig_params=False, or no backward after the idle forward match the reference.
    """,
    upstream=(
        Upstream(
            "pytorch/pytorch#85831",
            "use_orig_params follow-ups: between pre-forward and post-forward 'the original parameters are switched "
            "to being plain Tensor views into the underlying FlatParameter': the state this case is left in",
            Relation.RELATED,
        ),
    ),
)
def _no_shard_unit_without_gradient_keeps_tensor_views(
    scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]
) -> bool:
    if scenario.fsdp.sharding_strategy != "NO_SHARD" or not scenario.fsdp.use_orig_params:
        return False

    def explained(violation: Violation) -> bool:
        if violation.step is None or not _unit_ran_without_its_parameters(scenario, violation.step):
            return False
        if violation.kind in (Kind.GRADIENT_MISMATCH, Kind.OUTPUT_MISMATCH):
            return True
        return all_failed_with(observations, (violation,), (Kind.STEP_FAILED,), "KeyError", "tensor(")

    return all(explained(violation) for violation in violations)
