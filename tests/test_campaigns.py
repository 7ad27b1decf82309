"""Campaigns on live processes: workers side by side sharing one campaign,
a second campaign joining through a real Redis server, and every way a
campaign can end (SIGTERM, SIGINT, SIGKILL) leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fsdp_fuzz.corpus import load_entry
from fsdp_fuzz.workers import TEMPORARY_PREFIX, remove_abandoned_temporaries


def campaign_command(where: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fsdp_fuzz",
        "run",
        "--corpus",
        str(where / "corpus"),
        "--log-dir",
        str(where / "logs"),
        "--report",
        str(where / "report.json"),
        *options,
    ]


def run_campaign(where: Path, *options: str, timeout: float = 600) -> subprocess.CompletedProcess:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        campaign_command(where, *options), cwd=where, capture_output=True, text=True, timeout=timeout, check=False
    )


def strict_seed_campaign(where: Path, workers: int, examples: int, random_seed: int, database: str):
    """FSDP2's seed family under ``--strict``: by-design known issues
    make findings at once, so short campaigns are sure to save some."""
    return run_campaign(
        where,
        *("--target", "seed", "--engine", "fsdp2", "--strict", "--workers", str(workers)),
        *("--examples", str(examples), "--seed", str(random_seed), "--database", database),
    )


def start_long_campaign(where: Path, workers: int, output: int) -> subprocess.Popen:
    """A ten-minute campaign in a session of its own, to be ended early."""
    return subprocess.Popen(
        campaign_command(
            where, "--target", "generated", "--time", "10m", "--workers", str(workers), "--database", "none"
        ),
        cwd=where,
        stdout=output,
        stderr=output,
        text=True,
        start_new_session=True,
    )


def saved(where: Path) -> dict[str, str]:
    """Saved findings: file name to the known issue (or unknown class) they hold."""
    found = sorted((where / "corpus" / "found").glob("*.json"))
    return {path.name: load_entry(path).known_issue or "unknown" for path in found}


def session_processes(session: int) -> list[int]:
    """Processes still alive in a session: the campaign, its workers, ranks,
    fork servers and resource trackers all start in the campaign's."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def wait_for_no_process(session: int, within_s: float = 20) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_two_workers_share_one_campaign_and_save_each_class_once(tmp_path):
    result = strict_seed_campaign(tmp_path, workers=2, examples=200, random_seed=3, database=str(tmp_path / "db"))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (tally,) = report["targets"].values()
    files = saved(tmp_path)
    assert files, result.stdout
    assert sorted(tally["saved"]) == sorted(set(files.values())), "one file per saved class, each class once"
    assert len(set(files.values())) == len(files)
    assert tally["replayed_findings"] >= 1, "a worker replayed what the other saved, through the shared database"
    assert "on 2 worker(s)" in result.stdout


def test_a_second_campaign_joins_through_redis_and_replays_the_first_ones_finding(tmp_path, redis_url):
    first = strict_seed_campaign(tmp_path / "first", workers=1, examples=40, random_seed=5, database=redis_url)
    assert first.returncode == 1, first.stdout + first.stderr
    found_first = saved(tmp_path / "first")
    second = strict_seed_campaign(tmp_path / "second", workers=1, examples=1, random_seed=99, database=redis_url)
    assert second.returncode == 1, second.stdout + second.stderr
    found_second = saved(tmp_path / "second")
    assert set(found_second) & set(found_first), (found_first, found_second)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_campaign_with_its_summary_and_nothing_left(tmp_path, signum, code):
    tmp_path.mkdir(exist_ok=True)
    before = set(Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*"))
    process = start_long_campaign(tmp_path, workers=2, output=subprocess.PIPE)
    try:
        time.sleep(12)  # workers started, ranks running scenarios
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stdout + stderr
    assert "summary:" in stdout and f"stopped by {signal.Signals(signum).name}" in stdout
    assert json.loads((tmp_path / "report.json").read_text())["targets"]
    assert "leaked" not in stderr, stderr
    assert not wait_for_no_process(process.pid)
    assert set(Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*")) <= before


def test_sigkill_leaves_no_process_and_the_next_campaign_removes_its_directories(tmp_path):
    process = start_long_campaign(tmp_path, workers=1, output=subprocess.DEVNULL)
    try:
        time.sleep(12)
        workers = [pid for pid in session_processes(process.pid) if pid != process.pid]
        left_on_disk = [
            path
            for path in Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*")
            if int(path.name.removeprefix(TEMPORARY_PREFIX).split("-")[0]) in workers
        ]
        assert left_on_disk, "a running worker keeps a temporary directory"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not wait_for_no_process(process.pid)
    remove_abandoned_temporaries()
    assert not any(path.exists() for path in left_on_disk)
