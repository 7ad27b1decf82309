"""What FSDP promised for one scenario, as each rank of a script asserts it.

Nothing here decides what FSDP promises: ``fsdp_fuzz.judge.oracles`` does (``expectations``, ``refusal``,
``consistent``, the reference and replica clauses and their premises). This module reads those decisions
into what one rank can check on its own: the error it must raise and in which steps (FSDP1's
first-iteration error, FSDP2's documented refusals), the errors it may raise (FSDP2 refusing a method it
was not told of), where FSDP1 must warn of a later order and where it must not, and the numbers: each
rank's outputs and the gradients against a run without FSDP, and replicas against each other. It also
says the promise in one sentence, which the script prints.

One clause is checked by its symptom rather than its cause: *no silent mismatch* (clause 5) is judged
by the fuzzer on a trace of FSDP's collectives, which a hand-written test does not carry. Where FSDP1's
ranks do not keep one order, each rank's outputs must instead be the unsharded model's on its own
batches in the steps before FSDP is due to raise or warn (and before the first update): units paired
silently give other parameters.
"""

from __future__ import annotations

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
    keeps_replicas,
    replica_groups,
    unregistered_calls,
)

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

ORDER_WARNING = "Forward order differs"
"""How FSDP1's order warnings start (``oracles.ORDER_MARKER``)."""


def numbers_matter(entry: CorpusEntry | None) -> bool:
    """Whether the script compares numbers: only where nothing else shows the finding. A recorded finding's
    where every violation is about numbers; a known issue's unless it is one of ``NOT_ABOUT_NUMBERS``; always
    for a scenario that must keep the whole contract (a seed)."""
    if entry is None or entry.keeps_contract:
        return True
    if entry.finding is not None:
        return all(Clause.parse(getattr(clause, "value", clause)) in NUMBERS for clause, *_ in entry.finding.signature)
    return entry.known_issue not in NOT_ABOUT_NUMBERS


@dataclass(frozen=True)
class Raise:
    """An error FSDP promises, or documents it may give: its type, its words, the steps (-1: wrapping)."""

    error_type: str
    words: tuple[str, ...]
    """The message starts with the only one (``starts``), or contains one of them."""
    steps: tuple[int, ...]
    starts: bool = False

    @property
    def kind(self) -> tuple:
        return (self.error_type, self.words, self.starts)

    def describe(self, steps: bool = True) -> str:
        phrase = self.words[0] if self.starts else "..." + self.words[0] + "..."
        return f"{self.error_type} '{phrase}'" + (f" {_steps(self)}" if steps else "")


@dataclass(frozen=True)
class RankPromise:
    """What one rank is promised."""

    raises: Raise | None = None
    """It raises this, in one of its steps, and nothing else before."""
    may_raise: Raise | None = None
    """It may raise this there, as FSDP documents (and runs nothing more)."""
    warned_in: tuple[int, ...] = ()
    """FSDP1 warns of a later order in one of these steps and nowhere else."""
    unwarned: bool = False
    """FSDP1 warns of no order in any step (``warned_in`` empty), or outside ``warned_in``."""
    why: str = ""


@dataclass
class Numbers:
    """The numbers a rank compares: its outputs, the gradients, and its parameters against its replicas'."""

    outputs_until: int = 0
    """Each rank's outputs are the reference's in the steps before this."""
    grad_steps: tuple[int, ...] = ()
    """After these steps' backward the gradients are the reference's (averaged over the ranks)."""
    replicas_until: tuple[int, ...] = ()
    """Per rank: its parameters are its replicas' after the steps before this."""
    silent: bool = False
    """The outputs stand for clause 5 (units paired silently), not clause 4."""
    output_tolerance: float = RELATIVE_TOLERANCE
    grad_tolerance: float = RELATIVE_TOLERANCE
    operations: int = 0
    """The longest chain of additions one output element passes through: what rounding scales with."""

    @property
    def reference(self) -> bool:
        return bool(self.outputs_until or self.grad_steps)


@dataclass
class Contract:
    """Each rank's promise, and the numbers the ranks compare."""

    ranks: tuple[RankPromise, ...]
    numbers: Numbers = field(default_factory=Numbers)

    def promise(self, engine: str) -> str:
        """The promise in one sentence, as the script prints it."""
        parts = []
        groups: dict[tuple, list[int]] = {}
        for rank, promised in enumerate(self.ranks):
            kind = promised.raises.kind if promised.raises is not None else None
            key = (kind, promised.may_raise, promised.warned_in, promised.unwarned)
            groups.setdefault(key, []).append(rank)
        for (kind, may_raise, warned_in, unwarned), ranks in groups.items():
            who = "every rank" if len(ranks) == len(self.ranks) else _ranks(ranks)
            plural = who.startswith("ranks")
            if kind is not None:
                raised = [self.ranks[rank].raises for rank in ranks]
                text = f"{who} {'raise' if plural else 'raises'} {raised[0].describe()}"
                if len({error.steps for error in raised}) > 1:  # the same error, in steps of each rank's own
                    where = ", ".join(f"rank {rank} {_steps(self.ranks[rank].raises)}" for rank in ranks)

                    text = f"{who} {'raise' if plural else 'raises'} {raised[0].describe(steps=False)} ({where})"
                parts.append(text)
                continue
            text = f"{who} {'run' if plural else 'runs'} every step"
            if may_raise is not None:
                text += f" (or refuses it with {may_raise.describe()}, as documented)"
            if warned_in:
                steps = " or ".join(map(str, warned_in))
                text += f", warned (WARNING) in step {steps} only"
            elif unwarned:
                text += " without an order warning"

            parts.append(text)
        numbers = self.numbers
        if numbers.silent and numbers.outputs_until:
            parts.append(f"each rank's outputs match a run without {engine} until FSDP is due to warn or raise")
        elif numbers.reference:
            parts.append(f"outputs and gradients match a run without {engine}")
        if numbers.replicas_until:
            parts.append("replicas hold the same parameters")
        return "; ".join(parts)

    def reasons(self) -> list[str]:
        return list(dict.fromkeys(promised.why for promised in self.ranks if promised.why))


