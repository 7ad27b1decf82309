"""Replaying a corpus entry: today's verdict against the one it recorded.

Each entry promises something (``fuzz.corpus``); replay says whether that
still holds, in words a maintainer can act on: a finding that no longer
reproduces is news (the known issue it backs can be retired), and one that
fails differently shows both failures.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fsdp_fuzz.corpus import CorpusEntry, signature
from fsdp_fuzz.data import Observations, Violation
from fsdp_fuzz.judge.known_issues import triage
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.verdict import explain

KEEPS_CONTRACT = "keeps the contract"
REPRODUCES = "still reproduces"
FIXED = "FIXED"
CHANGED = "CHANGED"
BROKEN = "BREAKS THE CONTRACT"

PASSING = (KEEPS_CONTRACT, REPRODUCES)


@dataclass(frozen=True)
class ReplayResult:
    status: str
    detail: str = ""
    violations: tuple[Violation, ...] = ()
    """Today's violations: empty when FSDP kept the contract."""
    matched: str | None = None
    """The known issue that explains today's violations, if one does: the
    status says whether it is the one the file recorded."""

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def torch_release(version: str = torch.__version__) -> str:
    """``2.14.1`` for ``2.14.1+cu130``: the release a known-issue record
    names. The build's local part (CPU, CUDA) is left out: FSDP is the
    same Python in both, and the corpus runs on CPU ranks either way."""
    return str(version).split("+", 1)[0]


@dataclass
class ReplayReport:
    """What ``replay --json`` writes: per file, what it recorded and what it
    did today, on which torch and placement. One replay of the corpus is
    one column of a regression suite across torch releases; two side by
    side (``fsdp_fuzz.versions``) say which known issue a release fixed
    and which it brought."""

    placement: dict[str, Any]
    """``DeviceRequest.to_json``, with ``describe``'s line as ``summary``."""
    files: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, path: Path, entry: CorpusEntry | None, result: ReplayResult, seconds: float) -> None:
        """One file's verdict; ``entry`` None for a file that did not load."""
        self.files.append(
            {
                "path": path.as_posix(),
                "recorded": _recorded(entry),
                "known_issue_recorded": entry.known_issue if entry else None,
                "status": result.status,
                "passed": result.passed,
                "clean": entry is not None and not result.violations,
                "known_issue_matched": result.matched,
                "violations": [_violation_json(violation) for violation in result.violations],
                "detail": "" if result.passed else result.detail,
                "seconds": round(seconds, 3),
            }
        )

    def to_json(self) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for record in self.files:
            statuses[record["status"]] = statuses.get(record["status"], 0) + 1
        return {
            "torch": str(torch.__version__),
            "torch_release": torch_release(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime(self.started)),
            "placement": self.placement,
            "files_passed": sum(record["passed"] for record in self.files),
            "files_total": len(self.files),
            "statuses": statuses,
            "seconds": round(sum(record["seconds"] for record in self.files), 1),
            "files": self.files,
        }

    def write(self, path: Path) -> None:
        """Replace ``path`` whole (a temporary file renamed over it), so that a
        replay stopped part-way leaves the files it finished, never half a
        JSON document."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        partial.replace(path)


def _recorded(entry: CorpusEntry | None) -> str:
    if entry is None:
        return "malformed"
    if entry.keeps_contract:
        return "keeps the contract"
    return "known issue" if entry.known_issue is not None else "finding"


def _violation_json(violation: Violation) -> dict[str, Any]:
    return {
        "clause": violation.clause.value,
        "kind": violation.kind.value,
        "rank": violation.rank,
        "step": violation.step,
        "message": violation.message,
    }


def ranks_log(root: Path) -> Path:
    """A fresh ``root/replay-<date>-<pid>/ranks.log`` for one replay's ranks.

    The ranks print what FSDP prints: an assertion's text and the stack of
    the rank that hit it, through the pool's fork-server frames. On the
    terminal that reads as the fuzzer crashing, and for a known issue it is
    the expected outcome; in a file named at the start and in the summary,
    as ``run`` names its campaign's, it is there for whoever wants it.
    """
    directory = root / time.strftime(f"replay-%Y%m%d-%H%M%S-{os.getpid()}")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "ranks.log"


def replay_result(entry: CorpusEntry, observations: Observations) -> ReplayResult:
    scenario = entry.scenario
    violations = judge(scenario, observations)
    known = triage(scenario, observations, violations) if violations else None

    def result(status: str, detail: str = "") -> ReplayResult:
        return ReplayResult(status, detail, violations, known.name if known else None)

    if entry.keeps_contract:
        if not violations:
            return result(KEEPS_CONTRACT)
        return result(BROKEN, explain(scenario, observations, violations, known))
    if not violations:
        retire = (
            f"retire known issue {entry.known_issue!r} in fuzz/judge/known_issues/ and this file"
            if entry.known_issue
            else "delete this file once the fix is confirmed upstream"
        )
        return result(FIXED, f"{entry.path} no longer fails; {retire}")
    if entry.known_issue is not None:
        if known is not None and known.name == entry.known_issue:
            return result(REPRODUCES, f"known issue {entry.known_issue}")
        today = f"known issue {known.name!r}" if known else "no known issue"
        return result(
            CHANGED,
            f"{entry.path} recorded known issue {entry.known_issue!r}, today it matches {today}:\n"
            + explain(scenario, observations, violations),
        )
    recorded = entry.finding
    if signature(violations) == recorded.signature:
        return result(REPRODUCES, "; ".join(recorded.violations))
    return result(
        CHANGED,
        f"{entry.path} fails differently (recorded with torch {recorded.torch_version} on {recorded.backend}).\n"
        "recorded:\n" + "\n".join(f"  {line}" for line in recorded.violations) + "\ntoday:\n"
        f"{explain(scenario, observations, violations, known)}",
    )
