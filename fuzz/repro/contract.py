"""The contract for one scenario as assertions on what the ranks saw.

Nothing here decides what FSDP promises: ``fsdp_fuzz.judge.oracles`` does
(``expectations``, ``refusal``, ``consistent``, the reference and replica
clauses and their premises). This module writes those decisions down in
``check``: each group of ranks with one expectation as a loop over what
those ranks saw (an error, a warning, a refusal, the first-iteration
error), and the numbers' clauses as calls of small helpers emitted only
where needed, so the script states the promise for its own schedule and
nothing else.

One clause is checked by its symptom rather than its cause: *no silent
mismatch* (clause 5) is judged by the fuzzer on a trace of FSDP's
collectives, which a hand-written test would not carry. Where FSDP1's
ranks do not keep one order, the script instead compares each rank's
outputs with the unsharded model's on its own batches, until FSDP raises
or warns about the order: units paired silently give other parameters.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from fsdp_fuzz.corpus import CorpusEntry
from fsdp_fuzz.data import UNIT_ROUNDOFF, Clause, Scenario
from fsdp_fuzz.engines import Promise
from fsdp_fuzz.execute.reference import aligned
from fsdp_fuzz.judge.oracles import (
    FIRST_ITERATION_ERROR,
    LATER_WARNING,
    RELATIVE_TOLERANCE,
    ROUNDOFF_FACTOR,
    _promised_steps,
    accumulated_operations,
    consistent,
    documented_unregistered_failures,
    expectations,
    gradient_replicas,
    keeps_replicas,
    replica_groups,
    unregistered_calls,
)
from fsdp_fuzz.judge.orders import iterations
from fsdp_fuzz.repro.text import literal

EXPECT_REFERENCE = '''
def close(observed, expected, magnitude, operations):
    """Within 1e-4 relative, or the rounding of the coarsest dtype along the path, if larger."""
    bound = max(RELATIVE_TOLERANCE * (1 + abs(expected)), ROUNDOFF * operations * magnitude)
    return abs(observed - expected) <= bound


def expect_reference(broken, seen, expected, steps, grad_steps=(), replicas=1):
    """Each rank's outputs are the unsharded model's on its own batches, and the ranks' gradients
    (local sums added, over the ranks holding each element) its rank-averaged gradient."""
    for index in range(steps):
        (outputs, grad, magnitude), done = expected[index], [seen[rank].get(index, {}) for rank in RANKS]
        for rank, outcome in enumerate(done):
            (output, size), operations = outputs[rank], OPERATIONS[rank][index]
            if "output" in outcome and not close(outcome["output"], output, size, operations):
                return broken.append((index, f"rank {rank}'s outputs sum to {outcome['output']!r} in step {index}, "
                                      f"the unsharded model gives {output!r} for its batch"))
        if index in grad_steps and all(outcome.get("grad") is not None for outcome in done):
            observed = sum(outcome["grad"] for outcome in done) / replicas
            operations = max(OPERATIONS[rank][index] for rank in RANKS) + BATCH + WORLD_SIZE
            if not close(observed, grad, magnitude, operations):
                return broken.append((index, f"the ranks' gradients sum to {observed!r} after step {index}, "
                                      f"the unsharded model's rank-averaged gradient to {grad!r}"))
'''

EXPECT_UNANNOUNCED = '''
def expect_outputs_until_warned(broken, seen, expected, steps):
    """Ranks that run different units pair their collectives silently unless FSDP raises or warns: until
    it does, each rank's outputs must be the unsharded model's on its own batches."""
    for index in range(steps):
        done = [seen[rank].get(index, {}) for rank in RANKS]
        if any(outcome.get("warnings") or FIRST_ITERATION_ERROR in outcome.get("error", "") for outcome in done):
            return
        for rank, outcome in enumerate(done):
            (output, size), operations = expected[index][0][rank], OPERATIONS[rank][index]
            if "output" in outcome and not close(outcome["output"], output, size, operations):
                return broken.append((index, f"rank {rank}'s outputs sum to {outcome['output']!r} in step {index} "
                                      f"without error or warning, the unsharded model gives {output!r}"))
'''

EXPECT_REPLICAS = '''
def expect_replicas(broken, seen, groups, steps):
    """Ranks holding the same shards hold the same parameters after each step."""
    for group in groups:
        for index in range(steps):
            digests = [seen[rank].get(index, {}).get("digest") for rank in group]
            if None in digests:
                break
            if len(set(digests)) > 1:
                return broken.append((index, f"replicas {list(group)} hold different parameters after step "
                                      f"{index} (digests {digests})"))
'''


NUMBERS = frozenset({Clause.REFERENCE, Clause.SILENT_MISMATCH, Clause.REPLICAS})
"""The clauses about numbers: judged on the outputs, gradients and parameters."""

NOT_ABOUT_NUMBERS = frozenset(
    {
        "backward-on-some-ranks-only",
        "checkpoint-recompute-recorded-in-first-iteration-order",
        "eval-backward-ends-first-iteration",
        "eval-forwards-recorded-in-first-iteration-order",
        "first-iteration-order-ends-early",
        "frozen-unit-backward-state-error-with-orig-params",
        "fsdp2-explicit-unshard-breaks-checkpoint-recompute",
        "fsdp2-hsdp-partial-reduction-split-by-reentrant-checkpoint",
        "fsdp2-method-before-forward-makes-a-unit-root",
        "fsdp2-mixed-precision-unit-frozen-at-first-forward",
        "fsdp2-reset-iter-state-before-first-forward",
        "hybrid-order-check-intra-node-only",
        "hybrid-warning-names-intra-node-rank",
        "later-check-ignores-repeats",
        "later-check-misses-dropped-units",
        "no-sync-unit-unused-by-the-synced-backward",
        "order-error-key-error-with-orig-params",
        "reentrant-checkpoint-recompute-after-reshard",
        "refreeze-hits-unsharded-views",
        "unchecked-after-deviation",
        "unit-without-gradient-skips-reduce-scatter",
    }
)
"""Known issues that every one of their ``corpus/known/`` reproducers shows as an error, a warning or a hang
(``tests/test_repro.py`` checks it on the recorded observations): their scripts leave the numbers out. A
known issue not named here keeps the whole contract."""


def numbers_matter(entry: CorpusEntry | None) -> bool:
    """Whether the script compares numbers: only where nothing else shows the finding. A recorded finding's
    where every violation is about numbers; a known issue's unless it is one of ``NOT_ABOUT_NUMBERS``; always
    for a scenario that must keep the whole contract (a seed)."""
    if entry is None or entry.keeps_contract:
        return True
    if entry.finding is not None:
        return all(Clause.parse(getattr(clause, "value", clause)) in NUMBERS for clause, *_ in entry.finding.signature)
    return entry.known_issue not in NOT_ABOUT_NUMBERS


@dataclass
class Contract:
    """The script's ``check`` and what it needs from the rest of the script."""

    helpers: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    reference: bool = False
    """``check`` calls ``reference()``: the script computes the unsharded run."""
    digest: bool = False
    """Steps report a digest of the rank's parameters (the replica clause)."""

    def need(self, helper: str) -> None:
        if helper not in self.helpers:
            self.helpers.append(helper)

    def source(self) -> str:
        lines = [
            "def check(seen):",
            '    """FSDP\'s promise on what each rank saw (seen[rank][step], -1: wrapping): the first broken part, or None."""',  # noqa: E501
            "    broken = []",
            *self.body,
            "    return min(broken)[1] if broken else None",
        ]
        return "\n".join(lines)


