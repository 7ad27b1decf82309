"""Replaying a corpus entry: today's verdict against the one it recorded.

Each entry promises something (``fuzz.corpus``); replay says whether that
still holds, in words a maintainer can act on: a finding that no longer
reproduces is news (the known issue it backs can be retired), and one that
fails differently shows both failures.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fsdp_fuzz.corpus import CorpusEntry, signature
from fsdp_fuzz.data import Observations
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

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


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
    if entry.keeps_contract:
        if not violations:
            return ReplayResult(KEEPS_CONTRACT)
        return ReplayResult(BROKEN, explain(scenario, observations, violations, known))
    if not violations:
        retire = (
            f"retire known issue {entry.known_issue!r} in fuzz/judge/known_issues.py and this file"
            if entry.known_issue
            else "delete this file once the fix is confirmed upstream"
        )
        return ReplayResult(FIXED, f"{entry.path} no longer fails; {retire}")
    if entry.known_issue is not None:
        if known is not None and known.name == entry.known_issue:
            return ReplayResult(REPRODUCES, f"known issue {entry.known_issue}")
        today = f"known issue {known.name!r}" if known else "no known issue"
        return ReplayResult(
            CHANGED,
            f"{entry.path} recorded known issue {entry.known_issue!r}, today it matches {today}:\n"
            + explain(scenario, observations, violations),
        )
    recorded = entry.finding
    if signature(violations) == recorded.signature:
        return ReplayResult(REPRODUCES, "; ".join(recorded.violations))
    return ReplayResult(
        CHANGED,
        f"{entry.path} fails differently (recorded with torch {recorded.torch_version} on {recorded.backend}).\n"
        "recorded:\n" + "\n".join(f"  {line}" for line in recorded.violations) + "\ntoday:\n"
        f"{explain(scenario, observations, violations, known)}",
    )
