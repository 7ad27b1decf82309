"""What the three stages hand each other, as plain data that round-trips
through JSON: the scenario (generate -> execute, judge), the observations
(execute -> judge) and the verdict's vocabulary (judge -> corpus, campaign).

A scenario is a model spec, the engine and its settings (each engine's
settings class lives with the engine, in ``fsdp_fuzz.engines``), the debug
level, and for every rank the steps it runs; observations are what each
rank did in each step.
Nothing here imports torch, so a scenario can be saved, shrunk, diffed and
judged months later, and the judge never needs a process group. Statuses,
collective purposes, clauses and violation kinds are enums: triage and replay
key on them, never on the words of a message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path as FilePath
from typing import Any

from fsdp_fuzz.engines import ENGINES as ENGINE_REGISTRY
from fsdp_fuzz.engines import HYBRID_NODE_SIZE, Engine
from fsdp_fuzz.engines.base import Purpose
from fsdp_fuzz.engines.fsdp1 import FsdpSettings, MixedPrecision
from fsdp_fuzz.engines.fsdp2 import Fsdp2Settings, MixedPrecisionPolicy
from fsdp_fuzz.jsonfmt import format_json
from fsdp_fuzz.models.spec import (
    Choice,
    ModelSpec,
    Sequential,
    SpecError,
    spec_from_json,
    spec_to_json,
)

SCHEMA_VERSION = 1

DEBUG_LEVELS = ("OFF", "INFO", "DETAIL")
ENGINES = tuple(ENGINE_REGISTRY)
"""``fsdp1``: ``FullyShardedDataParallel``; ``fsdp2``: ``fully_shard``; each
one ``fsdp_fuzz.engines.Engine``."""
MODES = ("train", "eval")
METHODS = ("forward", "encode")
"""The model's entry points: ``forward``, and ``encode``, which runs every
stage of the root but the last (``ModelSpec.encoder_stages``)."""
DTYPES = ("float32", "bfloat16", "float16")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
"""Half the distance from 1 to the next number of each dtype."""


class ScenarioError(ValueError):
    """A scenario (or scenario file) the fuzzer cannot run, with the reason."""


class _Vocabulary(str, Enum):
    """A JSON string with a closed set of values."""

    def __str__(self) -> str:
        return self.value


class Status(_Vocabulary):
    """How one rank's setup or step ended."""

    OK = "ok"
    ERROR = "error"
    HANG = "hang"
    """A collective outlived its group's timeout, or the rank went silent."""
    CRASH = "crash"
    """The rank's process died."""
    NOT_RUN = "not_run"
    """After a failed step the rank runs nothing more."""


class Clause(_Vocabulary):
    """A clause of the contract. The value is the stable id saved findings
    key on; ``sentence`` is what people read and may be reworded."""

    FIRST_ITERATION = "first-iteration-raises"
    LATER_ITERATION = "later-deviation-warns"
    EVAL_SILENCE = "eval-unchecked"
    CLEAN_RUN = "clean-run"
    REFERENCE = "matches-reference"
    SILENT_MISMATCH = "no-silent-mismatch"
    REPLICAS = "replicas-agree"
    REFUSAL = "documented-refusal"

    @property
    def sentence(self) -> str:
        return _CLAUSE_SENTENCES[self]

    @classmethod
    def parse(cls, text: str) -> Clause:
        """An id, or the sentence that findings saved before ids were
        introduced recorded instead."""
        for clause in cls:
            if text in (clause.value, clause.sentence):
                return clause
        raise ValueError(f"unknown clause {text!r}; known: {[clause.value for clause in cls]}")


_CLAUSE_SENTENCES = {
    Clause.FIRST_ITERATION: "first-iteration divergence raises",
    Clause.LATER_ITERATION: "later deviation warns once",
    Clause.EVAL_SILENCE: "eval is unchecked",
    Clause.CLEAN_RUN: "clean run",
    Clause.REFERENCE: "matches the reference run",
    Clause.SILENT_MISMATCH: "no silent mismatch",
    Clause.REPLICAS: "replicas hold the same parameters",
    Clause.REFUSAL: "a documented refusal comes",
}


