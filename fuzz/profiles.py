"""Hypothesis profiles: ``dev`` (the default), ``ci`` and ``nightly``.

Every example runs on real ranks of a persistent pool: tens of milliseconds,
or a fraction of a second when ranks hang, so deadlines are off and example
counts are modest next to a typical Hypothesis suite.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

DEFAULT_PROFILE = "dev"

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])

PROFILES = {
    "dev": settings(max_examples=100, **_COMMON),
    "ci": settings(max_examples=30, derandomize=True, database=None, **_COMMON),
    "nightly": settings(max_examples=1500, **_COMMON),
}


def register_profiles() -> None:
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)


def profile_from_environment() -> str:
    """The profile named by ``HYPOTHESIS_PROFILE``, checked, or the default."""
    name = os.environ.get("HYPOTHESIS_PROFILE", DEFAULT_PROFILE)
    if name not in PROFILES:
        raise ValueError(unknown_profile_message(name, "HYPOTHESIS_PROFILE"))
    return name


def unknown_profile_message(name: str, source: str) -> str:
    return f"unknown Hypothesis profile {name!r} (from {source}); choose one of {', '.join(sorted(PROFILES))}"
