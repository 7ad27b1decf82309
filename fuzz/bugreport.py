"""Bug reports a PyTorch maintainer files as they are: a corpus file as PyTorch's bug-report template.

This module owns the report: its title (``TITLES``, one per known-issue record,
prefixed by the engine: ``[FSDP]`` or ``[FSDP2]``), what happens (from the
record's description, or for an unknown finding from its violations), the
reproducer (``fsdp_fuzz.repro.reproducer_script``) with what it printed when
run in a clean interpreter (``python -I``, captured, never described), expected
against actual (the contract's clauses the case breaks, from the recorded
finding or the fuzzer's own replay), what avoids it (``entry.reduction``, only
where one was measured), the related upstream threads with their relation, and
``python -m torch.utils.collect_env`` of the interpreter that ran the script.
The template (``.github/ISSUE_TEMPLATE/bug-report.yml`` of pytorch/pytorch) has
two fields, "🐛 Describe the bug" and "Versions"; the report is Markdown with
those two headings.

It also picks the records to report (``records_without_same_bug_thread``: no
upstream thread is the same bug, so none is known upstream) with the smallest
``corpus/known/`` file that backs each, and writes them (``write_findings``):

    python -m fsdp_fuzz.bugreport FILE [-o report.md] [--python PY ...]
    python -m fsdp_fuzz.bugreport --all docs/findings [--python PY ...] [--record NAME ...]

``--python`` (repeatable; default: this interpreter) names the interpreters
that run the reproducer, e.g. ``.tox/torch-2.14.1/bin/python`` for another
torch; each report records on which torch versions it reproduced. The command
line's ``report`` subcommand calls ``main_report``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fsdp_fuzz.corpus import CorpusEntry, corpus_files, load_entry
from fsdp_fuzz.data import Clause, ScenarioError, Violation, scenario_to_json
from fsdp_fuzz.judge.known_issues import KnownIssue, Relation, by_priority, issue_named
from fsdp_fuzz.reduce.record import CLEAN, Reduction

RUN_TIMEOUT_S = 300.0
"""Seconds a reproducer may run: the script ends itself within 120 s + 3 x its 10 s collective timeout."""
ENV_TIMEOUT_S = 180.0
"""Seconds ``python -m torch.utils.collect_env`` may take."""
REPRODUCED = 1
"""The reproducer's exit code when FSDP breaks its promise (0: kept, 3: the script itself failed)."""
OUTPUT_HEAD, OUTPUT_TAIL, LINE_LIMIT = 20, 80, 1000
"""Captured output longer than head + tail lines keeps those (the tail from the last traceback where it fits)."""
SHOWN_VIOLATIONS = 6
"""Violations shown per clause; the rest are counted."""
DEFAULT_CORPUS = Path("corpus")
PREFIXES = {"fsdp1": "FSDP", "fsdp2": "FSDP2"}
"""Title prefix per engine, as FSDP's issues are tagged upstream."""
SENTENCES_SHOWN = 3

EXPECTED = {
    Clause.FIRST_ITERATION: "at TORCH_DISTRIBUTED_DEBUG=DETAIL, when the ranks' first-iteration forward orders differ, "
    "every rank raises RuntimeError('Forward order differs across ranks ...') in the step that holds the divergence, "
    "and nothing hangs.",
    Clause.LATER_ITERATION: "a rank whose forward order in a later iteration differs from its first iteration's gets "
    "one UserWarning ('Forward order differs from that of the first iteration on rank R ...') naming itself, in its "
    "first deviating iteration and in no other; a rank that does not deviate is not warned.",
    Clause.EVAL_SILENCE: "eval-mode steps raise no forward-order error or warning.",
    Clause.CLEAN_RUN: "every step the above does not concern succeeds: no error, no hang, no crash.",
    Clause.REFERENCE: "where every rank keeps one forward order (FSDP2: runs the same program), each rank's outputs "
    "and the ranks' averaged gradients match a single-process run of the same model on the same batches without FSDP.",
    Clause.SILENT_MISMATCH: "the k-th collective of every rank serves the same FSDP unit, unless FSDP raised or warned "
    "about the order first: collectives of different units never pair silently.",
    Clause.REPLICAS: "ranks that hold the same shards hold the same parameters after each step.",
    Clause.REFUSAL: "where FSDP documents an error for what the program does, that error comes.",
}
"""What each clause of the fuzzer's contract expects of FSDP, worded for the report."""