class ViolationKind(_Vocabulary):
    """What exactly went against a clause: what triage keys on."""

    SETUP_FAILED = "setup-failed"
    STEP_FAILED = "step-failed"
    """A step that had to succeed failed (error, hang or crash)."""
    ORDER_ERROR_UNEXPECTED = "order-error-unexpected"
    """The first-iteration order error where no divergence was due."""
    ORDER_ERROR_MISSING = "order-error-missing"
    """A due order error never came: every step of its window succeeded."""
    ORDER_ERROR_REPLACED = "order-error-replaced"
    """Where the order error was due, or before it, the step failed otherwise."""
    WARNING_MISSING = "warning-missing"
    WARNING_MISWORDED = "warning-misworded"
    """An order warning whose words are not the contract's (a wrong rank, say)."""
    WARNING_UNEXPECTED = "warning-unexpected"
    """An order warning outside the rank's first deviating iteration."""
    EVAL_WARNED = "eval-warned"
    OUTPUT_MISMATCH = "output-mismatch"
    GRADIENT_MISMATCH = "gradient-mismatch"
    UNITS_PAIRED = "units-paired"
    """The k-th collectives of a group served different units."""
    REPLICAS_DIVERGED = "replicas-diverged"
    """Ranks that must hold the same parameters after a step hold different ones."""
    REFUSAL_MISSING = "refusal-missing"
    """The engine ran, or failed otherwise, where it documents an error."""


@dataclass(frozen=True)
class Violation:
    clause: Clause
    kind: ViolationKind
    rank: int
    step: int | None
    message: str

    def __str__(self) -> str:
        where = "setup" if self.step is None else f"step {self.step}"
        return f"[{self.clause.sentence}] rank {self.rank}, {where}: {self.message}"


@dataclass(frozen=True)
class Step:
    """What one rank does in one step of the schedule.

    ``path`` maps a branch point's name to the alternatives its forwards run,
    in order; a branch point absent from it runs alternative 0 once, and an
    empty list skips it. ``forwards`` forwards run, then one backward of the
    sum of their outputs when ``backward`` is set.

    ``gradient_sync`` off accumulates gradients unreduced: FSDP1 runs the
    step inside the root's ``no_sync()``, FSDP2 calls
    ``set_requires_gradient_sync(False)``.

    FSDP2 only: ``unshard`` calls every unit's ``unshard()`` before the
    forwards, ``reshard`` every unit's ``reshard()`` at the end of the step;
    ``all_reduce`` is ``set_requires_all_reduce`` (HSDP: off, gradients are
    reduce-scattered within a node but not all-reduced across nodes);
    ``last_backward`` is ``set_is_last_backward`` (off for a microbatch
    whose gradients a later backward completes); ``reshard_after_forward``,
    when set, is ``set_reshard_after_forward`` on every unit from this step
    on; ``reset_iter_state`` calls the root's ``reset_iter_state()`` first.

    ``method``: the entry point the forwards call (``METHODS``). ``frozen``:
    blocks whose parameters have ``requires_grad`` off for this step, as a
    fine-tuning recipe freezes and unfreezes them; a block named in some
    step of a schedule is trainable in the steps that do not name it.
    """

    mode: str = "train"
    path: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    forwards: int = 1
    backward: bool = True
    grad_enabled: bool = True
    optimizer_step: bool = False
    gradient_sync: bool = True
    unshard: bool = False
    reshard: bool = False
    method: str = "forward"
    frozen: tuple[str, ...] = ()
    all_reduce: bool = True
    last_backward: bool = True
    reshard_after_forward: bool | None = None
    reset_iter_state: bool = False

    @property
    def training(self) -> bool:
        return self.mode == "train"

    @property
    def reduces_gradients(self) -> bool:
        """Whether this step's backward leaves every rank's gradients reduced
        over all ranks when it ends: not with ``gradient_sync`` off, not
        without HSDP's all-reduce, not before the last backward of an
        accumulation (``last_backward`` off)."""
        return self.gradient_sync and self.all_reduce and self.last_backward


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    ranks: tuple[tuple[Step, ...], ...]
    fsdp: FsdpSettings = FsdpSettings()
    engine: str = "fsdp1"
    fsdp2: Fsdp2Settings = Fsdp2Settings()
    debug_level: str = "DETAIL"
    collective_checker: bool = False
    freeze_untaken: bool = False
    seed: int = 0
    batch_size: int = 8
    description: str = ""

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def num_steps(self) -> int:
        return len(self.ranks[0])

    @property
    def runs_on(self) -> Engine:
        """The engine, with everything the fuzzer knows of it (``fsdp_fuzz.engines``)."""
        return ENGINE_REGISTRY[self.engine]

    @property
    def hybrid(self) -> bool:
        """Sharded within simulated nodes of ``HYBRID_NODE_SIZE`` ranks, replicated across them."""
        return self.runs_on.hybrid(self)

    @property
    def mixed_precision(self) -> MixedPrecision | MixedPrecisionPolicy | None:
        """The engine's mixed-precision setting."""
        return self.runs_on.mixed_precision(self)

    @property
    def dtypes(self) -> frozenset[str]:
        """Every dtype the engine computes or communicates in: float32 and
        whatever the mixed-precision settings name."""
        policy = self.mixed_precision
        named = [] if policy is None else [v for k, v in vars(policy).items() if k.endswith("_dtype") and v]
        return frozenset(("float32", *named))

    @property
    def param_dtype(self) -> str:
        policy = self.mixed_precision
        return (policy.param_dtype if policy is not None else None) or "float32"

    @property
    def cpu_offload(self) -> bool:
        """Whether the engine offloads parameters to the CPU (CUDA only)."""
        return self.runs_on.cpu_offload(self)

    @property
    def ignored_blocks(self) -> tuple[str, ...]:
        """Blocks whose parameters the engine ignores (``ignored``)."""
        return self.runs_on.ignored(self)

    def scheduled_frozen(self) -> tuple[str, ...]:
        """Blocks some step freezes, in the spec's order."""
        named = {name for steps in self.ranks for step in steps for name in step.frozen}
        return tuple(node.name for node in self.model.named() if node.name in named)


