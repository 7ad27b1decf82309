"""Torch releases side by side: ``replay --json`` reports as tables.

The corpus is a regression suite across torch releases: replayed on two,
it says which known issue a release fixed, which it changed and which it
brought. ``docs/torch-versions.md`` holds the tables this module makes
from the reports under ``reports/`` (a test keeps them equal), and each
record's ``seen_on``/``fixed_in`` follow from the same reports::

    python -m fsdp_fuzz.versions reports/replay-torch-2.13.0.json reports/replay-torch-2.14.1.json

Reports are given oldest release first: "fixed in" is the first release
on which every reproducer of a record keeps the contract.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
from fsdp_fuzz.replay import CHANGED, FIXED, REPRODUCES

Report = dict[str, Any]


@dataclass(frozen=True)
class RecordVersions:
    """What the reports say about one known-issue record."""

    seen_on: tuple[str, ...]
    """Releases on which some replayed file matched the record."""
    fixed_in: str | None
    """The first release, after one that saw it, on which every file that
    recorded it kept the contract."""
    changed_on: tuple[str, ...]
    """Releases on which a file that recorded it failed some other way:
    not a fix, and not the record either."""


def load(path: Path) -> Report:
    return json.loads(path.read_text())


def release(report: Report) -> str:
    return report["torch_release"]


def summary(report: Report) -> str:
    """``torch 2.13.0: 83 of 85 files pass (cpu with gloo)``."""
    return (
        f"torch {release(report)}: {report['files_passed']} of {report['files_total']} files pass "
        f"({report['placement']['summary']})"
    )


def record_versions(reports: Sequence[Report]) -> dict[str, RecordVersions]:
    """Per record named by a replayed file (as recorded or as matched)."""
    names = sorted(
        {
            name
            for report in reports
            for f in report["files"]
            for name in (f["known_issue_recorded"], f["known_issue_matched"])
            if name
        }
    )
    versions: dict[str, RecordVersions] = {}
    for name in names:
        seen: list[str] = []
        changed: list[str] = []
        fixed_in = None
        for report in reports:
            reproducers = [f for f in report["files"] if f["known_issue_recorded"] == name]
            if any(f["known_issue_matched"] == name for f in report["files"]):
                seen.append(release(report))
            if any(f["status"] == CHANGED for f in reproducers):
                changed.append(release(report))
            if seen and fixed_in is None and reproducers and all(f["status"] == FIXED for f in reproducers):
                fixed_in = release(report)
        versions[name] = RecordVersions(tuple(seen), fixed_in, tuple(changed))
    return versions


def _verdict(record: dict[str, Any]) -> str:
    """One file's cell: the status, and what it matched when that is news."""
    status = record["status"]
    if status == CHANGED or (status != REPRODUCES and record["violations"]):
        matched = record["known_issue_matched"]
        if matched:
            return f"{status}: matches `{matched}`"
        clauses = sorted({violation["clause"] for violation in record["violations"]})
        return f"{status}: {', '.join(clauses)}"
    return status


def file_table(reports: Sequence[Report]) -> str:
    """Every replayed file, its verdict on each release, rows that differ marked."""
    heads = [release(report) for report in reports]
    rows = [
        f"| file | recorded | {' | '.join(heads)} | differs |",
        "| --- | --- | " + "--- | " * len(heads) + "--- |",
    ]
    by_path = [{f["path"]: f for f in report["files"]} for report in reports]
    paths = sorted({path for files in by_path for path in files})
    for path in paths:
        cells = [_verdict(files[path]) if path in files else "not replayed" for files in by_path]
        recorded = next(files[path] for files in by_path if path in files)
        what = f"`{recorded['known_issue_recorded']}`" if recorded["known_issue_recorded"] else recorded["recorded"]
        differs = "**yes**" if len(set(cells)) > 1 else ""
        rows.append(f"| `{path}` | {what} | {' | '.join(cells)} | {differs} |")
    return "\n".join(rows)


def record_table(reports: Sequence[Report]) -> str:
    """Every record the reports name: how its reproducers fared on each release."""
    heads = [release(report) for report in reports]
    rows = [
        f"| record | {' | '.join(heads)} | seen on | fixed in |",
        "| --- | " + "--- | " * len(heads) + "--- | --- |",
    ]
    for name, versions in record_versions(reports).items():
        cells = []
        for report in reports:
            reproducers = [f for f in report["files"] if f["known_issue_recorded"] == name]
            counts: dict[str, int] = {}
            for f in reproducers:
                counts[f["status"]] = counts.get(f["status"], 0) + 1
            cells.append(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no reproducer")
        seen = ", ".join(versions.seen_on) or "-"
        fixed = versions.fixed_in or (
            "-" if not versions.changed_on else f"not fixed: changed on {', '.join(versions.changed_on)}"
        )
        rows.append(f"| `{name}` | {' | '.join(cells)} | {seen} | {fixed} |")
    return "\n".join(rows)


def tables(reports: Sequence[Report]) -> str:
    """The block of ``docs/torch-versions.md`` between its markers."""
    lines = [f"- {summary(report)}, replayed {report['date']} in {report['seconds']:.0f} s" for report in reports]
    return "\n".join(
        [
            *lines,
            "",
            "### Per record",
            "",
            record_table(reports),
            "",
            "### Per file",
            "",
            file_table(reports),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    paths = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m fsdp_fuzz.versions REPORT.json [REPORT.json ...] (oldest release first)")
        return 2
    reports = [load(path) for path in paths]
    stale = sorted(set(record_versions(reports)) - set(KNOWN_ISSUES))
    if stale:
        print(f"reports name records that no longer exist: {', '.join(stale)}; replay again", file=sys.stderr)
    print(tables(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
