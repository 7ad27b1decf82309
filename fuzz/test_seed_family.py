"""Fuzz targets: the seed test's model under random flips and train/eval
mixes, one per engine; ``fsdp_fuzz.core.TARGETS`` defines them, as it does
for ``python -m fsdp_fuzz run --target seed``."""

from __future__ import annotations

from fsdp_fuzz.core import pytest_target

test_seed_family_keeps_the_contract = pytest_target("seed", "fsdp1")
test_seed_family_under_fsdp2_keeps_the_contract = pytest_target("seed", "fsdp2")
