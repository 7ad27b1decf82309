"""The engine's calls written out: one ``FullyShardedDataParallel(...)`` or
``fully_shard(...)`` per unit, innermost first, then the root, with the
scenario's settings (only those that differ from the engine's defaults,
which ``FsdpSettings`` and ``Fsdp2Settings`` share), and the per-step
controls a schedule uses (``no_sync``, FSDP2's setters)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fsdp_fuzz.data import HYBRID_NODE_SIZE, Fsdp2Settings, FsdpSettings, Scenario, Step
from fsdp_fuzz.models.spec import Choice, ModelSpec, Sequential
from fsdp_fuzz.repro.model import block_paths
from fsdp_fuzz.repro.text import call_lines, literal

FSDP2_CONTROLS = ("gradient_sync", "all_reduce", "last_backward")
"""Step fields FSDP2 applies on every step once any step sets them (``Engine.stepping``)."""


@dataclass(frozen=True)
class EngineSource:
    imports: tuple[str, ...]
    wrap: str
    stepping: str | None
    """``stepping(model, **controls)``: a context manager around one step, or None where no step needs one."""
    groups: str
    """Lines of the rank's function that create the engine's process groups (``new_group``)."""
    wrap_call: str
    """The line that builds and wraps the model, once the debug level is set."""
    controls: tuple[str, ...] = ()
    """``stepping``'s keywords: the step fields it applies."""


def engine_source(scenario: Scenario) -> EngineSource:
    return _fsdp1(scenario) if scenario.engine == "fsdp1" else _fsdp2(scenario)


def nested_units(spec: ModelSpec) -> list[Sequential | Choice]:
    """The units below the root, innermost first: the order wrapping must take."""
    found: list[Sequential | Choice] = []

    def visit(node: Sequential | Choice) -> None:
        for child in node.children if isinstance(node, Sequential) else node.alternatives:
            if isinstance(child, (Sequential, Choice)):
                visit(child)
                if child.fsdp_unit:
                    found.append(child)

    visit(spec.root)
    return found


def _dtype(name: str | None) -> str:
    return "None" if name is None else f"torch.{name}"


def _non_default(settings: object, skip: tuple[str, ...] = ()) -> dict[str, object]:
    default = type(settings)()
    return {
        f.name: getattr(settings, f.name)
        for f in fields(settings)
        if f.name not in skip and getattr(settings, f.name) != getattr(default, f.name)
    }


def _policy(variable: str, cls: str, policy: object, drop: tuple[str, ...] = ()) -> list[str]:
    """``variable = cls(...)``: the mixed-precision setting's non-default fields, dtypes as ``torch.*``."""
    changed = {name: value for name, value in _non_default(policy).items() if name not in drop}
    rendered = [
        f"{name}={_dtype(value) if name.endswith('_dtype') else repr(value)}" for name, value in changed.items()
    ]
    return call_lines("    ", cls, rendered, lead=f"{variable} = ")


def _parent_expression(spec: ModelSpec, name: str) -> tuple[str, str]:
    """(the expression of the module that holds ``name`` as an attribute, its attribute): through a
    checkpoint wrapper, the module inside it, where an assignment lands."""
    path = block_paths(spec)[name]
    parent, _, attribute = path.rpartition(".")
    expression = "model" + (f".{parent}" if parent else "")
    if parent and _checkpoint_wrapped(spec, parent.rsplit(".", 1)[-1]):
        expression += "._checkpoint_wrapped_module"
    return expression, attribute


def _checkpoint_wrapped(spec: ModelSpec, name: str) -> bool:
    node = spec.block(name)
    return isinstance(node, Sequential) and node.checkpoint == "wrapper"


