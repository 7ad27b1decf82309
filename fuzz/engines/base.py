"""What an engine is, and what the engines share.

An engine is everything the fuzzer knows of one FSDP API, in one place:
its settings (the data class a scenario carries), what it refuses to run,
what it promises (the facts the judge states its contract from), how its
settings and per-step controls are drawn, how ``show`` describes it, and
how a rank wraps a model in it and drives it (``wrap``, ``unit_keys``,
``unit_hooks``, ``stepping``), and how a reproducer script writes those
calls out (``source``). Importing an engine imports no torch: the rank-side
methods import it when called, so the judge stays torch-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from hypothesis.strategies import DrawFn

    from fsdp_fuzz.data import Scenario, Step
    from fsdp_fuzz.execute.model import BuiltModel

HYBRID_NODE_SIZE = 2
"""Ranks per simulated node under hybrid sharding (HSDP)."""


@dataclass(frozen=True)
class EngineSource:
    """The engine's part of a reproducer script (``fsdp_fuzz.repro``): its calls written out, as lines of
    the rank's ``run(rank)`` (``rank`` and ``model`` in scope; ``step`` in a step's body)."""

    imports: tuple[str, ...]
    wrap: tuple[str, ...]
    """Make the built ``model`` the engine's: every unit innermost first, then the root, then the setters."""
    groups: tuple[str, ...] = ()
    """Before building: the engine's process groups or mesh."""
    helpers: tuple[str, ...] = ()
    """Module-level functions the wrapping passes the engine."""
    before_step: tuple[str, ...] = ()
    """At the start of a step: the engine's per-step controls the schedule sets."""
    step_context: str | None = None
    """A context manager around a step's body (``no_sync``), or None."""
    after_step: tuple[str, ...] = ()
    gradients: str = ""
    """``def gradients(model)``: every parameter's whole gradient, flattened, by its name in the model."""
    gradients_call: str = "gradients(model)"
    replicas: str | None = None
    """This rank's replica group (``None``: the world) where ranks hold the same parameters."""
    local: str = "{}"
    """A parameter's part on this rank, ``{}`` the parameter."""
    flat_gradients: bool = False
    """``gradients`` gives each gradient flattened (the engine keeps no shapes at hand)."""
    module: str = "model"
    """The user's model inside the engine's wrapping (as an expression of ``model``), where its attributes are."""


def hybrid_allowed(world_size: int) -> bool:
    """Hybrid sharding needs the ranks split into equal simulated nodes."""
    return world_size % HYBRID_NODE_SIZE == 0


class Purpose(str, Enum):
    """Why FSDP issued a collective, as the trace attributes it (a stable id)."""

    UNSHARD = "unshard"
    REDUCE_GRAD = "reduce_grad"
    ORDER_CHECK = "order_check"

    def __str__(self) -> str:
        return self.value


class Promise(str, Enum):
    """Which programs an engine promises to run correctly, the premise of
    the contract's clauses about results."""

    ONE_ORDER = "one-order"
    """Any program in which every rank keeps one forward order of units,
    checked (at DETAIL) against the first iteration's: FSDP1."""
    SAME_PROGRAM = "same-program"
    """The same program on every rank (or the same units with unused
    parameters reduce-scattered); no order check: FSDP2."""


@dataclass(frozen=True)
class UnitHook:
    """An FSDP function that issues collectives on one unit's behalf: while it
    runs, the trace attributes collectives to that unit, for ``purpose``."""

    module: str
    owner: str | None
    """A class in ``module`` holding the function, or ``None`` for a module-level function."""
    name: str
    purpose: Purpose
    unit_argument: int
    """Which positional argument identifies the unit (see ``Engine.unit_keys``)."""

    def where(self) -> str:
        return ".".join(part for part in (self.module, self.owner, self.name) if part)


