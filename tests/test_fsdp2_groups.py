"""Process groups FSDP2 creates itself, on live ranks.

An int ``reshard_after_forward`` makes ``fully_shard`` build a mesh of its
own, whose groups torch creates with its 30-minute default timeout: a hang
there would stall a pool's rank set for half an hour. ``ScenarioGroups``
adopts them: the scenario's timeout, destroyed with the scenario.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fsdp_fuzz.data import Scenario, Step
from fsdp_fuzz.execute.groups import new_scenario_groups
from fsdp_fuzz.models.seed import seed_model

WORLD_SIZE = 4
TIMEOUT_S = 3.0
SCENARIO = Scenario(model=seed_model(), ranks=((Step(),),) * WORLD_SIZE, engine="fsdp2")


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _rank(rank: int, store: str, results) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        groups = new_scenario_groups(SCENARIO, rank, TIMEOUT_S)
        own = len(groups.created)
        mesh = DeviceMesh.from_group(groups.for_fsdp, "cpu")
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        with groups.adopting():
            fully_shard(model[0], mesh=mesh, reshard_after_forward=2)
            fully_shard(model, mesh=mesh)
        adopted = groups.created[own:]
        model(torch.ones(2, 4)).sum().backward()  # runs on the post-forward groups
        timeouts = {_timeout(group).total_seconds() for group in adopted}
        groups.destroy()
        alive = [group for group in adopted if group in dist.distributed_c10d._world.pg_map]
        results.put((rank, len(adopted), timeouts, len(alive)))
    finally:
        dist.destroy_process_group()


def test_groups_fsdp2_creates_get_the_scenario_timeout_and_are_destroyed_with_it():
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.NamedTemporaryFile() as store:
        processes = [context.Process(target=_rank, args=(rank, store.name, results)) for rank in range(WORLD_SIZE)]
        for process in processes:
            process.start()
        reports = sorted(results.get(timeout=120) for _ in processes)
        for process in processes:
            process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0] * WORLD_SIZE
    for rank, adopted, timeouts, alive in reports:
        assert adopted >= 1, f"rank {rank}: FSDP2 created no group of its own for reshard_after_forward=2"
        assert timeouts == {TIMEOUT_S}, f"rank {rank}: adopted groups keep timeouts {timeouts}"
        assert alive == 0, f"rank {rank}: {alive} adopted group(s) outlived the scenario"
