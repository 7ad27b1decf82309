"""Fuzz targets: the whole generated space (models, settings, schedules), one per engine."""

from __future__ import annotations

from hypothesis import given

from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.verdict import ContractCheck


@given(scenario=scenarios())
def test_generated_scenarios_keep_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))


@given(scenario=scenarios(engine="fsdp2"))
def test_generated_fsdp2_scenarios_keep_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))
