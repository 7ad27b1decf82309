"""The GPU path on a real GPU: ranks placed on CUDA (sharing one over gloo
where there are fewer GPUs than ranks), FSDP's order checks firing there as
on the CPU, results matching the CPU reference, GPU memory given back, and
workers forked from a fork server that never initialised CUDA.

Marked ``gpu`` and skipped, with the reason, where torch sees no GPU;
``benchmarks/gpu_check.py`` runs them on a lent GPU machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_fuzz.corpus import load_entry
from fsdp_fuzz.data import Status
from fsdp_fuzz.execute.devices import DeviceRequest, release_memory
from fsdp_fuzz.execute.pool import PoolSet, fork_server_state
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.generate.seed_family import invalid_first_iter_order, invalid_later_iter_order, on_fsdp2, train_eval
from fsdp_fuzz.repro import reproducer_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() == 0,
        reason=f"needs a GPU; torch {torch.__version__} sees none (CUDA build: {torch.version.cuda or 'no'})",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
CUDA = DeviceRequest("cuda")
TIMEOUT_S = 5.0


def statuses(observations):
    return [[step.status for step in rank.steps] for rank in observations.ranks]


@pytest.fixture(scope="module")
def gpu_pools():
    with PoolSet(CUDA, TIMEOUT_S) as pools:
        yield pools


def test_workers_fork_from_a_server_without_cuda_even_when_the_parent_has_it():
    torch.cuda.init()  # the parent may use CUDA: the fork server is a fresh interpreter
    assert torch.cuda.is_initialized()
    assert fork_server_state() == {"bad_fork": False, "cuda_initialized": False, "preloaded": True}


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_a_clean_scenario_on_gpu_ranks_matches_the_cpu_reference(gpu_pools, engine):
    scenario = train_eval("FULL_SHARD", iterations=2, epochs=1)
    scenario = on_fsdp2(scenario) if engine == "fsdp2" else scenario
    observations = gpu_pools.run(scenario)
    assert observations.device == "cuda"
    assert observations.backend == CUDA.place(scenario.world_size).backend
    assert statuses(observations) == [[Status.OK] * len(scenario.ranks[0])] * scenario.world_size
    for index, expected in enumerate(observations.reference):
        outputs = [rank.steps[index].output_sum for rank in observations.ranks]
        assert outputs == pytest.approx(list(expected.output_sums), rel=1e-4, abs=1e-5)


def test_the_order_checks_fire_on_gpu_ranks_as_on_the_cpu(gpu_pools):
    observations = gpu_pools.run(invalid_first_iter_order("SHARD_GRAD_OP"))
    for rank in observations.ranks:
        (step,) = rank.steps
        assert (step.status, step.error_type) == (Status.ERROR, "RuntimeError")
        assert step.error_message.startswith("Forward order differs across ranks")
    observations = gpu_pools.run(invalid_later_iter_order("FULL_SHARD", 1))
    warned = [
        warning.message
        for rank in observations.ranks
        for step in rank.steps
        for warning in step.warnings
        if warning.message.startswith("Forward order differs from that of the first iteration")
    ]
    assert warned, "the later-iteration warning did not fire on GPU ranks"


def test_the_pool_runs_many_scenarios_on_one_rank_set_without_replacing_it(gpu_pools):
    for _ in range(5):
        gpu_pools.run(train_eval("SHARD_GRAD_OP", iterations=1, epochs=1))
    stats = gpu_pools.pools[2].stats
    assert stats.device_resets == 0 and stats.respawns == 0, stats


def test_release_memory_gives_the_cache_back():
    placement = CUDA.place(2)
    placement.rank_device(0)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    assert torch.cuda.memory_reserved() > 0
    release_memory(placement)
    assert torch.cuda.memory_reserved() == 0


def test_fresh_ranks_on_the_gpu_observe_what_the_pool_observes(gpu_pools):
    scenario = train_eval("FULL_SHARD", iterations=1, epochs=1)
    fresh = run_scenario(scenario, CUDA.place(scenario.world_size), TIMEOUT_S)
    pooled = gpu_pools.run(scenario)
    assert statuses(fresh) == statuses(pooled)


def test_the_reproducer_runs_on_the_gpu(tmp_path):
    entry = load_entry(ROOT / "corpus" / "seed" / "train_eval-full_shard.json")
    script = tmp_path / "repro.py"
    script.write_text(reproducer_script(entry, device="cuda"))
    ran = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip().splitlines()[-1].startswith("FSDP kept its promise")
