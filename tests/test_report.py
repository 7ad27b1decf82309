"""The campaign report on recorded observations, the pytest options that
select profiles and write reports, run as a user runs them, and the one
campaign core (``fsdp_fuzz.core``) behind both front ends: the same
targets, the same summary."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fsdp_fuzz import core
from fsdp_fuzz.cli import _parser
from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.report import CampaignReport
from fsdp_fuzz.verdict import ContractCheck, ContractViolation

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
    assert list(report["targets"]) == ["seed[fsdp1]"], "named as `run --target seed --engine fsdp1` names it"
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
        assert f"] saved to {path}" in result.stdout, "finding [CLASS] saved to PATH"
        assert f"python -m fsdp_fuzz repro {path}" in result.stdout
        document = json.loads(path.read_text())
        assert document["finding"]["found_by"] == "fuzz/test_seed_family.py::test_seed_family_keeps_the_contract"
        assert document["finding"]["violations"] and document["observations"]["backend"] == "gloo"
        issues.append(document["known_issue"])
    assert None not in issues, "--strict-contract fails known issues, and says which"
    assert len(set(issues)) == len(issues), "one finding per class"


# One core for both front ends ---------------------------------------------------------------------

PYTEST_TARGET_MODULES = ("fsdp_fuzz.test_generated", "fsdp_fuzz.test_seed_family")


def test_the_pytest_targets_are_exactly_the_registry_the_command_looks_up(capsys):
    tests = {
        f"{module}::{name}": test
        for module in PYTEST_TARGET_MODULES
        for name, test in vars(importlib.import_module(module)).items()
        if name.startswith("test")
    }
    built = {name: getattr(test, "fuzz_target", None) for name, test in tests.items()}
    assert None not in built.values(), f"every pytest target is core.pytest_target(...): {built}"
    assert sorted(built.values()) == sorted(core.TARGETS.values()), "one pytest target per registry entry"
    for family, engine in core.TARGETS:
        args = _parser().parse_args(["run", "--target", family, "--engine", engine])
        assert core.target(args.target, args.engine) is core.TARGETS[(family, engine)]
    assert {family for family, _ in core.TARGETS} == set(core.TARGET_NAMES)
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--target", "nothing-registered"])


def spy_on_summary(monkeypatch, front_end) -> list:
    """Record what ``front_end`` (a module) asks ``core.summary_lines`` for,
    once it is checked to print the core's summary and no other."""
    assert front_end.summary_lines is core.summary_lines, f"{front_end.__name__} prints the core's summary"
    calls = []

    def recording(end: core.CampaignEnd) -> list[str]:
        lines = core.summary_lines(end)
        calls.append((end, lines))
        return lines

    monkeypatch.setattr(front_end, "summary_lines", recording)
    return calls


def test_the_pytest_summary_is_the_cores_and_names_the_saved_finding(monkeypatch, recorded, tmp_path):
    """The pytest front end, in process: a strict contract fails a known
    issue, the core saves it, and the terminal summary is the core's lines."""
    conftest = importlib.import_module("fsdp_fuzz.conftest")
    calls = spy_on_summary(monkeypatch, conftest)
    check = ContractCheck(strict=True)
    check.target = "fuzz/test_x.py::test_y"
    with pytest.raises(ContractViolation) as raised:
        check(*recorded("eval-order-unchecked-full_shard-silent"))
    saved = core.keep_finding(tmp_path / "corpus", raised.value.failure, check.target, check.report, check.target)
    options = {"--fuzz-device": "cpu", "--fuzz-backend": None, "--strict-contract": True}
    config = SimpleNamespace(stash=pytest.Stash(), getoption=lambda name, default=None: options.get(name, default))
    options["--fuzz-report"] = str(tmp_path / "report.json")
    config.stash[conftest._READY] = True
    config.stash[conftest._CONTRACT] = check
    config.stash[conftest._SAVED] = [saved]
    written: list[str] = []
    reporter = SimpleNamespace(section=lambda title: written.append(f"== {title}"), write_line=written.append)
    conftest.pytest_terminal_summary(reporter, 1, config)
    ((end, lines),) = calls
    assert written == ["== fsdp fuzz summary", *lines]
    assert end.report is check.report and list(end.findings) == [saved]
    assert any(line.startswith(f"  finding [eval-order-unchecked] saved to {saved.path} (shrink ") for line in lines)
    assert f"  report written to {tmp_path / 'report.json'}" in lines
    assert json.loads((tmp_path / "report.json").read_text())["targets"][check.target]["saved"]
