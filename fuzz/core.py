"""The campaign core both front ends call: the pytest targets
(``fuzz/conftest.py``, ``fuzz/test_generated.py``, ``fuzz/test_seed_family.py``)
and ``python -m fsdp_fuzz run`` (``fsdp_fuzz.cli``, ``fsdp_fuzz.workers``,
``fsdp_fuzz.campaign``), as HypoFuzz collects pytest targets.

- The targets, defined once (``TARGETS``): (target name, engine) to its
  strategy. ``run --target NAME --engine ENGINE`` looks one up; each pytest
  fuzz target is ``pytest_target(NAME, ENGINE)``.
- The checks before any rank starts (``check_before_ranks``) and the exit
  code of each refusal (``refusal_exit_code``): 3 for a torch that lacks a
  hook the trace relies on, 4 for a device that cannot run.
- Saving a finding (``keep_finding``): reduced first on the front end's
  own ranks (``fsdp_fuzz.reduce``), then the corpus file, the report's
  record of it, and the lines that name it and say how to replay it.
- The summary (``summary_lines``), which writes the JSON report too: each
  front end prints its lines, pytest in its terminal summary, the command
  on stdout.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fsdp_fuzz.corpus import save_finding
from fsdp_fuzz.data import ENGINES, Scenario
from fsdp_fuzz.execute.devices import WORLD_SIZES, DeviceError, DeviceRequest
from fsdp_fuzz.execute.protocol import HarnessError
from fsdp_fuzz.execute.trace import check_trace
from fsdp_fuzz.features import Trigger
from fsdp_fuzz.generate.seed_family import seed_family_scenarios
from fsdp_fuzz.generate.strategies import scenarios
from fsdp_fuzz.judge.known_issues import issue_named
from fsdp_fuzz.reduce.reducer import Runner, reduce
from fsdp_fuzz.report import Activity, CampaignReport, Ending, counts, time_spent
from fsdp_fuzz.verdict import Failure, judged_run

# The targets --------------------------------------------------------------------------------------

_FAMILIES: dict[str, Callable[[str, tuple[Trigger, ...]], st.SearchStrategy[Scenario]]] = {
    "generated": lambda engine, avoid: scenarios(engine=engine, avoid=avoid),
    "seed": lambda engine, avoid: seed_family_scenarios(engine=engine),
}
"""Each family's strategy for an engine, steered away from the triggers of
what a campaign has settled where the family draws swarms."""


@dataclass(frozen=True, order=True)
class Target:
    """One fuzz target: a family of scenarios under one engine."""

    family: str
    """What ``--target`` names: ``generated`` (the whole space) or ``seed`` (the seed test's model)."""
    engine: str

    @property
    def name(self) -> str:
        """The command's name for it in progress lines, summaries and reports: ``seed[fsdp2]``."""
        return f"{self.family}[{self.engine}]"

    @property
    def command(self) -> str:
        """The command that fuzzes it: what findings it saves record as ``found_by``."""
        return f"python -m fsdp_fuzz run --target {self.family} --engine {self.engine}"

    def strategy(self, avoid: tuple[Trigger, ...] = ()) -> st.SearchStrategy[Scenario]:
        return _FAMILIES[self.family](self.engine, avoid)


TARGETS: dict[tuple[str, str], Target] = {
    (family, engine): Target(family, engine) for family in _FAMILIES for engine in ENGINES
}
"""Every fuzz target, by (target name, engine): the pytest targets are these
(a test checks it), and ``run --target NAME --engine ENGINE`` looks them up."""

TARGET_NAMES: tuple[str, ...] = tuple(sorted(_FAMILIES))
"""What ``--target`` accepts."""


def target(family: str, engine: str) -> Target:
    try:
        return TARGETS[(family, engine)]
    except KeyError:
        raise ValueError(
            f"no fuzz target {family!r} for engine {engine!r}: targets {', '.join(TARGET_NAMES)}, "
            f"engines {', '.join(ENGINES)}"
        ) from None


def pytest_target(family: str, engine: str) -> Callable[..., None]:
    """The pytest fuzz target of ``TARGETS[(family, engine)]``: Hypothesis
    draws its scenarios, the session's ``pools`` run them and its
    ``contract`` judges them (fixtures of ``fuzz/conftest.py``). Assign it
    to a ``test_...`` name in a test module."""
    entry = target(family, engine)

    def fuzz_target(scenario: Scenario, pools, contract) -> None:
        contract(scenario, pools.run(scenario))

    fuzz_target.__name__ = fuzz_target.__qualname__ = f"fuzz_{family}_{engine}"
    # Every target has this same function: the name keeps their example databases apart.
    fuzz_target._hypothesis_internal_add_digest = f"pytest:{entry.name}".encode()
    test = given(scenario=entry.strategy())(fuzz_target)
    test.fuzz_target = entry
    return test


# Before any rank starts ---------------------------------------------------------------------------

REFUSAL_EXIT_CODES: dict[type[Exception], int] = {HarnessError: 3, DeviceError: 4}
"""The exit code of each refusal, for pytest and the command alike: 3 this
torch lacks a hook the collective trace needs, 4 the device or backend
cannot run the ranks."""


def check_before_ranks(request: DeviceRequest, world_sizes: tuple[int, ...] = WORLD_SIZES) -> None:
    """Refuse, before any rank starts, what could not run or observe: a
    placement that cannot run one of ``world_sizes`` (``DeviceError``), a
    torch that lacks a function an engine's trace wraps (``HarnessError``);
    the message names the problem and the fix."""
    request.check(world_sizes)
    for engine in ENGINES:
        check_trace(engine)


def refusal_exit_code(exc: BaseException) -> int | None:
    """``REFUSAL_EXIT_CODES``' code for ``exc``; None for anything else."""
    return next((code for kind, code in REFUSAL_EXIT_CODES.items() if isinstance(exc, kind)), None)


# Saving a finding ---------------------------------------------------------------------------------


REDUCE_S = 120.0
"""The most one finding's reduction may take in a campaign (and never past
its deadline): the reducer's share, beside Hypothesis's shrink."""


@dataclass(frozen=True)
class SavedFinding:
    """A finding a campaign saved (or found already saved) in the corpus."""

    path: Path
    new: bool
    failure_class: str
    """``FailureClass.name``: the known issue, or ``unknown: ...``."""
    fully_shrunk: bool = True
    shrink_s: float = 0.0
    """Hypothesis's shrink, this finding's share of it."""
    reduce_s: float | None = None
    """The reduction's seconds; None where it was not reduced (the deadline had come)."""
    reduced: bool = False
    """Whether the reducer reached a fixpoint (``Reduction.complete``)."""

    def headline(self) -> str:
        """The line that names it, when it is saved and in the summary."""
        where = "saved to" if self.new else "already in the corpus:"
        cut = "" if self.fully_shrunk else " (not fully shrunk: the deadline cut its shrink short)"
        if self.reduce_s is None:
            spent = f" (shrink {self.shrink_s:.1f} s, not reduced: the deadline had come)"
        else:
            cut = "" if self.reduced else ", cut short by its budget"
            spent = f" (shrink {self.shrink_s:.1f} s, reduce {self.reduce_s:.1f} s{cut})"
        return f"finding [{self.failure_class}] {where} {self.path}{cut}{spent}"

    def hints(self) -> list[str]:
        """How to replay, read and reproduce it."""
        root = self.path.parent.parent
        return [
            f"replay: python -m fsdp_fuzz replay {self.path}, "
            f"or pytest fuzz/test_corpus.py --corpus {root} -k {self.path.stem}",
            f"show: python -m fsdp_fuzz show {self.path}; reproducer: python -m fsdp_fuzz repro {self.path}",
        ]


def keep_finding(
    corpus: Path,
    failure: Failure,
    found_by: str,
    report: CampaignReport,
    target: str,
    fully_shrunk: bool = True,
    *,
    runner: Runner | None = None,
    reduce_by: float | None = None,
    shrink_s: float = 0.0,
) -> SavedFinding:
    """Save a shrunk failure under ``corpus/found/`` (once: a file already
    there is kept) and record it in the report under ``target``. With a
    ``runner`` (the front end's ranks) it is reduced first, for
    ``REDUCE_S`` at most and never past ``reduce_by`` (``time.monotonic``)."""
    scenario, run, reduction = failure.scenario, judged_run(failure.scenario, failure.observations), None
    if runner is not None:
        deadline = time.monotonic() + REDUCE_S
        reduced = reduce(
            failure.scenario,
            runner,
            failure_class=failure.failure_class.name,
            observations=failure.observations,
            deadline=deadline if reduce_by is None else min(deadline, reduce_by),
        )
        scenario, run, reduction = reduced.scenario, reduced.run, reduced.reduction
    path, new = save_finding(
        corpus, scenario, run.observations, run.violations, run.known, found_by, fully_shrunk, reduction
    )
    reduce_s = None if reduction is None else reduction.seconds
    report.record_saved(target, failure.failure_class, str(path), new, fully_shrunk, shrink_s, reduce_s or 0.0)
    reduced_fully = reduction is not None and reduction.complete
    return SavedFinding(path, new, failure.failure_class.name, fully_shrunk, shrink_s, reduce_s, reduced_fully)


# The summary --------------------------------------------------------------------------------------


@dataclass
class CampaignEnd:
    """Everything a campaign's summary says, from either front end."""

    report: CampaignReport | None
    """None where no fuzz target ran (pytest replaying the corpus only)."""
    request: DeviceRequest
    profile: str
    """The Hypothesis profile (pytest), or ``cli:TARGET`` (the command)."""
    wall_s: float
    findings: Sequence[SavedFinding] = ()
    strict: bool = False
    strict_option: str = "--strict"
    """The option that makes known issues fail, as this front end spells it."""
    workers: int | None = None
    """Worker processes (the command); None: the test session's own process,
    whose time is not charged to activities."""
    hypothesis_runs: int | None = None
    flaky: int = 0
    seconds: float | None = None
    """``--time``."""
    ends_within_s: float | None = None
    """The most a ``--time`` campaign may take, its allowance included."""
    database: str | None = None
    """The example database the campaign used, for what a cut-short shrink left there."""
    replays: Counter = field(default_factory=Counter)
    """Corpus files replayed, by status (pytest's ``fuzz/test_corpus.py``)."""
    report_path: Path | None = None
    """Where to write the JSON report, if anywhere."""
    log_path: Path | None = None
    """The ranks' output."""
    stopped_by: str | None = None
    """The signal that ended the campaign early."""
    failed_itself: bool = False
    """The fuzzer failed (a bug of its own, not a finding)."""


def summary_lines(end: CampaignEnd) -> list[str]:
    """The end-of-run summary, one string per line; writes the JSON report
    first where ``end.report_path`` asks for one."""
    lines: list[str] = []
    written = None
    if end.report is not None and end.report_path is not None:
        written = write_report(end, end.report, end.report_path)
    if end.replays:
        lines.append(f"corpus replay on {end.request.describe()}: {counts(end.replays)}")
    if end.report is not None:
        lines += _campaign_lines(end, end.report)
    if written is not None:
        lines.append(f"  report written to {written}")
    if end.log_path is not None:
        lines.append(f"  ranks' output: {end.log_path}")
    if end.stopped_by is not None:
        lines.append(f"  stopped by {end.stopped_by}")
    if end.failed_itself:
        lines.append("  the fuzzer itself failed (see above): a bug of the fuzzer's own, not an FSDP finding")
    return lines


def _campaign_lines(end: CampaignEnd, report: CampaignReport) -> list[str]:
    examples = sum(tally.examples for tally in report.targets.values())
    workers = "" if end.workers is None else f" on {end.workers} worker(s)"
    runs = "" if end.hypothesis_runs is None else f", {end.hypothesis_runs} Hypothesis run(s)"
    lines = [
        f"summary: {examples} scenarios in {end.wall_s:.1f} s ({_rate(examples, end.wall_s)}/s){workers}{runs}"
        + (f", {end.flaky} dropped as flaky" if end.flaky else "")
        + f", on {end.request.describe()}, profile {end.profile}"
    ]
    if examples == 0 and end.seconds is not None and end.stopped_by is None and not end.failed_itself:
        lines.append(
            f"  no scenario ran: the --time budget of {end.seconds:g} s was spent starting the workers and their "
            f"ranks ({end.wall_s:.1f} s in all); give --time 30s or more"
        )
    if end.workers is not None:
        spent = time_spent(report, end.workers)
        within = (
            ""
            if end.seconds is None or end.ends_within_s is None
            else f" (--time {end.seconds:.0f} s plus a tenth: {end.ends_within_s:.0f} s)"
        )
        lines.append(
            f"  time{within}, in seconds{' summed over workers' if end.workers > 1 else ''}: "
            + ", ".join(f"{activity.value} {spent[activity.value]:.1f}" for activity in Activity)
            + " (other: starting workers and pools, saving findings, ending)"
        )
    not_failed = "" if end.strict else f" (counted, not failed; {end.strict_option} fails them)"
    for name, tally in report.targets.items():
        lines.append(
            f"  {name}: {tally.examples} scenarios in {tally.wall_s:.1f} s ({_rate(tally.examples, tally.wall_s)}/s); "
            f"steps: {counts(tally.outcomes) or 'none'}"
        )
        lines.append("    violated clauses (known issues included): " + (counts(tally.clauses) or "none"))
        if tally.endings:
            ended = sum(tally.endings.values())
            lines.append(
                "    scenarios ending: "
                + ", ".join(f"{ending.value} {tally.endings[ending.value] / ended:.0%}" for ending in Ending)
                + " (settled: in a class the campaign had settled before)"
            )
        if tally.seconds:
            spent = ", ".join(f"{activity.value} {tally.seconds[activity.value]:.1f} s" for activity in Activity)
            lines.append(f"    time: {spent}")
        if tally.replayed_findings:
            lines.append(f"    findings replayed from the shared database: {tally.replayed_findings} run(s)")
        if tally.first_seen:
            lines.append("    classes, by time to the first run (then to the saved, shrunk finding):")
        for class_name, first in sorted(tally.first_seen.items(), key=lambda item: item[1]["seconds"]):
            saved = tally.saved.get(class_name)
            when = f"saved at {saved['seconds']:.0f} s" if saved else "not saved"
            when += "" if saved is None or saved.get("fully_shrunk", True) else ", not fully shrunk"
            lines.append(
                f"      {first['seconds']:6.1f} s (scenario {first['scenarios']}): {class_name}; "
                f"{tally.classes[class_name]} run(s); {when}"
            )
        for issue, count in tally.known_issues.most_common():
            lines.append(
                f"    known issue {issue}: {count} run(s){not_failed}; upstream: {issue_named(issue).upstream_summary}"
            )
        if tally.finding is not None:
            lines.append(f"    FINDING: {'; '.join(tally.finding['violations'])}")
    if not any(tally.known_issues for tally in report.targets.values()):
        lines.append("  known issues matched: none")
    for saved in end.findings:
        lines.append(f"  {saved.headline()}")
        lines += [f"    {hint}" for hint in saved.hints()]
    if not end.findings:
        lines.append("  findings saved: none")
    unfinished = [saved for saved in end.findings if not saved.fully_shrunk]
    if unfinished:
        kept = (
            f"Hypothesis's database ({end.database}) keeps their progress: a later run with it shrinks them further"
            if end.database not in (None, "none")
            else "with --database none their progress is lost: a later run shrinks them again from the start"
        )
        lines.append(
            f"  {len(unfinished)} finding(s) saved as they stood, not fully shrunk: the deadline cut their "
            f"shrink short; their classes stay unsettled, and {kept}"
        )
    return lines


def _rate(examples: int, seconds: float) -> str:
    return f"{examples / seconds if seconds else 0:.1f}"


def write_report(end: CampaignEnd, report: CampaignReport, path: Path) -> Path:
    """The JSON report (``CampaignReport.to_json``) at ``path``,
    with the backends the ranks used, where the time went (workers'
    campaigns) and the findings whose shrink the deadline cut short."""
    backends = ",".join(sorted(set(end.request.backends().values())))
    document = report.to_json(end.profile, backends, placement=end.request.to_json())
    if end.workers is not None:
        document["time"] = time_spent(report, end.workers)
    document["not_fully_shrunk"] = [str(saved.path) for saved in end.findings if not saved.fully_shrunk]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path