TITLES = {
    "fsdp2-assumes-the-same-program": "Ranks that run different forward paths get no error: collectives of different "
    "units pair, hang or give wrong results",
    "eval-order-unchecked": "Forward order is not checked in eval mode: ranks on different eval paths pair all-gathers "
    "of different units silently",
    "unchecked-after-deviation": "After the forward-order warning nothing is checked: ranks whose later orders differ "
    "hang or pair collectives silently",
    "refreeze-after-forward-without-backward": "Freezing a unit after a forward without backward fails the next "
    "backward with 'Invalid: _post_backward_hook_state'",
    "hybrid-order-check-intra-node-only": "HYBRID_SHARD checks the first-iteration forward order within each node "
    "only: nodes that diverge get no error",
    "later-check-ignores-repeats": "Forward-order check warns about an unchanged schedule when a unit runs more than "
    "once per iteration",
    "later-check-misses-dropped-units": "No forward-order warning when a later iteration leaves units out at the end",
    "first-iteration-order-ends-early": "First-iteration order check hangs or crashes instead of raising when one rank "
    "uses fewer units",
    "refreeze-hits-unsharded-views": "use_orig_params=True, SHARD_GRAD_OP: setting requires_grad after an eval "
    "forward raises 'you can only change requires_grad flags of leaf variables'",
    "order-unchecked-below-detail": "Below TORCH_DISTRIBUTED_DEBUG=DETAIL, ranks with different forward orders pair "
    "collectives of different units silently",
    "order-error-key-error-with-orig-params": "use_orig_params=True: a first-iteration order divergence raises "
    "KeyError(FlatParameter) instead of 'Forward order differs across ranks'",
    "hybrid-warning-names-intra-node-rank": "HYBRID_SHARD: the forward-order warning names the rank within its node, "
    "not the global rank",
    "backward-on-some-ranks-only": "A backward skipped on some ranks only hangs or pairs collectives silently, with no "
    "error naming the cause",
    "forward-on-some-ranks-only": "A forward skipped on some ranks after the first iteration hangs the others' "
    "all-gathers, with no warning",
    "refreeze-drops-accumulated-grads-with-orig-params": "use_orig_params=True: requires_grad=False between two "
    "accumulating backwards drops the accumulated gradient",
    "frozen-unit-backward-state-error-with-orig-params": "use_orig_params=True: a backward through a unit whose "
    "parameters are all frozen fails with 'expected to be in states [TrainingState.IDLE]'",
    "optimizer-step-before-backward-uses-stale-params": "An optimizer step after a forward without backward is lost: "
    "the root computes with stale unsharded parameters",
    "fsdp2-reshard-after-backward-off-loses-the-optimizer-step": "set_reshard_after_backward(False): the optimizer "
    "step is silently lost and module.parameters() holds no gradients",
    "fsdp2-optimizer-step-after-forward-uses-stale-params": "An optimizer step after a forward without backward is "
    "lost: the root computes with its stale unsharded parameters",
    "fsdp2-requires-grad-change-while-unsharded-loses-gradients": "requires_grad=True set while a unit is unsharded "
    "gives those parameters no reduced gradient, silently",
    "eval-forwards-recorded-in-first-iteration-order": "Eval forwards before the first backward enter the recorded "
    "forward order: an unchanged training schedule is warned about",
    "eval-backward-ends-first-iteration": "A backward through eval-mode forwards ends the first iteration: a later "
    "divergence is warned about and hangs instead of raising",
    "unit-without-gradient-skips-reduce-scatter": "A unit whose forward uses none of its parameters on some ranks "
    "skips its reduce-scatter there: crash, hang or silent pairing",
    "rank-dependent-freeze-drops-grads-with-orig-params": "use_orig_params=True: ranks that freeze different "
    "parameters of a unit silently lose gradients, depending on the sharding layout",
    "reentrant-checkpoint-recompute-after-reshard": "Reentrant checkpoint inside a unit, run twice before one "
    "backward: the recompute runs on freed parameters ('setStorage ... out of bounds')",
    "mixed-precision-reentrant-checkpoint-around-a-unit-loses-gradients": "MixedPrecision with a reentrant "
    "checkpoint around a nested unit, run twice before one backward: silently wrong gradients",
    "fsdp1-tie-across-units": "Parameters tied across units are not refused: the tie silently comes apart, or with "
    "use_orig_params 'mat2 must be a matrix'",
    "fsdp2-method-before-forward-makes-a-unit-root": "An unregistered method called before the first forward makes a "
    "nested unit root: the next forward fails",
    "mixed-precision-eval-forward-first-skips-gradient-reduction": "MixedPrecision: an eval forward with grad before "
    "the first backward leaves the gradients unreduced, silently",
    "fsdp2-reentrant-checkpoint-around-a-unit-loses-gradients": "Reentrant checkpoint around a nested unit, run twice "
    "before one backward: silently wrong gradients",
    "fsdp2-explicit-unshard-breaks-checkpoint-recompute": "An explicit unshard() before a forward through a "
    "non-reentrant checkpoint fails the recompute with CheckpointError",
    "fsdp2-mixed-precision-unit-frozen-at-first-forward": "MixedPrecisionPolicy: a unit frozen at the first forward "
    "fails the backward after it is unfrozen (grad_dtype Float)",
    "fsdp2-reset-iter-state-before-first-forward": "reset_iter_state() before the first forward raises "
    "AttributeError: 'FSDPCommContext' object has no attribute 'all_gather_state'",
    "fsdp2-hsdp-partial-reduction-dropped-by-freezing": "HSDP with set_requires_all_reduce(False): freezing a block "
    "during accumulation silently drops its partial gradients",
    "no-sync-unit-unused-by-the-synced-backward": "no_sync(): a unit used inside no_sync but not by the synced "
    "backward fails with 'should use `_saved_grad_shard`'",
    "fsdp2-hsdp-partial-reduction-split-by-reentrant-checkpoint": "HSDP with set_requires_all_reduce(False) and a "
    "reentrant checkpoint, two forwards per backward: size mismatch in the backward",
    "checkpoint-recompute-recorded-in-first-iteration-order": "A checkpointed block holding a nested unit: the "
    "recompute enters the first iteration's order, so the second iteration is warned about",
    "no-shard-unit-without-gradient-keeps-tensor-views-with-orig-params": "NO_SHARD with use_orig_params=True: a unit "
    "entered without using its parameters keeps plain tensor views; later gradients silently wrong",
}
"""A title per known-issue record, the engine's prefix left out; a record without one is titled from its
description."""