def contract_for(scenario: Scenario, numbers: bool = True) -> Contract:
    """The calls that state the oracles' expectations for ``scenario``; the numbers' (the reference,
    clause 5's symptom, the replicas) only where ``numbers``."""
    contract = Contract()
    engine = scenario.runs_on
    evals = any(step.mode == "eval" for steps in scenario.ranks for step in steps)
    grouped: dict[tuple, dict[int, tuple[int, ...]]] = {}
    for rank, expectation in enumerate(expectations(scenario)):
        if expectation.refusal is not None:
            refused = expectation.refusal
            key: tuple = ("refusal", refused.step, refused.error_type, refused.words, refused.reason)
            steps: tuple[int, ...] = ()
        elif expectation.error_steps:
            key, steps = ("order", expectation.reason), tuple(sorted(expectation.error_steps))
        else:
            key = ("clean", tuple(sorted(expectation.warning_steps)), expectation.reason)
            steps = tuple(_unregistered_steps(scenario, rank))
        grouped.setdefault(key, {})[rank] = steps
    for key, ranks in grouped.items():
        if key[0] == "refusal":
            contract.body += _refusal_block(list(ranks), *key[1:], warnings=engine.order_warnings)
        elif key[0] == "order":
            contract.body += _order_block(ranks, key[1])
        else:
            contract.body += _clean_block(ranks, *key[1:], warnings=engine.order_warnings, evals=evals)
    if numbers:
        _numbers(scenario, contract)
        _replicas(scenario, contract)
    needs = " ".join([*contract.helpers, *contract.body])
    if "FIRST_ITERATION_ERROR" in needs:
        contract.constants.append(f"FIRST_ITERATION_ERROR = {literal(FIRST_ITERATION_ERROR)}")
    if "LATER_WARNING" in needs:
        head, tail = LATER_WARNING.split(". ", 1)
        contract.constants.append(f"LATER_WARNING = (\n    {literal(head + '. ')}\n    {literal(tail)}\n)")
    if "DOCUMENTED" in needs:
        contract.constants += [
            "# How FSDP2 documents refusing an unregistered method on sharded or low-precision parameters:",
            "DOCUMENTED = [",
            *(f"    {literal(pair)}," for pair in documented_unregistered_failures(scenario)),
            "]",
        ]
    return contract


