"""FSDP1, ``FullyShardedDataParallel``: its settings, refusals and promises,
how they are drawn and shown, and how a rank wraps the spec's units and
drives them (the functions that issue collectives for one unit, the
per-step ``no_sync``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from fsdp_fuzz.engines.base import (
    Engine,
    EngineSource,
    Promise,
    Purpose,
    UnitHook,
    hybrid_allowed,
    norm_dtype_refusal,
    with_dtypes,
)
from fsdp_fuzz.generate.choices import LOW_PRECISION, chance
from fsdp_fuzz.models.spec import Choice, Sequential, blocks_below, named_in

if TYPE_CHECKING:
    import torch
    from hypothesis.strategies import DrawFn

    from fsdp_fuzz.data import Scenario, Step
    from fsdp_fuzz.execute.model import BuiltModel

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
PLAIN_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
HYBRID_STRATEGIES = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
BACKWARD_PREFETCH = (None, "BACKWARD_PRE", "BACKWARD_POST")
_DRAWN_DEBUG_LEVELS = ("DETAIL", "INFO", "OFF")
"""``TORCH_DISTRIBUTED_DEBUG``, FSDP1 checking the forward order at DETAIL only; shrinks to DETAIL."""


@dataclass(frozen=True)
class MixedPrecision:
    """FSDP1's ``MixedPrecision``: dtypes are names from ``DTYPES``, ``None``
    keeps the parameters' own (float32)."""

    param_dtype: str | None = None
    reduce_dtype: str | None = None
    buffer_dtype: str | None = None
    keep_low_precision_grads: bool = False
    cast_forward_inputs: bool = False


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
    mixed_precision: MixedPrecision | None = None
    auto_wrap: bool = False
    """Units wrapped by ``auto_wrap_policy=ModuleWrapPolicy({unit class})`` on
    the root, as users wrap a transformer's blocks, instead of one
    ``FullyShardedDataParallel`` call per unit."""
    ignored: tuple[str, ...] = ()
    """Blocks passed as ``ignored_states``: FSDP neither shards their
    parameters nor reduces their gradients."""
    cpu_offload: bool = False
    """``CPUOffload(offload_params=True)``: sharded parameters and gradients
    live on the CPU between uses. CUDA placements only."""


_PREFETCH = (FsdpSettings.backward_prefetch, *(p for p in BACKWARD_PREFETCH if p != FsdpSettings.backward_prefetch))


@st.composite
def mixed_precisions(draw: DrawFn) -> MixedPrecision | None:
    """``MixedPrecision`` about one time in three; shrinks to none.
    ``buffer_dtype`` follows ``param_dtype``: batch norm refuses weights and
    running statistics of different dtypes."""
    enabled = draw(chance(1, 3))
    param_dtype = draw(st.sampled_from(LOW_PRECISION))
    reduce_dtype = draw(st.sampled_from((None, "float32", param_dtype)))
    keep_low_precision_grads, cast_forward_inputs = draw(chance(1, 4)), draw(st.booleans())
    if not enabled:
        return None
    return MixedPrecision(param_dtype, reduce_dtype, param_dtype, keep_low_precision_grads, cast_forward_inputs)


@st.composite
def fsdp_settings(draw: DrawFn, world_size: int, *, device: str = "cpu", hybrid: bool = True) -> FsdpSettings:
    """Every keyword FSDP runs with on ``device``; shrinks to ``FsdpSettings()``.

    ``hybrid`` offers HYBRID_SHARD and _HYBRID_SHARD_ZERO2 where the world
    size allows (the executor passes FSDP an intra-/inter-node pair of groups).
    """
    strategies = PLAIN_STRATEGIES + (HYBRID_STRATEGIES if hybrid and hybrid_allowed(world_size) else ())
    policy = draw(mixed_precisions())
    return FsdpSettings(
        sharding_strategy=draw(st.sampled_from(strategies)),
        use_orig_params=draw(st.booleans()),
        forward_prefetch=draw(st.booleans()),
        backward_prefetch=draw(st.sampled_from(_PREFETCH)),
        limit_all_gathers=not draw(st.booleans()),
        sync_module_states=device != "cpu" and draw(st.booleans()),
        mixed_precision=policy,
        auto_wrap=draw(chance(1, 3)) and policy is None,  # auto wrapping would make each norm a unit
        cpu_offload=device == "cuda" and draw(chance(1, 4)),
    )


_FLAT_PARAM, _RUNTIME = "torch.distributed.fsdp._flat_param", "torch.distributed.fsdp._runtime_utils"


