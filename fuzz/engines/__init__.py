"""The engines a scenario can ask for, one module each, behind one registry.

An engine (``Engine``) is one place for everything the fuzzer knows of one
FSDP API: settings, refusals, promises, drawing, rendering, and the rank's
wrapping, trace hooks and per-step controls. Adding one is a module with an
``Engine`` subclass, its settings class given a field of ``Scenario``
(``fsdp_fuzz.data``), and an entry here.
"""

from __future__ import annotations

from fsdp_fuzz.engines.base import HYBRID_NODE_SIZE, Engine, Promise, UnitHook
from fsdp_fuzz.engines.fsdp1 import Fsdp1
from fsdp_fuzz.engines.fsdp2 import Fsdp2

__all__ = ["ENGINES", "HYBRID_NODE_SIZE", "Engine", "Fsdp1", "Fsdp2", "Promise", "UnitHook", "engine_of"]

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (Fsdp1(), Fsdp2())}


def engine_of(scenario) -> Engine:
    """The engine the scenario runs on."""
    return ENGINES[scenario.engine]