@dataclass(frozen=True)
class ScriptRun:
    """One run of the reproducer in a clean interpreter: what it printed (stdout and stderr together)."""

    torch_version: str
    """The interpreter's ``torch.__version__``."""
    exit_code: int | None
    """None: killed after ``timeout_s``."""
    output: str
    seconds: float
    timeout_s: float = RUN_TIMEOUT_S

    @property
    def reproduced(self) -> bool:
        return self.exit_code == REPRODUCED

    @property
    def verdict(self) -> str:
        if self.exit_code is None:
            return f"killed after {self.timeout_s:.0f} s"
        return {REPRODUCED: "reproduces (exit code 1)", 0: "does not reproduce (exit code 0)"}.get(
            self.exit_code, f"neither verdict (exit code {self.exit_code})"
        )


@dataclass(frozen=True)
class Verdict:
    """The clauses the case breaks, and where that verdict comes from."""

    source: str
    """``the verdict recorded with the finding ...``, ``the fuzzer's replay ...``."""
    violations: tuple[tuple[Clause, str], ...]
    """Each violation's clause and its words (``str(Violation)``)."""

    @classmethod
    def of(cls, source: str, violations: Iterable[Violation]) -> Verdict:
        return cls(source, tuple((violation.clause, str(violation)) for violation in violations))


class UnknownRecords(ValueError):
    """Records named for ``write_findings`` that are not among those it writes."""


class InterpreterProblem(RuntimeError):
    """An interpreter given to run the reproducer that cannot import torch (or does not exist)."""


@dataclass(frozen=True)
class Candidate:
    """A record that no upstream thread reports as the same bug, with the corpus files that back it."""

    record: KnownIssue
    files: tuple[Path, ...]
    """Smallest scenario first."""

    @property
    def representative(self) -> Path | None:
        return self.files[0] if self.files else None


# Choosing what to report ----------------------------------------------------


def has_same_bug_thread(record: KnownIssue) -> bool:
    return any(reference.relation is Relation.SAME_BUG for reference in record.upstream)


