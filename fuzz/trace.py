"""A trace of every collective a scenario issues, with the FSDP unit it served.

The trace is the ground truth about pairing: the k-th collective of one rank
meets the k-th of every other rank on the same group, whatever FSDP believes.
Recording it needs two kinds of shims, both of which call straight through:

- on ``torch.distributed``'s collectives (looked up by FSDP at call time),
  to record op, dtype and numel;
- on the three FSDP functions that issue them for a unit (unshard, gradient
  reduction, order check), to say which unit and why.

Installed once per rank process; records only while a ``CollectiveTrace`` is
active, so the worker's own control traffic is never traced.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from fuzz.observations import CollectiveRecord

# op name -> (position of the tensor whose numel the trace records, position of ``group``)
_TRACED_OPS = {
    "all_gather": (1, 2),
    "all_gather_single": (1, 2),
    "all_gather_into_tensor": (1, 2),
    "reduce_scatter_single": (1, 3),
    "reduce_scatter_tensor": (1, 3),
    "all_reduce": (0, 2),
    "broadcast": (0, 2),
}

UNSHARD = "unshard"
REDUCE_GRAD = "reduce_grad"
ORDER_CHECK = "order_check"


class CollectiveTrace:
    """Collects records while active; ``unit_of`` names a handle's unit."""

    def __init__(self, unit_of: Callable[[object], str | None]) -> None:
        self.unit_of = unit_of
        self.records: list[CollectiveRecord] = []

    def take(self) -> tuple[CollectiveRecord, ...]:
        taken, self.records = tuple(self.records), []
        return taken


# A plain global, not a context variable: on GPUs the backward's collectives
# are issued from autograd's device threads. A rank runs one scenario at a time.
_active: CollectiveTrace | None = None
_serving: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar("serving", default=None)
_installed = False


@contextmanager
def tracing(trace: CollectiveTrace) -> Iterator[CollectiveTrace]:
    global _active
    install()
    previous, _active = _active, trace
    try:
        yield trace
    finally:
        _active = previous


def install() -> None:
    """Put the shims in place, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, (tensor_at, group_at) in _TRACED_OPS.items():
        if hasattr(dist, name):
            setattr(dist, name, _recording_op(name, getattr(dist, name), tensor_at, group_at))
    from torch.distributed.fsdp import _exec_order_utils, _flat_param, _runtime_utils

    _wrap_unit_method(_flat_param.FlatParamHandle, "_all_gather_flat_param", UNSHARD, handle_position=0)
    _wrap_unit_method(_exec_order_utils._ExecOrderData, "_check_order", ORDER_CHECK, handle_position=1)
    for name in ("_reduce_grad", "_reduce_grad_no_shard"):
        _wrap_unit_method(_runtime_utils, name, REDUCE_GRAD, handle_position=1)


def _recording_op(name: str, op: Callable, tensor_at: int, group_at: int) -> Callable:
    parameters = list(inspect.signature(op).parameters)

    def argument(args, kwargs, position):
        return args[position] if len(args) > position else kwargs.get(parameters[position])

    @functools.wraps(op)
    def traced(*args, **kwargs):
        trace = _active
        if trace is not None:
            tensor = argument(args, kwargs, tensor_at)
            group = argument(args, kwargs, group_at)
            serving = _serving.get()
            handle, purpose = serving if serving else (None, None)
            trace.records.append(
                CollectiveRecord(
                    op=name,
                    dtype=str(tensor.dtype).removeprefix("torch.") if isinstance(tensor, torch.Tensor) else "?",
                    numel=tensor.numel() if isinstance(tensor, torch.Tensor) else -1,
                    unit=trace.unit_of(handle) if handle is not None else None,
                    purpose=purpose,
                    group=tuple(dist.get_process_group_ranks(group)) if group is not None else (),
                )
            )
        return op(*args, **kwargs)

    return traced


def _wrap_unit_method(owner: object, name: str, purpose: str, handle_position: int) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def serving(*args, **kwargs):
        token = _serving.set((args[handle_position], purpose))
        try:
            return original(*args, **kwargs)
        finally:
            _serving.reset(token)

    setattr(owner, name, serving)
