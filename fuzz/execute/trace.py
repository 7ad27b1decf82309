"""The collective trace: every collective a rank issues, with the unit it
served and why.

The ground truth about pairing: the k-th collective of one rank meets the k-th
of every other rank of the same group, whatever FSDP believes. Shims on
``torch.distributed``'s collectives (FSDP looks them up at call time) record
op, dtype and numel; shims on the engine's unit hooks say which unit and why.
Installed once per process, recording only while a trace is active, so a
worker's own control traffic is never traced.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from fsdp_fuzz.data import CollectiveRecord, Purpose
from fsdp_fuzz.engines import ENGINES, UnitHook
from fsdp_fuzz.execute.protocol import HarnessError

# op name -> (position of the tensor whose numel is recorded, position of ``group``)
TRACED_OPS = {
    "all_gather": (1, 2),
    "all_gather_single": (1, 2),
    "all_gather_into_tensor": (1, 2),
    "reduce_scatter_single": (1, 3),
    "reduce_scatter_tensor": (1, 3),
    "all_reduce": (0, 2),
    "broadcast": (0, 2),
}


class CollectiveTrace:
    """Collects records while active; ``unit_keys`` names a unit by the
    identity of what the hooks receive."""

    def __init__(self) -> None:
        self.unit_keys: dict[int, str] = {}
        self.records: list[CollectiveRecord] = []

    def take(self) -> list[CollectiveRecord]:
        taken, self.records = self.records, []
        return taken


# A plain global, not a context variable: on GPUs the backward's collectives
# are issued from autograd's device threads. A rank runs one scenario at a time.
_active: CollectiveTrace | None = None
_serving: contextvars.ContextVar[tuple[object, Purpose] | None] = contextvars.ContextVar("serving", default=None)
_installed: set[str] = set()


def missing_hooks(engine: str) -> list[str]:
    """The engine's unit hooks this torch does not have."""
    missing = []
    for hook in ENGINES[engine].unit_hooks:
        try:
            owner = importlib.import_module(hook.module)
            owner = getattr(owner, hook.owner) if hook.owner else owner
            getattr(owner, hook.name)
        except (ImportError, AttributeError):
            missing.append(hook.where())
    return missing


def check_trace(engine: str) -> None:
    """Stop, loudly, where the trace would go quiet: without these hooks no
    collective is attributed to a unit and clause 5 could never fail."""
    missing = missing_hooks(engine)
    if missing:
        raise HarnessError(
            f"torch {torch.__version__} lacks {', '.join(missing)}: the collective trace of engine {engine!r} "
            "cannot tell which FSDP unit a collective serves. Update the engine's unit_hooks in "
            f"fsdp_fuzz/engines/{engine}.py for this torch."
        )


@contextmanager
def tracing(trace: CollectiveTrace, engine: str) -> Iterator[CollectiveTrace]:
    global _active
    _install(engine)
    previous, _active = _active, trace
    try:
        yield trace
    finally:
        _active = previous


@functools.cache
def _trace_ops() -> None:
    for name, (tensor_at, group_at) in TRACED_OPS.items():
        if hasattr(dist, name):
            setattr(dist, name, _recording_op(name, getattr(dist, name), tensor_at, group_at))


def _install(engine: str) -> None:
    _trace_ops()
    if engine in _installed:
        return
    check_trace(engine)
    for hook in ENGINES[engine].unit_hooks:
        module = importlib.import_module(hook.module)
        _serve_while_running(getattr(module, hook.owner) if hook.owner else module, hook)
    _installed.add(engine)


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
            key, purpose = _serving.get() or (None, None)
            is_tensor = isinstance(tensor, torch.Tensor)
            trace.records.append(
                CollectiveRecord(
                    name,
                    str(tensor.dtype).removeprefix("torch.") if is_tensor else "?",
                    tensor.numel() if is_tensor else -1,
                    trace.unit_keys.get(id(key)) if key is not None else None,
                    purpose,
                    tuple(dist.get_process_group_ranks(group)) if group is not None else (),
                )
            )
        return op(*args, **kwargs)

    return traced


def _serve_while_running(owner: object, hook: UnitHook) -> None:
    original = getattr(owner, hook.name)

    @functools.wraps(original)
    def serving(*args, **kwargs):
        token = _serving.set((args[hook.unit_argument], hook.purpose))
        try:
            return original(*args, **kwargs)
        finally:
            _serving.reset(token)

    setattr(owner, hook.name, serving)
