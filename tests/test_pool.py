"""The persistent pool on real processes and real gloo groups: hangs,
crashes and errors are recorded and followed by clean scenarios, results
match fresh processes, and nothing outlives the pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fsdp_fuzz.corpus import load_entry
from fsdp_fuzz.data import Status
from fsdp_fuzz.execute.pool import FailureHandling, RankPool
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.generate.seed_family import (
    invalid_first_iter_order,
    invalid_later_iter_order,
    order_ends_early,
    train_eval,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 2.0


def statuses(observations):
    return [[step.status for step in rank.steps] for rank in observations.ranks]


CLEAN = train_eval("SHARD_GRAD_OP", iterations=2, epochs=1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def pool():
    with RankPool(2, group_timeout_s=TIMEOUT_S) as running:
        yield running


def test_hang_is_recorded_with_its_stack(pool):
    pool.run(CLEAN)
    observations = pool.run(order_ends_early())
    assert statuses(observations) == [[Status.HANG], [Status.OK]]
    assert "all_gather" in observations.ranks[0].steps[0].stack
    assert statuses(pool.run(CLEAN)) == [[Status.OK] * 4] * 2


def test_raising_scenario_then_clean(pool):
    observations = pool.run(invalid_first_iter_order("FULL_SHARD"))
    assert statuses(observations) == [[Status.ERROR], [Status.ERROR]]
    assert statuses(pool.run(CLEAN)) == [[Status.OK] * 4] * 2


def test_same_scenario_same_observation_as_fresh_processes(pool):
    scenario = invalid_later_iter_order("SHARD_GRAD_OP", 1)
    first = pool.run(scenario)
    assert pool.run(scenario) == first
    assert run_scenario(scenario, group_timeout_s=TIMEOUT_S) == first


def test_deadlock_is_recognised_long_before_the_group_timeout():
    """A 10-minute group timeout, never waited out: every unfinished rank
    sits blocked, so the pool asks each where it is and replaces them. The
    same observation three times over. (Time is no measure here: the pool's
    own count and the message say how the hang was recognised; the
    benchmarks print what it costs.)"""
    with RankPool(2, group_timeout_s=600) as pool:
        pool.run(CLEAN)
        observed = [pool.run(order_ends_early()) for _ in range(3)]
        hung = observed[0].ranks[0].steps[0]
        assert statuses(observed[0]) == [[Status.HANG], [Status.OK]]
        assert hung.error_message.startswith("deadlock")
        assert "all_gather" in hung.stack
        assert [record.unit for record in hung.collectives][-1] == "layer1"
        assert observed[1] == observed[0] and observed[2] == observed[0]
        assert pool.stats.deadlocks == 3
        assert statuses(pool.run(CLEAN)) == [[Status.OK] * 4] * 2


def test_a_crash_gives_the_same_observation_every_time_and_the_spare_set_runs_the_next():
    """FSDP2 with a first-iteration divergence: gloo aborts a rank (a size
    mismatch). The spare set takes over, so the next scenario starts at once."""
    crashing = load_entry(ROOT / "corpus" / "seed-fsdp2" / "fsdp2-invalid_first_iter_order-full_shard.json").scenario
    with RankPool(2, group_timeout_s=30) as pool:
        pool.run(CLEAN)
        observed = [pool.run(crashing) for _ in range(3)]
        after = pool.run(CLEAN)
    assert any(Status.CRASH in row for row in statuses(observed[0]))
    assert observed[1] == observed[0] and observed[2] == observed[0]
    assert pool.stats.crashes == 3 and pool.stats.respawns == 3
    assert statuses(after) == [[Status.OK] * 4] * 2


def test_killed_worker_is_a_crash_and_the_pool_respawns():
    waits_out_hangs = FailureHandling(deadlock_after_s=None)
    with RankPool(2, group_timeout_s=30, handling=waits_out_hangs) as pool:
        pool.run(CLEAN)
        victim = pool.pids()[0]
        killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
        killer.start()
        observations = pool.run(order_ends_early())
        killer.join()
        assert observations.ranks[0].steps[0].status == Status.CRASH
        assert "died" in observations.ranks[0].steps[0].error_message
        assert statuses(pool.run(CLEAN)) == [[Status.OK] * 4] * 2
        assert (pool.stats.crashes, pool.stats.respawns) == (1, 1)
        assert victim not in pool.pids()


def test_closing_leaves_no_process_or_directory():
    pool = RankPool(2, group_timeout_s=TIMEOUT_S)
    pool.run(CLEAN)
    sets = [pool._active, pool._spare]
    pids = [worker.pid for ranks in sets for worker in ranks.handles().processes]
    pool.close()
    assert len(pids) == 4
    assert not any(alive(pid) for pid in pids)
    assert not any(Path(ranks.workdir).exists() for ranks in sets)


def test_workers_die_with_a_killed_campaign():
    program = textwrap.dedent(
        """
        import sys, time
        from fsdp_fuzz.execute.pool import FailureHandling, RankPool
        from fsdp_fuzz.generate.seed_family import train_eval
        if __name__ == "__main__":
            pool = RankPool(2)
            pool.run(train_eval("FULL_SHARD", iterations=1, epochs=1))
            print(*pool.pids(), flush=True)
            time.sleep(600)
        """
    )
    campaign = subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in campaign.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        campaign.kill()
        campaign.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
