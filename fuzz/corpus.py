"""Saved scenarios: where they live, how they are read, what they promise.

A corpus file is either a bare scenario (it must keep the contract: the
seed's files are such) or ``{"known_issue": NAME, "scenario": {...}}``, a
reproducer of a known issue, which must keep failing in that known way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fuzz.known_issues import known_issue
from fuzz.scenario import Scenario, ScenarioError, read_json, scenario_from_json


@dataclass(frozen=True)
class CorpusEntry:
    path: Path
    scenario: Scenario
    known_issue: str | None = None


def corpus_root(config: pytest.Config) -> Path:
    option = config.getoption("--corpus", default=None)
    return Path(option) if option else config.rootpath / "corpus"


def corpus_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json"))


def load_entry(path: Path) -> CorpusEntry:
    document = read_json(path)
    try:
        if isinstance(document, dict) and "scenario" in document:
            name = document.get("known_issue")
            if name is not None:
                known_issue(name)
            return CorpusEntry(path, scenario_from_json(document["scenario"]), name)
        return CorpusEntry(path, scenario_from_json(document))
    except (ScenarioError, KeyError) as exc:
        raise ScenarioError(f"{path}: {exc.args[0]}") from None
