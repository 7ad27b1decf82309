"""What an engine is: the ``Engine`` protocol, the ``UnitHook`` that tells
the collective trace which unit a collective served, and what the engines
share."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from fsdp_fuzz.data import MixedPrecision, MixedPrecisionPolicy, Purpose, Scenario, Step
from fsdp_fuzz.execute.model import BuiltModel, dtype_named


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


class Engine(Protocol):
    """What an engine supplies; an instance in ``ENGINES`` plugs it in."""

    unit_hooks: tuple[UnitHook, ...]

    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        """Make the spec's units units of the engine, root last, recording
        each in ``built.units`` and the root in ``built.module``."""

    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of what the unit hooks receive -> the unit's spec name."""

    def stepping(self, built: BuiltModel, step: Step) -> AbstractContextManager:
        """Around one step: the engine's per-step controls the step sets."""


def with_dtypes(policy: MixedPrecision | MixedPrecisionPolicy, **replaced: Any) -> dict[str, Any]:
    """A mixed-precision setting's keywords, dtype names made dtypes."""
    keywords = {**asdict(policy), **replaced}
    return {name: dtype_named(value) if name.endswith("_dtype") else value for name, value in keywords.items()}
