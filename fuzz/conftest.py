"""pytest wiring for the fuzz targets: options, profiles, the session's ranks
and contract, saving findings and the summary. The targets themselves, the
checks before ranks start, saving and the summary are the campaign core the
command shares (``fsdp_fuzz.core``)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings

from fsdp_fuzz.campaign import Budget, progress_line
from fsdp_fuzz.core import (
    REFUSAL_EXIT_CODES,
    CampaignEnd,
    check_before_ranks,
    keep_finding,
    refusal_exit_code,
    summary_lines,
)
from fsdp_fuzz.corpus import corpus_root
from fsdp_fuzz.execute.devices import BACKENDS, DEVICES, DeviceRequest
from fsdp_fuzz.execute.pool import DEFAULT_GROUP_TIMEOUT_S, PoolSet
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


_READY = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def pools(pytestconfig: pytest.Config):
    """The campaign's ranks: spawned on first use, closed at the end of the
    session. What cannot run every world size the targets draw, or a torch
    the trace cannot observe, stops the session before any rank starts
    (``check_before_ranks``, with the command's exit codes)."""
    placement = device_request(pytestconfig)
    try:
        check_before_ranks(placement)
    except tuple(REFUSAL_EXIT_CODES) as exc:
        pytest.exit(str(exc), returncode=refusal_exit_code(exc))
    pytestconfig.stash[_READY] = True
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
    # The registry's name (``seed[fsdp1]``), as ``run`` reports the same target.
    entry = getattr(getattr(item, "function", None), "fuzz_target", None)
    check.target = entry.name if entry is not None else item.nodeid
    tally = check.report.tally(check.target)
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
                saved = keep_finding(
                    corpus_root(item.config),
                    failure,
                    item.nodeid,
                    check.report,
                    check.target,
                    runner=item.funcargs.get("pools"),
                )
                item.config.stash.setdefault(_SAVED, []).append(saved)
                terminal.write(saved.headline() + "\n")
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
    """The summary both front ends print (``fsdp_fuzz.core.summary_lines``),
    after whatever ran on the session's ranks."""
    check = config.stash.get(_CONTRACT, None)
    replays = config.stash.get(_REPLAYS, Counter())
    if not config.stash.get(_READY, False) or (check is None and not replays):
        return  # refused at the start, or no rank ran
    end = CampaignEnd(
        report=None if check is None else check.report,
        request=device_request(config),
        profile=settings.get_current_profile_name(),
        wall_s=0.0 if check is None else sum(tally.wall_s for tally in check.report.targets.values()),
        findings=config.stash.get(_SAVED, []),
        strict=config.getoption("--strict-contract"),
        strict_option="--strict-contract",
        replays=replays,
        report_path=config.getoption("--fuzz-report"),
        log_path=config.stash.get(_LOG, None),
    )
    terminalreporter.section("fsdp fuzz summary")
    for line in summary_lines(end):
        terminalreporter.write_line(line)
