"""pytest wiring for the fuzz targets: profiles, device choice, corpus path."""

from __future__ import annotations

import pytest
from hypothesis import settings

from fuzz.known_issues import known_issue
from fuzz.pool import DEFAULT_GROUP_TIMEOUT_S, PoolSet
from fuzz.profiles import PROFILES, profile_from_environment, register_profiles, unknown_profile_message
from fuzz.ranks import DeviceError, Placement
from fuzz.verdict import ContractCheck

register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fsdp-fuzz")
    group.addoption(
        "--fuzz-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="run ranks on CPU with gloo (default) or one GPU per rank with NCCL",
    )
    group.addoption(
        "--group-timeout",
        type=float,
        default=DEFAULT_GROUP_TIMEOUT_S,
        help="seconds a scenario's collective may wait before it counts as a hang (default %(default)s)",
    )
    group.addoption("--strict-contract", action="store_true", help="fail on known issues too, instead of counting them")
    group.addoption(
        "--corpus", default=None, help="directory of saved scenarios to replay (default: corpus/ under the rootdir)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    requested = config.getoption("--hypothesis-profile", default=None)
    if requested is not None and requested not in PROFILES:
        raise pytest.UsageError(unknown_profile_message(requested, "--hypothesis-profile"))
    try:
        settings.load_profile(profile_from_environment())
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def pools(pytestconfig: pytest.Config):
    """The campaign's ranks: spawned on first use, closed at the end of the session."""
    placement = Placement(pytestconfig.getoption("--fuzz-device"))
    try:
        placement.check(2)
    except DeviceError as exc:
        pytest.exit(str(exc), returncode=4)
    with PoolSet(placement, pytestconfig.getoption("--group-timeout")) as campaign:
        yield campaign


_CONTRACT = pytest.StashKey[ContractCheck]()


@pytest.fixture(scope="session")
def contract(pytestconfig: pytest.Config) -> ContractCheck:
    check = ContractCheck(strict=pytestconfig.getoption("--strict-contract"))
    pytestconfig.stash[_CONTRACT] = check
    return check


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    check = config.stash.get(_CONTRACT, None)
    if check is None:
        return
    terminalreporter.section("fsdp fuzz summary")
    terminalreporter.write_line(
        f"profile {settings.get_current_profile_name()}, {check.runs} scenario run(s) judged by the fuzz targets"
    )
    if not check.known_hits:
        terminalreporter.write_line("known issues matched: none")
    for name, count in check.known_hits.most_common():
        issue = known_issue(name)
        terminalreporter.write_line(
            f"known issue {name}: {count} run(s) (not failed; --strict-contract to fail) upstream: {issue.upstream}"
        )