def scenario_size(entry: CorpusEntry) -> int:
    """How big a scenario is: the length of its JSON without description (the smallest is the representative)."""
    encoded = scenario_to_json(entry.scenario)
    encoded.pop("description", None)
    return len(json.dumps(encoded, sort_keys=True, separators=(",", ":")))


def records_without_same_bug_thread(corpus: Path = DEFAULT_CORPUS) -> list[Candidate]:
    """The records whose upstream threads include none of ``Relation.SAME_BUG``, by priority, each with the
    ``known/`` files of ``corpus`` that back it, smallest scenario first."""
    backing: dict[str, list[tuple[int, str, Path]]] = {}
    for path in corpus_files(Path(corpus) / "known"):
        entry = load_entry(path)
        if entry.known_issue is not None:
            backing.setdefault(entry.known_issue, []).append((scenario_size(entry), path.name, path))
    return [
        Candidate(record, tuple(path for _, _, path in sorted(backing.get(record.name, []))))
        for record in by_priority()
        if not has_same_bug_thread(record)
    ]


# Running things in another interpreter --------------------------------------


def absolute(python: str) -> str:
    """An interpreter given by a path (``.tox/py/bin/python``) as an absolute one; a bare name stays a name."""
    return os.path.abspath(python) if os.sep in python else python


@functools.cache
def torch_version_of(python: str) -> str:
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            timeout=ENV_TIMEOUT_S,
        )
    except OSError as exc:
        raise InterpreterProblem(f"cannot run {python}: {exc.strerror}") from None
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise InterpreterProblem(f"{python} cannot import torch: {last[0]}")
    return done.stdout.strip().splitlines()[-1]


