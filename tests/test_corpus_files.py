"""The corpus on disk: seed files are the seed test exactly, every known
issue has a reproducer, a bad file is reported by name, findings are saved
once by content hash, and replay names what changed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fsdp_fuzz.corpus import CorpusEntry, corpus_files, load_entry, save_finding, scenario_id, signature
from fsdp_fuzz.data import Clause, ScenarioError, Violation, ViolationKind, dumps
from fsdp_fuzz.generate.seed_family import seed_scenarios
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.replay import BROKEN, CHANGED, FIXED, KEEPS_CONTRACT, REPRODUCES, replay_result

CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def test_seed_files_are_the_seed_tests_exactly():
    expected = seed_scenarios()
    on_disk = {path.stem: path for path in corpus_files(CORPUS / "seed")}
    assert sorted(on_disk) == sorted(expected)
    for stem, path in on_disk.items():
        assert path.read_text() == dumps(expected[stem]), (
            f"{path} drifted from fuzz/generate/seed_family.py; rewrite with python -c "
            "\"from fsdp_fuzz.generate.seed_family import write_seed_corpus; write_seed_corpus('corpus/seed')\""
        )


def test_every_known_issue_has_a_reproducer():
    reproduced = {load_entry(path).known_issue for path in corpus_files(CORPUS)}
    assert set(KNOWN_ISSUES) <= reproduced


def test_every_corpus_file_loads():
    for path in corpus_files(CORPUS):
        load_entry(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"known_issue": "no-such-issue", "scenario": {}}), "no known issue named 'no-such-issue'"),
        (json.dumps({"schema_version": 0}), "schema_version is 0"),
    ],
)
def test_a_malformed_corpus_file_names_itself_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ScenarioError, match=problem) as raised:
        load_entry(path)
    assert str(raised.value).startswith(str(path))


# Saving findings and judging replays, on recorded observations (real CPU
# runs saved by tests/record_observations.py).


def test_a_finding_is_saved_once_under_its_content_hash(tmp_path, recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    violations = judge(scenario, observations)
    path, new = save_finding(tmp_path, scenario, observations, violations, found_by="test")
    assert new and path == tmp_path / "found" / f"{scenario_id(scenario)}.json"
    reworded = replace(scenario, description="the same case, found again")
    assert scenario_id(reworded) == scenario_id(scenario)
    again, new_again = save_finding(tmp_path, reworded, observations, violations, found_by="test")
    assert (again, new_again) == (path, False)
    assert corpus_files(tmp_path) == [path]
    assert scenario_id(replace(scenario, seed=1)) != scenario_id(scenario)


def test_a_saved_finding_reads_back_with_its_verdict(tmp_path, recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    violations = judge(scenario, observations)
    path, _ = save_finding(tmp_path, scenario, observations, violations, found_by="test")
    entry = load_entry(path)
    assert entry.scenario == scenario and not entry.keeps_contract
    assert entry.finding.signature == signature(violations)
    assert entry.finding.violations == tuple(str(v) for v in violations)
    assert entry.finding.observations == observations


def test_a_finding_saved_before_clause_ids_still_replays(tmp_path, recorded):
    """Findings saved by earlier versions name clauses by their sentence."""
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    violations = judge(scenario, observations)
    path, _ = save_finding(tmp_path, scenario, observations, violations, found_by="test")
    document = json.loads(path.read_text())
    assert [entry[0] for entry in document["finding"]["signature"]] == [v.clause.value for v in violations]
    document["finding"]["signature"] = [[v.clause.sentence, v.rank, v.step] for v in violations]
    path.write_text(json.dumps(document))
    assert load_entry(path).finding.signature == signature(violations)
    assert replay_result(load_entry(path), observations).status == REPRODUCES


def test_replay_of_a_finding_that_fails_the_same_way_still_reproduces(tmp_path, recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    path, _ = save_finding(tmp_path, scenario, observations, judge(scenario, observations))
    result = replay_result(load_entry(path), observations)
    assert (result.status, result.passed) == (REPRODUCES, True)


def test_replay_of_a_finding_that_no_longer_fails_is_fixed(tmp_path, recorded):
    scenario, observations = recorded("train_eval-full_shard")
    claimed = (Violation(Clause.CLEAN_RUN, ViolationKind.STEP_FAILED, 0, 1, "made up for this test"),)
    path, _ = save_finding(tmp_path, scenario, observations, claimed)
    result = replay_result(load_entry(path), observations)
    assert (result.status, result.passed) == (FIXED, False)
    assert str(path) in result.detail


def test_replay_of_a_finding_that_fails_differently_shows_both(tmp_path, recorded):
    scenario, observations = recorded("hybrid-order-check-intra-node-only")
    claimed = (Violation(Clause.CLEAN_RUN, ViolationKind.STEP_FAILED, 3, 0, "recorded failure"),)
    path, _ = save_finding(tmp_path, scenario, observations, claimed)
    result = replay_result(load_entry(path), observations)
    assert (result.status, result.passed) == (CHANGED, False)
    assert "recorded failure" in result.detail and "no silent mismatch" in result.detail


def test_replay_of_known_issue_and_seed_entries(recorded):
    for name, status in [
        ("hybrid-order-check-intra-node-only", REPRODUCES),
        ("train_eval-full_shard", KEEPS_CONTRACT),
    ]:
        scenario, observations = recorded(name)
        path = next(p for p in corpus_files(CORPUS) if p.stem == name)
        assert replay_result(load_entry(path), observations).status == status
    clean_scenario, clean = recorded("train_eval-full_shard")
    retired = replay_result(CorpusEntry(Path("k.json"), clean_scenario, known_issue="eval-order-unchecked"), clean)
    assert retired.status == FIXED and "retire known issue 'eval-order-unchecked'" in retired.detail
    failing_scenario, failing = recorded("hybrid-order-check-intra-node-only")
    broken = replay_result(CorpusEntry(Path("seed.json"), failing_scenario), failing)
    assert broken.status == BROKEN and "no silent mismatch" in broken.detail
