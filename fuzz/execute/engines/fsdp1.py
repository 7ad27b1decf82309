"""FSDP1, ``FullyShardedDataParallel``: how the spec's units are wrapped,
the functions that issue collectives for one unit, and the per-step
``no_sync``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from fsdp_fuzz.data import Purpose, Scenario, Step
from fsdp_fuzz.execute.engines.base import UnitHook, with_dtypes
from fsdp_fuzz.execute.model import UNIT_CLASSES, Block, BuiltModel, blocks_below, unwrapped
from fsdp_fuzz.models.spec import Choice, Sequential


class Fsdp1:
    """``FullyShardedDataParallel``: every unit of the spec wrapped, innermost
    first, then the root."""

    unit_hooks = (
        UnitHook("torch.distributed.fsdp._flat_param", "FlatParamHandle", "_all_gather_flat_param", Purpose.UNSHARD, 0),
        UnitHook("torch.distributed.fsdp._exec_order_utils", "_ExecOrderData", "_check_order", Purpose.ORDER_CHECK, 1),
        UnitHook("torch.distributed.fsdp._runtime_utils", None, "_reduce_grad", Purpose.REDUCE_GRAD, 1),
        UnitHook("torch.distributed.fsdp._runtime_utils", None, "_reduce_grad_no_shard", Purpose.REDUCE_GRAD, 1),
    )

    def wrap(self, built: BuiltModel, scenario: Scenario, group: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

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
            "mixed_precision": None if policy is None else MixedPrecision(**with_dtypes(policy)),
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

        def wrap_below(node: Block, module: nn.Module) -> None:
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
