"""``benchmarks/gpu_check.py``, the one command that validates the GPU path,
checked where it can be without a GPU: it refuses clearly when none is
visible, and a step that outruns its time is ended, its whole process group
with it, within that time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_without_a_gpu_it_prints_one_json_line_that_says_so_and_exits_2():
    ran = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ran.returncode == 2, ran.stderr
    (line,) = ran.stdout.splitlines()
    result = json.loads(line)
    assert result["ok"] is False and result["gpus"] == 0 and result["torch"] == torch.__version__
    assert result["error"].startswith("no GPU visible") and "--device cpu" in result["error"]


def test_a_step_past_its_timeout_is_ended_with_its_children(tmp_path):
    """SIGINT is ignored and a grandchild sleeps on: SIGKILL to the group
    still ends both by the timeout."""
    check = load_check()
    marker = tmp_path / "grandchild.pid"
    stubborn = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    result = check.run([sys.executable, "-c", stubborn], 3.0, tmp_path / "log")
    assert result["timed_out"] and time.monotonic() - started < 30, "ended long before the 60 s sleeps"
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # killed; gone once its parent (init) reaps it
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_the_budget_keeps_time_for_later_steps():
    deadline = load_check().Deadline(100.0)
    assert 59 < deadline.timeout(60, reserved_s=10) <= 60
    assert 29 < deadline.timeout(60, reserved_s=70) <= 30
    assert deadline.timeout(60, reserved_s=200) == 0
