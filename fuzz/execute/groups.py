"""A rank's process groups: the long-lived default group, and each
scenario's own groups with the scenario's timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.engines import HYBRID_NODE_SIZE
from fsdp_fuzz.execute.devices import Placement, prepare_rank
from fsdp_fuzz.execute.protocol import STARTUP_TIMEOUT_S


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


def new_scenario_groups(scenario: Scenario, rank: int, timeout_s: float) -> ScenarioGroups:
    """Every rank creates every group, in the same order, as ``new_group``
    needs. torch wraps groups created at DETAIL in its collective checker,
    so the level is the scenario's ``collective_checker`` for the creation only.

    Groups are created with ``_creation_timeout`` and then given the
    scenario's timeout; a creation that fails is reported
    (``GroupsNotCreated``) rather than observed.
    """
    previous = dist.get_debug_level()
    checked = scenario.collective_checker
    dist.set_debug_level(dist.DebugLevel.DETAIL if checked else dist.DebugLevel.OFF)
    timeout = timedelta(seconds=timeout_s)
    creation = _creation_timeout(timeout, checked)
    try:
        if not scenario.hybrid:
            created = [dist.new_group(timeout=creation)]
            mine: Any = created[0]
        else:
            size = HYBRID_NODE_SIZE
            nodes, local = range(scenario.world_size // size), range(size)
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
