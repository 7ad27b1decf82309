"""A campaign on several workers: processes side by side, each with its own
pools and Hypothesis runs, sharing one example database, one ledger of saved
classes and the corpus.

The parent starts the workers, shows one progress line for all of them,
merges their reports and ends them cleanly: SIGINT and SIGTERM ask every
worker to stop after its current scenario, and the campaign still prints
its summary and writes its report. Workers and their ranks die with the
parent however it dies, and a campaign removes the temporary directories of
campaigns that were killed before it.
"""

from __future__ import annotations

import copy
import multiprocessing.util
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch.multiprocessing as mp
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from fsdp_fuzz.campaign import Budget, CampaignResult, deadline, run_campaign
from fsdp_fuzz.core import SavedFinding, target
from fsdp_fuzz.execute.devices import DeviceRequest
from fsdp_fuzz.execute.pool import PoolSet, die_with_parent
from fsdp_fuzz.ledger import Ledger
from fsdp_fuzz.report import CampaignReport, TargetTally
from fsdp_fuzz.verdict import ContractCheck

TEMPORARY_PREFIX = "fsdp-fuzz-campaign-"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""How a campaign ends on a signal: 128 plus the signal's number, as shells do."""


@dataclass(frozen=True)
class CampaignSpec:
    """Everything a worker needs, as plain data: it crosses a process start."""

    target: str
    engines: tuple[str, ...]
    examples: int | None
    """Per worker."""
    seconds: float | None
    corpus: Path
    strict: bool
    seed: int | None
    database: str | None
    """A directory, ``redis://host:port/db``, or None for no database."""
    device: str
    group_timeout_s: float
    directory: Path
    """The campaign's own: the ledger and the ranks' log."""
    started: float = field(default_factory=time.monotonic)
    """When the campaign's clock started: every worker's budget and deadline count from it."""
    backend: str | None = None
    """Forced with ``--backend``; None leaves it to ``fsdp_fuzz.execute.devices``."""

    @property
    def log_path(self) -> Path:
        return self.directory / "ranks.log"

    @property
    def deadline(self) -> float | None:
        """When every worker stops, shrinking or not (``campaign.deadline``)."""
        return None if self.seconds is None else deadline(self.started, self.seconds)


@dataclass
class WorkerResult:
    tallies: dict[str, TargetTally]
    findings: list[SavedFinding]
    hypothesis_runs: int
    flaky: int
    error: str | None = None
    """The traceback of a failure of the fuzzer's own, if the worker had one."""

    @property
    def unfinished(self) -> list[Path]:
        """Those of ``findings`` whose shrink the deadline cut short."""
        return [saved.path for saved in self.findings if not saved.fully_shrunk]


class KeepingFindings(ExampleDatabase):
    """A shared database from which no worker deletes a finding.

    Hypothesis deletes a saved failure that no longer fails when it replays
    it. In a campaign that is every finding a worker has settled, and a
    worker that joins later must still replay it. So deletions from the
    primary corpus (the minimal failures) are dropped; Hypothesis's other
    corpora (``.secondary``, ``.pareto``) are tended as usual.
    """

    def __init__(self, shared: ExampleDatabase) -> None:
        super().__init__()
        self.shared = shared

    def save(self, key: bytes, value: bytes) -> None:
        self.shared.save(key, value)

    def fetch(self, key: bytes):
        return self.shared.fetch(key)

    def delete(self, key: bytes, value: bytes) -> None:
        if key.endswith((b".secondary", b".pareto")):
            self.shared.delete(key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.shared.move(src, dest, value)

    def forget(self, key: bytes, value: bytes) -> None:
        """Delete for good: for what the campaign knows is no finding."""
        self.shared.delete(key, value)


def open_database(location: str | None) -> ExampleDatabase | None:
    """The example database the workers share: a directory on this machine,
    or a Redis server that workers on other machines reach too."""
    if location is None or location == "none":
        return None
    if location.startswith(("redis://", "rediss://", "unix://")):
        try:
            import redis
            from hypothesis.extra.redis import RedisExampleDatabase
        except ImportError:
            raise ValueError(
                f"--database {location} needs the redis client: pip install 'fsdp-path-fuzzer[redis]'"
            ) from None
        return KeepingFindings(RedisExampleDatabase(redis.Redis.from_url(location), key_prefix=b"fsdp-fuzz:"))
    return KeepingFindings(DirectoryBasedExampleDatabase(location))


def run_workers(
    spec: CampaignSpec, workers: int, note: Callable[[str], None], show: Callable[[list[TargetTally]], None]
) -> tuple[CampaignReport, WorkerResult, int | None]:
    """Run the campaign on ``workers`` processes. ``note`` gets lasting lines
    (findings), ``show`` every worker's latest tallies as they come. Returns
    the merged report, the merged result, and the signal that ended the
    campaign early, if any."""
    remove_abandoned_temporaries()
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    received: list[int] = []

    def request_stop(signum, frame) -> None:
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in EXIT_CODES}
    processes = [
        context.Process(target=campaign_worker, args=(index, spec, events, stop), daemon=False)
        for index in range(workers)
    ]
    latest: dict[int, dict[str, TargetTally]] = {}
    results: dict[int, WorkerResult] = {}
    try:
        for process in processes:
            process.start()
        while len(results) < workers:
            try:
                kind, index, payload = events.get(timeout=0.2)
            except queue.Empty:
                for index, process in enumerate(processes):
                    if index not in results and not process.is_alive():
                        error = f"worker {index} ended without a report (exit code {process.exitcode})"
                        results[index] = WorkerResult(latest.get(index, {}), [], 0, 0, error)
                continue
            if kind == "note":
                note(f"worker {index}: {payload}" if workers > 1 else payload)
            elif kind == "progress":
                latest[index] = payload
                show([tally for tallies in latest.values() for tally in tallies.values()])
            elif kind == "done":
                results[index] = payload
                latest[index] = payload.tallies
                if payload.error is not None:
                    note(f"worker {index} failed, a bug of the fuzzer's own, not an FSDP finding:\n{payload.error}")
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        events.close()
        events.join_thread()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    report = CampaignReport(started=spec.started)
    merged = WorkerResult({}, [], 0, 0)
    for result in results.values():
        merged.error = merged.error or result.error
        for name, tally in result.tallies.items():
            report.tally(name).merge(tally)
        merged.findings += result.findings
        merged.hypothesis_runs += result.hypothesis_runs
        merged.flaky += result.flaky
    merged.tallies = report.targets
    return report, merged, received[0] if received else None