def validate_scenario(scenario: Scenario) -> None:
    """Raise ``ScenarioError`` naming the first thing that makes it unrunnable."""
    if scenario.world_size < 2:
        raise ScenarioError("a scenario needs at least 2 ranks")
    if len({len(steps) for steps in scenario.ranks}) != 1:
        raise ScenarioError("every rank must run the same number of steps")
    if scenario.engine not in ENGINES:
        raise ScenarioError(f"engine {scenario.engine!r} is not one of {ENGINES}")
    if scenario.debug_level not in DEBUG_LEVELS:
        raise ScenarioError(f"debug_level {scenario.debug_level!r} is not one of {DEBUG_LEVELS}")
    engine = scenario.runs_on
    for other in ENGINE_REGISTRY.values():
        if other is not engine and other.settings(scenario) != other.settings_type():
            raise ScenarioError(
                f"{other.settings_field!r} settings need engine {other.name!r} ({other.api}); engine "
                f"{engine.name!r} takes {engine.settings_field!r} settings"
            )
    if scenario.hybrid and scenario.world_size % HYBRID_NODE_SIZE:
        raise ScenarioError(f"hybrid sharding simulates nodes of {HYBRID_NODE_SIZE} ranks: the world size must be even")
    _validate_ignored(scenario)
    _validate_mixed_precision(scenario)
    for reason in engine.refusals(scenario):
        raise ScenarioError(reason)
    if scenario.batch_size < 1:
        raise ScenarioError("batch_size must be positive")
    alternatives = {choice.name: len(choice.alternatives) for choice in scenario.model.choices()}
    freezable = freezable_blocks(scenario)
    for rank, steps in enumerate(scenario.ranks):
        for index, step in enumerate(steps):
            where = f"rank {rank}, step {index}"
            if step.mode not in MODES:
                raise ScenarioError(f"{where}: mode {step.mode!r} is not one of {MODES}")
            if step.method not in METHODS:
                raise ScenarioError(f"{where}: method {step.method!r} is not one of {METHODS}")
            if step.method not in engine.methods:
                offering = " or ".join(
                    repr(other.name) for other in ENGINE_REGISTRY.values() if step.method in other.methods
                )
                raise ScenarioError(
                    f"{where}: method {step.method!r} needs engine {offering} ({engine.api} runs its hooks "
                    f"around {' and '.join(engine.methods)} only)"
                )
            for other in ENGINE_REGISTRY.values():
                for name in other.step_controls if other is not engine else ():
                    if getattr(step, name) != getattr(_DEFAULT_STEP, name):
                        raise ScenarioError(f"{where}: {name!r} needs engine {other.name!r}")
            unfreezable = sorted(set(step.frozen) - set(freezable))
            if unfreezable:
                raise ScenarioError(
                    f"{where}: cannot freeze {unfreezable} by schedule; blocks that can be: {sorted(freezable)} "
                    "(not frozen by the model, not tied, not inside an alternative under freeze_untaken)"
                )
            if step.forwards < 0:
                raise ScenarioError(f"{where}: forwards must not be negative")
            if step.backward and (step.forwards == 0 or not step.grad_enabled):
                raise ScenarioError(f"{where}: a backward needs at least one forward with grad enabled")
            for name, runs in step.path.items():
                if name not in alternatives:
                    raise ScenarioError(f"{where}: path names unknown branch point {name!r}")
                if any(not 0 <= index < alternatives[name] for index in runs):
                    raise ScenarioError(
                        f"{where}: branch point {name!r} has {alternatives[name]} alternatives, "
                        f"path asks for {list(runs)}"
                    )


