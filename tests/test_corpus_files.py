"""The corpus on disk: seed files are the seed test exactly, every known
issue has a reproducer, and a bad file is reported by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzz.corpus import corpus_files, load_entry
from fuzz.known_issues import KNOWN_ISSUES
from fuzz.scenario import ScenarioError, dumps
from fuzz.seed_family import seed_scenarios

CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def test_seed_files_are_the_seed_tests_exactly():
    expected = seed_scenarios()
    on_disk = {path.stem: path for path in corpus_files(CORPUS / "seed")}
    assert sorted(on_disk) == sorted(expected)
    for stem, path in on_disk.items():
        assert path.read_text() == dumps(expected[stem]), (
            f"{path} drifted from fuzz/seed_family.py; rewrite with "
            "python -c \"from fuzz.seed_family import write_seed_corpus; write_seed_corpus('corpus/seed')\""
        )


def test_every_known_issue_has_a_reproducer():
    reproduced = {load_entry(path).known_issue for path in corpus_files(CORPUS)}
    assert {issue.name for issue in KNOWN_ISSUES} <= reproduced


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
