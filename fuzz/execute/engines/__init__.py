"""The engines a scenario can ask for, one module each, behind one registry.

An engine plugs in as an entry of ``ENGINES``: a class with ``wrap`` (make
the spec's units units of the engine, root last), ``unit_keys`` plus
``unit_hooks`` (the engine's functions that issue collectives for one unit,
which the trace wraps to attribute each collective) and ``stepping`` (the
engine's per-step controls); see ``Engine``. Its name goes in
``fsdp_fuzz.data.ENGINES`` too, so that scenarios can ask for it.
"""

from __future__ import annotations

from fsdp_fuzz.execute.engines.base import Engine, UnitHook
from fsdp_fuzz.execute.engines.fsdp1 import Fsdp1
from fsdp_fuzz.execute.engines.fsdp2 import Fsdp2

__all__ = ["ENGINES", "Engine", "Fsdp1", "Fsdp2", "UnitHook"]

ENGINES: dict[str, Engine] = {"fsdp1": Fsdp1(), "fsdp2": Fsdp2()}
