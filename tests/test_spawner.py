"""The spawner on real processes and real gloo groups: every kind of ending
is recorded as such, and nothing is left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from fsdp_fuzz.data import Status
from fsdp_fuzz.execute.devices import DeviceError, Placement
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.generate.seed_family import invalid_first_iter_order, order_ends_early, train_eval


def statuses(observations):
    return [[step.status for step in rank.steps] for rank in observations.ranks]


def test_clean_scenario_is_ok_on_every_rank_and_computes_what_one_process_computes():
    observations = run_scenario(train_eval("FULL_SHARD", iterations=2, epochs=1))
    assert statuses(observations) == [[Status.OK] * 4] * 2
    assert observations.backend == "gloo" and observations.torch_version == torch.__version__
    for index, expected in enumerate(observations.reference):
        outputs = [rank.steps[index].output_sum for rank in observations.ranks]
        assert outputs == pytest.approx(list(expected.output_sums), rel=1e-5)
        if expected.grad_sum is not None:
            grads = sum(rank.steps[index].grad_sum for rank in observations.ranks)
            assert grads == pytest.approx(expected.grad_sum, rel=1e-5)


def test_raising_scenario_records_type_and_message():
    observations = run_scenario(invalid_first_iter_order("SHARD_GRAD_OP"))
    for rank in observations.ranks:
        (step,) = rank.steps
        assert (step.status, step.error_type) == (Status.ERROR, "RuntimeError")
        assert step.error_message.startswith("Forward order differs across ranks")


def test_hanging_rank_is_recorded_at_its_step_before_the_group_timeout():
    """Fresh ranks, as a reproducer runs them, recognise the deadlock too:
    a 10-minute group timeout is never waited out (the message says how the
    hang was recognised: one waited out would not be called a deadlock)."""
    observations = run_scenario(order_ends_early(), group_timeout_s=600)
    assert statuses(observations) == [[Status.HANG], [Status.OK]]
    assert observations.ranks[0].steps[0].error_message.startswith("deadlock")


def test_killed_ranks_are_crashes():
    results = []
    runner = threading.Thread(target=lambda: results.append(run_scenario(order_ends_early(), group_timeout_s=60)))
    runner.start()
    deadline = time.monotonic() + 60
    while len(multiprocessing.active_children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    runner.join(timeout=120)
    (observations,) = results
    for rank in observations.ranks:
        assert Status.CRASH in {rank.setup.status} | {step.status for step in rank.steps}


def test_two_runs_at_once_do_not_collide():
    results = []
    scenario = train_eval("SHARD_GRAD_OP", iterations=1, epochs=1)
    threads = [threading.Thread(target=lambda: results.append(run_scenario(scenario))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [statuses(r) for r in results] == [[[Status.OK, Status.OK]] * 2] * 2
    assert results[0] == results[1]


def test_a_placement_that_cannot_run_is_refused_with_the_fix():
    """The choices themselves are in tests/test_devices.py."""
    with pytest.raises(DeviceError, match=r"no GPU is visible.*device 'cpu'"):
        Placement("cuda", "gloo", gpus=0).check(2)
    with pytest.raises(DeviceError, match=r"needs one GPU per rank.*4 ranks and 2 GPU\(s\)"):
        Placement("cuda", "nccl", gpus=2).check(4)
