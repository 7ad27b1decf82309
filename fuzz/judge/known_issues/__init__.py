"""Known FSDP misbehaviours: failures the fuzzer has already triaged.

Each record is its predicate, registered where it is defined with its name,
its priority, a description and the upstream threads where users met it. A
failing case that a record explains is counted and reported, not failed, so
a campaign keeps looking for the next new finding; ``--strict-contract``
fails them all again. Every record has a reproducer under ``corpus/known/``
and a triage test on recorded observations, both ways.

Predicates read violation kinds, the scenario, and the symptom FSDP showed
(the type and words of its error), never the oracles' own message text, and
are kept narrow (a kind, a step range, a symptom) so that a record never
hides a different bug in the same scenario. When several records explain a
case, the lowest ``priority`` names it.

A record lives with its engine: ``fsdp1`` and ``fsdp2`` hold the records and
the facts only they read, ``facts`` what records of both engines read, and
``registry`` the registry itself (``known_issue``, ``triage``). Importing
this package registers every record.
"""

from __future__ import annotations

from fsdp_fuzz.judge.known_issues import fsdp1, fsdp2  # noqa: F401 - importing them registers their records
from fsdp_fuzz.judge.known_issues.registry import (
    KNOWN_ISSUES,
    KnownIssue,
    Predicate,
    Relation,
    Upstream,
    by_priority,
    issue_named,
    known_issue,
    markdown_table,
    triage,
)

__all__ = [
    "KNOWN_ISSUES",
    "KnownIssue",
    "Predicate",
    "Relation",
    "Upstream",
    "by_priority",
    "issue_named",
    "known_issue",
    "markdown_table",
    "triage",
]
