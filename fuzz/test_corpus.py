"""Replay every saved scenario under the corpus and judge it again."""

from __future__ import annotations

import pytest

from fuzz.corpus import corpus_files, corpus_root, load_entry
from fuzz.known_issues import triage
from fuzz.oracles import judge
from fuzz.pool import PoolSet
from fuzz.scenario import ScenarioError
from fuzz.verdict import ContractCheck, explain


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "corpus_file" in metafunc.fixturenames:
        root = corpus_root(metafunc.config)
        files = corpus_files(root)
        metafunc.parametrize("corpus_file", files, ids=[str(f.relative_to(root)) for f in files])


def test_replay(corpus_file, pools: PoolSet) -> None:
    try:
        entry = load_entry(corpus_file)
    except ScenarioError as exc:
        pytest.fail(str(exc), pytrace=False)
    observations = pools.run(entry.scenario)
    if entry.known_issue is None:
        ContractCheck(strict=True)(entry.scenario, observations)
        return
    violations = judge(entry.scenario, observations)
    if not violations:
        pytest.fail(
            f"FIXED: {corpus_file} no longer reproduces known issue {entry.known_issue!r}; "
            "retire the entry in fuzz/known_issues.py and this file",
            pytrace=False,
        )
    known = triage(entry.scenario, observations, violations)
    if known is None or known.name != entry.known_issue:
        found = known.name if known else "no known issue"
        pytest.fail(
            f"CHANGED: {corpus_file} recorded {entry.known_issue!r}, today it matches {found}:\n"
            + explain(entry.scenario, observations, violations),
            pytrace=False,
        )
