"""Shared helpers for the fuzzer's own tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
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


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free loopback port, for this test only.

    ``.ci/run`` installs the server; elsewhere the test is skipped unless
    ``FSDP_FUZZ_REQUIRE_REDIS=1`` says a missing server is a failure."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("FSDP_FUZZ_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (FSDP_FUZZ_REQUIRE_REDIS=1): apt-get install redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