def _clean_block(
    ranks: dict[int, tuple[int, ...]], warned_in: tuple[int, ...], why: str, *, warnings: bool, evals: bool
) -> list[str]:
    """Every step succeeds (or, in ``ranks[rank]``, FSDP2 refuses an unregistered method as it documents); an
    engine that warns of orders warns in ``warned_in`` (the rank's first deviating iteration) only, and there."""
    refusable = any(ranks.values())
    lines = _why(why) if warned_in else []
    if refusable:
        lines.append(f"    for rank, may_refuse in {literal(ranks)}.items():  # every step succeeds, or is refused")
    else:
        comment = f"FSDP warns in step(s) {list(warned_in)} only" if warned_in else "every step succeeds, unwarned"
        lines.append(f"    for rank in {literal(list(ranks))}:  # {comment if warnings else 'every step succeeds'}")
    lines += ["        warned = []"] * bool(warned_in) + ["        for index, outcome in sorted(seen[rank].items()):"]
    if refusable:
        lines += [
            '            error = outcome.get("error", "")',
            "            if error and not (index in may_refuse and any(error.startswith(k) and w in error for k, w in DOCUMENTED)):",  # noqa: E501
            '                broken.append((index, f"rank {rank} failed in step {index}: {error}"))',
        ]
    else:
        lines += [
            '            if "error" in outcome:',
            """                broken.append((index, f"rank {rank} failed in step {index}: {outcome['error']}"))""",
        ]
    if warnings:
        lines.append('            for text in outcome.get("warnings", ()):')
        if warned_in:
            due = f"index in {literal(list(warned_in))} and text.startswith(LATER_WARNING.format(rank=rank))"
            due += ' and outcome["mode"] != "eval"' * evals  # never in eval
            test = f"                if not ({due}):"
            lines.append("                warned.append(index)")
            lines += [test] if len(test) <= 120 else [f"                due = {due}", "                if not due:"]
            lines += [
                '                    broken.append((index, f"rank {rank} was warned in step {index}: {text}"))',
                f"        if not warned and any(step in seen[rank] for step in {literal(list(warned_in))}):",
                f'            broken.append(({warned_in[0]}, f"rank {{rank}} was never warned in step(s) {list(warned_in)} though {{why}}"))',  # noqa: E501
            ]
        else:
            lines.append('                broken.append((index, f"rank {rank} was warned in step {index}: {text}"))')
    return lines


def _order_block(ranks: dict[int, tuple[int, ...]], why: str) -> list[str]:
    """FSDP raises its first-iteration error on each rank in one of its steps, and nothing else before."""
    return [
        *_why(why),
        f"    for rank, steps in {literal({rank: list(steps) for rank, steps in ranks.items()})}.items():",
        "        for index, outcome in sorted(seen[rank].items()):",
        '            error = outcome.get("error", "")',
        '            if error and not (index in steps and error.startswith("RuntimeError: " + FIRST_ITERATION_ERROR)):',
        "                due = f\"'{FIRST_ITERATION_ERROR}' due in step(s) {steps}\"",
        '                broken.append((index, f"rank {rank} failed in step {index} ({due}): {error}"))',
        '        if not any("error" in outcome for outcome in seen[rank].values()):',
        "            broken.append((steps[0], f\"rank {rank} never raised '{FIRST_ITERATION_ERROR}' in step(s) {steps}: {why}\"))",  # noqa: E501
    ]


