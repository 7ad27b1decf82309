"""The collective trace on live ranks: every collective FSDP issues in a step
is attributed to the unit it served, and where this torch lacks a hook the
trace needs, runs stop saying so instead of tracing nothing."""

from __future__ import annotations

import pytest
import torch

from fsdp_fuzz.cli import main
from fsdp_fuzz.data import FsdpSettings, Purpose, Scenario, Status, Step
from fsdp_fuzz.engines import ENGINES, Fsdp1, UnitHook
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.execute.protocol import HarnessError
from fsdp_fuzz.execute.trace import check_trace, missing_hooks
from fsdp_fuzz.generate.seed_family import invalid_first_iter_order, invalid_later_iter_order
from fsdp_fuzz.models.seed import seed_model

MISSING = UnitHook("torch.distributed.fsdp._flat_param", "FlatParamHandle", "_no_such_hook", Purpose.UNSHARD, 0)


def agreeing(strategy: str, world_size: int, **settings) -> Scenario:
    schedule = (Step(), Step(optimizer_step=True), Step(mode="eval", backward=False))
    return Scenario(
        model=seed_model(),
        ranks=(schedule,) * world_size,
        fsdp=FsdpSettings(sharding_strategy=strategy, **settings),
    )


SCENARIOS = {
    "full_shard order error": invalid_first_iter_order("FULL_SHARD"),
    "shard_grad_op later warning": invalid_later_iter_order("SHARD_GRAD_OP", 1),
    "no_shard": agreeing("NO_SHARD", 2),
    "full_shard orig params": agreeing("FULL_SHARD", 2, use_orig_params=True),
    "hybrid": agreeing("HYBRID_SHARD", 4),
}


@pytest.fixture(scope="module")
def pools():
    with PoolSet() as running:
        yield running


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_collective_of_a_step_is_attributed_to_a_unit(name, pools):
    observations = pools.run(SCENARIOS[name])
    traced = [
        record
        for rank in observations.ranks
        for step in rank.steps
        if step.status in (Status.OK, Status.ERROR)
        for record in step.collectives
    ]
    assert traced, "FSDP issued collectives in every one of these scenarios"
    unattributed = [record for record in traced if record.unit is None or record.purpose is None]
    assert unattributed == []
    purposes = {record.purpose for record in traced}
    if name != "no_shard":
        assert Purpose.UNSHARD in purposes
    if name.startswith(("full_shard", "shard_grad_op")):
        assert Purpose.ORDER_CHECK in purposes
    if name in ("no_shard", "hybrid"):
        assert Purpose.REDUCE_GRAD in purposes


def test_a_missing_hook_stops_the_run_naming_torch_and_the_hook(monkeypatch):
    monkeypatch.setitem(ENGINES, "fsdp1", replace_hooks(Fsdp1.unit_hooks + (MISSING,)))
    with pytest.raises(HarnessError) as raised:
        check_trace("fsdp1")
    message = str(raised.value)
    assert f"torch {torch.__version__}" in message
    assert "torch.distributed.fsdp._flat_param.FlatParamHandle._no_such_hook" in message


def test_replay_exits_with_the_harness_message_before_running_anything(monkeypatch, capsys):
    monkeypatch.setitem(ENGINES, "fsdp1", replace_hooks((MISSING,)))
    assert main(["replay", "corpus/seed/train_eval-full_shard.json"]) == 3
    assert "_no_such_hook" in capsys.readouterr().err


def replace_hooks(hooks: tuple[UnitHook, ...]) -> Fsdp1:
    engine = Fsdp1()
    engine.unit_hooks = hooks
    return engine


def test_this_torch_has_every_hook_the_trace_needs():
    assert missing_hooks("fsdp1") == []
