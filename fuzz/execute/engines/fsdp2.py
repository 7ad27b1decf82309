"""FSDP2, ``fully_shard``: how the spec's units are sharded on a mesh built
from the scenario's groups, the functions that issue collectives for one
parameter group, and the per-step controls (``Engine.stepping``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fsdp_fuzz.data import HYBRID_NODE_SIZE, Purpose, Scenario, Step
from fsdp_fuzz.execute.engines.base import UnitHook, with_dtypes
from fsdp_fuzz.execute.model import Block, BuiltModel, blocks_below
from fsdp_fuzz.models.spec import Choice, Sequential


def _units_in_spec_order(node: Block) -> Iterator[str]:
    """The non-root units below ``node``, outer before inner, as the spec lists them."""
    for child in blocks_below(node):
        if isinstance(child, (Sequential, Choice)):
            if child.fsdp_unit:
                yield child.name
            yield from _units_in_spec_order(child)


class Fsdp2:
    """``fully_shard``: every unit of the spec sharded, innermost first, then
    the root, on a mesh built from the scenario's groups (1-D, or replicate x
    shard for HSDP over simulated nodes)."""

    unit_hooks = (
        UnitHook(
            "torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "unshard", Purpose.UNSHARD, 0
        ),
        UnitHook(
            "torch.distributed.fsdp._fully_shard._fsdp_param_group",
            "FSDPParamGroup",
            "post_backward",
            Purpose.REDUCE_GRAD,
            0,
        ),
    )

    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

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
            inner_kwargs["mp_policy"] = MixedPrecisionPolicy(**with_dtypes(policy, output_dtype=None))
            root_kwargs["mp_policy"] = MixedPrecisionPolicy(**with_dtypes(policy))
        if not settings.cpu_offload:  # offloaded parameters stay where FSDP2 finds them, on the CPU
            built.module.to(device)
        together = {name: tuple(group) for group in settings.sharded_together for name in group}
        waiting: dict[tuple[str, ...], list[nn.Module]] = {}

        def shard_below(node: Block, module: nn.Module) -> None:
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
        order = [built.units[name] for name in _units_in_spec_order(root)]
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