def _steps(error: Raise) -> str:
    where = "in the wrapping or step" if -1 in error.steps else "in step"
    return f"{where} {' or '.join(str(step) for step in error.steps if step >= 0)}"


def _ranks(ranks: list[int]) -> str:

    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def contract_for(scenario: Scenario, numbers: bool = True) -> Contract:
    """Each rank's promise from the oracles' ``expectations``; the numbers' clauses (the reference, clause 5's
    symptom, the replicas) only where ``numbers``."""
    engine = scenario.runs_on
    promises = []
    for rank, expectation in enumerate(expectations(scenario)):
        if expectation.refusal is not None:
            refused = expectation.refusal
            step = -1 if refused.step is None else refused.step
            promises.append(
                RankPromise(raises=Raise(refused.error_type, (refused.words,), (-1, step)), why=refused.reason)
            )
        elif expectation.error_steps:
            raises = Raise("RuntimeError", (FIRST_ITERATION_ERROR,), tuple(sorted(expectation.error_steps)), True)
            promises.append(RankPromise(raises=raises, why=expectation.reason))
        else:
            steps = tuple(
                index
                for index, step in enumerate(scenario.ranks[rank])
                if not engine.registers(scenario, step.method) and step.forwards
            )
            may = None
            if steps:
                failures = documented_unregistered_failures(scenario)
                may = Raise(failures[0][0], tuple(words for _, words in failures), steps)
            warned_in = tuple(sorted(expectation.warning_steps))
            promises.append(RankPromise(None, may, warned_in, engine.order_warnings, expectation.reason))
    contract = Contract(tuple(promises))
    if numbers:
        contract.numbers = _numbers(scenario, contract.ranks)
    return contract


def _numbers(scenario: Scenario, ranks: tuple[RankPromise, ...]) -> Numbers:
    """Clause 4 where its premises hold, clause 5's symptom where FSDP1's ranks diverge, and the replicas."""
    found = Numbers()
    steps = _promised_steps(scenario)
    if aligned(scenario) and consistent(scenario) and not unregistered_calls(scenario) and steps:
        found.outputs_until = steps
        if not scenario.ignored_blocks:  # each rank's own gradients there: judged by the outputs after an update
            found.grad_steps = tuple(
                index for index in range(steps) if all(rank[index].reduces_gradients for rank in scenario.ranks)
            )
    elif scenario.runs_on.promise is Promise.ONE_ORDER and not consistent(scenario):
        first_update = min(
            (index for steps in scenario.ranks for index, step in enumerate(steps) if step.optimizer_step),
            default=scenario.num_steps - 1,
        )
        due = [step for promised in ranks for step in (*promised.warned_in, *(promised.raises or _NONE).steps)]
        found.outputs_until = min([first_update + 1, *(step for step in due if step >= 0)])
        found.silent = True
    found.operations = max(
        accumulated_operations(scenario.model, step.path, scenario.batch_size)
        for steps in scenario.ranks
        for step in steps
    )
    roundoff = ROUNDOFF_FACTOR * max(UNIT_ROUNDOFF[dtype] for dtype in scenario.dtypes)
    found.output_tolerance = max(RELATIVE_TOLERANCE, roundoff * found.operations)
    found.grad_tolerance = max(
        RELATIVE_TOLERANCE, roundoff * (found.operations + scenario.batch_size + scenario.world_size)
    )
    found.replicas_until = _replicas(scenario)
    return found


_NONE = Raise("", (), ())


def _replicas(scenario: Scenario) -> tuple[int, ...]:
    """Per rank, the steps after which its replica group holds the same parameters: while the engine keeps its
    promise, every rank of the group has taken the same optimizer steps (``oracles.replica_drift``)."""
    groups = replica_groups(scenario)
    if not groups or not keeps_replicas(scenario):
        return ()
    counted = [0] * scenario.world_size
    for group in groups:
        for index in range(_promised_steps(scenario)):
            histories = {tuple(s.optimizer_step for s in scenario.ranks[rank][: index + 1]) for rank in group}
            if len(histories) > 1:
                break
            for rank in group:
                counted[rank] = index + 1
    return tuple(counted) if any(counted) else ()


def later_warning(rank: str = "{rank}") -> str:
    """FSDP1's later-order warning for a rank, as the contract words it."""
    return LATER_WARNING.replace("{rank}", rank)


__all__ = [
    "NOT_ABOUT_NUMBERS",
    "NUMBERS",
    "Contract",
    "Numbers",
    "RankPromise",
    "Raise",
    "contract_for",
    "later_warning",
    "numbers_matter",
]
