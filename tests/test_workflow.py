"""The maintainer's workflow end to end, as the README shows it: a campaign
finds and saves a failure, replay says it still reproduces, and ``repro``
turns it into a script that reproduces it in a clean interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fsdp_fuzz.corpus import corpus_files, load_entry

ROOT = Path(__file__).resolve().parent.parent


def fuzz(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m fsdp_fuzz``, as an installed package runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fsdp_fuzz", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_a_saved_finding_replays_and_becomes_a_standalone_reproducer(tmp_path):
    corpus = tmp_path / "corpus"
    # --strict makes the seed family's known issues findings, so a short,
    # seeded campaign is sure to find (and shrink) one.
    campaign = fuzz(
        "run", "--target", "seed", "--strict", "--examples", "30", "--seed", "1", "--corpus", str(corpus), cwd=tmp_path
    )
    assert campaign.returncode == 1, campaign.stdout + campaign.stderr
    assert "summary:" in campaign.stdout and "] saved to " in campaign.stdout
    found = corpus_files(corpus / "found")
    assert found, campaign.stdout
    entry = load_entry(found[0])
    assert entry.finding is not None and entry.finding.observations is not None

    replay = fuzz("replay", str(found[0]))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"still reproduces    {found[0]}" in replay.stdout

    script = tmp_path / "repro.py"
    assert fuzz("repro", str(found[0]), "-o", str(script)).returncode == 0
    clean = subprocess.run(
        [sys.executable, "-I", str(script), "--timeout", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    # The script asserts FSDP's promise in each rank: exit 1 and the failing
    # rank's traceback while the finding reproduces, as replay just said it does.
    assert clean.returncode == 1, clean.stdout[-2000:] + clean.stderr[-2000:]
    assert "Traceback (most recent call last)" in clean.stderr, "the script shows what went wrong"


def test_a_time_budget_too_short_to_start_ends_with_a_summary_that_says_so(tmp_path):
    """Starting the workers and their ranks takes seconds, more on a loaded
    machine: a budget that runs out first still ends with the summary, and
    the summary says why nothing ran. (The 40 s campaign of
    ``test_time_budget`` runs scenarios within its budget.)"""
    campaign = fuzz("run", "--target", "seed", "--time", "0.5s", "--seed", "3", "--corpus", str(tmp_path), cwd=tmp_path)
    assert campaign.returncode == 0, campaign.stderr[-2000:]
    assert "for 0.5 s on cpu" in campaign.stdout, campaign.stdout
    (summary,) = [line for line in campaign.stdout.splitlines() if line.startswith("summary: ")]
    assert int(summary.split()[1]) == 0, summary
    assert "no scenario ran: the --time budget of 0.5 s was spent starting the workers" in campaign.stdout
    assert "findings saved: none" in campaign.stdout
    assert "ranks' output: " in campaign.stdout