class Fsdp1(Engine):
    """``FullyShardedDataParallel``: every unit of the spec wrapped, innermost
    first, then the root."""

    name = "fsdp1"
    api = "FullyShardedDataParallel"
    settings_field = "fsdp"
    settings_type = FsdpSettings
    promise = Promise.ONE_ORDER
    methods = ("forward",)
    step_controls = ()
    checkpoint_wrapper = "wrapper"
    test_class = "TestFSDPRepro"
    order_warnings = True

    unit_hooks = (
        UnitHook(_FLAT_PARAM, "FlatParamHandle", "_all_gather_flat_param", Purpose.UNSHARD, 0),
        UnitHook("torch.distributed.fsdp._exec_order_utils", "_ExecOrderData", "_check_order", Purpose.ORDER_CHECK, 1),
        UnitHook(_RUNTIME, None, "_reduce_grad", Purpose.REDUCE_GRAD, 1),
        UnitHook(_RUNTIME, None, "_reduce_grad_no_shard", Purpose.REDUCE_GRAD, 1),
    )

    # Settings, refusals, promises ---------------------------------------------

    def mixed_precision(self, scenario: Scenario) -> MixedPrecision | None:
        return scenario.fsdp.mixed_precision

    def hybrid(self, scenario: Scenario) -> bool:
        return scenario.fsdp.sharding_strategy in HYBRID_STRATEGIES

    def buffer_dtype(self, scenario: Scenario) -> str:
        policy = scenario.fsdp.mixed_precision
        return (policy.buffer_dtype if policy is not None else None) or "float32"

    def refusals(self, scenario: Scenario) -> Iterator[str]:
        settings = scenario.fsdp
        if settings.sharding_strategy not in SHARDING_STRATEGIES:
            yield f"sharding_strategy {settings.sharding_strategy!r} is not one of {SHARDING_STRATEGIES}"
        if settings.backward_prefetch not in BACKWARD_PREFETCH:
            yield f"backward_prefetch {settings.backward_prefetch!r} is not one of {BACKWARD_PREFETCH}"
        for name in settings.ignored:
            if name in {node.name for node in scenario.model.named()} and any(
                node.fsdp_unit for node in named_in(scenario.model.block(name))
            ):
                yield (
                    f"ignored block {name!r} is or holds an FSDP unit, and FSDP1's ignored_states refuses FSDP "
                    "modules; ignore a block inside a unit, or make it no unit"
                )
        if settings.auto_wrap and settings.mixed_precision is not None and scenario.model.has_norms():
            yield (
                "auto_wrap with mixed_precision: FSDP1's auto wrapping then makes every BatchNorm a unit of its own "
                "(kept in float32), units the spec does not describe, so the contract cannot say what to expect; "
                "wrap explicitly (auto_wrap false), or drop the norms or the mixed precision"
            )
        yield from norm_dtype_refusal(self, scenario, "set buffer_dtype to the param_dtype", "to buffer_dtype")

    def checks_order(self, scenario: Scenario) -> bool:
        return scenario.debug_level == "DETAIL"

    def flat_parameters(self, scenario: Scenario) -> bool:
        return not scenario.fsdp.use_orig_params

    def replicated(self, scenario: Scenario) -> bool:
        return scenario.fsdp.sharding_strategy == "NO_SHARD"

    # Drawing ----------------------------------------------------------------

    def draw_settings(self, draw: DrawFn, world_size: int, device: str, hybrid: bool) -> dict[str, Any]:
        fsdp = draw(fsdp_settings(world_size, device=device, hybrid=hybrid))
        return {"fsdp": fsdp, "debug_level": draw(st.sampled_from(_DRAWN_DEBUG_LEVELS))}

    def may_ignore_units(self) -> bool:
        return False

    def with_precision(self, draw: DrawFn, scenario: Scenario, dtype: str | None) -> Scenario:
        reduce_dtype = draw(st.sampled_from((None, "float32")))
        policy = MixedPrecision(dtype, reduce_dtype, dtype) if dtype is not None else None
        auto_wrap = scenario.fsdp.auto_wrap and policy is None  # no auto wrap of low-precision norms
        return replace(scenario, fsdp=replace(scenario.fsdp, mixed_precision=policy, auto_wrap=auto_wrap, ignored=()))

    # Rendering --------------------------------------------------------------

    def describe(self, scenario: Scenario) -> str:
        fsdp = scenario.fsdp
        return (
            f"FSDP: {fsdp.sharding_strategy}, use_orig_params={fsdp.use_orig_params}, "
            f"forward_prefetch={fsdp.forward_prefetch}, backward_prefetch={fsdp.backward_prefetch}, "
            f"limit_all_gathers={fsdp.limit_all_gathers}, sync_module_states={fsdp.sync_module_states}"
            + (f", mixed_precision={fsdp.mixed_precision}" if fsdp.mixed_precision else "")
            + (", units wrapped by ModuleWrapPolicy" if fsdp.auto_wrap else "")
            + (f", ignored_states={list(fsdp.ignored)}" if fsdp.ignored else "")
        )

    def features(self, scenario: Scenario) -> set[str]:
        fsdp = scenario.fsdp
        return {
            f"sharding {fsdp.sharding_strategy}",
            f"use_orig_params {fsdp.use_orig_params}",
            f"forward_prefetch {fsdp.forward_prefetch}",
            f"backward_prefetch {fsdp.backward_prefetch}",
            f"limit_all_gathers {fsdp.limit_all_gathers}",
            f"sync_module_states {fsdp.sync_module_states}",
            f"fsdp1 auto_wrap {fsdp.auto_wrap}",
            f"fsdp1 ignored {bool(fsdp.ignored)}",
        }

    # Reproducer ---------------------------------------------------------------

    def wraps_by_class(self, scenario: Scenario) -> bool:
        return scenario.fsdp.auto_wrap

    def source(self, scenario: Scenario, model: Any, schedule: Any, cuda: bool) -> EngineSource:
        """``FullyShardedDataParallel(...)`` on every unit (or ``ModuleWrapPolicy`` on the units' classes) with
        the settings that differ from the defaults, and ``no_sync`` where a step turns gradient sync off."""
        from fsdp_fuzz.repro.engines import (
            INTER,
            INTRA,
            assigned,
            assignment,
            hybrid_groups,
            nested_units,
            non_default,
            policy,
        )

        settings = scenario.fsdp
        spec = scenario.model
        imports = ["from torch.distributed.fsdp import FullyShardedDataParallel as FSDP"]
        names = []
        keywords = ["device_id=device" if cuda else 'device_id=torch.device("cpu")']
        for name, value in non_default(settings, skip=("auto_wrap", "ignored")).items():
            if name == "sharding_strategy":
                names.append("ShardingStrategy")
                keywords.append(f"sharding_strategy=ShardingStrategy.{value}")
            elif name == "backward_prefetch":
                names += ["BackwardPrefetch"] if value is not None else []
                keywords.append(f"backward_prefetch={'None' if value is None else f'BackwardPrefetch.{value}'}")
            elif name == "mixed_precision":
                names.append("MixedPrecision")
                keywords.append("mixed_precision=precision")
            elif name == "cpu_offload":
                names.append("CPUOffload")
                keywords.append("cpu_offload=CPUOffload(offload_params=True)")
            else:
                keywords.append(f"{name}={value!r}")
        if settings.ignored:
            keywords.append("ignored_states=[" + ", ".join(f"model.{model.paths[n]}" for n in settings.ignored) + "]")
        groups = []
        if scenario.hybrid:
            groups = hybrid_groups(scenario)
            keywords.append(f"process_group=({INTRA}, {INTER})")
        if names:
            imports.append(f"from torch.distributed.fsdp import {', '.join(sorted(names))}")
        wrap = []
        if settings.mixed_precision is not None:
            wrap += assignment("precision", "MixedPrecision", policy(settings.mixed_precision))
        units = [] if settings.auto_wrap else nested_units(spec)
        inline = ", ".join(keywords)
        longest = max(
            (len(f"{assigned(spec, model, u.name)} = FSDP(model.{model.paths[u.name]}, ") for u in units),
            default=len("model = FSDP(model, "),
        )

        if len(keywords) == 1 or (len(units) <= 1 and longest + len(inline) <= 110):  # written in each call
            arguments = inline
        else:
            arguments = "**fsdp"
            wrap += assignment("fsdp", "dict", keywords)
        if settings.auto_wrap:
            imports.append("from torch.distributed.fsdp.wrap import ModuleWrapPolicy")
            classes = ", ".join(model.unit_classes) or "Unit"
            wrap.append(f"model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({{{classes}}}), {arguments})")
        else:
            for unit in units:
                call = f"FSDP(model.{model.paths[unit.name]}, {arguments})"
                wrap.append(f"{assigned(spec, model, unit.name)} = {call}")
            wrap.append(f"model = FSDP(model, {arguments})")
        context = None
        if schedule.varies(lambda step: step.gradient_sync) or not schedule.constant(lambda step: step.gradient_sync):
            imports.append("from contextlib import nullcontext")
            context = f"nullcontext() if {schedule.of(lambda step: step.gradient_sync)} else model.no_sync()"
        replicas = None
        if self.replicated(scenario):
            replicas = "None"
        elif scenario.hybrid:
            replicas = INTER
        return EngineSource(
            tuple(imports),
            tuple(wrap),
            groups=tuple(groups),
            step_context=context,
            gradients=_gradients_source(settings.use_orig_params, self.replicated(scenario), scenario.hybrid),
            gradients_call=f"gradients(model, {INTRA})" if scenario.hybrid else "gradients(model)",
            replicas=replicas,
            flat_gradients=True,
            module='getattr(model, "module", model)',
        )

    # On a rank --------------------------------------------------------------

    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision as TorchMixedPrecision

        from fsdp_fuzz.execute.model import UNIT_CLASSES, unwrapped

        settings = scenario.fsdp
        prefetch = settings.backward_prefetch
        policy = settings.mixed_precision
        kwargs = {
            "process_group": group,
            "device_id": device,
            "sharding_strategy": ShardingStrategy[settings.sharding_strategy],
            "use_orig_params": settings.use_orig_params,
            "forward_prefetch": settings.forward_prefetch,
            "backward_prefetch": BackwardPrefetch[prefetch] if prefetch else None,
            "limit_all_gathers": settings.limit_all_gathers,
            "sync_module_states": settings.sync_module_states,
            "mixed_precision": None if policy is None else TorchMixedPrecision(**with_dtypes(policy)),
            "ignored_states": built.ignore(settings.ignored) or None,
            "cpu_offload": CPUOffload(offload_params=True) if settings.cpu_offload else None,
        }
        root = built.spec.root
        if settings.auto_wrap:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            built.module = FSDP(built.module, auto_wrap_policy=ModuleWrapPolicy(UNIT_CLASSES), **kwargs)
            for module in built.module.modules():
                if isinstance(module, FSDP) and module is not built.module:
                    built.units[module.module.unit_name] = module
            built.units[root.name] = built.module
            return

        def wrap_below(node, module) -> None:
            for child in blocks_below(node):
                if not isinstance(child, (Sequential, Choice)):
                    continue
                child_module = getattr(module, child.name)
                wrap_below(child, child_module)
                if child.fsdp_unit:
                    built.units[child.name] = FSDP(child_module, **kwargs)
                    setattr(unwrapped(module), child.name, built.units[child.name])

        wrap_below(root, built.module)
        built.module = built.units[root.name] = FSDP(built.module, **kwargs)

    def unit_keys(self, built: BuiltModel) -> dict[int, str]:
        """id of each unit's flat-parameter handle (what the hooks receive) -> its spec name."""
        return {id(unit._handle): name for name, unit in built.units.items() if unit._handle is not None}

    def stepping(self, built: BuiltModel, step: Step) -> AbstractContextManager:
        """``gradient_sync`` off: the step runs inside the root's ``no_sync()``."""
        return nullcontext() if step.gradient_sync else built.module.no_sync()


