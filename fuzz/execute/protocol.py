"""What a rank and its parent agree on: the words of a rank's reports, how
long a rank may take to start, and the error that stops a run.

A rank reports in plain JSON (``Json``), in the form
``fsdp_fuzz.data.outcome_from_json`` reads; the statuses and purposes here
are the strings ``fsdp_fuzz.data.Status`` and ``Purpose`` parse
(tests/test_layout.py keeps the two vocabularies equal).
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]

# The words of a report.
OK, ERROR, HANG, CRASH, NOT_RUN = "ok", "error", "hang", "crash", "not_run"
UNSHARD, REDUCE_GRAD, ORDER_CHECK = "unshard", "reduce_grad", "order_check"

STARTUP_TIMEOUT_S = 120.0
"""For a rank's first report: starting Python, importing torch, the rendezvous."""


class HarnessError(RuntimeError):
    """The fuzzer cannot observe what it promises to (a hook it relies on is
    gone from this torch): a reason to stop, never an observation of FSDP."""
