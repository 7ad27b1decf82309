"""Scenarios: everything a fuzz case does, as plain data that round-trips
through JSON.

A scenario is the *generate* stage's output and the only input of the
*execute* and *judge* stages: a model spec, FSDP settings, the debug level,
and for every rank the steps it runs. Nothing in it refers to torch objects,
so a scenario can be saved, shrunk, diffed and replayed months later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

from fuzz.jsonfmt import format_json
from models.spec import ModelSpec, SpecError, spec_from_json, spec_to_json

SCHEMA_VERSION = 1

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
BACKWARD_PREFETCH = (None, "BACKWARD_PRE", "BACKWARD_POST")
HYBRID_STRATEGIES = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
HYBRID_NODE_SIZE = 2
"""Ranks per simulated node for hybrid sharding: nodes are consecutive ranks."""
DEBUG_LEVELS = ("OFF", "INFO", "DETAIL")
MODES = ("train", "eval")


class ScenarioError(ValueError):
    """A scenario (or scenario file) the fuzzer cannot run, with the reason."""


@dataclass(frozen=True)
class FsdpSettings:
    """Keyword arguments of every ``FullyShardedDataParallel`` in the model.

    Defaults are FSDP's own, so a scenario that says nothing uses FSDP as a
    user who says nothing does.
    """

    sharding_strategy: str = "FULL_SHARD"
    use_orig_params: bool = False
    forward_prefetch: bool = False
    backward_prefetch: str | None = "BACKWARD_PRE"
    limit_all_gathers: bool = True
    sync_module_states: bool = False


@dataclass(frozen=True)
class Step:
    """What one rank does in one step of the schedule.

    ``path`` maps a branch point's name to the alternatives its forwards run,
    in order; a branch point absent from it runs alternative 0 once, and an
    empty list skips it. ``forwards`` forwards run, then one backward of the
    sum of their outputs when ``backward`` is set.
    """

    mode: str = "train"
    path: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    forwards: int = 1
    backward: bool = True
    grad_enabled: bool = True
    optimizer_step: bool = False

    @property
    def training(self) -> bool:
        return self.mode == "train"


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    ranks: tuple[tuple[Step, ...], ...]
    fsdp: FsdpSettings = FsdpSettings()
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


def validate_scenario(scenario: Scenario) -> None:
    """Raise ``ScenarioError`` naming the first thing that makes it unrunnable."""
    if scenario.world_size < 2:
        raise ScenarioError("a scenario needs at least 2 ranks")
    if len({len(steps) for steps in scenario.ranks}) != 1:
        raise ScenarioError("every rank must run the same number of steps")
    if scenario.debug_level not in DEBUG_LEVELS:
        raise ScenarioError(f"debug_level {scenario.debug_level!r} is not one of {DEBUG_LEVELS}")
    if scenario.fsdp.sharding_strategy not in SHARDING_STRATEGIES:
        raise ScenarioError(
            f"sharding_strategy {scenario.fsdp.sharding_strategy!r} is not one of {SHARDING_STRATEGIES}"
        )
    if scenario.fsdp.backward_prefetch not in BACKWARD_PREFETCH:
        raise ScenarioError(f"backward_prefetch {scenario.fsdp.backward_prefetch!r} is not one of {BACKWARD_PREFETCH}")
    if scenario.fsdp.sharding_strategy in HYBRID_STRATEGIES and scenario.world_size % HYBRID_NODE_SIZE:
        raise ScenarioError(f"hybrid sharding simulates nodes of {HYBRID_NODE_SIZE} ranks: the world size must be even")
    if scenario.batch_size < 1:
        raise ScenarioError("batch_size must be positive")
    alternatives = {choice.name: len(choice.alternatives) for choice in scenario.model.choices()}
    for rank, steps in enumerate(scenario.ranks):
        for index, step in enumerate(steps):
            where = f"rank {rank}, step {index}"
            if step.mode not in MODES:
                raise ScenarioError(f"{where}: mode {step.mode!r} is not one of {MODES}")
            if step.forwards < 0:
                raise ScenarioError(f"{where}: forwards must not be negative")
            if step.backward and (step.forwards == 0 or not step.grad_enabled):
                raise ScenarioError(f"{where}: a backward needs at least one forward with grad enabled")
            for name, taken in step.path.items():
                if name not in alternatives:
                    raise ScenarioError(f"{where}: path names unknown branch point {name!r}")
                if any(not 0 <= index < alternatives[name] for index in taken):
                    raise ScenarioError(
                        f"{where}: branch point {name!r} has {alternatives[name]} alternatives, "
                        f"path asks for {list(taken)}"
                    )


# JSON ----------------------------------------------------------------------

_DEFAULT_STEP = Step()


def step_to_json(step: Step) -> dict[str, Any]:
    """Mode and path always; other fields only where they differ from ``Step()``."""
    encoded: dict[str, Any] = {
        "mode": step.mode,
        "path": {name: list(taken) for name, taken in sorted(step.path.items())},
    }
    for name in ("forwards", "backward", "grad_enabled", "optimizer_step"):
        if getattr(step, name) != getattr(_DEFAULT_STEP, name):
            encoded[name] = getattr(step, name)
    return encoded


def step_from_json(encoded: Mapping[str, Any]) -> Step:
    known = {"mode", "path", "forwards", "backward", "grad_enabled", "optimizer_step"}
    unknown = set(encoded) - known
    if unknown:
        raise ScenarioError(f"unknown step fields {sorted(unknown)}")
    path = {str(name): tuple(int(i) for i in taken) for name, taken in dict(encoded.get("path", {})).items()}
    return Step(
        mode=str(encoded.get("mode", "train")),
        path=path,
        forwards=int(encoded.get("forwards", 1)),
        backward=bool(encoded.get("backward", True)),
        grad_enabled=bool(encoded.get("grad_enabled", True)),
        optimizer_step=bool(encoded.get("optimizer_step", False)),
    )


def scenario_to_json(scenario: Scenario) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "description": scenario.description,
        "world_size": scenario.world_size,
        "model": spec_to_json(scenario.model),
        "fsdp": {
            "sharding_strategy": scenario.fsdp.sharding_strategy,
            "use_orig_params": scenario.fsdp.use_orig_params,
            "forward_prefetch": scenario.fsdp.forward_prefetch,
            "backward_prefetch": scenario.fsdp.backward_prefetch,
            "limit_all_gathers": scenario.fsdp.limit_all_gathers,
            "sync_module_states": scenario.fsdp.sync_module_states,
        },
        "debug_level": scenario.debug_level,
        "collective_checker": scenario.collective_checker,
        "freeze_untaken": scenario.freeze_untaken,
        "seed": scenario.seed,
        "batch_size": scenario.batch_size,
        "ranks": [[step_to_json(step) for step in steps] for steps in scenario.ranks],
    }


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
            fsdp=FsdpSettings(**encoded.get("fsdp", {})),
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
