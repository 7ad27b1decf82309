"""Replay every saved scenario under the corpus: one test id per file."""

from __future__ import annotations

import pytest

from fsdp_fuzz.corpus import corpus_files, corpus_root, load_entry
from fsdp_fuzz.data import ScenarioError
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.replay import replay_result


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "corpus_file" in metafunc.fixturenames:
        root = corpus_root(metafunc.config)
        files = corpus_files(root)
        if not files:
            raise pytest.UsageError(f"no corpus files (*.json) under {root}; pass --corpus DIR")
        metafunc.parametrize("corpus_file", files, ids=[str(f.relative_to(root)) for f in files])


def test_replay(corpus_file, pools: PoolSet, replay_statuses) -> None:
    try:
        entry = load_entry(corpus_file)
    except ScenarioError as exc:
        replay_statuses["malformed"] += 1
        pytest.fail(str(exc), pytrace=False)
    result = replay_result(entry, pools.run(entry.scenario))
    replay_statuses[result.status] += 1
    if not result.passed:
        pytest.fail(str(result), pytrace=False)
