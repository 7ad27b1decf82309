"""The one executor: a scenario in its complete JSON form goes in, each rank's
outcomes come out.

Everything that runs a scenario lives here: building the model from its spec,
wrapping its units, the scenario's process groups, running a rank's steps,
tracing its collectives, telling a hang from an error, and gathering the
ranks' reports. It needs only torch and the standard library, so the pool's
workers (``fsdp_fuzz.execute.pool``), the fresh-process spawner (``run_fresh``)
and the standalone reproducer scripts (this file verbatim, plus the scenario
as a literal: ``fsdp_fuzz.repro``) all run this code and nothing else.

It reads the complete form of a scenario (``fsdp_fuzz.data.scenario_to_json(...,
complete=True)``: every default spelled out, every branch point in every
path), so no default lives here a second time. It reports each outcome in the
JSON form ``fsdp_fuzz.data.outcome_from_json`` reads.

Two plug points: an engine is an entry of ``ENGINES`` (how units are wrapped,
and which FSDP functions tell the trace what a collective served); a device
is a ``Placement`` (which backend, which ``torch.device`` a rank computes on).
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import importlib
import inspect
import json
import os
import queue
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.checkpoint
from torch import nn

from fsdp_fuzz.execute.devices import (
    CPU,
    DeviceError,
    DeviceRequest,
    Placement,
    prepare_rank,
)

Json = dict[str, Any]

# The words of a report: ``fsdp_fuzz.data.Status`` and ``Purpose`` parse them
# (tests/test_executor.py keeps the two vocabularies equal).
OK, ERROR, HANG, CRASH, NOT_RUN = "ok", "error", "hang", "crash", "not_run"
UNSHARD, REDUCE_GRAD, ORDER_CHECK = "unshard", "reduce_grad", "order_check"

STARTUP_TIMEOUT_S = 120.0
"""For a rank's first report: starting Python, importing torch, the rendezvous."""
DEADLOCK_AFTER_S = 0.1
"""How long every unfinished rank must sit blocked, nothing running, before
the parent calls it a deadlock rather than wait out the group's timeout."""
LEARNING_RATE = 0.01


class HarnessError(RuntimeError):
    """The fuzzer cannot observe what it promises to (a hook it relies on is
    gone from this torch): a reason to stop, never an observation of FSDP."""


# Devices: ``Placement`` (which backend, which GPU each rank computes on), the
# choice of it and its refusals are in ``fsdp_fuzz.execute.devices``, imported
# above (a reproducer script inlines that module there).


# The model -----------------------------------------------------------------------
#
# A spec node is {"linear": [in, out], "bias": b}, {"relu": true}, {"norm": n},
# {"sequential": name, "children": [...], "fsdp_unit": b, "frozen": b,
# "checkpoint": mode, "tied_to": name} or {"choice": name, "alternatives":
# [sequentials], "fsdp_unit": b}. Every branch point reads the path of the
# forward in progress from one dict shared by the whole model, set before each
# step, the way a user's model reads a flag (the seed test's ``use_alt_path``):
# FSDP sees the call signature a user's model has.


def _named(node: Json) -> str | None:
    return node.get("sequential", node.get("choice"))


def _children(node: Json) -> list[Json]:
    return node["children"] if "sequential" in node else node["alternatives"]


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside an activation-checkpoint wrapper (itself otherwise):
    where a child is set, so that the forward that runs sees it."""
    return getattr(module, "_checkpoint_wrapped_module", module)


class SequentialModule(nn.Module):
    """Children run one after another; sequentials and branch points are
    named, others numbered. ``checkpoint`` ``reentrant`` or ``non_reentrant``
    runs the children under ``torch.utils.checkpoint``."""

    def __init__(self, node: Json, path: dict[str, list[int]]) -> None:
        super().__init__()
        self.child_names: list[str] = []
        self.checkpoint_mode = node.get("checkpoint")
        for index, child in enumerate(node["children"]):
            name = _named(child) or str(index)
            self.add_module(name, _build_node(child, path))
            self.child_names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_mode in ("reentrant", "non_reentrant"):
            reentrant = self.checkpoint_mode == "reentrant"
            return torch.utils.checkpoint.checkpoint(self._run, x, self.child_names, use_reentrant=reentrant)
        return self._run(x, self.child_names)

    def _run(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x


class UnitModule(SequentialModule):
    """A sequential the spec makes an FSDP unit: a class of its own, so that
    a ``ModuleWrapPolicy`` finds the units by class, as it finds a
    transformer's blocks."""

    def __init__(self, node: Json, path: dict[str, list[int]]) -> None:
        super().__init__(node, path)
        self.unit_name = node["sequential"]


