"""Fuzz target: the seed test's model under random flips and train/eval mixes."""

from __future__ import annotations

from hypothesis import given

from fuzz.pool import PoolSet
from fuzz.seed_family import seed_family_scenarios
from fuzz.verdict import ContractCheck


@given(scenario=seed_family_scenarios())
def test_seed_family_keeps_the_contract(scenario, pools: PoolSet, contract: ContractCheck) -> None:
    contract(scenario, pools.run(scenario))