def first_step_on_unreduced_gradients(steps: Sequence[Step]) -> int | None:
    """The first of one rank's steps that steps the optimizer while the last
    backward since the previous optimizer step left gradients unreduced
    (``Step.reduces_gradients``), or in a step that does. Both engines
    document these settings as gradient accumulation: such gradients are
    each rank's own until a backward that reduces them."""
    unreduced = False
    for index, step in enumerate(steps):
        unreduced = (not step.reduces_gradients) if step.backward else unreduced
        if step.optimizer_step and (unreduced or not step.reduces_gradients):
            return index
        unreduced = unreduced and not step.optimizer_step
    return None


def freezable_blocks(scenario: Scenario) -> tuple[str, ...]:
    """Blocks a step may freeze: named Sequentials below the root that the
    model does not freeze and no tie involves, outside alternatives when
    ``freeze_untaken`` sets theirs; with FSDP1 and ``use_orig_params`` off,
    only units (a flat parameter has one ``requires_grad``)."""
    tied = {name for pair in scenario.model.ties().items() for name in pair}
    whole_units = scenario.runs_on.flat_parameters(scenario)
    found: list[str] = []

    def visit(node, inside_alternative: bool, frozen_above: bool) -> None:
        if isinstance(node, Sequential):
            if (
                node is not scenario.model.root
                and not node.frozen
                and not frozen_above
                and node.name not in tied
                and not (inside_alternative and scenario.freeze_untaken)
                and (node.fsdp_unit or not whole_units)
            ):
                found.append(node.name)
            for child in node.children:
                visit(child, inside_alternative, frozen_above or node.frozen)
        elif isinstance(node, Choice):
            for alternative in node.alternatives:
                visit(alternative, True, frozen_above)

    visit(scenario.model.root, False, False)
    return tuple(found)


def _validate_mixed_precision(scenario: Scenario) -> None:
    policy = scenario.mixed_precision
    if policy is None:
        return
    for name, value in vars(policy).items():
        if name.endswith("_dtype") and value is not None and value not in DTYPES:
            raise ScenarioError(f"mixed precision {name} {value!r} is not one of {DTYPES}")
    if scenario.ignored_blocks and scenario.param_dtype != "float32":
        raise ScenarioError(
            f"ignored blocks {list(scenario.ignored_blocks)} keep float32 parameters that the engine does not "
            f"cast, and would meet {scenario.param_dtype} activations, which torch refuses; drop the param_dtype "
            "or the ignored blocks"
        )