def _fsdp1(scenario: Scenario) -> EngineSource:
    settings: FsdpSettings = scenario.fsdp
    spec = scenario.model
    paths = block_paths(spec)
    imports = ["from torch.distributed.fsdp import FullyShardedDataParallel as FSDP"]
    names = []
    keywords = ["process_group=group", "device_id=device"]
    for name, value in _non_default(settings, skip=("auto_wrap", "ignored")).items():
        if name == "sharding_strategy":
            names.append("ShardingStrategy")
            keywords.append(f"sharding_strategy=ShardingStrategy.{value}")
        elif name == "backward_prefetch":
            names += ["BackwardPrefetch"] if value is not None else []
            keywords.append(f"backward_prefetch={'None' if value is None else f'BackwardPrefetch.{value}'}")
        elif name == "mixed_precision":
            names.append("MixedPrecision")
            keywords.append("mixed_precision=policy")
        else:
            keywords.append(f"{name}={value!r}")
    if settings.ignored:
        keywords.append("ignored_states=[" + ", ".join(f"model.{paths[name]}" for name in settings.ignored) + "]")
    if names:
        imports.append(f"from torch.distributed.fsdp import {', '.join(sorted(names))}")
    lines = [
        "def wrap(model, group, device):",
        '    """FullyShardedDataParallel on every unit, innermost first, then the root."""',
    ]
    if settings.mixed_precision is not None:
        lines += _policy("policy", "MixedPrecision", settings.mixed_precision)
    lines += call_lines("    ", "dict", keywords, lead="fsdp = ")
    if settings.auto_wrap:
        imports.append("from torch.distributed.fsdp.wrap import ModuleWrapPolicy")
        lines.append("    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Unit, UnitBranch}), **fsdp)")
    else:
        for unit in nested_units(spec):
            parent, attribute = _parent_expression(spec, unit.name)
            lines.append(f"    {parent}.{attribute} = FSDP(model.{paths[unit.name]}, **fsdp)")
        lines.append("    return FSDP(model, **fsdp)")
    uses_no_sync = any(not step.gradient_sync for steps in scenario.ranks for step in steps)
    stepping = None
    if uses_no_sync:
        imports.append("from contextlib import nullcontext")
        stepping = "\n".join(
            [
                "def stepping(model, gradient_sync=True):",
                '    """gradient_sync off: the step runs inside the root\'s no_sync(), gradients kept unreduced."""',
                "    return nullcontext() if gradient_sync else model.no_sync()",
            ]
        )
    if scenario.hybrid:
        groups, call = _hybrid_groups(scenario), "    model = wrap(build(), (intra, inter), device)"
    else:
        groups, call = ["    group = new_group()"], "    model = wrap(build(), group, device)"
    controls = ("gradient_sync",) if stepping is not None else ()
    return EngineSource(tuple(imports), "\n".join(lines), stepping, "\n".join(groups), call, controls)


def _hybrid_groups(scenario: Scenario) -> list[str]:
    size, world = HYBRID_NODE_SIZE, scenario.world_size
    return [
        f"    # Simulated nodes of {size} consecutive ranks: sharded within a node, replicated across nodes.",
        f"    intras = [new_group(range(node * {size}, node * {size} + {size})) for node in range({world // size})]",
        f"    inters = [new_group(range(local, {world}, {size})) for local in range({size})]",
        f"    intra, inter = intras[rank // {size}], inters[rank % {size}]",
    ]


def _fsdp2(scenario: Scenario) -> EngineSource:
    settings: Fsdp2Settings = scenario.fsdp2
    spec = scenario.model
    paths = block_paths(spec)
    names = ["fully_shard"]
    common = ["mesh=mesh"]
    inner, root = list(common), list(common)
    reshard = settings.reshard_after_forward
    if reshard is not None:
        inner.append(f"reshard_after_forward={reshard!r}")
        if isinstance(reshard, bool):  # an int is for the non-root units; the root keeps the default
            root.append(f"reshard_after_forward={reshard!r}")
    if settings.mp_policy is not None:
        names.append("MixedPrecisionPolicy")
        inner.append("mp_policy=policy")
        root.append("mp_policy=root_policy" if settings.mp_policy.output_dtype is not None else "mp_policy=policy")
    extra_imports = []
    lines = [
        "def wrap(model, mesh):",
        '    """fully_shard on every unit, innermost first, then the root; then the setters."""',
    ]
    if settings.shard_dim:
        extra_imports.append("from torch.distributed.tensor import Shard")
        lines.append(
            "    def on_dim1(parameter):  # Shard(1) where dim 1 splits evenly (FSDP2 pads dim 0 only)\n"
            "        return Shard(1) if parameter.ndim == 2 and parameter.shape[1] % mesh.size(-1) == 0 else None\n"
        )
        inner.append("shard_placement_fn=on_dim1")
        root.append("shard_placement_fn=on_dim1")
    if settings.ignored:
        ignored = ", ".join(f"*model.{paths[name]}.parameters()" for name in settings.ignored)
        lines.append(f"    ignored = {{{ignored}}}")
        inner.append("ignored_params=ignored")
        root.append("ignored_params=ignored")
    if settings.mp_policy is not None:
        lines += _policy("policy", "MixedPrecisionPolicy", settings.mp_policy, drop=("output_dtype",))
        if settings.mp_policy.output_dtype is not None:  # the model's output dtype: the root's alone
            lines += _policy("root_policy", "MixedPrecisionPolicy", settings.mp_policy)
    lines += call_lines("    ", "dict", inner, lead="units = ")
    if root != inner:
        keys = {item.split("=", 1)[0] for item in root}
        extra = [item for item in root if item not in inner]
        extra += [f"{item.split('=', 1)[0]}=None" for item in inner if item.split("=", 1)[0] not in keys]
        lines += call_lines("    ", "dict", ["units", *extra], lead="root = ")
    root_arguments = "**root" if root != inner else "**units"
    together = {name: group for group in settings.sharded_together for name in group}
    done: set[tuple[str, ...]] = set()
    order = nested_units(spec)
    for unit in order:
        group = together.get(unit.name)
        if group is None:
            lines.append(f"    fully_shard(model.{paths[unit.name]}, **units)")
        elif group not in done and all(any(u.name == m for u in order[: order.index(unit) + 1]) for m in group):
            done.add(group)
            ordered = sorted(group, key=lambda name: [u.name for u in order].index(name))
            members = ", ".join(f"model.{paths[name]}" for name in ordered)
            lines.append(f"    fully_shard([{members}], **units)  # one parameter group")
    lines.append(f"    fully_shard(model, {root_arguments})")
    if settings.register_encode:
        names.append("register_fsdp_forward_method")
        lines.append('    register_fsdp_forward_method(model, "encode")')
    if settings.reduce_scatter_unused_params:
        lines.append("    model.set_reduce_scatter_unused_params(True)")
    if not settings.reshard_after_backward:
        lines.append("    model.set_reshard_after_backward(False)")
    units = ["model", *(f"model.{paths[u.name]}" for u in order)]
    per_unit = []
    if settings.force_sum_reduction:
        per_unit.append("unit.set_force_sum_reduction_for_comms(True)")
    if settings.gradient_divide_factor is not None:
        per_unit.append(f"unit.set_gradient_divide_factor({settings.gradient_divide_factor!r})")
    if per_unit:
        lines.append(f"    for unit in [{', '.join(units)}]:  # these setters do not recurse")
        lines += [f"        {line}" for line in per_unit]
    spec_order = _spec_order(spec)
    for earlier, later in zip(spec_order, spec_order[1:], strict=False):
        if settings.forward_prefetch:
            lines.append(f"    model.{paths[earlier]}.set_modules_to_forward_prefetch([model.{paths[later]}])")
        if settings.backward_prefetch:
            lines.append(f"    model.{paths[later]}.set_modules_to_backward_prefetch([model.{paths[earlier]}])")
    lines.append("    return model")
    imports = [f"from torch.distributed.fsdp import {', '.join(sorted(names))}", *extra_imports]
    stepping = _fsdp2_stepping(scenario)
    if stepping is not None:
        imports.append("from contextlib import contextmanager")
    if scenario.hybrid:
        imports.append("from torch.distributed.device_mesh import DeviceMesh")
        layout = f"torch.arange({scenario.world_size}).reshape(-1, {HYBRID_NODE_SIZE})"
        groups = _hybrid_groups(scenario) + [
            "    mesh = DeviceMesh.from_group(",
            f'        [inter, intra], device.type, mesh={layout}, mesh_dim_names=("replicate", "shard")',
            "    )",
        ]
    else:
        imports.append("from torch.distributed.device_mesh import DeviceMesh")
        groups = ["    group = new_group()", "    mesh = DeviceMesh.from_group(group, device.type)"]
    call = "    model = wrap(build().to(device), mesh)"
    controls = ()
    if stepping is not None:
        head = stepping.split("def stepping(model, ", 1)[1].split("):", 1)[0]
        controls = tuple(parameter.split("=")[0] for parameter in head.split(", "))
    return EngineSource(tuple(imports), "\n".join(lines), stepping, "\n".join(groups), call, controls)


