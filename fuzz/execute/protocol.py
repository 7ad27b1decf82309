"""What a rank and its parent agree on beyond the typed scenario and
outcomes (``fsdp_fuzz.data``): how long a rank may take to start, and the
error that stops a run."""

from __future__ import annotations

STARTUP_TIMEOUT_S = 120.0
"""For a rank's first report: starting Python, importing torch, the rendezvous."""


class HarnessError(RuntimeError):
    """The fuzzer cannot observe what it promises to (a hook it relies on is
    gone from this torch): a reason to stop, never an observation of FSDP."""
