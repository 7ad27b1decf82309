"""A scenario on freshly spawned ranks: one process per rank per scenario.

This is how the seed's harness runs, and it costs a Python start, an
``import torch`` and a process group per case; ``fsdp_fuzz.execute.pool``
reuses ranks instead. It stays as the baseline the pool is measured against
and as the simplest faithful way to replay one scenario.
"""

from __future__ import annotations

from fsdp_fuzz.data import Observations, Scenario, scenario_to_json
from fsdp_fuzz.execute.executor import CPU, Placement, run_fresh
from fsdp_fuzz.execute.observe import observations_of

DEFAULT_GROUP_TIMEOUT_S = 5.0


def run_scenario(
    scenario: Scenario, placement: Placement = CPU, group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S
) -> Observations:
    """Run ``scenario`` on ``world_size`` freshly spawned ranks and observe it."""
    outcomes = run_fresh(scenario_to_json(scenario, complete=True), placement, group_timeout_s)
    return observations_of(scenario, placement, outcomes)