class RootModule(SequentialModule):
    """The model: ``forward`` runs every stage, ``encode`` all but the last,
    a second entry point as a ``generate`` or ``encode`` method is."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.child_names[:-1])


class ChoiceModule(nn.Module):
    """A branch point: runs the alternatives the path lists for it, in order."""

    unit_name: str | None = None

    def __init__(self, node: Json, path: dict[str, list[int]]) -> None:
        super().__init__()
        self.choice_name = node["choice"]
        self.path = path
        self.alternative_names = [alternative["sequential"] for alternative in node["alternatives"]]
        for alternative in node["alternatives"]:
            self.add_module(alternative["sequential"], _build_node(alternative, path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.path[self.choice_name]:
            x = getattr(self, self.alternative_names[index])(x)
        return x


class UnitChoiceModule(ChoiceModule):
    """A branch point the spec makes an FSDP unit (see ``UnitModule``)."""

    def __init__(self, node: Json, path: dict[str, list[int]]) -> None:
        super().__init__(node, path)
        self.unit_name = node["choice"]


UNIT_CLASSES = frozenset({UnitModule, UnitChoiceModule})


def _build_node(node: Json, path: dict[str, list[int]]) -> nn.Module:
    if "linear" in node:
        return nn.Linear(*node["linear"], bias=node["bias"])
    if "relu" in node:
        return nn.ReLU()
    if "norm" in node:
        return nn.BatchNorm1d(node["norm"])
    if "choice" in node:
        return (UnitChoiceModule if node["fsdp_unit"] else ChoiceModule)(node, path)
    module = (UnitModule if node["fsdp_unit"] else SequentialModule)(node, path)
    if node.get("checkpoint") == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if node.get("checkpoint") == "composable":
        from torch.distributed._composable import checkpoint

        checkpoint(module)
    return module


@dataclass
class BuiltModel:
    """A model and the handles a schedule needs to drive it."""

    spec: Json
    module: nn.Module
    """The root; the engine's wrapper once wrapped."""
    path: dict[str, list[int]]
    units: dict[str, nn.Module] = field(default_factory=dict)
    """Spec name -> the module the engine made a unit of, once wrapped."""
    ignored: frozenset[int] = frozenset()
    """ids of the parameters the engine was told to ignore: each rank's own."""

    def set_path(self, path: dict[str, list[int]]) -> None:
        self.path.clear()
        self.path.update(path)

    def branch_points(self) -> Iterator[tuple[Json, nn.Module, str]]:
        """(node, module, innermost enclosing alternative or the root) of
        every branch point, outer first; through wrappers once wrapped."""
        for node, module, enclosing in self.blocks():
            if "choice" in node:
                yield node, module, enclosing

    def blocks(self) -> Iterator[tuple[Json, nn.Module, str]]:
        """(node, module, innermost enclosing alternative or the root) of
        every sequential and branch point, outer first."""

        def walk(node: Json, module: nn.Module, enclosing: str) -> Iterator[tuple[Json, nn.Module, str]]:
            yield node, module, enclosing
            for child in _children(node):
                name = _named(child)
                if name is not None:
                    inner = name if "choice" in node else enclosing
                    yield from walk(child, getattr(module, name), inner)

        root = self.spec["root"]
        yield from walk(root, self.module, root["sequential"])

    def block(self, name: str) -> nn.Module:
        return next(module for node, module, _ in self.blocks() if _named(node) == name)

    def ignore(self, names: list[str]) -> list[nn.Module]:
        """The named blocks, whose parameters the engine is told to ignore."""
        blocks = [self.block(name) for name in names]
        self.ignored = frozenset(id(parameter) for block in blocks for parameter in block.parameters())
        return blocks


