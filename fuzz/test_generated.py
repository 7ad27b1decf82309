"""Fuzz targets: the whole generated space (models, settings, schedules), one
per engine; ``fsdp_fuzz.core.TARGETS`` defines them, as it does for
``python -m fsdp_fuzz run --target generated``."""

from __future__ import annotations

from fsdp_fuzz.core import pytest_target

test_generated_scenarios_keep_the_contract = pytest_target("generated", "fsdp1")
test_generated_fsdp2_scenarios_keep_the_contract = pytest_target("generated", "fsdp2")
