"""From the ranks' reports to ``Observations``: the typed record the
judge reads, with the single-process reference next to the ranks'."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fsdp_fuzz.data import Observations, RankObservation, Scenario, StepOutcome
from fsdp_fuzz.execute.devices import Placement
from fsdp_fuzz.execute.reference import reference_run


def observations_of(
    scenario: Scenario, placement: Placement, outcomes: Sequence[Sequence[StepOutcome]]
) -> Observations:
    """Per rank, setup's reported outcome then each step's."""
    return Observations(
        backend=placement.backend,
        device=placement.device,
        torch_version=torch.__version__,
        ranks=tuple(
            RankObservation(
                setup=reported[0],
                steps=tuple(reported[1:]),
            )
            for reported in outcomes
        ),
        reference=reference_run(scenario),
    )
