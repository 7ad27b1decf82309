"""Known-issue references say how far they back their record, in one typed place."""

from __future__ import annotations

import re

from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES, Relation, markdown_table

TRAILING_VERDICT = re.compile(r": (same bug|same symptom|by design|related)\W*$")


def test_every_reference_has_a_typed_relation_and_no_verdict_in_its_text() -> None:
    """The relation is the field, not a suffix of the prose: a second,
    free-text verdict could contradict it unnoticed."""
    for issue in KNOWN_ISSUES.values():
        for reference in issue.upstream:
            assert isinstance(reference.relation, Relation), (issue.name, reference.thread)
            assert not TRAILING_VERDICT.search(reference.seen), (issue.name, reference.thread, reference.seen)


def test_the_readme_table_shows_each_relation() -> None:
    table = markdown_table()
    for issue in KNOWN_ISSUES.values():
        for reference in issue.upstream:
            assert f"[{reference.thread}]({reference.url}) ({reference.relation})" in table


def test_a_thread_is_the_same_bug_for_one_record_at_most() -> None:
    """A bug report describes one bug; two records both claiming it means
    one of them overstates."""
    claims: dict[str, list[str]] = {}
    for issue in KNOWN_ISSUES.values():
        for reference in issue.upstream:
            if reference.relation is Relation.SAME_BUG:
                claims.setdefault(reference.thread, []).append(issue.name)
    assert {thread: names for thread, names in claims.items() if len(names) > 1} == {}
