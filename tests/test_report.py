"""The campaign report on recorded observations, and the pytest options
that select profiles and write reports, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.report import CampaignReport

ROOT = Path(__file__).resolve().parent.parent


def test_report_counts_outcomes_clauses_and_keeps_the_last_finding(recorded):
    report = CampaignReport()
    clean = recorded("train_eval-full_shard")
    known = recorded("eval-order-unchecked-full_shard-silent")
    for scenario, observations in (clean, known):
        violations = judge(scenario, observations)
        issue = triage(scenario, observations, violations) if violations else None
        report.record("target", scenario, observations, violations, issue, failed=False)
    report.record("target", *known, judge(*known), None, failed=True)
    encoded = json.loads(json.dumps(report.to_json("ci", "gloo")))
    tally = encoded["targets"]["target"]
    assert tally["examples"] == 3
    # setup plus every step, per rank: 2 x (1 + 12) for train_eval, 2 x (1 + 1) twice for the eval mismatch
    assert tally["outcomes"] == {"ok": 26 + 2 * 4}
    assert tally["clauses"] == {"no-silent-mismatch": 2}
    assert tally["known_issues"] == {"eval-order-unchecked": 1}
    (finding,) = encoded["findings"]
    assert finding["clauses"] == ["no-silent-mismatch"] and finding["scenario"]["world_size"] == 2


def run_pytest(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *arguments],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_profiles_are_refused_by_name():
    by_option = run_pytest("fuzz", "--collect-only", "--hypothesis-profile=weekly")
    assert by_option.returncode == 4
    assert "unknown Hypothesis profile 'weekly'" in by_option.stderr and "nightly" in by_option.stderr
    by_environment = run_pytest("fuzz", "--collect-only", env={"HYPOTHESIS_PROFILE": "weekly"})
    assert by_environment.returncode == 4
    assert "HYPOTHESIS_PROFILE" in by_environment.stderr


def test_fuzz_report_is_written(tmp_path):
    path = tmp_path / "report.json"
    result = run_pytest(
        "fuzz/test_seed_family.py::test_seed_family_keeps_the_contract",
        "--hypothesis-profile=ci",
        "--hypothesis-seed=0",
        f"--fuzz-report={path}",
        env={"HYPOTHESIS_PROFILE": "ci"},
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "fsdp fuzz summary" in result.stdout
    report = json.loads(path.read_text())
    assert report["profile"] == "ci" and report["backend"] == "gloo"
    (tally,) = report["targets"].values()
    assert tally["examples"] >= 30 and tally["wall_s"] > 0


def test_a_failing_target_saves_one_shrunk_finding_per_class_to_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    result = run_pytest(
        "fuzz/test_seed_family.py::test_seed_family_keeps_the_contract",
        "--hypothesis-profile=ci",
        "--strict-contract",
        f"--corpus={corpus}",
        env={"HYPOTHESIS_PROFILE": "ci"},
    )
    assert result.returncode == 1, result.stdout[-2000:]
    saved = sorted((corpus / "found").glob("*.json"))
    assert len(saved) >= 2, "the seed family breaks the strict contract in several ways, each its own finding"
    issues = []
    for path in saved:
        assert f"finding saved to {path}" in result.stdout
        assert f"python -m fsdp_fuzz repro {path}" in result.stdout
        document = json.loads(path.read_text())
        assert document["finding"]["found_by"] == "fuzz/test_seed_family.py::test_seed_family_keeps_the_contract"
        assert document["finding"]["violations"] and document["observations"]["backend"] == "gloo"
        issues.append(document["known_issue"])
    assert None not in issues, "--strict-contract fails known issues, and says which"
    assert len(set(issues)) == len(issues), "one finding per class"
