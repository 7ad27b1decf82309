"""Fuzz targets: the seed test's model under random flips and train/eval mixes, one per engine."""

from __future__ import annotations

from hypothesis import given

from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.generate.seed_family import seed_family_scenarios
from fsdp_fuzz.verdict import ContractCheck


@given(scenario=seed_family_scenarios())
def test_seed_family_keeps_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))


@given(scenario=seed_family_scenarios(engine="fsdp2"))
def test_seed_family_under_fsdp2_keeps_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))
