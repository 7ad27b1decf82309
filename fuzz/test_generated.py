"""Fuzz target: the whole generated space (models, FSDP settings, schedules)."""

from __future__ import annotations

from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.verdict import ContractCheck
from hypothesis import given


@given(scenario=scenarios())
def test_generated_scenarios_keep_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))
