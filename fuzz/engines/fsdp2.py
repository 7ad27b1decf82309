"""FSDP2, ``fully_shard``: its settings, refusals and promises, how they are
drawn and shown, and how a rank shards the spec's units on a mesh built
from the scenario's groups and drives them (the functions that issue
collectives for one parameter group, the per-step setters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from fsdp_fuzz.engines.base import (
    HYBRID_NODE_SIZE,
    Engine,
    EngineSource,
    Promise,
    Purpose,
    UnitHook,
    hybrid_allowed,
    norm_dtype_refusal,
    with_dtypes,
)
from fsdp_fuzz.generate.choices import LOW_PRECISION, chance, sometimes
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Norm, Sequential, blocks_below, named_in

if TYPE_CHECKING:
    import torch
    from hypothesis.strategies import DrawFn

    from fsdp_fuzz.data import Scenario, Step
    from fsdp_fuzz.execute.model import BuiltModel


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """FSDP2's ``MixedPrecisionPolicy``, dtypes by name as above; every
    unit gets it, ``output_dtype`` only the root (the model's output dtype)."""

    param_dtype: str | None = None
    reduce_dtype: str | None = None
    output_dtype: str | None = None
    cast_forward_inputs: bool = True


@dataclass(frozen=True)
class Fsdp2Settings:
    """How every ``fully_shard`` unit is set up; defaults are FSDP2's own.

    ``reshard_after_forward`` is ``fully_shard``'s argument (an int applies to
    the non-root units; the root keeps FSDP2's default). ``hsdp`` shards over
    a 2-D (replicate x shard) mesh of simulated nodes. The other fields are
    the ``FSDPModule`` setters of the same names, applied to the root
    (recursively); ``forward_prefetch`` and ``backward_prefetch`` have each
    unit prefetch the next (the previous) unit in the spec's order.
    """

    reshard_after_forward: bool | int | None = None
    hsdp: bool = False
    reduce_scatter_unused_params: bool = False
    reshard_after_backward: bool = True
    forward_prefetch: bool = False
    backward_prefetch: bool = False
    mp_policy: MixedPrecisionPolicy | None = None
    register_encode: bool = False
    """``register_fsdp_forward_method(root, "encode")``: FSDP2 runs its hooks around ``encode`` too."""
    shard_dim: int = 0
    """``shard_placement_fn``: 1 shards the 2-D parameters (weights) on dim
    1 (``Shard(1)``) where it splits evenly over the shard group (FSDP2
    refuses uneven dim-1 shards), 0 keeps FSDP2's ``Shard(0)``."""
    gradient_divide_factor: float | None = None
    """``set_gradient_divide_factor``: reduced gradients are the ranks' sum
    divided by this instead of by the world size."""
    force_sum_reduction: bool = False
    """``set_force_sum_reduction_for_comms``: sum reductions, the division done apart."""
    ignored: tuple[str, ...] = ()
    """Blocks whose parameters every ``fully_shard`` call gets as
    ``ignored_params``: neither sharded nor reduced."""
    sharded_together: tuple[tuple[str, ...], ...] = ()
    """Sibling units each sharded by one ``fully_shard([a, b, ...])`` call:
    one parameter group, unsharded whichever of them runs first."""
    no_unshard_in_backward: tuple[str, ...] = ()
    """Units given ``set_unshard_in_backward(False)``: FSDP2 leaves their
    parameters sharded in backward, which is right only where backward
    needs none of them (an embedding-like first layer)."""
    cpu_offload: bool = False
    """``offload_policy=CPUOffloadPolicy()``. CUDA placements only."""


def backward_needs_no_parameters(model: ModelSpec, name: str) -> bool:
    """Whether backward can do without the unit's unsharded parameters: the
    model's first block, a unit, not checkpointed nor tied, whose only
    layer with parameters is its first child, a Linear on the model's
    input (which needs no gradient): its weight gradient is input times
    output gradient, and no gradient flows further back."""
    first = model.root.children[0]
    if not isinstance(first, Sequential) or first.name != name or not first.fsdp_unit:
        return False
    if first.checkpoint or first.tied_to or not first.children or not isinstance(first.children[0], Linear):
        return False
    return not any(isinstance(child, (Linear, Norm, Sequential, Choice)) for child in first.children[1:])


def _sharded_together_refusals(model: ModelSpec, groups: tuple[tuple[str, ...], ...]) -> Iterator[str]:
    units = {node.name for node in model.units() if node is not model.root}
    parents = model.parents()
    seen: set[str] = set()
    for group in groups:
        if len(group) < 2:
            yield f"sharded_together group {list(group)} needs at least two units"
        for name in group:
            if name not in units:
                yield f"sharded_together names {name!r}, which is not a unit below the root"
                return
            if name in seen:
                yield f"sharded_together names unit {name!r} twice"
            seen.add(name)
        if len({parents[name] for name in group}) > 1:
            yield (
                f"sharded_together group {list(group)} must be siblings (one parent block), so that one "
                "fully_shard call can take them after their inner units and before their parent"
            )


@st.composite
def mp_policies(draw: DrawFn) -> MixedPrecisionPolicy | None:
    """``MixedPrecisionPolicy`` about one time in three; shrinks to none."""
    enabled = draw(chance(1, 3))
    param_dtype = draw(st.sampled_from(LOW_PRECISION))
    reduce_dtype = draw(st.sampled_from((None, "float32", param_dtype)))
    output_dtype = draw(st.sampled_from((None, "float32")))
    return MixedPrecisionPolicy(param_dtype, reduce_dtype, output_dtype) if enabled else None


@st.composite
def fsdp2_settings(draw: DrawFn, world_size: int, *, device: str = "cpu", hybrid: bool = True) -> Fsdp2Settings:
    """Every ``fully_shard`` setting; shrinks to ``Fsdp2Settings()``.

    ``hsdp`` where the ranks split into simulated nodes; an int
    ``reshard_after_forward`` where the shard group has a divisor other
    than 1 and itself (4 ranks without HSDP); a gradient divide factor with
    sum reductions only (gloo has no ``PREMUL_SUM``); CPU offload on CUDA
    only. What depends on the model (``ignored``, ``sharded_together``,
    ``no_unshard_in_backward``) is drawn with it.
    """
    hsdp = hybrid and hybrid_allowed(world_size) and draw(chance(1, 3))
    divisors = () if hsdp else tuple(n for n in range(2, world_size) if world_size % n == 0)
    force_sum = draw(chance(1, 4))
    factor = draw(st.sampled_from((None, None, 1.0, float(2 * world_size))))
    return Fsdp2Settings(
        reshard_after_forward=draw(st.sampled_from((None, True, False, *divisors))),
        hsdp=hsdp,
        reduce_scatter_unused_params=draw(st.booleans()),
        reshard_after_backward=not draw(chance(1, 4)),
        forward_prefetch=draw(chance(1, 3)),
        backward_prefetch=draw(chance(1, 3)),
        mp_policy=draw(mp_policies()),
        register_encode=draw(st.booleans()),
        shard_dim=int(draw(chance(1, 4))),
        force_sum_reduction=force_sum,
        gradient_divide_factor=factor if force_sum else None,
        cpu_offload=device == "cuda" and draw(chance(1, 4)),
    )


@st.composite
def no_unshard_in_backward(draw: DrawFn, model: ModelSpec) -> tuple[str, ...]:
    """About one scenario in three whose stem qualifies
    (``backward_needs_no_parameters``): the stem left sharded in backward,
    as users set it on an embedding; shrinks to none."""
    stem = model.root.children[0]
    qualifies = isinstance(stem, Sequential) and backward_needs_no_parameters(model, stem.name)
    enabled = draw(chance(1, 3))
    return (stem.name,) if enabled and qualifies else ()


@st.composite
def sharded_together(draw: DrawFn, model: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """About one scenario in three: two sibling units sharded by one
    ``fully_shard`` call; shrinks to none."""
    parents = model.parents()
    units = [node.name for node in model.units() if node is not model.root]
    pairs = [
        (first, second)
        for index, first in enumerate(units)
        for second in units[index + 1 :]
        if parents[first] == parents[second]
    ]
    enabled = draw(chance(1, 3))
    pair = draw(st.sampled_from(pairs or [()]))
    return (pair,) if enabled and pairs else ()


_PARAM_GROUP = "torch.distributed.fsdp._fully_shard._fsdp_param_group"


class Fsdp2(Engine):
    """``fully_shard``: every unit of the spec sharded, innermost first, then
    the root, on a mesh built from the scenario's groups (1-D, or replicate x
    shard for HSDP over simulated nodes)."""

    name = "fsdp2"
    api = "fully_shard"
    settings_field = "fsdp2"
    settings_type = Fsdp2Settings
    promise = Promise.SAME_PROGRAM
    methods = ("forward", "encode")
    settings_depending = {"gradient_divide_factor": "force_sum_reduction"}
    step_controls = ("unshard", "reshard", "all_reduce", "last_backward", "reshard_after_forward", "reset_iter_state")
    checkpoint_wrapper = "composable"
    test_class = "TestFullyShardRepro"
    local_tensors = True

    unit_hooks = (
        UnitHook(_PARAM_GROUP, "FSDPParamGroup", "unshard", Purpose.UNSHARD, 0),
        UnitHook(_PARAM_GROUP, "FSDPParamGroup", "post_backward", Purpose.REDUCE_GRAD, 0),
    )

    # Settings, refusals, promises ---------------------------------------------

    def mixed_precision(self, scenario: Scenario) -> MixedPrecisionPolicy | None:
        return scenario.fsdp2.mp_policy

    def hybrid(self, scenario: Scenario) -> bool:
        return scenario.fsdp2.hsdp

    def refusals(self, scenario: Scenario) -> Iterator[str]:
        settings = scenario.fsdp2
        if settings.shard_dim not in (0, 1):
            yield f"shard_dim {settings.shard_dim!r} must be 0 or 1 (the dim 2-D parameters are sharded on)"
        if settings.gradient_divide_factor is not None:
            if not settings.gradient_divide_factor > 0:
                yield f"gradient_divide_factor {settings.gradient_divide_factor!r} must be positive"
            if not settings.force_sum_reduction:
                yield (
                    "gradient_divide_factor without force_sum_reduction: FSDP2 then reduces with PREMUL_SUM, which "
                    "gloo lacks; set force_sum_reduction too (FSDP2 then divides apart)"
                )
        yield from _sharded_together_refusals(scenario.model, settings.sharded_together)
        for name in settings.no_unshard_in_backward:
            if not backward_needs_no_parameters(scenario.model, name):
                yield (
                    f"no_unshard_in_backward names {name!r}, whose parameters backward needs (it computes input "
                    "gradients through them, or recomputes them under checkpointing): only a unit that is the "
                    "model's first block and whose only layer with parameters is its first, a Linear, qualifies "
                    "(an embedding-like layer on inputs that need no gradient)"
                )
        reshard = settings.reshard_after_forward
        if isinstance(reshard, int) and not isinstance(reshard, bool):
            shard_size = HYBRID_NODE_SIZE if settings.hsdp else scenario.world_size
            if not 1 < reshard < shard_size or shard_size % reshard:
                yield (
                    f"reshard_after_forward={reshard} must be a divisor of the shard group's size ({shard_size}) "
                    "other than 1 and itself"
                )
        yield from norm_dtype_refusal(self, scenario, "drop the param_dtype", "never")
        policy = settings.mp_policy
        if policy is not None and not policy.cast_forward_inputs and scenario.param_dtype != "float32":
            yield (
                "cast_forward_inputs=False with a param_dtype: the root's float32 inputs would meet "
                f"{scenario.param_dtype} weights, which torch refuses; keep cast_forward_inputs"
            )

    def registers(self, scenario: Scenario, method: str) -> bool:
        return method == "forward" or scenario.fsdp2.register_encode

    def refuses_ties_across_units(self, scenario: Scenario) -> bool:
        return True

    def gradient_divisor(self, scenario: Scenario) -> float:
        factor = scenario.fsdp2.gradient_divide_factor
        return scenario.world_size if factor is None else factor

    # Drawing ----------------------------------------------------------------

    def draw_settings(self, draw: DrawFn, world_size: int, device: str, hybrid: bool) -> dict[str, Any]:
        # FSDP2 has no order check: the debug level keeps its default.
        return {"engine": self.name, "fsdp2": draw(fsdp2_settings(world_size, device=device, hybrid=hybrid))}

    def draw_model_settings(self, draw: DrawFn, scenario: Scenario, ignored: tuple[str, ...]) -> Scenario:
        fsdp2 = replace(
            scenario.fsdp2,
            ignored=ignored,
            sharded_together=draw(sharded_together(scenario.model)),
            no_unshard_in_backward=draw(no_unshard_in_backward(scenario.model)),
        )
        return replace(scenario, fsdp2=fsdp2)

    def draw_step_controls(self, draw: DrawFn, hsdp: bool) -> dict[str, Any]:
        unshard, reshard = draw(chance(1, 6)), draw(chance(1, 6))
        method = "encode" if draw(chance(1, 6)) else "forward"
        all_reduce = not (draw(chance(1, 4)) and hsdp)
        return {
            "unshard": unshard,
            "reshard": reshard,
            "method": method,
            "all_reduce": all_reduce,
            "last_backward": not draw(chance(1, 8)),
            "reshard_after_forward": draw(sometimes((True, False), 8)),
            "reset_iter_state": draw(chance(1, 10)),
        }

    def draw_deviation_controls(self, draw: DrawFn) -> dict[str, Any]:
        return {
            "unshard": draw(sometimes((True, False), 12)),
            "reshard": draw(sometimes((True, False), 12)),
            "method": draw(sometimes(("forward", "encode"), 10)),
        }

    def with_precision(self, draw: DrawFn, scenario: Scenario, dtype: str | None) -> Scenario:
        policy = MixedPrecisionPolicy(dtype, draw(st.sampled_from((None, "float32"))), None) if dtype else None
        fsdp2 = replace(scenario.fsdp2, mp_policy=policy, ignored=(), sharded_together=(), no_unshard_in_backward=())
        return replace(scenario, fsdp2=fsdp2)

    # Rendering --------------------------------------------------------------

    def describe(self, scenario: Scenario) -> str:
        settings = ", ".join(f"{name}={value}" for name, value in vars(scenario.fsdp2).items())
        return f"FSDP2 (fully_shard): {settings}"

    # Reproducer ---------------------------------------------------------------

    def source(self, scenario: Scenario, model: Any, schedule: Any, cuda: bool) -> EngineSource:
        """``fully_shard(...)`` on every unit with the settings that differ from the defaults, then the
        setters, on a mesh of the ranks (replicate x shard for HSDP); the per-step setters the schedule
        uses; whole gradients by ``DTensor.full_tensor``."""
        from fsdp_fuzz.repro.engines import (
            INTER,
            INTRA,
            controls,
            guarded,
            hybrid_groups,
            nested_units,
            policy,
            spec_order,
        )
        from fsdp_fuzz.repro.engines import assignment as assign

        settings = scenario.fsdp2
        spec = scenario.model
        paths = model.paths
        names = ["fully_shard"]
        device = "cuda" if cuda else "cpu"
        imports = ["from torch.distributed.tensor import DTensor"]
        inner, root = ["mesh=mesh"], ["mesh=mesh"]
        reshard = settings.reshard_after_forward
        if reshard is not None:
            inner.append(f"reshard_after_forward={reshard!r}")
            if isinstance(reshard, bool):  # an int is for the non-root units; the root keeps the default
                root.append(f"reshard_after_forward={reshard!r}")
        helpers = []
        if settings.shard_dim:
            imports.append("from torch.distributed.tensor import Shard")
            shards = HYBRID_NODE_SIZE if settings.hsdp else scenario.world_size
            helpers.append(
                "def on_dim1(parameter):  # Shard(1) where dim 1 splits evenly over the shards (FSDP2 pads dim 0)\n"
                f"    return Shard(1) if parameter.ndim == 2 and parameter.shape[1] % {shards} == 0 else None"
            )
            inner.append("shard_placement_fn=on_dim1")
            root.append("shard_placement_fn=on_dim1")
        if settings.cpu_offload:
            names.append("CPUOffloadPolicy")
            inner.append("offload_policy=CPUOffloadPolicy()")
            root.append("offload_policy=CPUOffloadPolicy()")
        if settings.ignored:
            ignored = ", ".join(f"*model.{paths[name]}.parameters()" for name in settings.ignored)
            inner.append(f"ignored_params={{{ignored}}}")
            root.append(f"ignored_params={{{ignored}}}")
        wrap = []
        if settings.mp_policy is not None:
            names.append("MixedPrecisionPolicy")
            wrap += assign("precision", "MixedPrecisionPolicy", policy(settings.mp_policy, drop=("output_dtype",)))
            inner.append("mp_policy=precision")
            if settings.mp_policy.output_dtype is not None:  # the model's output dtype: the root's alone
                wrap += assign("at_root", "MixedPrecisionPolicy", policy(settings.mp_policy))
                root.append("mp_policy=at_root")
            else:
                root.append("mp_policy=precision")
        unit_arguments = root_arguments = "**units"
        if inner == ["mesh=mesh"] and root == inner:  # the mesh alone: written in each call
            unit_arguments = root_arguments = "mesh=mesh"
        else:
            wrap += assign("units", "dict", inner)
        if root != inner:
            changed = [item for item in root if item not in inner]
            changed += [f"{item.split('=')[0]}=None" for item in inner if item.split("=")[0] not in str(root)]
            wrap += assign("root", "dict", ["units", *changed])
            root_arguments = "**root"
        together = {name: group for group in settings.sharded_together for name in group}
        done: set[tuple[str, ...]] = set()
        order = nested_units(spec)
        units: list[str] = []
        for unit in order:
            group = together.get(unit.name)
            if group is None:
                wrap.append(f"fully_shard(model.{paths[unit.name]}, {unit_arguments})")
                units.append(f"model.{paths[unit.name]}")
            elif group not in done and all(any(u.name == m for u in order[: order.index(unit) + 1]) for m in group):
                done.add(group)
                ordered = sorted(group, key=lambda name: [u.name for u in order].index(name))
                members = ", ".join(f"model.{paths[name]}" for name in ordered)
                wrap.append(f"fully_shard([{members}], {unit_arguments})  # one parameter group")
                units += [f"model.{paths[name]}" for name in group]
        wrap.append(f"fully_shard(model, {root_arguments})")
        units.append("model")
        if settings.register_encode:
            names.append("register_fsdp_forward_method")
            wrap.append('register_fsdp_forward_method(model, "encode")')
        if settings.reduce_scatter_unused_params:
            wrap.append("model.set_reduce_scatter_unused_params(True)")
        if not settings.reshard_after_backward:
            wrap.append("model.set_reshard_after_backward(False)")
        wrap += [f"model.{paths[name]}.set_unshard_in_backward(False)" for name in settings.no_unshard_in_backward]
        per_unit = []
        if settings.force_sum_reduction:
            per_unit.append("unit.set_force_sum_reduction_for_comms(True)")
        if settings.gradient_divide_factor is not None:
            per_unit.append(f"unit.set_gradient_divide_factor({settings.gradient_divide_factor!r})")
        if per_unit:
            wrap.append(f"for unit in [{', '.join(units)}]:  # these setters do not recurse")
            wrap += [f"    {line}" for line in per_unit]
        prefetched = spec_order(spec)
        for earlier, later in zip(prefetched, prefetched[1:], strict=False):
            if settings.forward_prefetch:
                wrap.append(f"model.{paths[earlier]}.set_modules_to_forward_prefetch([model.{paths[later]}])")
            if settings.backward_prefetch:
                wrap.append(f"model.{paths[later]}.set_modules_to_backward_prefetch([model.{paths[earlier]}])")
        imports.append(f"from torch.distributed.fsdp import {', '.join(sorted(names))}")
        if scenario.hybrid:
            imports.append("from torch.distributed.device_mesh import DeviceMesh")
            groups = [
                *hybrid_groups(scenario),
                "mesh = DeviceMesh.from_group(  # replicated across the nodes, sharded within",
                f'    [{INTER}, {INTRA}], "{device}", mesh=torch.arange(WORLD_SIZE).reshape(-1, {HYBRID_NODE_SIZE}),',
                '    mesh_dim_names=("replicate", "shard"),',
                ")",
            ]
        else:
            imports.append("from torch.distributed.device_mesh import init_device_mesh")
            groups = [f'mesh = init_device_mesh("{device}", (WORLD_SIZE,))']
        before = []
        if any(step.reset_iter_state for steps in scenario.ranks for step in steps):
            before += guarded(schedule.when(lambda step: step.reset_iter_state), ["model.reset_iter_state()"])
        if any(step.reshard_after_forward is not None for steps in scenario.ranks for step in steps):
            before += guarded(
                schedule.when(lambda step: step.reshard_after_forward is not None),
                [f"model.set_reshard_after_forward({schedule.of(lambda step: bool(step.reshard_after_forward))})"],
            )
        before += controls(
            schedule,
            {
                "gradient_sync": "set_requires_gradient_sync",
                "all_reduce": "set_requires_all_reduce",
                "last_backward": "set_is_last_backward",
            },
        )
        everyone = f"for unit in [{', '.join(units)}]:"
        if any(step.unshard for steps in scenario.ranks for step in steps):
            before += guarded(schedule.when(lambda step: step.unshard), [everyone, "    unit.unshard()"])
        after = []
        if any(step.reshard for steps in scenario.ranks for step in steps):
            after += guarded(schedule.when(lambda step: step.reshard), [everyone, "    unit.reshard()"])
        return EngineSource(
            tuple(imports),
            tuple(wrap),
            groups=tuple(groups),
            helpers=tuple(helpers),
            before_step=tuple(before),
            after_step=tuple(after),
            gradients=_gradients_source(cuda),
            replicas='mesh.get_group("replicate")' if scenario.hybrid else None,
            local="({0}.to_local() if isinstance({0}, DTensor) else {0})",
        )

    # On a rank --------------------------------------------------------------

    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )
        from torch.distributed.fsdp import MixedPrecisionPolicy as TorchMixedPrecisionPolicy

        settings = scenario.fsdp2
        mesh = self._mesh(scenario, group, device)
        reshard = settings.reshard_after_forward
        policy = settings.mp_policy
        # output_dtype casts each unit's outputs: it is the model's output
        # dtype, so only the root gets it, as users set it.
        common = {"mesh": mesh, "shard_placement_fn": self._placement(settings.shard_dim, mesh.size(-1))}
        if settings.cpu_offload:
            common["offload_policy"] = CPUOffloadPolicy()
        if settings.ignored:
            common["ignored_params"] = {p for block in built.ignore(settings.ignored) for p in block.parameters()}
        inner_kwargs, root_kwargs = dict(common), dict(common)
        if policy is not None:
            inner_kwargs["mp_policy"] = TorchMixedPrecisionPolicy(**with_dtypes(policy, output_dtype=None))
            root_kwargs["mp_policy"] = TorchMixedPrecisionPolicy(**with_dtypes(policy))
        if not settings.cpu_offload:  # offloaded parameters stay where FSDP2 finds them, on the CPU
            built.module.to(device)
        together = {name: tuple(group) for group in settings.sharded_together for name in group}
        waiting: dict[tuple[str, ...], list] = {}

        def shard_below(node, module) -> None:
            for child in blocks_below(node):
                if not isinstance(child, (Sequential, Choice)):
                    continue
                name = child.name
                shard_below(child, getattr(module, name))
                if not child.fsdp_unit:
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

        root = built.spec.root
        shard_below(root, built.module)
        at_root = reshard if reshard is None or isinstance(reshard, bool) else None  # an int is for non-root units
        built.units[root.name] = fully_shard(built.module, reshard_after_forward=at_root, **root_kwargs)
        if settings.register_encode:
            register_fsdp_forward_method(built.module, "encode")
        built.module.set_reduce_scatter_unused_params(settings.reduce_scatter_unused_params)
        built.module.set_reshard_after_backward(settings.reshard_after_backward)
        for name in settings.no_unshard_in_backward:
            built.units[name].set_unshard_in_backward(False)
        for unit in built.units.values():  # these two setters do not recurse: users call them on every unit
            unit.set_force_sum_reduction_for_comms(settings.force_sum_reduction)
            if settings.gradient_divide_factor is not None:
                unit.set_gradient_divide_factor(settings.gradient_divide_factor)
        order = [built.units[node.name] for node in named_in(root) if node.fsdp_unit and node is not root]
        for earlier, later in zip(order, order[1:], strict=False):
            if settings.forward_prefetch:
                earlier.set_modules_to_forward_prefetch([later])
            if settings.backward_prefetch:
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
    def _mesh(scenario: Scenario, group: Any, device: torch.device):
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        if not scenario.hybrid:
            return DeviceMesh.from_group(group, device.type)
        intra, inter = group
        layout = torch.arange(scenario.world_size).reshape(-1, HYBRID_NODE_SIZE)
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
    def stepping(self, built: BuiltModel, step: Step) -> Iterator[None]:
        root = built.module
        if step.reset_iter_state:
            root.reset_iter_state()
        if step.reshard_after_forward is not None:
            root.set_reshard_after_forward(step.reshard_after_forward)
        root.set_requires_gradient_sync(step.gradient_sync)
        root.set_requires_all_reduce(step.all_reduce)
        root.set_is_last_backward(step.last_backward)
        if step.unshard:
            for unit in built.units.values():
                unit.unshard()
        yield
        if step.reshard:
            for unit in built.units.values():
                unit.reshard()


def _gradients_source(cuda: bool) -> str:
    """``gradients(model)``: every parameter's whole gradient, ``DTensor.full_tensor`` gathering it from the
    shards (zeros where a parameter has none; one FSDP2 left unsharded holds its whole gradient)."""
    return "\n".join(
        [
            "def gradients(model):  # every parameter's whole gradient, zeros where none (FSDP2's are DTensors)",
            "    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad"
            " for name, p in model.named_parameters()}",
            "    return {name: grad.full_tensor() if isinstance(grad, DTensor) else grad"
            " for name, grad in grads.items()}",
        ]
    )