class Engine(ABC):
    """One FSDP API; an instance in ``fsdp_fuzz.engines.ENGINES`` plugs it in."""

    name: ClassVar[str]
    """The scenario's ``engine``."""
    api: ClassVar[str]
    """What users call: ``FullyShardedDataParallel``, ``fully_shard``."""
    settings_field: ClassVar[str]
    """The scenario field that holds this engine's settings."""
    settings_type: ClassVar[type]
    promise: ClassVar[Promise]
    methods: ClassVar[tuple[str, ...]]
    """Entry points a step may call (``Step.method``)."""
    settings_depending: ClassVar[dict[str, str]] = {}
    """A settings field that is valid only beside another one set, to that
    other field: a swarm holds them off together (``fsdp_fuzz.generate.swarm``)."""
    step_controls: ClassVar[tuple[str, ...]]
    """``Step`` fields only this engine acts on: the other engine refuses them set."""
    checkpoint_wrapper: ClassVar[str]
    """The engine's own activation-checkpointing mode (``models.spec.CHECKPOINT_MODES``)."""
    unit_hooks: ClassVar[tuple[UnitHook, ...]]
    test_class: ClassVar[str]
    """The ``MultiProcessTestCase`` a reproducer written as a PyTorch test defines."""
    order_warnings: ClassVar[bool] = False
    """Whether the engine warns when a later iteration's forward order differs from the first's (which a
    reproducer then records)."""
    local_tensors: ClassVar[bool] = False
    """Whether parameters and gradients are DTensors, whose rank-local part is ``to_local()``."""

    # Settings ---------------------------------------------------------------

    def settings(self, scenario: Scenario) -> Any:
        return getattr(scenario, self.settings_field)

    @abstractmethod
    def mixed_precision(self, scenario: Scenario) -> Any:
        """The mixed-precision setting, or ``None``."""

    @abstractmethod
    def hybrid(self, scenario: Scenario) -> bool:
        """Sharded within simulated nodes, replicated across them."""

    def buffer_dtype(self, scenario: Scenario) -> str:
        """The dtype norm layers' running statistics are kept in."""
        return "float32"

    def cpu_offload(self, scenario: Scenario) -> bool:
        return self.settings(scenario).cpu_offload

    def ignored(self, scenario: Scenario) -> tuple[str, ...]:
        return self.settings(scenario).ignored

    # What it refuses and promises ------------------------------------------

    @abstractmethod
    def refusals(self, scenario: Scenario) -> Iterator[str]:
        """Why the scenario cannot run on this engine, each with its fix."""

    def checks_order(self, scenario: Scenario) -> bool:
        """Whether the engine validates every rank's forward order."""
        return False

    def flat_parameters(self, scenario: Scenario) -> bool:
        """Whether a unit's parameters share one ``requires_grad`` (flattened)."""
        return False

    def replicated(self, scenario: Scenario) -> bool:
        """Whether every rank holds every parameter (nothing sharded)."""
        return False

    def registers(self, scenario: Scenario, method: str) -> bool:
        """Whether the engine runs its hooks around ``method``."""
        return method == "forward"

    def refuses_ties_across_units(self, scenario: Scenario) -> bool:
        """Whether parameters tied across units are refused at lazy initialisation."""
        return False

    def gradient_divisor(self, scenario: Scenario) -> float:
        """What the ranks' summed gradients are divided by."""
        return scenario.world_size

    # Drawing ----------------------------------------------------------------

    @abstractmethod
    def draw_settings(self, draw: DrawFn, world_size: int, device: str, hybrid: bool) -> dict[str, Any]:
        """The scenario fields the engine sets before the model is drawn."""

    def draw_model_settings(self, draw: DrawFn, scenario: Scenario, ignored: tuple[str, ...]) -> Scenario:
        """The settings that name the model's blocks, once it is drawn."""
        return replace(scenario, **{self.settings_field: replace(self.settings(scenario), ignored=ignored)})

    def may_ignore_units(self) -> bool:
        """Whether an ignored block may be or hold a unit."""
        return True

    def draw_step_controls(self, draw: DrawFn, hsdp: bool) -> dict[str, Any]:
        """Per-step controls beyond the shared ones, as ``Step`` fields."""
        return {}

    def draw_deviation_controls(self, draw: DrawFn) -> dict[str, Any]:
        """How a deviating rank's step may change those controls."""
        return {}

    @abstractmethod
    def with_precision(self, draw: DrawFn, scenario: Scenario, dtype: str | None) -> Scenario:
        """The scenario computing in ``dtype`` (``None``: float32), nothing
        else of its settings naming blocks (for calibration runs)."""

    # Rendering --------------------------------------------------------------

    @abstractmethod
    def describe(self, scenario: Scenario) -> str:
        """One line for ``show``: the engine and its settings."""

    def features(self, scenario: Scenario) -> set[str]:
        """Labels for the engine's settings, for statistics runs."""
        return {f"{self.name} {name} {value}" for name, value in vars(self.settings(scenario)).items()}

    def wraps_by_class(self, scenario: Scenario) -> bool:
        """Whether the engine finds the units by their class (an auto-wrap policy), so a reproducer's model
        gives units classes of their own."""
        return False

    @abstractmethod
    def source(self, scenario: Scenario, model: Any, schedule: Any, cuda: bool) -> EngineSource:
        """The engine's calls for ``scenario`` as reproducer source (``fsdp_fuzz.repro``: the script's
        ``ModelSource`` and ``Schedule``): the wrapping, the process groups, the per-step controls its
        schedule uses, and how a rank reads whole gradients."""

    # On a rank (these import torch) -----------------------------------------

    @abstractmethod
    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        """Make the spec's units units of the engine, root last, recording
        each in ``built.units`` and the root in ``built.module``."""

    @abstractmethod
    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of what the unit hooks receive -> the unit's spec name."""

    @abstractmethod
    def stepping(self, built: BuiltModel, step: Step) -> AbstractContextManager:
        """Around one step: the engine's per-step controls the step sets."""


def with_dtypes(policy: Any, **replaced: Any) -> dict[str, Any]:
    """A mixed-precision setting's keywords, dtype names made dtypes."""
    import torch

    keywords = {**asdict(policy), **replaced}
    return {
        name: (None if value is None else getattr(torch, value)) if name.endswith("_dtype") else value
        for name, value in keywords.items()
    }


def norm_dtype_refusal(engine: Engine, scenario: Scenario, fix: str, casts: str) -> Iterator[str]:
    """Batch norm refuses weights and running statistics of different dtypes."""
    buffers = engine.buffer_dtype(scenario)
    if engine.mixed_precision(scenario) is not None and scenario.model.has_norms() and buffers != scenario.param_dtype:
        yield (
            f"a norm layer would get {scenario.param_dtype} weights and {buffers} running statistics, which "
            f"torch's batch norm refuses ({engine.name} casts parameters to param_dtype and buffers {casts}); "
            f"{fix}, or drop the norm layers"
        )
