"""pytest wiring for the fuzz targets: profiles, device and backend choice, corpus path."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings

from fsdp_fuzz.campaign import Budget, counts, progress_line
from fsdp_fuzz.corpus import corpus_root, save_finding
from fsdp_fuzz.data import ENGINES
from fsdp_fuzz.execute.devices import BACKENDS, DEVICES, WORLD_SIZES, DeviceError, DeviceRequest
from fsdp_fuzz.execute.pool import DEFAULT_GROUP_TIMEOUT_S, PoolSet
from fsdp_fuzz.execute.protocol import HarnessError
from fsdp_fuzz.execute.trace import check_trace
from fsdp_fuzz.judge.known_issues import issue_named
from fsdp_fuzz.profiles import PROFILES, profile_from_environment, register_profiles, unknown_profile_message
from fsdp_fuzz.terminal import ProgressLine
from fsdp_fuzz.verdict import ContractCheck, failures_in

register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fsdp-fuzz")
    group.addoption(
        "--fuzz-device",
        default="cpu",
        choices=DEVICES,
        help="run ranks on the CPU (default) or on GPUs, rank r on GPU r mod (visible GPUs)",
    )
    group.addoption(
        "--fuzz-backend",
        default=None,
        choices=BACKENDS,
        help="force a backend; default: nccl where every rank has a GPU of its own, gloo otherwise",
    )
    group.addoption(
        "--group-timeout",
        type=float,
        default=DEFAULT_GROUP_TIMEOUT_S,
        help="seconds a scenario's collective may wait before it counts as a hang (default %(default)s)",
    )
    group.addoption("--fuzz-report", default=None, metavar="PATH", help="write the campaign report as JSON to PATH")
    group.addoption("--strict-contract", action="store_true", help="fail on known issues too, instead of counting them")
    group.addoption(
        "--corpus",
        default=None,
        help="corpus directory: replayed by fuzz/test_corpus.py, and where findings are saved, under found/ "
        "(default: corpus/ under the rootdir)",
    )
    group.addoption("--no-save-findings", action="store_true", help="do not write findings to the corpus")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    requested = config.getoption("--hypothesis-profile", default=None)
    if requested is not None and requested not in PROFILES:
        raise pytest.UsageError(unknown_profile_message(requested, "--hypothesis-profile"))
    try:
        settings.load_profile(profile_from_environment())
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


_LOG = pytest.StashKey[Path]()


def rank_log(config: pytest.Config) -> Path:
    """Where this session's ranks write: one file per session, named in the summary."""
    if _LOG not in config.stash:
        directory = config.rootpath / ".fsdp-fuzz"
        directory.mkdir(exist_ok=True)
        config.stash[_LOG] = directory / time.strftime(f"pytest-%Y%m%d-%H%M%S-{os.getpid()}.log")
    return config.stash[_LOG]


def device_request(config: pytest.Config) -> DeviceRequest:
    """``--fuzz-device`` and ``--fuzz-backend``, placed per world size by the pools."""
    return DeviceRequest(config.getoption("--fuzz-device"), config.getoption("--fuzz-backend"))


@pytest.fixture(scope="session")
def pools(pytestconfig: pytest.Config):
    """The campaign's ranks: spawned on first use, closed at the end of the
    session. A device or backend that cannot run every world size the
    targets draw stops the session before any rank starts."""
    placement = device_request(pytestconfig)
    try:
        placement.check(WORLD_SIZES)
        for engine in ENGINES:
            check_trace(engine)
    except HarnessError as exc:
        pytest.exit(str(exc), returncode=3)
    except DeviceError as exc:
        pytest.exit(str(exc), returncode=4)
    with PoolSet(placement, pytestconfig.getoption("--group-timeout"), log_path=rank_log(pytestconfig)) as campaign:
        yield campaign


_CONTRACT = pytest.StashKey[ContractCheck]()


@pytest.fixture(scope="session")
def contract(pytestconfig: pytest.Config) -> ContractCheck:
    return _contract_check(pytestconfig)