def campaign_worker(index: int, spec: CampaignSpec, events, stop) -> None:
    """One worker: its own pools and Hypothesis runs, the engines one after
    the other with the budget, and the time to the deadline, split between
    them."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent asks through ``stop``
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    temporary = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-")
    tempfile.tempdir = temporary  # the pools' and multiprocessing's own directories go in here
    # Removed at exit after multiprocessing removes its own directory in it
    # (a finaliser of priority -100).
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(temporary, True), exitpriority=-101)
    check = ContractCheck(strict=spec.strict, report=CampaignReport(started=spec.started))
    last_sent = 0.0

    def send_progress(force: bool = False) -> None:
        nonlocal last_sent
        if force or time.monotonic() - last_sent >= 1.0:
            last_sent = time.monotonic()
            events.put(("progress", index, copy.deepcopy(check.report.targets)))

    findings: list[SavedFinding] = []
    runs = flaky = 0
    error = None
    try:
        ledger, database = Ledger(spec.directory / "ledger"), open_database(spec.database)
        with PoolSet(DeviceRequest(spec.device, spec.backend), spec.group_timeout_s, log_path=spec.log_path) as pools:
            examples, seconds = spec.examples, spec.seconds
            for position, engine in enumerate(spec.engines):
                share = len(spec.engines) - position
                now = time.monotonic()
                budget = Budget(
                    examples=None if examples is None else max(1, examples // share),
                    seconds=None if seconds is None else max(0.0, spec.started + seconds - now) / share,
                    started=now,
                    deadline=None if spec.deadline is None else now + max(0.0, spec.deadline - now) / share,
                )
                check.report.tally(target(spec.target, engine).name)
                result: CampaignResult = run_campaign(
                    spec.target,
                    pools,
                    check,
                    budget,
                    spec.corpus,
                    ledger,
                    note=lambda text: events.put(("note", index, text)),
                    random_seed=None if spec.seed is None else spec.seed * 1000 + index,
                    engine=engine,
                    database=database,
                    stop_requested=stop.is_set,
                    after_each=send_progress,
                )
                findings += result.findings
                runs += result.hypothesis_runs
                flaky += result.flaky
                if examples is not None:
                    examples -= result.examples
                if stop.is_set():
                    break
    except Exception:  # noqa: BLE001 - reported to the parent, which ends the campaign with exit code 3
        error = traceback.format_exc()
    finally:
        send_progress(force=True)
        tallies = dict(check.report.targets)
        events.put(("done", index, WorkerResult(tallies, findings, runs, flaky, error)))
        events.close()
        events.join_thread()
    # Leave as a forked process does: finalisers (this worker's temporary
    # directory, multiprocessing's semaphores), then out. A spawned one would
    # go on to tear down an interpreter that imported torch, 0.3 s and more on
    # a loaded machine, and the campaign's end waits for it.
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def remove_abandoned_temporaries() -> None:
    """Remove what campaigns killed outright (SIGKILL) left in the
    temporary directory: each directory names the process that made it."""
    for path in Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*"):
        try:
            pid = int(path.name.removeprefix(TEMPORARY_PREFIX).split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running, or at least not a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: alive, as far as can be told
