"""Fuzz target: the whole generated space (models, FSDP settings, schedules)."""

from __future__ import annotations

from hypothesis import given

from fuzz.pool import PoolSet
from fuzz.strategies import scenarios
from fuzz.verdict import ContractCheck


@given(scenario=scenarios())
def test_generated_scenarios_keep_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))
