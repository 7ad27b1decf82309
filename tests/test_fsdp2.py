"""FSDP2's one promise for rank-divergent control flow, on live ranks: with
``set_reduce_scatter_unused_params(True)``, ranks that run the same unit but
different parameters inside it get the reference's results; without it the
same program is outside the promise and counted as FSDP2's by-design issue."""

from __future__ import annotations

import pytest

from fsdp_fuzz.data import Fsdp2Settings, Scenario, Status, Step
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.judge.orders import fsdp2_promises
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Sequential

EXPERTS = ModelSpec(
    4,
    Sequential(
        "model",
        (
            Sequential("stem", (Linear(4, 4),)),
            Choice(
                "experts",
                (
                    Sequential("expert0", (Linear(4, 4, bias=False),)),
                    Sequential("expert1", (Linear(4, 2, bias=False), Linear(2, 4, bias=False))),
                ),
                fsdp_unit=True,
            ),
        ),
    ),
)


def routed(reduce_scatter_unused_params: bool) -> Scenario:
    """A mixture of two experts in one unit: rank 0 routes to expert 0, rank 1 to expert 1."""

    def schedule(expert: int) -> tuple[Step, ...]:
        path = {"experts": (expert,)}
        return (Step(path=path), Step(path=path, optimizer_step=True), Step(path=path))

    return Scenario(
        model=EXPERTS,
        ranks=(schedule(0), schedule(1)),
        engine="fsdp2",
        fsdp2=Fsdp2Settings(reduce_scatter_unused_params=reduce_scatter_unused_params),
        description="two experts in one fully_shard unit, each rank routing to its own",
    )


@pytest.fixture(scope="module")
def pools():
    with PoolSet() as running:
        yield running


def test_with_the_flag_divergent_experts_match_the_reference(pools):
    scenario = routed(reduce_scatter_unused_params=True)
    assert fsdp2_promises(scenario)
    observations = pools.run(scenario)
    assert all(step.status == Status.OK for rank in observations.ranks for step in rank.steps)
    assert observations.reference is not None
    assert judge(scenario, observations) == ()


def test_without_the_flag_the_same_routing_is_the_by_design_issue(pools):
    scenario = routed(reduce_scatter_unused_params=False)
    assert not fsdp2_promises(scenario)
    observations = pools.run(scenario)
    violations = judge(scenario, observations)
    assert violations, "FSDP2 reduce-scatters only the gradients each rank has: the ranks' inputs differ"
    assert triage(scenario, observations, violations).name == "fsdp2-assumes-the-same-program"