def _spec_order(spec: ModelSpec) -> list[str]:
    """Units below the root, outer before inner, as the spec lists them (prefetch order)."""
    found: list[str] = []

    def visit(node: Sequential | Choice) -> None:
        for child in node.children if isinstance(node, Sequential) else node.alternatives:
            if isinstance(child, (Sequential, Choice)):
                if child.fsdp_unit:
                    found.append(child.name)
                visit(child)

    visit(spec.root)
    return found


def _fsdp2_stepping(scenario: Scenario) -> str | None:
    steps = [step for steps in scenario.ranks for step in steps]
    default = Step()
    used = [name for name in FSDP2_CONTROLS if any(getattr(s, name) != getattr(default, name) for s in steps)]
    resets = any(s.reset_iter_state for s in steps)
    reshards = any(s.reshard_after_forward is not None for s in steps)
    unshard = any(s.unshard for s in steps)
    reshard = any(s.reshard for s in steps)
    if not (used or resets or reshards or unshard or reshard):
        return None
    parameters = [f"{name}=True" for name in used]
    parameters += ["reset_iter_state=False"] * resets + ["reshard_after_forward=None"] * reshards
    parameters += ["unshard=False"] * unshard + ["reshard=False"] * reshard
    lines = [
        "@contextmanager",
        f"def stepping(model, {', '.join(parameters)}):",
        '    """FSDP2\'s per-step controls, as a training loop calls them around one step."""',
    ]
    if resets:
        lines += ["    if reset_iter_state:", "        model.reset_iter_state()"]
    if reshards:
        lines += [
            "    if reshard_after_forward is not None:",
            "        model.set_reshard_after_forward(reshard_after_forward)",
        ]
    setters = {
        "gradient_sync": "set_requires_gradient_sync",
        "all_reduce": "set_requires_all_reduce",
        "last_backward": "set_is_last_backward",
    }
    lines += [f"    model.{setters[name]}({name})" for name in used]
    units = "[m for m in model.modules() if hasattr(m, 'unshard')]"
    if unshard:
        lines += ["    if unshard:", f"        for unit in {units}:", "            unit.unshard()"]
    lines.append("    yield")
    if reshard:
        lines += ["    if reshard:", f"        for unit in {units}:", "            unit.reshard()"]
    return "\n".join(lines)


__all__ = ["EngineSource", "engine_source", "literal", "nested_units"]