@functools.cache
def collect_env(python: str, timeout_s: float = ENV_TIMEOUT_S) -> str:
    """What ``python -m torch.utils.collect_env`` prints with ``python``, as the template asks."""
    done = subprocess.run(
        [python, "-I", "-m", "torch.utils.collect_env"], capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        return f"{done.stdout}\n(collect_env exited {done.returncode})\n{trim_output(done.stderr)}".strip()
    return done.stdout.strip()


def run_reproducer(script: str, python: str = sys.executable, timeout_s: float = RUN_TIMEOUT_S) -> ScriptRun:
    """Run ``script`` as ``python -I repro.py`` in a fresh temporary directory; capture stdout and stderr
    together. A run past ``timeout_s`` is killed with every process it started (its own session)."""
    python = absolute(python)  # the run's directory is another
    version = torch_version_of(python)
    with tempfile.TemporaryDirectory(prefix="fsdp-fuzz-report-") as directory:
        script_path = Path(directory) / "repro.py"
        script_path.write_text(script)
        started = time.monotonic()
        process = subprocess.Popen(
            [python, "-I", script_path.name],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout_s)
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            code = None
        seconds = time.monotonic() - started
        for prefix in {directory, os.path.realpath(directory)}:
            output = output.replace(prefix + os.sep, "")
    return ScriptRun(version, code, output, seconds, timeout_s)


def trim_output(text: str, head: int = OUTPUT_HEAD, tail: int = OUTPUT_TAIL) -> str:
    """``text`` as shown: long lines cut, and past head + tail lines the head and the tail, the tail starting
    at the last traceback where that keeps it within twice the tail. What was cut is said where it was."""
    lines = [
        line if len(line) <= LINE_LIMIT else f"{line[:LINE_LIMIT]} [... {len(line) - LINE_LIMIT} characters cut]"
        for line in text.rstrip().splitlines()
    ]
    if len(lines) <= head + tail + 1:
        return "\n".join(lines)
    start = len(lines) - tail
    tracebacks = [index for index, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tracebacks and head <= tracebacks[-1] < start and len(lines) - tracebacks[-1] <= 2 * tail:
        start = tracebacks[-1]
    return "\n".join([*lines[:head], f"[... {start - head} lines cut ...]", *lines[start:]])


# Where the verdict comes from -----------------------------------------------


def verdict_of(entry: CorpusEntry) -> Verdict:
    """The recorded finding's violations where the file has one; otherwise the fuzzer replays the scenario on
    fresh CPU ranks with this process's torch and judges it."""
    if entry.finding is not None:
        finding = entry.finding
        clauses = [clause for clause, _, _ in finding.signature]
        return Verdict(
            f"the verdict recorded with the finding (torch {finding.torch_version}, {finding.where()})",
            tuple(zip(clauses, finding.violations, strict=True)),
        )
    import torch

    from fsdp_fuzz.execute.spawn import run_scenario
    from fsdp_fuzz.judge.oracles import judge

    observations = run_scenario(entry.scenario)
    source = f"the fuzzer's replay of the same scenario on torch {torch.__version__} (CPU ranks, gloo)"
    return Verdict.of(source, judge(entry.scenario, observations))


# Markdown pieces --------------------------------------------------------------


def fenced(text: str, info: str = "") -> list[str]:
    """A code block whose fence is longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text.rstrip("\n"), fence]


def prose(text: str) -> str:
    """``text`` safe in Markdown prose: ``<`` outside code spans is escaped, so ``<unit>`` is not read as HTML."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(part if part.startswith("`") else part.replace("<", "&lt;") for part in parts)


def details(summary: str, body: list[str]) -> list[str]:
    return ["<details>", f"<summary>{prose(summary)}</summary>", "", *body, "", "</details>"]


def sentences(text: str) -> list[str]:
    """``text`` split at sentence ends (not after ``e.g.`` or ``i.e.``)."""
    return [part for part in re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z(])", text.strip()) if part]


def shortened(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: text.rfind(" ", 0, limit)].rstrip(",:;") + " ..."


def _words(violation: str) -> str:
    """A violation's words without its ``[clause] rank R, step S:`` head."""
    return re.sub(r"^\[[^\]]*\] rank \d+, (step \d+|setup): ", "", violation)


def title(entry: CorpusEntry, verdict: Verdict | None = None) -> str:
    """``[FSDP] ...`` or ``[FSDP2] ...``: the record's title, else its description's first sentence, else
    (an unknown finding) its first violation."""
    engine = entry.scenario.runs_on
    prefix = f"[{PREFIXES.get(engine.name, engine.name.upper())}]"
    if entry.known_issue is not None:
        record = issue_named(entry.known_issue)
        text = TITLES.get(record.name) or shortened(sentences(record.description)[0].rstrip("."))
    elif verdict is not None and verdict.violations:
        text = shortened(_words(verdict.violations[0][1]))
    else:
        text = f"{engine.api}: {shortened(entry.scenario.description) or 'a case from the fuzzer'}"
    return f"{prefix} {text}"


def what_happens(entry: CorpusEntry, verdict: Verdict | None) -> list[str]:
    """Two or three sentences: the record's (its provenance left out), or what the unknown finding breaks."""
    if entry.known_issue is not None:
        record = issue_named(entry.known_issue)
        told = [sentence for sentence in sentences(record.description) if not sentence.startswith("Found ")]
        lines = [prose(" ".join(told[:SENTENCES_SHOWN]))]
        if len(told) > SENTENCES_SHOWN:
            lines += ["", *details("More on what happens, and when it does not", [prose(record.description)])]
        return lines
    if verdict is None or not verdict.violations:
        return [prose(entry.scenario.description or "The case below was found by the fuzzer.")]
    clauses = list(dict.fromkeys(clause for clause, _ in verdict.violations))
    broken = ", ".join(f"'{clause.sentence}'" for clause in clauses)
    engine = entry.scenario.runs_on
    first = _words(verdict.violations[0][1])
    return [
        prose(
            f"A {engine.api} program that the fuzzer generated and shrank breaks what FSDP promises for it "
            f"({broken}); no known issue explains it. First: {first}"
        )
    ]


def reproducer_section(script: str, runs: Sequence[ScriptRun]) -> list[str]:
    lines = [
        "Self-contained: it needs only torch and starts its own ranks (CPU, gloo). Run it with `python repro.py`.",
        "",
        *fenced(script, "python"),
        "",
    ]
    for index, run in enumerate(runs):
        ended = "killed at the timeout" if run.exit_code is None else f"exit code {run.exit_code}"
        heading = f"Output of `python -I repro.py` on torch {run.torch_version} ({ended}, {run.seconds:.0f} s):"
        block = fenced(trim_output(run.output) or "(no output)")
        lines += [heading, "", *block, ""] if index == 0 else [*details(heading, block), ""]
    if len(runs) > 1:
        lines.append(
            "Reproduced on: " + "; ".join(f"torch {run.torch_version}: {run.verdict}" for run in runs) + ".",
        )
    return lines


def expected_section(verdict: Verdict | None) -> list[str]:
    if verdict is None:
        return ["Not judged: the case was neither recorded with a verdict nor replayed by the fuzzer."]
    if not verdict.violations:
        return [prose(f"No clause of FSDP's contract is broken in {verdict.source}.")]
    lines = [prose(f"From {verdict.source}:"), ""]
    for clause in dict.fromkeys(clause for clause, _ in verdict.violations):
        words = [text for broken, text in verdict.violations if broken is clause]
        shown = words[:SHOWN_VIOLATIONS] + (
            [f"... and {len(words) - SHOWN_VIOLATIONS} more"] if len(words) > SHOWN_VIOLATIONS else []
        )
        lines += [f"**Expected** ({clause.sentence}): {EXPECTED[clause]}", "", "**Actual**:", ""]
        lines += [*fenced("\n".join(shown)), ""]
    return lines[:-1]


def avoids_section(reduction: Reduction | None) -> list[str]:
    """From the reducer's measurements only; without them, says so."""
    if reduction is None:
        return [
            "No reduction was measured for this case: which of its parts the failure needs, and which one-step "
            "change avoids it, is not known beyond the description above."
        ]
    needs = [flip for flip in reduction.needs() if not flip.outcome.startswith("invalid")]
    avoiding = [flip for flip in needs if flip.outcome == CLEAN]
    changing = [flip for flip in needs if flip.outcome != CLEAN]
    lines = [
        f"Measured by the fuzzer's reducer on the case in the script ({reduction.runs} live runs, "
        f"{reduction.seconds:.0f} s), each change made alone:",
    ]
    if avoiding:
        lines += ["", "Avoids it (the run then keeps FSDP's contract):", ""]
        lines += [f"- {prose(flip.change)}" for flip in avoiding]
    if changing:
        lines += ["", f"Turns it into another failure (not {reduction.failure_class}):", ""]
        lines += [f"- {prose(flip.change)}: {prose(flip.outcome)}" for flip in changing]
    if not needs:
        lines += ["", "No one-step change loses it."]
    if not reduction.complete:
        lines += ["", "The reduction's budget ended before a fixpoint: the case may simplify further."]
    if reduction.removed:
        lines += ["", "Does not need (removed while the failure stayed the same):", ""]
        lines += [f"- {prose(change)}" for change in reduction.removed]
    return lines


def upstream_section(entry: CorpusEntry) -> list[str]:
    if entry.known_issue is None:
        return ["None searched for yet: the finding is not triaged."]
    record = issue_named(entry.known_issue)
    if not record.upstream:
        return ["Searched for; none found."]
    return [
        f"- [{reference.thread}]({reference.url}) ({reference.relation}): {prose(reference.seen)}"
        for reference in record.upstream
    ]


def found_by_line(entry: CorpusEntry, runs: Sequence[ScriptRun]) -> str:
    where = _shown(entry.path)
    triaged = f", known issue `{entry.known_issue}`" if entry.known_issue else ""
    reproduced = list(dict.fromkeys(run.torch_version for run in runs if run.reproduced))
    tried = list(dict.fromkeys(run.torch_version for run in runs))
    verified = (
        f"the reproducer reproduces on torch {', '.join(reproduced)}"
        if reproduced
        else f"the reproducer did not reproduce on torch {', '.join(tried)}"
        if tried
        else "the reproducer was not run"
    )
    if reproduced and len(reproduced) < len(tried):
        verified += f" (tried: {', '.join(tried)})"
    return f"Found by the fsdp-path-fuzzer (corpus file `{where}`{triaged}); {verified}."


def versions_section(environments: Sequence[tuple[str, str]]) -> list[str]:
    """``collect_env``'s output per interpreter that ran the script: the first in full, the others folded."""
    if not environments:
        return ["(collect_env was not run)"]
    (version, first), rest = environments[0], environments[1:]
    lines = [f"`python -m torch.utils.collect_env` with torch {version}:", "", *fenced(first)]
    for other_version, other in rest:
        lines += ["", *details(f"The same with torch {other_version}", fenced(other))]
    return lines


@dataclass(frozen=True)
class Evidence:
    """What a report shows that had to be run: the script, its runs, the verdict, each interpreter's environment."""

    script: str
    runs: tuple[ScriptRun, ...]
    verdict: Verdict | None
    environments: tuple[tuple[str, str], ...]
    """(torch version, ``collect_env``'s output) per interpreter that ran the script."""


def gather(
    entry: CorpusEntry,
    pythons: Sequence[str] = (sys.executable,),
    timeout_s: float = RUN_TIMEOUT_S,
    verdict: Verdict | None = None,
) -> Evidence:
    """Write the reproducer, run it with each of ``pythons``, collect each one's environment, and judge the
    case (``verdict_of``) unless ``verdict`` is given."""
    for python in pythons:  # an interpreter that cannot run torch is refused before anything is written
        torch_version_of(absolute(python))
    from fsdp_fuzz.repro import reproducer_script

    script = reproducer_script(entry)
    runs = tuple(run_reproducer(script, python, timeout_s) for python in pythons)
    environments = tuple((run.torch_version, collect_env(python)) for run, python in zip(runs, pythons, strict=True))
    return Evidence(script, runs, verdict if verdict is not None else verdict_of(entry), environments)


def render(entry: CorpusEntry, evidence: Evidence) -> str:
    """The report from what was measured; pure: nothing runs here."""
    sections = [
        [f"# {title(entry, evidence.verdict)}"],
        ["### 🐛 Describe the bug"],
        what_happens(entry, evidence.verdict),
        ["#### Reproducer"],
        reproducer_section(evidence.script, evidence.runs),
        ["#### Expected and actual"],
        expected_section(evidence.verdict),
        ["#### What avoids it"],
        avoids_section(entry.reduction),
        ["#### Related upstream threads"],
        upstream_section(entry),
        [found_by_line(entry, evidence.runs)],
        ["### Versions"],
        versions_section(evidence.environments),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def bug_report(
    entry: CorpusEntry,
    *,
    pythons: Sequence[str] = (sys.executable,),
    timeout_s: float = RUN_TIMEOUT_S,
    verdict: Verdict | None = None,
) -> str:
    """The report of ``entry``: its reproducer run with each of ``pythons`` in a clean interpreter (the first
    one's output shown in full, the others folded, with whether each reproduced), ``collect_env`` of each, and
    ``verdict`` (default: ``verdict_of(entry)``)."""
    return render(entry, gather(entry, pythons, timeout_s, verdict))


# The command line -------------------------------------------------------------


def main_report(
    path: Path, out: Path | None, pythons: Sequence[str] = (sys.executable,), timeout_s: float = RUN_TIMEOUT_S
) -> int:
    """``python -m fsdp_fuzz report FILE [-o OUT]``: the report on stdout, or in ``out``. 0 once written, 2 when
    an interpreter in ``pythons`` cannot run torch (said on stderr); a file that does not load raises
    ``ScenarioError`` (the command's exit code 2)."""
    entry = load_entry(Path(path))
    try:
        report = bug_report(entry, pythons=pythons, timeout_s=timeout_s)
    except InterpreterProblem as exc:
        print(f"fsdp-fuzz report: {exc}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(report)
    else:
        Path(out).write_text(report)
        print(f"wrote {out} ({len(report.splitlines())} lines)", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Written:
    """One report ``write_findings`` wrote."""

    candidate: Candidate
    path: Path
    title: str
    reproduced_on: tuple[str, ...]
    tried: tuple[str, ...]


def write_findings(
    directory: Path,
    corpus: Path = DEFAULT_CORPUS,
    pythons: Sequence[str] = (sys.executable,),
    records: Sequence[str] = (),
    timeout_s: float = RUN_TIMEOUT_S,
) -> tuple[list[Written], list[str]]:
    """``directory/<record>.md`` for each record without a same-bug thread (or those named in ``records``),
    from its representative file, and ``directory/README.md`` indexing the reports written. Returns them and
    the problems of the records that could not be written."""
    for python in pythons:  # an interpreter that cannot run torch stops the run before any report
        torch_version_of(absolute(python))
    directory.mkdir(parents=True, exist_ok=True)
    candidates = records_without_same_bug_thread(corpus)
    unknown = set(records) - {candidate.record.name for candidate in candidates}
    if unknown:
        raise UnknownRecords(f"not records without a same-bug thread: {sorted(unknown)}")
    written, problems = [], []
    for candidate in candidates:
        if records and candidate.record.name not in records:
            continue
        if candidate.representative is None:
            problems.append(f"{candidate.record.name}: no file in {corpus}/known backs it")
            continue
        print(f"{candidate.record.name}: {candidate.representative} ...", file=sys.stderr, flush=True)
        entry = load_entry(candidate.representative)
        try:
            evidence = gather(entry, pythons, timeout_s)
        except Exception as exc:  # one record's failure is reported; the others are still written
            problems.append(f"{candidate.record.name}: {type(exc).__name__}: {exc}")
            continue
        path = directory / f"{candidate.record.name}.md"
        path.write_text(render(entry, evidence))
        reproduced = tuple(run.torch_version for run in evidence.runs if run.reproduced)
        tried = tuple(run.torch_version for run in evidence.runs)
        written.append(Written(candidate, path, title(entry, evidence.verdict), reproduced, tried))
        print(f"  wrote {path}: reproduces on {', '.join(reproduced) or 'none'}", file=sys.stderr, flush=True)
    command = " ".join(
        [
            f"python -m fsdp_fuzz.bugreport --all {_shown(directory)}",
            *([f"--corpus {_shown(corpus)}"] if Path(corpus) != DEFAULT_CORPUS else []),
            *(f"--python {_shown(Path(python))}" for python in pythons),
            *(f"--record {name}" for name in records),
        ]
    )
    (directory / "README.md").write_text(index(written, corpus, command))
    return written, problems


def index(written: Sequence[Written], corpus: Path = DEFAULT_CORPUS, command: str = "") -> str:
    """``docs/findings/README.md``: one row per report written, and the ``command`` that wrote them."""
    lines = [
        "# Findings to file upstream",
        "",
        "One bug report per known-issue record that no upstream thread reports as the same bug, written from "
        f"the smallest `{corpus}/known/` file that backs it, as PyTorch's bug-report template asks: what happens, "
        "the reproducer with its captured output, expected against actual, what avoids it, the related threads, "
        "and `collect_env`. Written by the fsdp-path-fuzzer:",
        "",
        f"    {command or 'python -m fsdp_fuzz.bugreport --all docs/findings'}",
        "",
        "(each `--python` runs every reproducer; see `fsdp_fuzz.bugreport`; `--record NAME` writes some only). "
        "A thread marked *by design* means maintainers decided the behaviour the record depends on: "
        "read it before filing.",
        "",
        "| report | engine | reproduces on | upstream threads | corpus file |",
        "| --- | --- | --- | --- | --- |",
    ]
    for report in written:
        record = report.candidate.record
        threads = ", ".join(f"[{u.thread}]({u.url}) ({u.relation})" for u in record.upstream) or "none found"
        reproduced = ", ".join(report.reproduced_on) or f"none of {', '.join(report.tried)}"
        text = prose(report.title).replace("|", "&#124;").replace("[", "\\[").replace("]", "\\]")
        link, source = f"[{text}]({report.path.name})", _shown(report.candidate.representative)
        lines.append(f"| {link} | {', '.join(record.engines)} | {reproduced} | {threads} | `{source}` |")
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (commands and file names in reports)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fsdp_fuzz.bugreport", description="write PyTorch bug reports from corpus files"
    )
    parser.add_argument("path", nargs="?", type=Path, help="a corpus file to report")
    parser.add_argument("-o", "--output", type=Path, help="where to write the report (default: stdout)")
    parser.add_argument("--all", type=Path, metavar="DIR", help="a report per record without a same-bug thread")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="with --all: the corpus (%(default)s)")
    parser.add_argument("--record", action="append", default=[], help="with --all: only this record (repeatable)")
    parser.add_argument(
        "--python", action="append", default=[], help="an interpreter to run the reproducer (repeatable; default: this)"
    )
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds per run (%(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    pythons = args.python or [sys.executable]
    if (args.path is None) == (args.all is None):
        parser.error("give a corpus file or --all DIR")
    try:
        if args.path is not None:
            return main_report(args.path, args.output, pythons, args.timeout)
        written, problems = write_findings(args.all, args.corpus, pythons, args.record, args.timeout)
    except (ScenarioError, UnknownRecords, InterpreterProblem) as exc:
        print(f"fsdp-fuzz report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} report(s) and {args.all / 'README.md'}", file=sys.stderr)
    for problem in problems:
        print(f"not written: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
