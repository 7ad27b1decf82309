"""``python -m fsdp_fuzz`` (console script ``fsdp-fuzz``): run, replay, show, reduce, repro, report.

Exit codes: 0 all good, 1 a finding or a replay that did not pass,
2 bad input (the message names it and the fix), 3 the fuzzer cannot observe
FSDP on this torch (a hook it relies on is gone) or failed itself, 4 the
device cannot run it, 130 and 143 a campaign stopped by SIGINT or SIGTERM
(after its summary).
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from fsdp_fuzz.campaign import ALLOWANCE, Budget, progress_line
from fsdp_fuzz.core import (
    REFUSAL_EXIT_CODES,
    TARGET_NAMES,
    CampaignEnd,
    check_before_ranks,
    refusal_exit_code,
    summary_lines,
)
from fsdp_fuzz.corpus import CorpusEntry, corpus_files, load_entry, reduced_document, write_document
from fsdp_fuzz.data import ENGINES, ScenarioError
from fsdp_fuzz.execute.devices import BACKENDS, DEVICES, WORLD_SIZES, DeviceRequest
from fsdp_fuzz.execute.pool import DEFAULT_GROUP_TIMEOUT_S, PoolSet
from fsdp_fuzz.judge.known_issues import issue_named
from fsdp_fuzz.render import render_scenario
from fsdp_fuzz.replay import PASSING, ReplayReport, ReplayResult, ranks_log, replay_result
from fsdp_fuzz.report import counts
from fsdp_fuzz.terminal import ProgressLine
from fsdp_fuzz.workers import EXIT_CODES, CampaignSpec, open_database, run_workers

DEFAULT_CORPUS = Path("corpus")
DEFAULT_EXAMPLES = 100
DEFAULT_WORKERS = os.cpu_count() or 1
DEFAULT_DATABASE = Path(".hypothesis") / "examples"
DEFAULT_LOG_DIR = Path(".fsdp-fuzz")
REDUCE_TIME_S = 300.0


class UsageProblem(Exception):
    """Bad input from the command line, worded for the person who typed it."""


def main(argv: Sequence[str] | None = None) -> int:
    """The command; ``argv`` None reads the command line, and then a
    campaign's clock starts with the process, as a job's wall-clock limit does."""
    args = _parser().parse_args(argv)
    args.started = _process_started() if argv is None else time.monotonic()
    code = _command(args)
    if argv is None and args.name == "run":
        _exit_at_once(code)
    return code


def _command(args: argparse.Namespace) -> int:
    try:
        return args.command(args)
    except UsageProblem as exc:
        print(f"fsdp-fuzz {args.name}: {exc}", file=sys.stderr)
        return 2
    except ScenarioError as exc:
        print(f"fsdp-fuzz {args.name}: {exc}", file=sys.stderr)
        return 2
    except tuple(REFUSAL_EXIT_CODES) as exc:  # refused before any rank started: the same codes as pytest's
        print(f"fsdp-fuzz {args.name}: {exc}", file=sys.stderr)
        return refusal_exit_code(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fsdp_fuzz", description="A property-based fuzzer for the forward paths of PyTorch FSDP."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="fuzz FSDP until a budget is spent; save findings to the corpus")
    run.add_argument("--target", choices=TARGET_NAMES, default="generated", help="what to generate (%(default)s)")
    run.add_argument(
        "--engine",
        choices=(*ENGINES, "both"),
        default="fsdp1",
        help="FullyShardedDataParallel (fsdp1), fully_shard (fsdp2), or both, the budget split evenly (%(default)s)",
    )
    budget = run.add_argument_group(f"budget (default: {DEFAULT_EXAMPLES} scenarios)")
    budget.add_argument("--examples", type=int, help="stop after this many scenarios")
    budget.add_argument(
        "--time",
        type=_duration,
        help=f"stop after this long: 90s, 10m, 1h; a shrink under way may run on, but the campaign ends within "
        f"a tenth more ({ALLOWANCE * 100:.0f}%% allowance; shrinks cut short are saved, marked not fully shrunk)",
    )
    run.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="findings go to CORPUS/found (%(default)s)")
    run.add_argument("--report", type=Path, help="write the campaign report as JSON here")
    run.add_argument("--strict", action="store_true", help="treat known issues as findings too")
    run.add_argument("--seed", type=int, help="Hypothesis seed, for a campaign that can be repeated")
    run.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="campaign processes side by side, each with its own ranks (default: one per core, %(default)s here)",
    )
    run.add_argument(
        "--database",
        default=str(DEFAULT_DATABASE),
        help="Hypothesis example database the workers share: a directory, or redis://HOST:PORT/DB for workers "
        "on several machines (default %(default)s); 'none' for none",
    )
    run.add_argument(
        "--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="each campaign's directory: ranks' output (%(default)s)"
    )
    _add_device_options(run)
    run.set_defaults(command=_run, name="run")

    replay = commands.add_parser("replay", help="re-run corpus files and compare with what they recorded")
    replay.add_argument("paths", nargs="*", type=Path, default=[DEFAULT_CORPUS], help="files or directories")
    replay.add_argument(
        "--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="each replay's directory: ranks' output (%(default)s)"
    )
    replay.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the verdicts as JSON here (torch version, placement, per file: what it recorded, today's "
        "violations and known issue, seconds), rewritten after each file",
    )
    _add_device_options(replay)
    replay.set_defaults(command=_replay, name="replay")

    show = commands.add_parser("show", help="print a corpus file readably: model, units, steps, expectations")
    show.add_argument("path", type=Path)
    show.set_defaults(command=_show, name="show")

    reduce = commands.add_parser(
        "reduce",
        help="make a finding or known-issue file small on live ranks, keeping its class; measure what it needs",
    )
    reduce.add_argument("path", type=Path)
    reduce.add_argument(
        "-o", "--output", type=Path, help="file to write (default: next to PATH, its name ending in -reduced.json)"
    )
    reduce.add_argument(
        "--time", type=_duration, default=REDUCE_TIME_S, help="stop reducing after this long (%(default)s s)"
    )
    reduce.add_argument(
        "--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="each reduction's directory: ranks' output (%(default)s)"
    )
    _add_device_options(reduce)
    reduce.set_defaults(command=_reduce, name="reduce")

    repro = commands.add_parser(
        "repro", help="write a one-screen reproducer (needs only torch): exits 1 when the finding reproduces"
    )
    repro.add_argument("path", type=Path)
    repro.add_argument("-o", "--output", type=Path, help="script to write (default: repro_<name>.py)")
    repro.add_argument(
        "--style",
        choices=("script", "unittest"),
        default="script",
        help="a plain script (default), or a test in PyTorch's MultiProcessTestCase, ready for a pull request",
    )
    repro.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the script's default device (cuda: rank r on GPU r mod n; NCCL where every rank has its own GPU)",
    )
    repro.add_argument(
        "--timeout", type=float, default=10.0, help="the script's seconds before a collective is hung (%(default)s)"
    )
    repro.set_defaults(command=_repro, name="repro")

    report = commands.add_parser(
        "report", help="write the PyTorch bug report of a corpus file, its reproducer run and its output captured"
    )
    report.add_argument("path", type=Path)
    report.add_argument("-o", "--output", type=Path, help="Markdown file to write (default: stdout)")
    report.add_argument(
        "--python",
        action="append",
        help="run the reproducer and collect_env with this interpreter too (repeatable; default: this one)",
    )
    report.add_argument("--timeout", type=float, default=300.0, help="seconds the reproducer may run (%(default)s)")
    report.set_defaults(command=_report, name="report")
    return parser


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=DEVICES, default="cpu", help="cpu, or cuda: rank r on GPU r mod (visible GPUs)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="force a backend; default: nccl where every rank has a GPU of its own, gloo otherwise",
    )
    parser.add_argument(
        "--group-timeout",
        type=float,
        default=DEFAULT_GROUP_TIMEOUT_S,
        help="seconds before a collective counts as a hang (%(default)s)",
    )


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 10m or 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _request(args: argparse.Namespace) -> DeviceRequest:
    return DeviceRequest(args.device, args.backend)


def _exit_at_once(code: int) -> NoReturn:
    """End a campaign's process once its report is out: exit handlers run
    (multiprocessing's finalisers among them), the interpreter's teardown of
    torch does not (1 to 2 s on the loaded 2-core machine, inside ``--time``'s
    allowance)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _process_started() -> float:
    """When this process started, on the ``time.monotonic`` clock (Linux's
    ``/proc``; elsewhere, now): Python starting and importing torch count
    against ``--time`` too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()
    return time.monotonic() - max(0.0, age)


def _pools(
    args: argparse.Namespace, log_path: Path | None = None, world_sizes: tuple[int, ...] = WORLD_SIZES
) -> PoolSet:
    """Pools on the requested device, refused before any rank starts (``check_before_ranks``)."""
    request = _request(args)
    check_before_ranks(request, world_sizes)
    return PoolSet(request, args.group_timeout, log_path=log_path)


def _run(args: argparse.Namespace) -> int:
    if args.examples is not None and args.examples < 1:
        raise UsageProblem("--examples must be at least 1")
    if args.workers < 1:
        raise UsageProblem("--workers must be at least 1")
    examples = args.examples if args.examples is not None or args.time is not None else DEFAULT_EXAMPLES
    engines = ENGINES if args.engine == "both" else (args.engine,)
    check_before_ranks(_request(args))  # refuse a device or a torch that cannot run it, before any worker starts
    try:
        open_database(args.database)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    directory = args.log_dir / time.strftime(f"run-%Y%m%d-%H%M%S-{os.getpid()}")
    directory.mkdir(parents=True, exist_ok=True)
    spec = CampaignSpec(
        target=args.target,
        engines=engines,
        examples=None if examples is None else max(1, examples // args.workers),
        seconds=args.time,
        corpus=args.corpus,
        strict=args.strict,
        seed=args.seed,
        database=args.database,
        device=args.device,
        group_timeout_s=args.group_timeout,
        directory=directory,
        started=args.started,
        backend=args.backend,
    )
    limits = [f"{examples} scenarios"] if examples is not None else []
    limits += [f"{args.time:g} s"] if args.time is not None else []
    print(
        f"fuzzing target {args.target!r} with {' and '.join(engines)} for {' or '.join(limits)} on "
        f"{_request(args).describe()} "
        f"(torch {torch.__version__}), {args.workers} worker(s); findings go to {args.corpus / 'found'}",
        flush=True,
    )
    print(f"ranks' output: {spec.log_path}", flush=True)
    latest: list = []
    budget = Budget(examples=examples, seconds=args.time, started=spec.started, deadline=spec.deadline)

    def show(tallies: list) -> None:
        latest[:] = tallies

    with ProgressLine(lambda: progress_line(latest, budget.elapsed(), budget, args.workers)) as line:
        report, result, signum = run_workers(spec, args.workers, line.note, show)
    end = CampaignEnd(
        report=report,
        request=_request(args),
        profile=f"cli:{args.target}",
        wall_s=report.elapsed(),
        findings=result.findings,
        strict=args.strict,
        strict_option="--strict",
        workers=args.workers,
        hypothesis_runs=result.hypothesis_runs,
        flaky=result.flaky,
        seconds=args.time,
        ends_within_s=None if args.time is None else args.time * (1 + ALLOWANCE),
        database=spec.database,
        report_path=args.report,
        log_path=spec.log_path,
        stopped_by=None if signum is None else signal.Signals(signum).name,
        failed_itself=result.error is not None,
    )
    print()
    for line in summary_lines(end):
        print(line)
    if signum is not None:
        return EXIT_CODES[signum]
    if result.error is not None:
        return 3
    return 1 if result.findings else 0


def _entries(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = corpus_files(path)
            if not found:
                raise UsageProblem(f"no corpus files (*.json) under {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageProblem(f"{path} does not exist; give corpus files or directories")
    return files


def _replay(args: argparse.Namespace) -> int:
    files = _entries(args.paths)
    statuses: Counter = Counter()
    log = ranks_log(args.log_dir)
    print(f"ranks' output: {log}", flush=True)
    world_sizes = tuple(sorted({size for path in files if (size := _world_size(path)) is not None})) or (2,)
    request = _request(args)
    report = ReplayReport({**request.to_json(world_sizes), "summary": request.describe(world_sizes)})
    with _pools(args, log, world_sizes) as pools:
        for path in files:
            started = time.monotonic()
            try:
                entry = load_entry(path)
            except ScenarioError as exc:
                statuses["MALFORMED"] += 1
                print(f"MALFORMED           {exc}", flush=True)
                _add_to_report(args, report, path, None, ReplayResult("MALFORMED", str(exc)), started)
                continue
            result = replay_result(entry, pools.run(entry.scenario))
            _add_to_report(args, report, path, entry, result, started)
            statuses[result.status] += 1
            print(f"{result.status:<19} {path}", flush=True)
            if not result.passed:
                print("    " + result.detail.replace("\n", "\n    "), flush=True)
    print(f"\nreplayed {len(files)} file(s) on {request.describe(world_sizes)}: {counts(statuses)}")
    print(f"ranks' output: {log}")
    if args.json:
        print(f"verdicts as JSON: {args.json}")
    return 0 if all(status in PASSING for status in statuses) else 1


def _add_to_report(
    args: argparse.Namespace,
    report: ReplayReport,
    path: Path,
    entry: CorpusEntry | None,
    result: ReplayResult,
    started: float,
) -> None:
    """Record one file's verdict and, with ``--json``, rewrite the file: a
    replay cut short (a hang past every timeout, a killed job) still leaves
    the verdicts it reached."""
    report.add(path, entry, result, time.monotonic() - started)
    if args.json:
        report.write(args.json)


def _world_size(path: Path) -> int | None:
    """The file's world size, None where it does not load (replay reports that)."""
    try:
        return load_entry(path).scenario.world_size
    except ScenarioError:
        return None


def _show(args: argparse.Namespace) -> int:
    entry = _load(args.path)
    print(render_scenario(entry.scenario))
    if entry.known_issue:
        issue = issue_named(entry.known_issue)
        print(f"\nknown issue {issue.name}: {issue.description}")
        for reference in issue.upstream:
            print(f"  upstream {reference.url}: {reference.relation}; {reference.seen}")
        print(f"  torch: {issue.versions_summary} (docs/torch-versions.md)")
    if entry.finding is not None:
        finding = entry.finding
        print(f"\nrecorded finding (torch {finding.torch_version}, {finding.where()}):")
        print("\n".join(f"  {line}" for line in finding.violations))
        if not finding.fully_shrunk:
            print(
                "  not fully shrunk: the campaign's deadline cut its shrink short; a later run with the same "
                "Hypothesis database shrinks it further"
            )
    if entry.reduction is not None:
        reduction = entry.reduction
        print(f"\nreduced ({reduction.runs} live runs, {reduction.seconds:.1f} s):")
        print("\n".join(f"  {line}" for line in reduction.summary()))
    return 0


def _reduce(args: argparse.Namespace) -> int:
    from fsdp_fuzz.reduce.passes import size
    from fsdp_fuzz.reduce.reducer import ReductionError, reduce

    entry = _load(args.path)
    if entry.keeps_contract:
        raise UsageProblem(f"{args.path} promises a clean run: reduce a finding or a known-issue file")
    output = args.output or args.path.with_name(f"{args.path.stem}-reduced.json")
    log = ranks_log(args.log_dir)
    wanted = entry.known_issue or "its class on this run"
    print(f"reducing {args.path} (keeping {wanted}) for {args.time:g} s at most; ranks' output: {log}", flush=True)
    with _pools(args, log, tuple(sorted({2, entry.scenario.world_size}))) as pools:
        try:
            reduced = reduce(
                entry.scenario,
                pools,
                failure_class=entry.known_issue,
                deadline=time.monotonic() + args.time,
                progress=lambda line: print(f"  {line}", flush=True),
            )
        except ReductionError as exc:
            print(f"fsdp-fuzz reduce: {args.path}: {exc}", file=sys.stderr)
            return 1
    write_document(output, reduced_document(entry, reduced))
    reduction = reduced.reduction
    print(
        f"\nreduced {args.path} to {output}: size {size(entry.scenario)} -> {size(reduced.scenario)}, "
        f"{reduced.scenario.world_size} ranks, {reduced.scenario.num_steps} step(s); "
        f"{reduction.runs} runs in {reduction.seconds:.1f} s"
        + ("" if reduction.complete else " (the time ran out first: --time longer reduces further)")
    )
    print("\n".join(reduction.summary()))
    print(f"show: python -m fsdp_fuzz show {output}; reproducer: python -m fsdp_fuzz repro {output}")
    return 0


def _repro(args: argparse.Namespace) -> int:
    from fsdp_fuzz.repro import reproducer_script

    if args.timeout <= 0:
        raise UsageProblem("--timeout must be positive")
    entry = _load(args.path)
    suffix = "_test" if args.style == "unittest" else ""
    output = args.output or Path(f"repro_{entry.path.stem.replace('-', '_')}{suffix}.py")
    output.write_text(reproducer_script(entry, style=args.style, device=args.device, timeout_s=args.timeout))
    runner = "pytest" if args.style == "unittest" else "python"
    print(f"wrote {output} ({len(output.read_text().splitlines())} lines); run it with: {runner} {output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fsdp_fuzz.bugreport import main_report

    _load(args.path)
    return main_report(args.path, args.output, args.python or [sys.executable], args.timeout)


def _load(path: Path) -> CorpusEntry:
    if not path.is_file():
        raise UsageProblem(f"{path} is not a file; give a corpus file such as corpus/seed/train_eval-full_shard.json")
    return load_entry(path)