def _refusal_block(ranks: list[int], step: int, error_type: str, words: str, why: str, *, warnings: bool) -> list[str]:
    """FSDP documents an error here: the steps before it succeed (unwarned), and this step (or the wrapping)
    raises it."""
    lines = [
        *_why(why),
        *_assign("words", words),
        f"    for rank in {literal(ranks)}:  # FSDP refuses step {step} (or the wrapping): {error_type}, ...words...",  # noqa: E501
        "        for index, outcome in sorted(seen[rank].items()):",
        '            error = outcome.get("error", "")',
        f"            if error and not (index in (-1, {step}) and error.startswith({literal(error_type)}) and words in error):",  # noqa: E501
        '                broken.append((index, f"rank {rank} failed in step {index} (expected the refusal): {error}"))',
    ]
    if warnings:
        lines += [
            '            for text in outcome.get("warnings", ()):',
            '                broken.append((index, f"rank {rank} was warned in step {index}: {text}"))',
        ]
    return lines + [
        f'        if "error" not in seen[rank].get({step}, {{"error": ""}}):',
        f'            broken.append(({step}, f"rank {{rank}} ran step {step} without the refusal due: {{why}}"))',
    ]


def _why(why: str) -> list[str]:
    """``why = "..."``: the oracle's reason, which the messages quote."""
    return _assign("why", why)


def _assign(name: str, text: str) -> list[str]:
    """``name = "text"`` in ``check``, split into adjacent literals where long."""
    if len(text) <= 100:
        return [f"    {name} = {literal(text)}"]
    pieces = textwrap.wrap(text, 100, drop_whitespace=False, break_on_hyphens=False)
    return [f"    {name} = (", *(f"        {literal(piece)}" for piece in pieces), "    )"]


def _unregistered_steps(scenario: Scenario, rank: int) -> list[int]:
    """Steps where FSDP2 may refuse an unregistered method on sharded parameters, as it documents."""
    engine = scenario.runs_on
    return [index for index, step in enumerate(scenario.ranks[rank]) if not engine.registers(scenario, step.method)]


def _numbers(scenario: Scenario, contract: Contract) -> None:
    """Clause 4 where its premises hold; clause 5's symptom where FSDP1's ranks diverge."""
    compare = aligned(scenario) and consistent(scenario) and not unregistered_calls(scenario)
    steps = _promised_steps(scenario)
    silent = scenario.runs_on.promise is Promise.ONE_ORDER and not consistent(scenario)
    if compare and steps:
        grad_steps = [
            index
            for index in range(steps)
            if all(ranks[index].reduces_gradients for ranks in scenario.ranks) and not scenario.ignored_blocks
        ]
        contract.need(EXPECT_REFERENCE)
        contract.body.append(
            f"    expect_reference(broken, seen, reference(), {steps}, grad_steps={literal(grad_steps)}"
            + (f", replicas={gradient_replicas(scenario)})" if gradient_replicas(scenario) != 1 else ")")
        )
    elif silent:
        first_update = min(
            (i for ranks in scenario.ranks for i, step in enumerate(ranks) if step.optimizer_step),
            default=scenario.num_steps - 1,
        )
        contract.need(EXPECT_REFERENCE)
        contract.need(EXPECT_UNANNOUNCED)
        contract.body.append(f"    expect_outputs_until_warned(broken, seen, reference(), {first_update + 1})")
    else:
        return
    contract.reference = True
    operations = [
        [accumulated_operations(scenario.model, step.path, scenario.batch_size) for step in ranks]
        for ranks in scenario.ranks
    ]
    roundoff = ROUNDOFF_FACTOR * max(UNIT_ROUNDOFF[dtype] for dtype in scenario.dtypes)
    contract.constants += [
        f"RELATIVE_TOLERANCE, ROUNDOFF = {RELATIVE_TOLERANCE!r}, {roundoff!r}  # the fuzzer's tolerance",
        "# Additions one output element passes through per rank and step, what rounding scales with:",
        f"OPERATIONS = {literal(operations)}",
    ]


def _replicas(scenario: Scenario, contract: Contract) -> None:
    groups = replica_groups(scenario)
    if not groups or not keeps_replicas(scenario):
        return
    steps = _promised_steps(scenario)
    for group in groups:
        counted = 0
        for index in range(steps):
            histories = {tuple(s.optimizer_step for s in scenario.ranks[rank][: index + 1]) for rank in group}
            if len(histories) > 1:
                break
            counted = index + 1
        if counted:
            contract.need(EXPECT_REPLICAS)
            contract.digest = True
            contract.body.append(f"    expect_replicas(broken, seen, {literal([group])}, {counted})")


def iteration_note(scenario: Scenario, rank: int) -> str:
    """The rank's iterations' orders, for a comment."""
    return "; ".join(f"{list(it.order)}" for it in iterations(scenario, rank))