def _validate_ignored(scenario: Scenario) -> None:
    blocks = {node.name for node in scenario.model.named() if isinstance(node, Sequential)}
    tied = {name for pair in scenario.model.ties().items() for name in pair}
    for name in scenario.ignored_blocks:
        if name not in blocks or name == scenario.model.root.name:
            raise ScenarioError(f"ignored block {name!r} is not a named Sequential below the root")
        if name in tied:
            raise ScenarioError(
                f"ignored block {name!r} is tied: its parameters would be managed at one place and ignored at "
                "the other; ignore a block no tie involves"
            )


# JSON ----------------------------------------------------------------------

_DEFAULT_STEP = Step()


def step_to_json(step: Step) -> dict[str, Any]:
    """Mode and path always; other fields only where they differ from ``Step()``."""
    encoded: dict[str, Any] = {
        "mode": step.mode,
        "path": {name: list(taken) for name, taken in sorted(step.path.items())},
    }
    for item in fields(Step):
        value = getattr(step, item.name)
        if item.name not in encoded and value != getattr(_DEFAULT_STEP, item.name):
            encoded[item.name] = list(value) if isinstance(value, tuple) else value
    return encoded


def step_from_json(encoded: Mapping[str, Any]) -> Step:
    """Each field as its default's type; the others' decoders in ``_STEP_DECODERS``."""
    names = [item.name for item in fields(Step)]
    unknown = set(encoded) - set(names)
    if unknown:
        raise ScenarioError(f"unknown step fields {sorted(unknown)}")
    return Step(
        **{
            name: _STEP_DECODERS.get(name, type(getattr(_DEFAULT_STEP, name)))(encoded[name])
            for name in names
            if name in encoded
        }
    )


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


_STEP_DECODERS = {
    "path": lambda path: {str(name): tuple(int(i) for i in taken) for name, taken in dict(path).items()},
    "frozen": lambda names: tuple(str(name) for name in names),
    "reshard_after_forward": _optional_bool,
}


def scenario_to_json(scenario: Scenario) -> dict[str, Any]:
    """The saved form: settings newer than the first saved scenarios only where set."""
    return {
        "schema_version": SCHEMA_VERSION,
        "description": scenario.description,
        "world_size": scenario.world_size,
        **({"engine": scenario.engine} if scenario.engine != "fsdp1" else {}),
        "model": spec_to_json(scenario.model),
        # FSDP1's settings always (every file has them), another engine's where it runs.
        "fsdp": _settings_json(scenario.fsdp),
        scenario.runs_on.settings_field: _settings_json(scenario.runs_on.settings(scenario)),
        "debug_level": scenario.debug_level,
        "collective_checker": scenario.collective_checker,
        "freeze_untaken": scenario.freeze_untaken,
        "seed": scenario.seed,
        "batch_size": scenario.batch_size,
        "ranks": [[step_to_json(step) for step in steps] for steps in scenario.ranks],
    }


_ADDED_SETTINGS = (
    "mixed_precision",
    "mp_policy",
    "register_encode",
    "auto_wrap",
    "ignored",
    "shard_dim",
    "gradient_divide_factor",
    "force_sum_reduction",
    "sharded_together",
    "no_unshard_in_backward",
    "cpu_offload",
)
"""Settings newer than the first saved scenarios: written only where set, so old files stay as they were."""


def _settings_json(settings: FsdpSettings | Fsdp2Settings) -> dict[str, Any]:
    encoded, default = (json.loads(json.dumps(asdict(s))) for s in (settings, type(settings)()))  # tuples as lists
    return {name: value for name, value in encoded.items() if name not in _ADDED_SETTINGS or value != default[name]}


def _settings_from_json(kind: type, encoded: Mapping[str, Any]) -> Any:
    fields = dict(encoded)
    for name, policy in (("mixed_precision", MixedPrecision), ("mp_policy", MixedPrecisionPolicy)):
        if fields.get(name) is not None:
            fields[name] = policy(**fields[name])
    if "ignored" in fields:
        fields["ignored"] = tuple(str(name) for name in fields["ignored"])
    if "no_unshard_in_backward" in fields:
        fields["no_unshard_in_backward"] = tuple(str(name) for name in fields["no_unshard_in_backward"])
    if "sharded_together" in fields:
        fields["sharded_together"] = tuple(tuple(str(name) for name in group) for group in fields["sharded_together"])
    if fields.get("gradient_divide_factor") is not None:
        fields["gradient_divide_factor"] = float(fields["gradient_divide_factor"])
    return kind(**fields)