def build_model(spec: Json, seed: int, freeze_untaken: bool) -> BuiltModel:
    """Build ``spec`` with parameters that depend on ``seed`` alone.

    Every rank calls this with the same seed and gets the same parameters,
    as FSDP expects without ``sync_module_states``. A tied block takes the
    parameters of the block it is tied to, as weight tying does.
    """
    path: dict[str, list[int]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = RootModule(spec["root"], path)
    built = BuiltModel(spec, module, path)
    for node, block, _ in list(built.blocks()):
        if node.get("tied_to"):
            source = built.block(node["tied_to"])
            for index, child in enumerate(node["children"]):
                if "linear" in child or "norm" in child:
                    layer, origin = getattr(block, str(index)), getattr(source, str(index))
                    layer.weight = origin.weight
                    if getattr(origin, "bias", None) is not None:
                        layer.bias = origin.bias

    def freeze(node: Json, module: nn.Module) -> None:
        if node.get("frozen"):
            for parameter in module.parameters():
                parameter.requires_grad = False
        for child in _children(node):
            if _named(child) is not None:
                freeze(child, getattr(module, _named(child)))

    freeze(spec["root"], module)
    if freeze_untaken:
        freeze_untaken_alternatives(built, {node["choice"]: [0] for node, _, _ in built.branch_points()})
    return built


def freeze_untaken_alternatives(built: BuiltModel, path: dict[str, list[int]]) -> None:
    """Make trainable exactly the alternatives ``path`` runs, as the seed's
    ``flip_path`` does.

    Works through FSDP wrappers: an alternative that is its own unit yields
    its flat parameter (or its original parameters with ``use_orig_params``).
    Branch points come outer first, so an untaken outer alternative leaves
    everything inside it frozen.
    """
    active = {built.spec["root"]["sequential"]}
    for node, module, enclosing in built.branch_points():
        runs = set(path[node["choice"]])
        for index, alternative in enumerate(node["alternatives"]):
            trainable = enclosing in active and index in runs
            if trainable:
                active.add(alternative["sequential"])
            for parameter in getattr(module, alternative["sequential"]).parameters():
                parameter.requires_grad = trainable


def freeze_scheduled(built: BuiltModel, scenario: Json, frozen: list[str]) -> None:
    """Blocks some step of the scenario freezes: frozen in this step when
    ``frozen`` names them, trainable otherwise."""
    scheduled = {name for steps in scenario["ranks"] for step in steps for name in step["frozen"]}
    for name in sorted(scheduled):
        for parameter in built.block(name).parameters():
            parameter.requires_grad = name not in frozen


def step_input(scenario: Json, rank: int, step: int, forward: int) -> torch.Tensor:
    """A batch that depends only on where it is used, never on RNG history."""
    generator = torch.Generator().manual_seed(((scenario["seed"] * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((scenario["batch_size"], scenario["model"]["in_features"]), generator=generator)


@dataclass
class Forwards:
    """The step's forwards: the sum of their outputs (float32, what a
    backward differentiates) and of their absolute values."""

    total: torch.Tensor
    magnitude: float


def run_forwards(
    scenario: Json,
    built: BuiltModel,
    rank: int,
    index: int,
    device: torch.device,
    input_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> Forwards:
    """The step's forwards, as the user's program runs them: mode, path,
    freezing, grad mode, entry point. The dtypes are for a run without an
    engine to cast the inputs and outputs (the reference)."""
    step = scenario["ranks"][rank][index]
    built.module.train(step["mode"] == "train")
    built.set_path(step["path"])
    if scenario["freeze_untaken"]:
        freeze_untaken_alternatives(built, step["path"])
    freeze_scheduled(built, scenario, step["frozen"])
    entry = built.module if step["method"] == "forward" else getattr(built.module, step["method"])
    outputs = []
    with torch.set_grad_enabled(step["grad_enabled"]):
        for k in range(step["forwards"]):
            batch = step_input(scenario, rank, index, k).to(device)
            output = entry(batch if input_dtype is None else batch.to(input_dtype))
            outputs.append((output if output_dtype is None else output.to(output_dtype)).float())
        total = sum((output.sum() for output in outputs), torch.zeros((), device=device))
    magnitude = sum(float(output.detach().abs().sum().cpu()) for output in outputs)
    return Forwards(total, magnitude)


def dtype_named(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


# Engines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitHook:
    """An FSDP function that issues collectives on one unit's behalf: while it
    runs, the trace attributes collectives to that unit, for ``purpose``."""

    module: str
    owner: str | None
    """A class in ``module`` holding the function, or ``None`` for a module-level function."""
    name: str
    purpose: str
    unit_argument: int
    """Which positional argument identifies the unit (see ``Engine.unit_keys``)."""

    def where(self) -> str:
        return ".".join(part for part in (self.module, self.owner, self.name) if part)


class Engine(Protocol):
    """What an engine supplies; an instance in ``ENGINES`` plugs it in."""

    unit_hooks: tuple[UnitHook, ...]

    def wrap(self, built: BuiltModel, scenario: Json, group: Any, device: torch.device) -> None:
        """Make the spec's units units of the engine, root last, recording
        each in ``built.units`` and the root in ``built.module``."""

    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of what the unit hooks receive -> the unit's spec name."""

    def stepping(self, built: BuiltModel, step: Json) -> AbstractContextManager:
        """Around one step: the engine's per-step controls the step sets."""


class Fsdp1:
    """``FullyShardedDataParallel``: every unit of the spec wrapped, innermost
    first, then the root."""

    unit_hooks = (
        UnitHook("torch.distributed.fsdp._flat_param", "FlatParamHandle", "_all_gather_flat_param", UNSHARD, 0),
        UnitHook("torch.distributed.fsdp._exec_order_utils", "_ExecOrderData", "_check_order", ORDER_CHECK, 1),
        UnitHook("torch.distributed.fsdp._runtime_utils", None, "_reduce_grad", REDUCE_GRAD, 1),
        UnitHook("torch.distributed.fsdp._runtime_utils", None, "_reduce_grad_no_shard", REDUCE_GRAD, 1),
    )

    def wrap(self, built: BuiltModel, scenario: Json, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        settings = scenario["fsdp"]
        prefetch = settings["backward_prefetch"]
        policy = settings["mixed_precision"]
        kwargs = {
            "process_group": group,
            "device_id": device,
            "sharding_strategy": ShardingStrategy[settings["sharding_strategy"]],
            "use_orig_params": settings["use_orig_params"],
            "forward_prefetch": settings["forward_prefetch"],
            "backward_prefetch": BackwardPrefetch[prefetch] if prefetch else None,
            "limit_all_gathers": settings["limit_all_gathers"],
            "sync_module_states": settings["sync_module_states"],
            "mixed_precision": None if policy is None else MixedPrecision(**_with_dtypes(policy)),
            "ignored_states": built.ignore(settings["ignored"]) or None,
            "cpu_offload": CPUOffload(offload_params=True) if settings["cpu_offload"] else None,
        }
        root = built.spec["root"]
        if settings["auto_wrap"]:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            built.module = FSDP(built.module, auto_wrap_policy=ModuleWrapPolicy(UNIT_CLASSES), **kwargs)
            for module in built.module.modules():
                if isinstance(module, FSDP) and module is not built.module:
                    built.units[module.module.unit_name] = module
            built.units[root["sequential"]] = built.module
            return

        def wrap_below(node: Json, module: nn.Module) -> None:
            for child in _children(node):
                name = _named(child)
                if name is None:
                    continue
                child_module = getattr(module, name)
                wrap_below(child, child_module)
                if child["fsdp_unit"]:
                    built.units[name] = FSDP(child_module, **kwargs)
                    setattr(unwrapped(module), name, built.units[name])

        wrap_below(root, built.module)
        built.module = built.units[root["sequential"]] = FSDP(built.module, **kwargs)

    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of each unit's flat-parameter handle (what the hooks receive) -> its spec name."""
        return {id(unit._handle): name for name, unit in built.units.items() if unit._handle is not None}

    def stepping(self, built: BuiltModel, step: Json) -> AbstractContextManager:
        """``gradient_sync`` off: the step runs inside the root's ``no_sync()``."""
        return nullcontext() if step["gradient_sync"] else built.module.no_sync()


def _units_in_spec_order(node: Json) -> Iterator[str]:
    """The non-root units below ``node``, outer before inner, as the spec lists them."""
    for child in _children(node):
        if _named(child) is not None:
            if child["fsdp_unit"]:
                yield _named(child)
            yield from _units_in_spec_order(child)


class Fsdp2:
    """``fully_shard``: every unit of the spec sharded, innermost first, then
    the root, on a mesh built from the scenario's groups (1-D, or replicate x
    shard for HSDP over simulated nodes)."""

    unit_hooks = (
        UnitHook("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "unshard", UNSHARD, 0),
        UnitHook(
            "torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "post_backward", REDUCE_GRAD, 0
        ),
    )

    def wrap(self, built: BuiltModel, scenario: Json, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        settings = scenario["fsdp2"]
        mesh = self._mesh(scenario, group, device)
        reshard = settings["reshard_after_forward"]
        policy = settings["mp_policy"]
        # output_dtype casts each unit's outputs: it is the model's output
        # dtype, so only the root gets it, as users set it.
        common = {"mesh": mesh, "shard_placement_fn": self._placement(settings["shard_dim"], mesh.size(-1))}
        if settings["cpu_offload"]:
            common["offload_policy"] = CPUOffloadPolicy()
        if settings["ignored"]:
            common["ignored_params"] = {p for block in built.ignore(settings["ignored"]) for p in block.parameters()}
        inner_kwargs, root_kwargs = dict(common), dict(common)
        if policy is not None:
            inner_kwargs["mp_policy"] = MixedPrecisionPolicy(**_with_dtypes({**policy, "output_dtype": None}))
            root_kwargs["mp_policy"] = MixedPrecisionPolicy(**_with_dtypes(policy))
        if not settings["cpu_offload"]:  # offloaded parameters stay where FSDP2 finds them, on the CPU
            built.module.to(device)
        together = {name: tuple(group) for group in settings["sharded_together"] for name in group}
        waiting: dict[tuple[str, ...], list[nn.Module]] = {}

        def shard_below(node: Json, module: nn.Module) -> None:
            for child in _children(node):
                name = _named(child)
                if name is None:
                    continue
                shard_below(child, getattr(module, name))
                if not child["fsdp_unit"]:
                    continue
                if name not in together:
                    built.units[name] = fully_shard(
                        getattr(module, name), reshard_after_forward=reshard, **inner_kwargs
                    )
                    continue
                # Siblings: the last of them to come up shards them all at once.
                members = waiting.setdefault(together[name], [])
                members.append(getattr(module, name))
                if len(members) == len(together[name]):
                    fully_shard(members, reshard_after_forward=reshard, **inner_kwargs)
                    built.units.update(zip(together[name], members, strict=True))

        root = built.spec["root"]
        shard_below(root, built.module)
        at_root = reshard if reshard is None or isinstance(reshard, bool) else None  # an int is for non-root units
        built.units[root["sequential"]] = fully_shard(built.module, reshard_after_forward=at_root, **root_kwargs)
        if settings["register_encode"]:
            register_fsdp_forward_method(built.module, "encode")
        built.module.set_reduce_scatter_unused_params(settings["reduce_scatter_unused_params"])
        built.module.set_reshard_after_backward(settings["reshard_after_backward"])
        for name in settings["no_unshard_in_backward"]:
            built.units[name].set_unshard_in_backward(False)
        for unit in built.units.values():  # these two setters do not recurse: users call them on every unit
            unit.set_force_sum_reduction_for_comms(settings["force_sum_reduction"])
            if settings["gradient_divide_factor"] is not None:
                unit.set_gradient_divide_factor(settings["gradient_divide_factor"])
        order = [built.units[name] for name in _units_in_spec_order(root)]
        for earlier, later in zip(order, order[1:], strict=False):
            if settings["forward_prefetch"]:
                earlier.set_modules_to_forward_prefetch([later])
            if settings["backward_prefetch"]:
                later.set_modules_to_backward_prefetch([earlier])

    @staticmethod
    def _placement(shard_dim: int, shards: int) -> Callable | None:
        """``shard_placement_fn``: with ``shard_dim`` 1, ``Shard(1)`` for the
        2-D parameters whose dim 1 splits evenly into ``shards`` (FSDP2
        pads only dim 0), FSDP2's ``Shard(0)`` for the rest."""
        if shard_dim == 0:
            return None
        from torch.distributed.tensor import Shard

        return lambda parameter: Shard(1) if parameter.ndim == 2 and parameter.shape[1] % shards == 0 else None

    @staticmethod
    def _mesh(scenario: Json, group: Any, device: torch.device):
        from torch.distributed.device_mesh import DeviceMesh

        if not scenario["hybrid"]:
            return DeviceMesh.from_group(group, device.type)
        intra, inter = group
        layout = torch.arange(scenario["world_size"]).reshape(-1, scenario["hybrid_node_size"])
        return DeviceMesh.from_group([inter, intra], device.type, mesh=layout, mesh_dim_names=("replicate", "shard"))

    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of each unit's parameter group (what the hooks receive) -> its
        spec name; units sharded together share one group, named ``a+b``."""
        names: dict[int, list[str]] = {}
        for name, unit in built.units.items():
            for param_group in unit._get_fsdp_state()._fsdp_param_groups:
                names.setdefault(id(param_group), []).append(name)
        return {key: "+".join(sorted(found)) for key, found in names.items()}

    @contextmanager
    def stepping(self, built: BuiltModel, step: Json) -> Iterator[None]:
        root = built.module
        if step["reset_iter_state"]:
            root.reset_iter_state()
        if step["reshard_after_forward"] is not None:
            root.set_reshard_after_forward(step["reshard_after_forward"])
        root.set_requires_gradient_sync(step["gradient_sync"])
        root.set_requires_all_reduce(step["all_reduce"])
        root.set_is_last_backward(step["last_backward"])
        if step["unshard"]:
            for unit in built.units.values():
                unit.unshard()
        yield
        if step["reshard"]:
            for unit in built.units.values():
                unit.reshard()


def _with_dtypes(policy: Json) -> Json:
    """A mixed-precision setting's keywords, dtype names made dtypes."""
    return {name: dtype_named(value) if name.endswith("_dtype") else value for name, value in policy.items()}


ENGINES: dict[str, Engine] = {"fsdp1": Fsdp1(), "fsdp2": Fsdp2()}


# The collective trace ------------------------------------------------------------------
#
# The ground truth about pairing: the k-th collective of one rank meets the k-th
# of every other rank of the same group, whatever FSDP believes. Shims on
# ``torch.distributed``'s collectives (FSDP looks them up at call time) record
# op, dtype and numel; shims on the engine's unit hooks say which unit and why.
# Installed once per process, recording only while a trace is active, so a
# worker's own control traffic is never traced.

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
        self.records: list[list] = []

    def take(self) -> list[list]:
        taken, self.records = self.records, []
        return taken


# A plain global, not a context variable: on GPUs the backward's collectives
# are issued from autograd's device threads. A rank runs one scenario at a time.
_active: CollectiveTrace | None = None
_serving: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar("serving", default=None)
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
            "fsdp_fuzz/execute/executor.py for this torch."
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
                [
                    name,
                    str(tensor.dtype).removeprefix("torch.") if is_tensor else "?",
                    tensor.numel() if is_tensor else -1,
                    trace.unit_keys.get(id(key)) if key is not None else None,
                    purpose,
                    list(dist.get_process_group_ranks(group)) if group is not None else [],
                ]
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


# A rank ------------------------------------------------------------------------------

# How gloo and NCCL word a collective that outlived the group's timeout. A peer
# that timed out first closes its connections, so a rank waiting on it may hear
# "Connection closed by peer" first: which one wins is a race.
TIMEOUT_MARKERS = (
    "Timed out",
    "timed out",
    "Watchdog caught collective operation timeout",
    "Connection closed by peer",
)


def join_default_group(rank: int, world_size: int, store_path: str, placement: Placement) -> None:
    """The long-lived group that only creates each scenario's own. Created
    below DETAIL whatever the environment says, so it never carries the
    collective-checking wrapper: that is the scenario's choice. The rank's
    GPU is made current first, and NCCL gets its settings (``prepare_rank``)."""
    prepare_rank(placement, rank)
    dist.set_debug_level(dist.DebugLevel.OFF)
    dist.init_process_group(
        placement.backend,
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )


@dataclass
class ScenarioGroups:
    """The scenario's own groups, so a hang there times out quickly and
    leaves the default group usable. ``for_fsdp`` is what FSDP's
    ``process_group`` gets: one group, or for hybrid sharding this rank's
    (intra-node, inter-node) pair."""

    for_fsdp: Any
    created: list
    timeout: timedelta
    checked: bool
    """Created at DETAIL, wrapped in torch's collective checker."""

    def destroy(self) -> None:
        for group in self.created:
            dist.destroy_process_group(group)

    @contextmanager
    def adopting(self) -> Iterator[None]:
        """Groups created inside become the scenario's: FSDP2 builds its own
        for an int ``reshard_after_forward``, with torch's default timeout
        of 30 minutes, which would turn a hang there into a stall of the
        pool. They are created with the timeout ``new_scenario_groups``
        gives creation, then given the scenario's, and destroyed with it."""
        world = dist.distributed_c10d._world
        before = set(world.pg_map)
        previous = dist.distributed_c10d.default_pg_timeout
        dist.distributed_c10d.default_pg_timeout = _creation_timeout(self.timeout, self.checked)
        try:
            yield
        finally:
            dist.distributed_c10d.default_pg_timeout = previous
            for group in list(world.pg_map):
                if group not in before:
                    group.set_timeout(self.timeout)
                    self.created.append(group)


def _creation_timeout(timeout: timedelta, checked: bool) -> timedelta:
    """Connecting a group's ranks is not the scenario's business: a loaded
    machine may take longer than a collective's timeout. At DETAIL the
    checker keeps the timeout it was created with, so there it is the
    scenario's from the start."""
    return timeout if checked else max(timeout, timedelta(seconds=STARTUP_TIMEOUT_S))


def new_scenario_groups(scenario: Json, rank: int, timeout_s: float) -> ScenarioGroups:
    """Every rank creates every group, in the same order, as ``new_group``
    needs. torch wraps groups created at DETAIL in its collective checker,
    so the level is the scenario's ``collective_checker`` for the creation only.

    Groups are created with ``_creation_timeout`` and then given the
    scenario's timeout; a creation that fails is reported
    (``GroupsNotCreated``) rather than observed.
    """
    previous = dist.get_debug_level()
    checked = scenario["collective_checker"]
    dist.set_debug_level(dist.DebugLevel.DETAIL if checked else dist.DebugLevel.OFF)
    timeout = timedelta(seconds=timeout_s)
    creation = _creation_timeout(timeout, checked)
    try:
        if not scenario["hybrid"]:
            created = [dist.new_group(timeout=creation)]
            mine: Any = created[0]
        else:
            size = scenario["hybrid_node_size"]
            nodes, local = range(scenario["world_size"] // size), range(size)
            intra = [dist.new_group([n * size + i for i in local], timeout=creation) for n in nodes]
            inter = [dist.new_group([n * size + i for n in nodes], timeout=creation) for i in local]
            mine = (intra[rank // size], inter[rank % size])
            created = list(mine)
    except RuntimeError as exc:
        raise GroupsNotCreated(str(exc)) from exc
    finally:
        dist.set_debug_level(previous)
    for group in created:
        group.set_timeout(timeout)
    return ScenarioGroups(mine, created, timeout, checked)


class GroupsNotCreated(RuntimeError):
    """The scenario's groups could not be connected: a failure of the
    machine, not an observation of FSDP."""


@dataclass
class Doing:
    """What this rank's main thread is doing: read by ``answer_inquiries``
    while the main thread sits blocked in a collective."""

    scenario_id: int | None = None
    caught: list | None = None
    """The warnings of the setup or step under way."""
    trace: CollectiveTrace | None = None


_doing = Doing()


def run_rank(
    scenario: Json, rank: int, device: torch.device, groups: ScenarioGroups, timings: dict[str, float] | None = None
) -> Iterator[Json]:
    """Yield setup's outcome, then each step's, for this rank, as each ends.

    Whoever drives the rank learns how far it got even if a later step hangs.
    After a failed step the rank runs nothing more: FSDP's state after an
    exception is undefined, and a harness that pressed on would report noise.
    ``timings`` receives seconds spent building, wrapping and stepping; they
    stay out of the outcomes, which must not vary from run to run.
    """
    timings = {} if timings is None else timings
    engine = ENGINES[scenario["engine"]]
    trace = CollectiveTrace()
    with _recording() as caught, tracing(trace, scenario["engine"]):
        _doing.caught, _doing.trace = caught, trace
        try:
            started = time.perf_counter()
            built = build_model(scenario["model"], scenario["seed"], scenario["freeze_untaken"])
            timings["build"] = time.perf_counter() - started
            dist.set_debug_level(getattr(dist.DebugLevel, scenario["debug_level"]))
            started = time.perf_counter()
            with groups.adopting():
                engine.wrap(built, scenario, groups.for_fsdp, device)
            timings["wrap"] = time.perf_counter() - started
            trace.unit_keys = engine.unit_keys(built)
            optimizer = torch.optim.SGD(built.module.parameters(), lr=LEARNING_RATE)
            setup = _outcome(OK, caught, trace)
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            setup = _failure(exc, caught, trace)
    yield setup
    steps = scenario["ranks"][rank]
    if setup["status"] != OK:
        yield from ({"status": NOT_RUN} for _ in steps)
        return
    started = time.perf_counter()
    for index in range(len(steps)):
        outcome = _run_step(scenario, built, optimizer, rank, index, device, trace)
        timings["steps"] = time.perf_counter() - started
        yield outcome
        if outcome["status"] != OK:
            yield from ({"status": NOT_RUN} for _ in steps[index + 1 :])
            return


def _run_step(scenario: Json, built: BuiltModel, optimizer, rank: int, index: int, device, trace) -> Json:
    step = scenario["ranks"][rank][index]
    engine = ENGINES[scenario["engine"]]
    with _recording() as caught, tracing(trace, scenario["engine"]):
        _doing.caught, _doing.trace = caught, trace
        try:
            with engine.stepping(built, step):
                total = run_forwards(scenario, built, rank, index, device).total
                grad_sum = None
                if step["backward"]:
                    total.backward()
                    # On the CPU: offloaded gradients live there whatever the device.
                    grads = [
                        _local(p.grad).float().sum().cpu() for p in built.module.parameters() if p.grad is not None
                    ]
                    grad_sum = float(sum(grads, torch.zeros(())))
                if step["optimizer_step"]:
                    optimizer.step()
                    optimizer.zero_grad()
            return _outcome(
                OK,
                caught,
                trace,
                output_sum=float(total.detach().cpu()),
                grad_sum=grad_sum,
                param_digest=param_digest(built.module, built.ignored),
            )
        except Exception as exc:  # noqa: BLE001 - any failure is an observation
            return _failure(exc, caught, trace)


def param_digest(module: nn.Module, ignored: frozenset[int] = frozenset()) -> float:
    """A fingerprint of the rank's local parameters, the ignored ones (each
    rank's own) left out: equal values, equal digests; each element
    weighted by its position, so a permutation shows."""
    total = 0.0
    for parameter in module.parameters():
        if id(parameter) in ignored:
            continue
        values = _local(parameter).detach().reshape(-1).double().cpu()
        weights = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
        total += float((values * weights).sum())
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: FSDP2's gradients are sharded DTensors,
    whose own ``sum`` would be a collective."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextmanager
def _recording() -> Iterator[list[warnings.WarningMessage]]:
    """``warnings.catch_warnings(record=True)`` that records repeats too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _outcome(status: str, caught: list[warnings.WarningMessage], trace: CollectiveTrace, **fields: Any) -> Json:
    """An outcome in its JSON form: fields that say nothing are left out."""
    outcome = {
        "status": status,
        **fields,
        "warnings": [{"category": w.category.__name__, "message": str(w.message)} for w in caught],
        "collectives": trace.take(),
    }
    return {key: value for key, value in outcome.items() if key == "status" or value not in (None, [])}


def _failure(exc: BaseException, caught: list[warnings.WarningMessage], trace: CollectiveTrace) -> Json:
    message = str(exc)
    timed_out = any(marker in message for marker in TIMEOUT_MARKERS)
    return _outcome(
        HANG if timed_out else ERROR,
        caught,
        trace,
        error_type=type(exc).__name__,
        error_message=message if message else "".join(traceback.format_exception_only(exc)).strip(),
        stack=_stack(traceback.extract_tb(exc.__traceback__)) if timed_out else None,
    )


def _stack(frames: traceback.StackSummary, depth: int = 12) -> str:
    """The innermost frames, as paths relative to their package."""
    return "".join(
        f"{_short(frame.filename)}:{frame.lineno} in {frame.name}: {frame.line}\n" for frame in frames[-depth:]
    )


def _short(filename: str) -> str:
    for package in ("/torch/", "/fsdp_fuzz/", "/fuzz/"):
        if package in filename:
            return package.strip("/") + "/" + filename.split(package, 1)[1]
    return os.path.basename(filename)


def serve_scenario(scenario: Json, scenario_id: int, rank: int, placement: Placement, timeout_s: float, reports):
    """Run one scenario on groups of its own, putting ``(kind, rank,
    scenario_id, payload)`` on ``reports``: ``outcome`` for each outcome as
    it ends, then ``done`` with the rank's timings; ``no-groups`` instead if
    its groups could not be created. The id lets a pool drop what a
    previous scenario left behind."""
    started = time.perf_counter()
    _doing.scenario_id, _doing.caught, _doing.trace = scenario_id, None, None
    try:
        groups = new_scenario_groups(scenario, rank, timeout_s)
    except GroupsNotCreated as exc:
        reports.put(("no-groups", rank, scenario_id, str(exc)))
        return
    timings = {"group": time.perf_counter() - started}
    try:
        for outcome in run_rank(scenario, rank, placement.rank_device(rank), groups, timings):
            reports.put(("outcome", rank, scenario_id, outcome))
        _doing.caught, _doing.trace = None, None
    finally:
        # A peer still inside a collective must end by its own timeout (a
        # hang), not by this rank closing the connection under it (an error).
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer died: nobody is left to wait for
        groups.destroy()
    reports.put(("done", rank, scenario_id, timings))


DEADLOCK_MESSAGE = "deadlock: every unfinished rank sat blocked, using no CPU, for {quiet:g} s"


def answer_inquiries(rank: int, inquiries, reports) -> None:
    """Answer the parent's "where are you?" (a scenario id) with the outcome
    this rank would report had its blocked collective timed out: the step's
    warnings and collectives so far, and where the main thread waits.

    Runs on a thread of its own: the main thread, blocked inside torch's C++
    collective, has released the GIL. ``None`` ends the thread.
    """
    main = threading.main_thread().ident
    while (scenario_id := inquiries.get()) is not None:
        answer = None
        if scenario_id == _doing.scenario_id and _doing.trace is not None:
            caught, trace = list(_doing.caught or ()), _doing.trace
            frame = sys._current_frames().get(main)
            stack = _stack(traceback.extract_stack(frame)) if frame is not None else None
            answer = _outcome(HANG, caught, trace, error_type="Deadlock", stack=stack)
        reports.put(("where", rank, scenario_id, answer))


# The parent -------------------------------------------------------------------------


class RankActivity:
    """Tells whether ranks are moving, from what the kernel says of their
    threads: CPU time consumed (``schedstat``, in nanoseconds) and whether any
    is runnable. A rank blocked in a collective consumes nothing and sleeps;
    one that is merely starved of CPU is runnable, so a loaded machine never
    looks like a deadlock. Gloo's TCP event loops wake on a timer of their own
    (a fraction of a millisecond every few hundred), so they are left out.
    Linux only: elsewhere ``available`` is False."""

    available = os.path.isdir("/proc/self/task")
    IGNORED_THREADS = ("gloo_tcp_loop",)

    def __init__(self, pid: Callable[[int], int | None]) -> None:
        self._pid = pid

    def sample(self, ranks: set[int]) -> tuple[int, ...] | None:
        """CPU nanoseconds per rank, or None if any thread of any rank is
        runnable (or a rank cannot be read)."""
        used = []
        for rank in sorted(ranks):
            tasks = f"/proc/{self._pid(rank)}/task"
            total = 0
            try:
                for tid in os.listdir(tasks):
                    with open(f"{tasks}/{tid}/stat") as stat:
                        name, state = stat.read().rsplit(")", 1)
                    if name.split("(", 1)[1] in self.IGNORED_THREADS:
                        continue
                    if state.split()[0] in ("R", "D"):
                        return None
                    with open(f"{tasks}/{tid}/schedstat") as schedstat:
                        total += int(schedstat.read().split()[0])
            except (OSError, ValueError, IndexError):
                return None
            used.append(total)
        return tuple(used)


@dataclass
class RankHandles:
    """How the parent reaches the processes of its ranks."""

    processes: list
    inquiries: list
    """Per rank, the queue its ``answer_inquiries`` thread reads."""

    def is_alive(self, rank: int) -> bool:
        return self.processes[rank].is_alive()

    def exit_code(self, rank: int) -> int | None:
        return self.processes[rank].exitcode

    def pid(self, rank: int) -> int | None:
        return self.processes[rank].pid


@dataclass
class Collected:
    outcomes: list[list[Json]]
    """Per rank, setup's outcome and then each step's, padded with ``not_run``."""
    silent: set[int]
    """Ranks that stopped reporting without dying: stuck outside any collective timeout."""
    crashed: set[int]
    timings: list[dict[str, float]]
    """Per rank, seconds spent per phase (group, build, wrap, steps), where reported."""
    deadlocked: bool = False
    """Every unfinished rank was found blocked with nothing moving: the
    ranks must be replaced, since their collectives are still pending."""
    no_groups: str | None = None
    """Why the scenario's groups could not be created, if they could not:
    nothing was observed, and the ranks must be replaced."""


def collect_outcomes(
    scenario: Json,
    reports,
    scenario_id: int,
    ranks: RankHandles,
    first_report_s: float,
    progress_s: float,
    deadlock_after_s: float | None = None,
) -> Collected:
    """Gather reports until every rank is done, dies, or stops making progress.

    Progress means a report arrived. A rank stuck in a collective ends by its
    group's timeout and reports a hang itself. With ``deadlock_after_s``, a
    hang is recognised sooner: when every unfinished rank has been blocked
    that long with no thread running, nothing can move again before the
    timeout, so each blocked rank is asked where it is (``answer_inquiries``)
    and its answer is recorded as the hang. Not at DETAIL: there torch's
    collective checker turns the wait into an error naming the missing rank,
    after the group's timeout, and that is FSDP's to say. One silent for
    ``progress_s`` is stuck elsewhere and is recorded as hung at the step it
    was in. Steps a
    rank never reached did not run; nor, for the other ranks, the step a rank
    crashed in and those after it.
    """
    world_size = scenario["world_size"]
    total = 1 + len(scenario["ranks"][0])
    collected = Collected([[] for _ in range(world_size)], set(), set(), [{} for _ in range(world_size)])
    done: set[int] = set()
    anchor, limit = time.monotonic(), first_report_s
    watch = deadlock_after_s is not None and not scenario["collective_checker"] and RankActivity.available
    activity = RankActivity(ranks.pid) if watch else None
    quiet: tuple[float, tuple[int, ...]] | None = None
    while len(done) < world_size:
        try:
            kind, rank, tag, payload = reports.get(timeout=0.02)
        except queue.Empty:
            for rank in sorted(set(range(world_size)) - done):
                if not ranks.is_alive(rank):
                    message = f"rank {rank} died (exit code {ranks.exit_code(rank)})"
                    collected.outcomes[rank].append({"status": CRASH, "error_message": message})
                    collected.crashed.add(rank)
                    done.add(rank)
            if time.monotonic() - anchor > limit:
                for rank in sorted(set(range(world_size)) - done):
                    if len(collected.outcomes[rank]) < total:  # else it waits at the final barrier
                        message = f"no report from rank {rank} for {limit:.0f} s"
                        collected.outcomes[rank].append({"status": HANG, "error_message": message})
                    collected.silent.add(rank)
                break
            if activity is not None and len(done) < world_size:
                used = activity.sample(set(range(world_size)) - done)
                if used is None or quiet is None or used != quiet[1]:
                    quiet = None if used is None else (time.monotonic(), used)
                elif time.monotonic() - quiet[0] >= deadlock_after_s:
                    _record_deadlock(collected, done, total, reports, scenario_id, ranks, deadlock_after_s)
                    break
            continue
        if tag != scenario_id:
            continue
        anchor, limit, quiet = time.monotonic(), progress_s, None
        if kind == "no-groups":
            collected.no_groups = payload
            break
        if kind == "outcome":
            collected.outcomes[rank].append(payload)
        elif kind == "done":
            collected.timings[rank] = payload
            done.add(rank)
    for reported in collected.outcomes:
        reported[:] = reported[:total] + [{"status": NOT_RUN}] * (total - len(reported))
    if collected.crashed:
        # Whether a peer finished the step it was in when a rank died is a
        # race: from that step on, only the crash is observed.
        ended = min(
            next(i for i, o in enumerate(collected.outcomes[r]) if o["status"] == CRASH) for r in collected.crashed
        )
        for rank, reported in enumerate(collected.outcomes):
            if rank not in collected.crashed:
                reported[ended:] = [{"status": NOT_RUN}] * (total - ended)
    return collected


def _record_deadlock(
    collected: Collected, done: set[int], total: int, reports, scenario_id: int, ranks: RankHandles, quiet_s: float
) -> None:
    """Each blocked rank's own account of its hung step, or where it has none
    (blocked outside a step, or no answer) a bare hang."""
    blocked = [
        rank for rank in range(len(collected.outcomes)) if rank not in done and len(collected.outcomes[rank]) < total
    ]
    answers: dict[int, Json | None] = {}
    for rank in blocked:
        ranks.inquiries[rank].put(scenario_id)
    deadline = time.monotonic() + 2.0
    while len(answers) < len(blocked) and time.monotonic() < deadline:
        try:
            kind, rank, tag, payload = reports.get(timeout=0.05)
        except queue.Empty:
            continue
        if tag == scenario_id and kind == "where":
            answers[rank] = payload
        elif tag == scenario_id and kind == "outcome":
            collected.outcomes[rank].append(payload)
    message = DEADLOCK_MESSAGE.format(quiet=quiet_s)
    for rank in blocked:
        outcome = answers.get(rank) or {"status": HANG, "error_type": "Deadlock"}
        collected.outcomes[rank].append({**outcome, "error_message": message})
    collected.deadlocked = True


def refuse_offload_on_cpu(scenario: Json, placement: Placement) -> None:
    """CPU offload moves parameters between the CPU and the device: there
    is nothing to offload from ranks on the CPU (FSDP2 fails to find an
    accelerator), so such a scenario needs CUDA ranks."""
    offloads = scenario["fsdp"]["cpu_offload"] or scenario["fsdp2"]["cpu_offload"]
    if offloads and placement.device != "cuda":
        raise DeviceError(
            f"the scenario offloads parameters to the CPU (cpu_offload), which needs CUDA ranks, but it would run "
            f"on {placement.device}; run it with --device cuda, or drop cpu_offload"
        )


def run_fresh(
    scenario: Json,
    placement: Placement = CPU,
    timeout_s: float = 5.0,
    deadlock_after_s: float | None = DEADLOCK_AFTER_S,
) -> list[list[Json]]:
    """Run the scenario on freshly spawned ranks, one process each, as the
    seed test's harness does; per rank, setup's outcome then each step's.

    The rendezvous is a file in a private temporary directory (no ports, so
    runs on one machine never collide). Ranks that finish wait for the others
    before exiting, so a rank stuck in a collective ends by its own timeout or
    by a deadlock the parent recognised, never by a peer's exit: the same
    scenario, the same outcomes.
    """
    placement.check(scenario["world_size"])
    refuse_offload_on_cpu(scenario, placement)
    check_trace(scenario["engine"])
    context = mp.get_context("spawn")
    reports, release = context.Queue(), context.Event()
    inquiries = [context.Queue() for _ in range(scenario["world_size"])]
    workdir = tempfile.mkdtemp(prefix="fsdp-fuzz-")
    store = os.path.join(workdir, "store")
    processes = [
        context.Process(
            target=_fresh_rank,
            args=(scenario, rank, store, placement, timeout_s, reports, release, inquiries[rank]),
            daemon=True,
        )
        for rank in range(scenario["world_size"])
    ]
    collected = None
    try:
        for process in processes:
            process.start()
        collected = collect_outcomes(
            scenario,
            reports,
            scenario_id=0,
            ranks=RankHandles(processes, inquiries),
            first_report_s=STARTUP_TIMEOUT_S,
            progress_s=2 * timeout_s + 1,
            deadlock_after_s=deadlock_after_s,
        )
    finally:
        release.set()
        stuck = collected is None or collected.deadlocked or collected.no_groups is not None
        for process in processes:
            process.join(timeout=0 if stuck else 5)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (reports, *inquiries):
            channel.close()
            channel.join_thread()
        shutil.rmtree(workdir, ignore_errors=True)
    if collected.no_groups is not None:
        raise HarnessError(f"the scenario's process groups could not be created: {collected.no_groups}")
    return collected.outcomes


def _fresh_rank(scenario, rank, store_path, placement, timeout_s, reports, release, inquiries) -> None:
    threading.Thread(target=answer_inquiries, args=(rank, inquiries, reports), daemon=True).start()
    join_default_group(rank, scenario["world_size"], store_path, placement)
    serve_scenario(scenario, 0, rank, placement, timeout_s, reports)
    release.wait(timeout=STARTUP_TIMEOUT_S)
    os._exit(0)


# As a script: the reproducer ------------------------------------------------------------


def main(scenario: Json, argv: list[str] | None = None) -> int:
    """Run ``scenario`` on fresh ranks, print what each rank did in each step,
    and end with one line ``REPRO-RESULT <json>``: every rank's outcomes."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").strip().splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu, or cuda: rank r on GPU r mod (visible GPUs)"
    )
    parser.add_argument(
        "--backend", choices=["gloo", "nccl"], help="default: nccl if every rank has a GPU of its own, else gloo"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a collective counts as hung")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        placement = DeviceRequest(args.device, args.backend).place(scenario["world_size"])
        outcomes = run_fresh(scenario, placement, args.timeout)
    except (DeviceError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\n{scenario['world_size']} ranks, engine {scenario['engine']}, {placement.describe(scenario['world_size'])}, "
        f"torch {torch.__version__}, timeout {args.timeout:g} s"
    )
    print_outcomes(scenario, outcomes)
    print("REPRO-RESULT " + json.dumps({"ranks": outcomes}))
    return 0


def print_outcomes(scenario: Json, outcomes: list[list[Json]]) -> None:
    """Each rank's setup and steps: how each ended, FSDP's order warnings in
    full, other warnings counted."""
    labels = [
        ["setup"] + [f"step {index}: {_describe(step)}" for index, step in enumerate(steps)]
        for steps in scenario["ranks"]
    ]
    width = max(len(label) for rank_labels in labels for label in rank_labels)
    for rank, rank_outcomes in enumerate(outcomes):
        print(f"rank {rank}")
        for label, outcome in zip(labels[rank], rank_outcomes, strict=True):
            status = outcome["status"]
            if status == OK and "output_sum" in outcome:
                grad = f", grad sum {outcome['grad_sum']:.6g}" if "grad_sum" in outcome else ""
                status += f" (output sum {outcome['output_sum']:.6g}{grad})"
            elif status in (ERROR, HANG, CRASH):
                said = [outcome.get("error_type"), _first_line(outcome.get("error_message"))]
                status += ": " + ": ".join(part for part in said if part)
            print(f"  {label:<{width}}  {status}")
            others: dict[str, int] = {}
            for warning in outcome.get("warnings", []):
                if warning["message"].startswith("Forward order differs"):
                    text = f"{warning['category']}: {warning['message']}"
                    print(textwrap.indent(text, " " * (width + 6)))
                else:
                    key = f"{warning['category']}: {_first_line(warning['message'])[:100]}"
                    others[key] = others.get(key, 0) + 1
            for key, count in others.items():
                print(" " * (width + 6) + f"(other warning{f' x{count}' if count > 1 else ''}) {key}")


def _describe(step: Json) -> str:
    words = [step["mode"]] + [f"{name}={taken}" for name, taken in step["path"].items()]
    if step["forwards"] != 1:
        words.append(f"forwards={step['forwards']}")
    if not step["grad_enabled"]:
        words.append("no grad")
    if not step["backward"]:
        words.append("no backward")
    if step["optimizer_step"]:
        words.append("optimizer step")
    return ", ".join(words)


def _first_line(text: str | None) -> str | None:
    return text.splitlines()[0] if text else text
