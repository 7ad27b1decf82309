"""Bug reports (``fsdp_fuzz.bugreport``) judged as a maintainer reads them: rendered from real corpus files
with runs and reductions made up in the test (rendering is pure), and one live run of a real reproducer whose
captured output and exit code must be what the report shows."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fsdp_fuzz import bugreport
from fsdp_fuzz.bugreport import (
    EXPECTED,
    TITLES,
    Evidence,
    ScriptRun,
    Verdict,
    gather,
    prose,
    records_without_same_bug_thread,
    render,
    scenario_size,
    trim_output,
    write_findings,
)
from fsdp_fuzz.corpus import CorpusEntry, RecordedFinding, corpus_files, load_entry
from fsdp_fuzz.data import Clause
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES, Relation, issue_named
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.reduce.record import CLEAN, Flip, Reduction
from tests.conftest import load_recorded

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "corpus" / "known"
FSDP1_FILE = "first-iteration-order-ends-early"
"""FSDP1, threads of two relations, a description longer than three sentences."""
FSDP2_FILE = "fsdp2-reshard-after-backward-off-loses-the-optimizer-step"
LIVE_FILE = "order-error-key-error-with-orig-params"
"""Small and quick: every rank fails in step 0."""
SCRIPT = "import torch\nprint('the reproducer')\n"
OUTPUT = "FSDP broke its promise (torch 9.9.9): rank 0 hung in step 0"


def entry_of(stem: str) -> CorpusEntry:
    return load_entry(KNOWN / f"{stem}.json")


def recorded_verdict(stem: str) -> Verdict:
    """The judge's verdict on a real run's recorded observations: no ranks start."""
    scenario, observations = load_recorded(stem)
    return Verdict.of("the recorded run", judge(scenario, observations))


def evidence(stem: str, *runs: ScriptRun) -> Evidence:
    runs = runs or (ScriptRun("9.9.9", 1, OUTPUT, 3.0),)
    environments = tuple((run.torch_version, f"PyTorch version: {run.torch_version}") for run in runs)
    return Evidence(SCRIPT, runs, recorded_verdict(stem), environments)


def test_a_report_has_the_templates_fields_and_an_fsdp1_title():
    entry = entry_of(FSDP1_FILE)
    report = render(entry, evidence(FSDP1_FILE))
    assert report.startswith(f"# [FSDP] {TITLES[entry.known_issue]}\n")
    headings = [line for line in report.splitlines() if line.startswith("#")]
    assert headings == [
        headings[0],
        "### 🐛 Describe the bug",
        "#### Reproducer",
        "#### Expected and actual",
        "#### What avoids it",
        "#### Related upstream threads",
        "### Versions",
    ]
    assert f"```python\n{SCRIPT}```" in report
    assert f"on torch 9.9.9 (exit code 1, 3 s):\n\n```\n{OUTPUT}\n```" in report
    assert "```\nPyTorch version: 9.9.9\n```" in report.split("### Versions", 1)[1]
    assert "the reproducer reproduces on torch 9.9.9." in report


def test_what_happens_is_the_records_first_sentences_with_the_whole_description_folded():
    stem = "frozen-unit-backward-state-error-with-orig-params"
    told = bugreport.sentences(issue_named(stem).description)
    assert len(told) > 3
    describe = render(entry_of(stem), evidence(stem)).split("#### Reproducer")[0]
    summary, folded = describe.split("<details>")
    assert prose(" ".join(told[:3])) in summary and prose(told[3]) not in summary
    assert prose(issue_named(stem).description) in folded
    short = render(entry_of(FSDP1_FILE), evidence(FSDP1_FILE)).split("#### Reproducer")[0]
    assert prose(issue_named(FSDP1_FILE).description) in short and "<details>" not in short


def test_what_happens_leaves_out_how_the_fuzzer_found_it():
    stem = "reentrant-checkpoint-recompute-after-reshard"
    told = bugreport.sentences(issue_named(stem).description)
    assert told[-1].startswith("Found by the first campaign")
    describe = render(entry_of(stem), evidence(stem)).split("#### Reproducer")[0]
    assert prose(" ".join(told[:3])) in describe and "Found by the first campaign" not in describe


def test_an_fsdp2_report_is_titled_fsdp2():
    assert render(entry_of(FSDP2_FILE), evidence(FSDP2_FILE)).startswith("# [FSDP2] ")


def test_the_upstream_threads_appear_with_their_relations():
    record = issue_named(FSDP1_FILE)
    assert {reference.relation for reference in record.upstream} >= {Relation.RELATED, Relation.SAME_SYMPTOM}
    threads = render(entry_of(FSDP1_FILE), evidence(FSDP1_FILE)).split("#### Related upstream threads")[1]
    for reference in record.upstream:
        assert f"- [{reference.thread}]({reference.url}) ({reference.relation}): " in threads


def test_a_record_without_threads_says_none_were_found():
    report = render(entry_of(LIVE_FILE), evidence(LIVE_FILE))
    assert "#### Related upstream threads\n\nSearched for; none found." in report


def test_expected_and_actual_are_the_judges_clauses_and_words():
    verdict = recorded_verdict(FSDP1_FILE)
    section = render(entry_of(FSDP1_FILE), evidence(FSDP1_FILE)).split("#### Expected and actual")[1]
    section = section.split("#### What avoids it")[0]
    for clause, words in verdict.violations:
        assert f"**Expected** ({clause.sentence}): {EXPECTED[clause]}" in section
        assert words in section
    assert set(EXPECTED) == set(Clause)


def test_what_avoids_it_comes_from_the_reduction_and_only_from_it():
    reduction = Reduction(
        failure_class=FSDP1_FILE,
        removed=("the optimizer step", "rank 1's eval step"),
        flips=(
            Flip("use_orig_params back to False", CLEAN),
            Flip("sharding_strategy SHARD_GRAD_OP", "unknown: clean-run (step-failed)"),
            Flip("rank 1's path takes layer2", FSDP1_FILE),
            Flip("world size 1", "invalid: needs two ranks"),
        ),
        complete=False,
        runs=14,
        seconds=41.2,
    )
    entry = replace(entry_of(FSDP1_FILE), reduction=reduction)
    section = render(entry, evidence(FSDP1_FILE)).split("#### What avoids it")[1].split("####")[0]
    assert "(14 live runs, 41 s)" in section
    assert "Avoids it (the run then keeps FSDP's contract):\n\n- use_orig_params back to False\n" in section
    assert (
        f"Turns it into another failure (not {FSDP1_FILE}):\n\n"
        "- sharding_strategy SHARD_GRAD_OP: unknown: clean-run (step-failed)\n" in section
    )
    assert "rank 1's path takes layer2" not in section, "a flip that keeps the failure avoids nothing"
    assert "world size 1" not in section, "a flip that could not run avoids nothing"
    assert (
        "Does not need (removed while the failure stayed the same):\n\n- the optimizer step\n- rank 1's eval step"
        in section
    )
    assert "budget ended before a fixpoint" in section


def test_without_a_reduction_nothing_is_said_to_avoid_it():
    entry = replace(entry_of(FSDP1_FILE), reduction=None)
    section = render(entry, evidence(FSDP1_FILE)).split("#### What avoids it")[1].split("####")[0]
    assert section.strip().startswith("No reduction was measured for this case")
    assert "Avoids it" not in section and "Does not need" not in section


def test_runs_on_two_torches_are_both_recorded():
    runs = (ScriptRun("2.13.0+cpu", 1, OUTPUT, 3.0), ScriptRun("2.14.1+cu130", 0, "FSDP kept its promise", 4.0))
    report = render(entry_of(FSDP1_FILE), evidence(FSDP1_FILE, *runs))
    assert "<summary>Output of `python -I repro.py` on torch 2.14.1+cu130 (exit code 0, 4 s):</summary>" in report
    assert "FSDP kept its promise" in report
    assert (
        "Reproduced on: torch 2.13.0+cpu: reproduces (exit code 1); "
        "torch 2.14.1+cu130: does not reproduce (exit code 0)." in report
    )
    assert "the reproducer reproduces on torch 2.13.0+cpu (tried: 2.13.0+cpu, 2.14.1+cu130)." in report
    assert "<summary>The same with torch 2.14.1+cu130</summary>" in report


def test_a_killed_run_is_reported_as_killed():
    run = ScriptRun("9.9.9", None, "", 300.0)
    report = render(entry_of(FSDP1_FILE), evidence(FSDP1_FILE, run))
    assert "(killed at the timeout, 300 s)" in report and "```\n(no output)\n```" in report
    assert "did not reproduce on torch 9.9.9" in report


def test_an_unknown_finding_is_titled_and_told_from_its_violations():
    known = entry_of(LIVE_FILE)
    verdict = recorded_verdict(LIVE_FILE)
    signature = tuple((clause, rank, 0) for rank, (clause, _) in enumerate(verdict.violations))
    finding = RecordedFinding(tuple(words for _, words in verdict.violations), signature, "9.9.9", "gloo", None)
    entry = CorpusEntry(Path("corpus/found/0123456789abcdef.json"), known.scenario, None, finding)
    recorded = bugreport.verdict_of(entry)
    assert recorded.source == "the verdict recorded with the finding (torch 9.9.9, gloo)"
    assert recorded.violations == verdict.violations
    report = render(entry, Evidence(SCRIPT, (ScriptRun("9.9.9", 1, OUTPUT, 3.0),), recorded, ()))
    assert report.startswith("# [FSDP] expected RuntimeError 'Forward order differs across ranks'")
    assert "no known issue explains it" in report
    assert "None searched for yet: the finding is not triaged." in report


def test_markup_in_the_records_words_is_escaped():
    report = render(entry_of(LIVE_FILE), evidence(LIVE_FILE))
    assert "KeyError(&lt;the FlatParameter>)" in report.split("#### Reproducer")[0]


def test_long_output_keeps_its_head_and_its_last_traceback():
    lines = [f"line {n}" for n in range(200)] + ["Traceback (most recent call last):"]
    lines += [f"  frame {n}" for n in range(90)] + ["AssertionError: the ranks disagree"]
    shown = trim_output("\n".join(lines)).splitlines()
    assert shown[:20] == lines[:20]
    assert shown[20] == "[... 180 lines cut ...]"
    assert shown[21:] == lines[200:]
    assert trim_output("x" * 1500).endswith("[... 500 characters cut]")
    assert trim_output("short\noutput\n") == "short\noutput"


def test_the_records_to_report_have_no_same_bug_thread_and_their_smallest_file():
    candidates = records_without_same_bug_thread(ROOT / "corpus")
    expected = [
        name
        for name, record in KNOWN_ISSUES.items()
        if all(reference.relation is not Relation.SAME_BUG for reference in record.upstream)
    ]
    assert sorted(candidate.record.name for candidate in candidates) == sorted(expected)
    assert len(candidates) < len(KNOWN_ISSUES)
    backing = {}
    for path in corpus_files(KNOWN):
        backing.setdefault(load_entry(path).known_issue, []).append(path)
    for candidate in candidates:
        assert sorted(candidate.files) == sorted(backing[candidate.record.name])
        sizes = [scenario_size(load_entry(path)) for path in candidate.files]
        assert sizes == sorted(sizes) and candidate.representative == candidate.files[0]


def test_titles_are_of_records_and_read_as_titles():
    assert set(TITLES) <= set(KNOWN_ISSUES)
    for name, title in TITLES.items():
        assert len(title) <= 150 and "<" not in title and not title.endswith("."), name


def test_the_driver_writes_a_report_per_record_and_an_index(tmp_path, monkeypatch):
    def made_up(entry, pythons, timeout_s, verdict=None):
        return evidence(entry.path.stem, ScriptRun("9.9.9", 1, OUTPUT, 3.0))

    monkeypatch.setattr(bugreport, "gather", made_up)
    written, problems = write_findings(tmp_path, ROOT / "corpus", records=[FSDP1_FILE, LIVE_FILE])
    assert problems == []
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["README.md", f"{FSDP1_FILE}.md", f"{LIVE_FILE}.md"]
    )
    assert (tmp_path / f"{LIVE_FILE}.md").read_text().startswith(f"# [FSDP] {TITLES[LIVE_FILE]}")
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# Findings to file upstream") and f"--record {FSDP1_FILE} --record {LIVE_FILE}" in readme
    assert f"| [\\[FSDP\\] {TITLES[LIVE_FILE]}]({LIVE_FILE}.md) | fsdp1 | 9.9.9 | none found |" in readme
    assert "(same symptom)" in readme


def test_the_command_refuses_records_it_does_not_write(tmp_path, capsys):
    assert bugreport.main(["--all", str(tmp_path), "--record", "no-such-record"]) == 2
    assert "not records without a same-bug thread" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bugreport.main([])


def test_an_interpreter_that_cannot_run_is_refused_before_any_report(tmp_path, capsys):
    missing = str(tmp_path / "no-python")
    assert bugreport.main_report(KNOWN / f"{LIVE_FILE}.json", None, [missing]) == 2
    assert f"cannot run {missing}" in capsys.readouterr().err
    assert bugreport.main(["--all", str(tmp_path / "out"), "--python", missing, "--record", LIVE_FILE]) == 2
    assert not (tmp_path / "out" / f"{LIVE_FILE}.md").exists()


def test_a_live_report_shows_what_the_reproducer_printed():
    """The one live run: the real reproducer of a small corpus file, in a clean interpreter."""
    entry = entry_of(LIVE_FILE)
    gathered = gather(entry, (sys.executable,), verdict=recorded_verdict(LIVE_FILE))
    (run,) = gathered.runs
    assert run.exit_code not in (None, 0), run.output
    assert run.output.strip() and "fsdp-fuzz-report-" not in run.output
    report = render(entry, gathered)
    assert trim_output(run.output) in report
    assert f"(exit code {run.exit_code}, " in report
    assert f"PyTorch version: {run.torch_version}" in report.split("### Versions", 1)[1]