def _gradients_source(orig_params: bool, replicated: bool, hybrid: bool) -> str:
    """``gradients(model)``: FSDP1 keeps no whole gradient outside ``summon_full_params`` (which would
    re-register the parameters it reads), so the ranks gather the parts they hold: with
    ``use_orig_params`` a piece of every parameter, in rank order; without it, each unit's flat
    parameter, split as FSDP flattened it (``FlatParameter._fqns``, ``._numels``)."""
    group = ", group=group" if hybrid else ""
    name = 'name.replace("_fsdp_wrapped_module.", "")'
    if orig_params:
        local = [
            f"    mine = {{}}  # {'the whole' if replicated else 'this rank' + chr(39) + 's piece'} of every gradient",
            "    for name, p in model.named_parameters():",
            "        grad = torch.zeros_like(p) if p.grad is None else p.grad",
            f"        mine[{name}] = grad.reshape(-1).float()",
        ]
        if replicated:
            doc = "def gradients(model):  # every parameter's gradient: NO_SHARD keeps them whole on every rank"
            return "\n".join([doc, *local, "    return mine"])
        return "\n".join(
            [
                f"def gradients(model{', group' if hybrid else ''}):",
                '    """Every parameter\'s gradient: with use_orig_params each rank holds a piece of it, in rank'
                ' order."""',
                *local,
                f"    pieces = [None] * {'2' if hybrid else 'WORLD_SIZE'}",
                f"    dist.all_gather_object(pieces, mine{group})",
                "    return {name: torch.cat([piece[name] for piece in pieces]) for name in mine}",
            ]
        )
    if replicated:
        whole = ["        whole = flat.grad if flat.grad is not None else torch.zeros_like(flat)"]
    else:
        whole = [
            "        grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)",
            f"        shards = [torch.zeros_like(grad) for _ in range({'2' if hybrid else 'WORLD_SIZE'})]",
            f"        dist.all_gather(shards, grad{group})",
            "        whole = torch.cat(shards)",
        ]
    return "\n".join(
        [
            f"def gradients(model{', group' if hybrid and not replicated else ''}):",
            '    """Every parameter\'s gradient: each unit\'s flat gradient whole, split as FSDP flattened it."""',
            "    found = {}",
            "    for name, flat in model.named_parameters():",
            *whole,
            f'        prefix = {name}.removesuffix("_flat_param")',
            "        pieces = whole[: sum(flat._numels)].float().split(flat._numels)",
            "        found.update({prefix + fqn: piece for fqn, piece in zip(flat._fqns, pieces, strict=True)})",
            "    return found",
        ]
    )