def _contract_check(config: pytest.Config) -> ContractCheck:
    if _CONTRACT not in config.stash:
        config.stash[_CONTRACT] = ContractCheck(strict=config.getoption("--strict-contract"))
    return config.stash[_CONTRACT]


_REPLAYS = pytest.StashKey[Counter]()
_SAVED = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def replay_statuses(pytestconfig: pytest.Config) -> Counter:
    """Corpus replay outcomes by status, for the end-of-run summary."""
    return pytestconfig.stash.setdefault(_REPLAYS, Counter())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Time each fuzz target, tell the contract check which one is running,
    and save the target's finding: Hypothesis replays the shrunk case last."""
    if "contract" not in getattr(item, "fixturenames", ()):
        return (yield)
    check = _contract_check(item.config)
    check.target = item.nodeid
    tally = check.report.tally(item.nodeid)
    started = time.monotonic()
    terminal = _Terminal(item.config)
    terminal.write("\n")
    progress = ProgressLine(
        lambda: f"{item.name}: " + progress_line([tally], time.monotonic() - started, Budget(started=started)),
        stream=terminal,
        live=terminal.writer.hasmarkup,
    )
    try:
        with progress:
            return (yield)
    except BaseException as exc:
        if not item.config.getoption("--no-save-findings"):
            for failure in failures_in(exc):
                path, new = save_finding(
                    corpus_root(item.config),
                    failure.scenario,
                    failure.observations,
                    failure.violations,
                    failure.known,
                    found_by=item.nodeid,
                )
                item.config.stash.setdefault(_SAVED, []).append((path, new))
        raise
    finally:
        tally.wall_s += time.monotonic() - started


class _Terminal:
    """pytest's terminal, written to while a test runs: output capture is
    suspended for each write, as pytest's own live logging does."""

    def __init__(self, config: pytest.Config) -> None:
        self.writer = config.get_terminal_writer()
        self.capture = config.pluginmanager.getplugin("capturemanager")

    def write(self, text: str) -> None:
        with self.capture.global_and_fixture_disabled():
            self.writer.write(text, flush=True)

    def flush(self) -> None:
        pass


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    check = config.stash.get(_CONTRACT, None)
    replays = config.stash.get(_REPLAYS, None)
    if check is None and not replays:
        return
    try:
        device_request(config).check(WORLD_SIZES)
    except DeviceError:
        return  # refused at the start: nothing ran
    write = terminalreporter.write_line
    terminalreporter.section("fsdp fuzz summary")
    if replays:
        write(f"corpus replay: {counts(replays)}")
    if check is not None:
        _summarise_campaign(check, config, write)
    if _LOG in config.stash:
        write(f"ranks' output: {config.stash[_LOG]}")


def _summarise_campaign(check: ContractCheck, config: pytest.Config, write) -> None:
    profile = settings.get_current_profile_name()
    write(f"ranks on {device_request(config).describe()}")
    for name, tally in check.report.targets.items():
        outcomes = counts(tally.outcomes)
        write(
            f"{name}: {tally.examples} scenarios in {tally.wall_s:.1f} s (profile {profile}); step outcomes: {outcomes}"
        )
        if tally.finding is not None:
            write(f"  FINDING: {'; '.join(tally.finding['violations'])}")
    for path, new in config.stash.get(_SAVED, []):
        write(f"finding saved to {path}" if new else f"finding already in the corpus: {path}")
        write(f"  replay: pytest fuzz/test_corpus.py -k {path.stem}; reproducer: python -m fsdp_fuzz repro {path}")
    hits = sum((tally.known_issues for tally in check.report.targets.values()), Counter())
    if not hits:
        write("known issues matched: none")
    for name, count in hits.most_common():
        issue = issue_named(name)
        write(
            f"known issue {name}: {count} run(s) (not failed; --strict-contract to fail) "
            f"upstream: {issue.upstream_summary}"
        )
    path = config.getoption("--fuzz-report")
    if path:
        request = device_request(config)
        backend = ",".join(sorted(set(request.backends().values())))
        document = check.report.to_json(profile, backend, placement=request.to_json())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(document, indent=1) + "\n")
        write(f"report written to {path}")
