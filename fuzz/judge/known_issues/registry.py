"""The registry of known issues: what a record is (``KnownIssue``, its
``Upstream`` threads and how far each backs it, ``Relation``), how one is
registered (``@known_issue``), and how a failing case is matched to one
(``triage``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from fsdp_fuzz.data import Observations, Scenario, Violation
from fsdp_fuzz.features import NOTHING, Trigger, features_of

Predicate = Callable[[Scenario, Observations, tuple[Violation, ...]], bool]


class Relation(StrEnum):
    """How far a thread backs a record. Only ``SAME_BUG`` says the thread
    met this bug (the same trigger and the same failure, seen or diagnosed
    there); a hang or a warning that merely looks the same is
    ``SAME_SYMPTOM``, whatever its cause turned out to be, so that a reader
    filing upstream knows which threads to link as duplicates."""

    SAME_BUG = "same bug"
    SAME_SYMPTOM = "same symptom"
    BY_DESIGN = "by design"
    """Maintainers decided or documented the behaviour the record depends on."""
    RELATED = "related"
    """The same mechanism or code, another trigger or another failure."""


@dataclass(frozen=True)
class Upstream:
    """A thread where FSDP's maintainers or users met the issue."""

    thread: str
    """``owner/repo#number``."""
    seen: str
    """What the thread says, in its own words where they matter."""
    relation: Relation = Relation.RELATED
    """The weakest claim unless stated: a reference never overstates by default."""

    @property
    def url(self) -> str:
        repository, number = self.thread.split("#")
        return f"https://github.com/{repository}/issues/{number}"


@dataclass(frozen=True)
class KnownIssue:
    name: str
    priority: int
    description: str
    upstream: tuple[Upstream, ...]
    """Empty: searched for, none found."""
    matches: Predicate
    engines: tuple[str, ...]
    """The engines whose scenarios it can explain."""
    seen_on: tuple[str, ...] = ()
    """Torch releases (``2.13.0``, no build suffix) on which a replay of the
    corpus matched it (its ``corpus/known/`` reproducers, or another file):
    evidence, not a range. Empty means not replayed yet, and a test fails on
    that; ``docs/torch-versions.md`` holds the replays and how to rerun them."""
    fixed_in: str | None = None
    """The first replayed release on which its reproducers keep the
    contract. A reproducer that fails differently there is not fixed: the
    record stays open and ``versions_note`` says what changed."""
    versions_note: str = ""
    """What a replay on another release showed that the two fields cannot."""
    trigger: Trigger = NOTHING
    """The scenario features ``matches`` requires before it reads any
    observation: triage asks it first, and a campaign that has settled the
    record draws fewer swarms that meet it (``fsdp_fuzz.generate.swarm``)."""

    def explains(self, scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> bool:
        """Whether the record explains the case: its trigger, then its predicate."""
        return self.trigger.met_by(features_of(scenario)) and self.matches(scenario, observations, violations)

    @property
    def upstream_summary(self) -> str:
        return ", ".join(reference.thread for reference in self.upstream) or "none found"

    @property
    def versions_summary(self) -> str:
        """For the README's table and ``show``: ``seen on 2.13.0, 2.14.1``,
        ``seen on 2.13.0; fixed in 2.14.1``, and the note."""
        text = f"seen on {', '.join(self.seen_on)}" if self.seen_on else "not replayed yet"
        if self.fixed_in:
            text += f"; fixed in {self.fixed_in}"
        return f"{text} ({self.versions_note})" if self.versions_note else text


KNOWN_ISSUES: dict[str, KnownIssue] = {}


def known_issue(
    name: str,
    *,
    priority: int,
    description: str,
    upstream: tuple[Upstream, ...] = (),
    engines: tuple[str, ...] = ("fsdp1",),
    seen_on: tuple[str, ...] = (),
    fixed_in: str | None = None,
    versions_note: str = "",
    trigger: Trigger = NOTHING,
) -> Callable[[Predicate], Predicate]:
    """Register the decorated predicate as the record ``name``."""

    def register(predicate: Predicate) -> Predicate:
        if name in KNOWN_ISSUES or priority in {issue.priority for issue in KNOWN_ISSUES.values()}:
            raise ValueError(f"known issue {name!r}: name and priority must be unique")
        description_text = " ".join(description.split())
        KNOWN_ISSUES[name] = KnownIssue(
            name,
            priority,
            description_text,
            upstream,
            predicate,
            engines,
            seen_on,
            fixed_in,
            " ".join(versions_note.split()),
            trigger,
        )
        return predicate

    return register


def issue_named(name: str) -> KnownIssue:
    try:
        return KNOWN_ISSUES[name]
    except KeyError:
        raise KeyError(f"no known issue named {name!r}; known: {sorted(KNOWN_ISSUES)}") from None


def by_priority() -> list[KnownIssue]:
    return sorted(KNOWN_ISSUES.values(), key=lambda issue: issue.priority)


def triage(scenario: Scenario, observations: Observations, violations: tuple[Violation, ...]) -> KnownIssue | None:
    """The first record, by priority, that explains every violation; failing
    that, when each violation is explained by some record on its own (a
    shrunk case that hits two of them), the one that explains the first.
    A case without violations has nothing to explain."""
    if not violations:
        return None
    issues = [issue for issue in by_priority() if scenario.engine in issue.engines]
    for issue in issues:
        if issue.explains(scenario, observations, violations):
            return issue
    explaining = [
        next((issue for issue in issues if issue.explains(scenario, observations, (violation,))), None)
        for violation in violations
    ]
    return explaining[0] if explaining and all(explaining) else None


def markdown_table() -> str:
    """The README's table of known issues, by priority."""
    rows = ["| name | engines | what | upstream | torch |", "| --- | --- | --- | --- | --- |"]
    for issue in by_priority():
        threads = ", ".join(f"[{u.thread}]({u.url}) ({u.relation})" for u in issue.upstream) or "none found"
        rows.append(
            f"| `{issue.name}` | {', '.join(issue.engines)} | {issue.description} | {threads} "
            f"| {issue.versions_summary} |"
        )
    return "\n".join(rows)
