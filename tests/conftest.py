"""Shared helpers for the fuzzer's own tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsdp_fuzz.data import Observations, Scenario, observations_from_json, scenario_from_json

RECORDED = Path(__file__).parent / "recorded"


def load_recorded(name: str) -> tuple[Scenario, Observations]:
    """A scenario and the observations a real two-rank CPU run gave for it
    (see ``tests/record_observations.py``)."""
    document = json.loads((RECORDED / f"{name}.json").read_text())
    return scenario_from_json(document["scenario"]), observations_from_json(document["observations"])


@pytest.fixture
def recorded():
    return load_recorded