def scenario_from_json(encoded: Any) -> Scenario:
    """Decode and validate; every problem becomes a ``ScenarioError``."""
    if not isinstance(encoded, dict):
        raise ScenarioError("a scenario must be a JSON object")
    version = encoded.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ScenarioError(
            f"schema_version is {version!r}, this fuzzer reads version {SCHEMA_VERSION}; "
            "re-save the scenario with a matching fuzzer version"
        )
    try:
        ranks = tuple(tuple(step_from_json(step) for step in steps) for steps in encoded["ranks"])
        scenario = Scenario(
            model=spec_from_json(encoded["model"]),
            ranks=ranks,
            **{
                engine.settings_field: _settings_from_json(engine.settings_type, encoded.get(engine.settings_field, {}))
                for engine in ENGINE_REGISTRY.values()
            },
            engine=str(encoded.get("engine", "fsdp1")),
            debug_level=str(encoded.get("debug_level", "DETAIL")),
            collective_checker=bool(encoded.get("collective_checker", False)),
            freeze_untaken=bool(encoded.get("freeze_untaken", False)),
            seed=int(encoded.get("seed", 0)),
            batch_size=int(encoded.get("batch_size", 8)),
            description=str(encoded.get("description", "")),
        )
    except KeyError as exc:
        raise ScenarioError(f"missing field {exc.args[0]!r}") from None
    except SpecError as exc:
        raise ScenarioError(f"model: {exc}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(f"malformed field: {exc}") from None
    if "world_size" in encoded and encoded["world_size"] != scenario.world_size:
        raise ScenarioError(f"world_size is {encoded['world_size']} but {scenario.world_size} ranks have steps")
    validate_scenario(scenario)
    return scenario


def dumps(scenario: Scenario) -> str:
    return format_json(scenario_to_json(scenario)) + "\n"


def read_json(path: str | FilePath) -> Any:
    """Parse a JSON file; errors name the file and the place in it."""
    path = FilePath(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def load_scenario(path: str | FilePath) -> Scenario:
    """Read a scenario file; errors name the file and what is wrong in it."""
    try:
        return scenario_from_json(read_json(path))
    except ScenarioError as exc:
        message = str(exc)
        raise ScenarioError(message if message.startswith(str(path)) else f"{path}: {message}") from None


# Observations --------------------------------------------------------------


@dataclass(frozen=True)
class WarningRecord:
    category: str
    message: str


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective a rank issued: what, how big, and for which FSDP unit."""

    op: str
    dtype: str
    numel: int
    unit: str | None
    """The spec name of the FSDP unit served, ``None`` when not on a unit's behalf."""
    purpose: Purpose | None
    group: tuple[int, ...] = ()
    """Global ranks of the group it ran on: collectives pair up within a group."""


@dataclass(frozen=True)
class StepOutcome:
    """One rank's step: how it ended, and every warning it raised, in order."""

    status: Status
    error_type: str | None = None
    error_message: str | None = None
    warnings: tuple[WarningRecord, ...] = ()
    output_sum: float | None = None
    grad_sum: float | None = None
    """Sum of this rank's local gradients after the step's backward."""
    collectives: tuple[CollectiveRecord, ...] = ()
    stack: str | None = None
    """For a hang: where the rank was when its group timed out (innermost frames last)."""
    param_digest: float | None = None
    """A fingerprint of this rank's local parameters (its shards) after the
    step: ranks holding the same values have the same digest."""

    def failed_with(self, error_type: str, message_prefix: str) -> bool:
        """Whether the step raised ``error_type`` with a message that starts so."""
        return self.error_type == error_type and (self.error_message or "").startswith(message_prefix)


@dataclass(frozen=True)
class RankObservation:
    """``setup`` covers building the model and wrapping it in FSDP."""

    setup: StepOutcome
    steps: tuple[StepOutcome, ...]


@dataclass(frozen=True)
class ReferenceStep:
    """What a single process computes for one step (``fsdp_fuzz.execute.reference``)."""

    output_sums: tuple[float, ...]
    """Per rank: the sum of its forwards' outputs."""
    grad_sum: float | None
    """Sum of the rank-averaged gradient after this step's backward,
    accumulated since the last optimizer step; ``None`` without a backward."""
    output_magnitudes: tuple[float, ...] | None = None
    """Per rank: the sum of the absolute values of its forwards' outputs,
    what a rounding error in low precision scales with."""
    grad_magnitude: float | None = None
    """The sum of the absolute values of the averaged gradient."""


@dataclass(frozen=True)
class Observations:
    backend: str
    device: str
    torch_version: str
    ranks: tuple[RankObservation, ...]
    reference: tuple[ReferenceStep, ...] | None = None
    """The single-process reference run, when the schedules allow one."""


def outcome_to_json(outcome: StepOutcome) -> dict[str, Any]:
    """Status always; the other fields only when they say something. The
    executor reports outcomes in this form."""
    encoded = asdict(outcome)
    encoded["warnings"] = [asdict(w) for w in outcome.warnings]
    encoded["collectives"] = [list(asdict(c).values()) for c in outcome.collectives]
    return {key: value for key, value in encoded.items() if key == "status" or value not in (None, [])}


def outcome_from_json(encoded: Mapping[str, Any]) -> StepOutcome:
    return StepOutcome(
        status=Status(encoded["status"]),
        error_type=encoded.get("error_type"),
        error_message=encoded.get("error_message"),
        warnings=tuple(WarningRecord(**w) for w in encoded.get("warnings", ())),
        output_sum=encoded.get("output_sum"),
        grad_sum=encoded.get("grad_sum"),
        param_digest=encoded.get("param_digest"),
        collectives=tuple(_collective_from_json(c) for c in encoded.get("collectives", ())),
        stack=encoded.get("stack"),
    )


def observations_to_json(observations: Observations) -> dict[str, Any]:
    return {
        "backend": observations.backend,
        "device": observations.device,
        "torch_version": observations.torch_version,
        "ranks": [
            {"setup": outcome_to_json(rank.setup), "steps": [outcome_to_json(s) for s in rank.steps]}
            for rank in observations.ranks
        ],
        "reference": None
        if observations.reference is None
        else [_reference_step_json(step) for step in observations.reference],
    }


def observations_from_json(encoded: Mapping[str, Any]) -> Observations:
    return Observations(
        backend=encoded["backend"],
        device=encoded["device"],
        torch_version=encoded["torch_version"],
        ranks=tuple(
            RankObservation(
                setup=outcome_from_json(rank["setup"]),
                steps=tuple(outcome_from_json(s) for s in rank["steps"]),
            )
            for rank in encoded["ranks"]
        ),
        reference=None
        if encoded.get("reference") is None
        else tuple(_reference_step_from_json(step) for step in encoded["reference"]),
    )


def _reference_step_json(step: ReferenceStep) -> dict[str, Any]:
    encoded: dict[str, Any] = {"output_sums": list(step.output_sums), "grad_sum": step.grad_sum}
    if step.output_magnitudes is not None:
        encoded["output_magnitudes"] = list(step.output_magnitudes)
    if step.grad_magnitude is not None:
        encoded["grad_magnitude"] = step.grad_magnitude
    return encoded


def _reference_step_from_json(encoded: Mapping[str, Any]) -> ReferenceStep:
    magnitudes = encoded.get("output_magnitudes")
    return ReferenceStep(
        tuple(encoded["output_sums"]),
        encoded["grad_sum"],
        None if magnitudes is None else tuple(magnitudes),
        encoded.get("grad_magnitude"),
    )


def _collective_from_json(encoded: list) -> CollectiveRecord:
    op, dtype, numel, unit, purpose, group = encoded
    return CollectiveRecord(op, dtype, numel, unit, None if purpose is None else Purpose(purpose), tuple(group))
