"""``python -m fsdp_fuzz``: readable output, and bad input named with its fix."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

from fsdp_fuzz import cli
from fsdp_fuzz.cli import _duration, main
from tests.test_report import spy_on_summary

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
FIRST_ITERATION = CORPUS / "seed" / "invalid_first_iter_order-full_shard.json"


def test_show_draws_the_model_units_and_steps_side_by_side(capsys):
    assert main(["show", str(FIRST_ITERATION)]) == 0
    shown = capsys.readouterr().out
    assert "branch point branch" in shown
    assert "[1] layer2  [FSDP unit, 36 parameters]" in shown
    header = next(line for line in shown.splitlines() if line.strip().startswith("step |"))
    assert "rank 0" in header and "rank 1" in header
    assert "rank 0 iteration 0 (steps [0]): model > layer1 (no backward yet)" in shown
    assert "rank 1 iteration 0 (steps [0]): model > layer2 (no backward yet)" in shown
    assert "rank 1: the first-iteration error in step(s) [0]" in shown


def test_show_names_the_known_issue_and_its_upstream_reference(capsys):
    assert main(["show", str(CORPUS / "known" / "hybrid-order-check-intra-node-only.json")]) == 0
    shown = capsys.readouterr().out
    assert "known issue hybrid-order-check-intra-node-only:" in shown
    assert "upstream https://github.com/pytorch/pytorch/issues/108331: " in shown


@pytest.mark.parametrize("command", ["show", "repro", "replay", "reduce", "report"])
def test_a_missing_file_is_named_with_the_fix(tmp_path, capsys, command):
    missing = tmp_path / "nope.json"
    assert main([command, str(missing)]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and ("give a corpus file" in error or "give corpus files" in error)


def test_a_malformed_corpus_file_is_named_not_traced(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "ranks": ')
    assert main(["show", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fsdp-fuzz show: {bad}: not valid JSON") and "Traceback" not in error


def test_an_outdated_corpus_file_says_how_to_update_it(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text('{"schema_version": 0}')
    assert main(["repro", str(old)]) == 2
    assert "re-save the scenario" in capsys.readouterr().err


def test_replaying_an_empty_directory_is_an_error(tmp_path, capsys):
    assert main(["replay", str(tmp_path)]) == 2
    assert "no corpus files" in capsys.readouterr().err


def test_a_budget_of_no_scenarios_is_refused(capsys):
    assert main(["run", "--examples", "0"]) == 2
    assert "--examples must be at least 1" in capsys.readouterr().err


def test_durations_read_as_people_write_them():
    assert [_duration(text) for text in ("90s", "10m", "1h", "2.5", " 3 m ")] == [90, 600, 3600, 2.5, 180]
    with pytest.raises(argparse.ArgumentTypeError, match="write e.g. 90s, 10m or 1h"):
        _duration("soon")


def test_repro_writes_a_script_where_asked(tmp_path, capsys):
    output = tmp_path / "first.py"
    assert main(["repro", str(FIRST_ITERATION), "-o", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    tree = ast.parse(output.read_text())
    docstring = " ".join(ast.get_docstring(tree).split()).lower()
    assert FIRST_ITERATION.stem.lower() in docstring, "the docstring names the case"
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "run" in functions and "PROMISE" in output.read_text()


def test_show_of_a_saved_finding_prints_its_recorded_verdict(tmp_path, capsys, recorded):
    from fsdp_fuzz.corpus import save_finding
    from fsdp_fuzz.judge.oracles import judge

    scenario, observations = recorded("backward-on-some-ranks-only")
    path, _ = save_finding(tmp_path, scenario, observations, judge(scenario, observations), found_by="test")
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "recorded finding (torch " in shown and "[clean run] rank 1, step 0" in shown
    row = next(line for line in shown.splitlines() if line.strip().startswith("0 |"))
    assert [cell.strip() for cell in row.split("|")[1:]] == ["train (defaults) fwd", "train (defaults) fwd bwd"]


def test_both_engines_split_the_budget_and_are_summarised_each(tmp_path, capsys, monkeypatch):
    calls = spy_on_summary(monkeypatch, cli)
    report = tmp_path / "report.json"
    code = main(
        ["run", "--target", "seed", "--engine", "both", "--examples", "4", "--seed", "2", "--workers", "1"]
        + ["--corpus", str(tmp_path / "corpus"), "--report", str(report), "--database", "none"]
        + ["--log-dir", str(tmp_path / "logs")]
    )
    assert code in (0, 1)
    shown = capsys.readouterr().out
    assert "with fsdp1 and fsdp2" in shown
    assert "  seed[fsdp1]: 2 scenarios" in shown and "  seed[fsdp2]: 2 scenarios" in shown
    targets = json.loads(report.read_text())["targets"]
    assert {name: tally["examples"] for name, tally in targets.items()} == {"seed[fsdp1]": 2, "seed[fsdp2]": 2}
    ((_, lines),) = calls
    assert shown.endswith("\n".join(["", *lines, ""])), "the summary is the core's, as pytest's is (test_report)"
