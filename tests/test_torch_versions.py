"""The corpus across torch releases: ``replay --json``, the replays kept in
``reports/``, the records' ``seen_on``/``fixed_in`` and the docs page that
shows them, all kept in step."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest
import torch

from fsdp_fuzz.cli import main
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
from fsdp_fuzz.replay import KEEPS_CONTRACT, REPRODUCES, torch_release
from fsdp_fuzz.versions import load, record_versions, tables

ROOT = Path(__file__).resolve().parent.parent
REPORTS = [ROOT / "reports" / "replay-torch-2.13.0.json", ROOT / "reports" / "replay-torch-2.14.1.json"]
DOCS = ROOT / "docs" / "torch-versions.md"
RELEASE = re.compile(r"\d+\.\d+\.\d+")
REGENERATE = (
    "regenerate docs/torch-versions.md's tables with: python -m fsdp_fuzz.versions "
    "reports/replay-torch-2.13.0.json reports/replay-torch-2.14.1.json"
)


def test_every_record_says_on_which_torch_it_was_seen() -> None:
    """A record without ``seen_on`` was never replayed: nobody knows whether
    the release in use still has the bug."""
    unreplayed = sorted(name for name, issue in KNOWN_ISSUES.items() if not issue.seen_on)
    assert unreplayed == [], f"records without seen_on (replay their corpus/known files): {unreplayed}"
    for issue in KNOWN_ISSUES.values():
        assert all(RELEASE.fullmatch(version) for version in issue.seen_on), (issue.name, issue.seen_on)
        assert issue.fixed_in is None or RELEASE.fullmatch(issue.fixed_in), (issue.name, issue.fixed_in)
        assert issue.fixed_in not in issue.seen_on, f"{issue.name}: fixed in a release it was seen on"


def test_the_records_agree_with_the_replays() -> None:
    """``seen_on`` and ``fixed_in`` are what the kept replays show, for the
    releases they cover; a record added since then is checked by the test
    above only, until the next replay."""
    reports = [load(path) for path in REPORTS]
    releases = {report["torch_release"] for report in reports}
    for name, versions in record_versions(reports).items():
        issue = KNOWN_ISSUES[name]
        assert tuple(v for v in issue.seen_on if v in releases) == versions.seen_on, name
        assert issue.fixed_in == versions.fixed_in, name
        if versions.changed_on:
            assert issue.versions_note, f"{name} fails differently on {versions.changed_on}: say so in versions_note"


def test_the_docs_tables_are_generated_from_the_replays() -> None:
    text = DOCS.read_text()
    block = text.split("<!-- torch-versions:start -->\n", 1)[1].split("\n<!-- torch-versions:end -->", 1)[0]
    assert block == tables([load(path) for path in REPORTS]), REGENERATE


def test_the_torch_environment_changes_torch_only_and_stays_out_of_ci() -> None:
    """CI runs ``tox -e py``: the default list must never reach the 5.5 GB
    CUDA build, and the other environment must differ from CI's pins in
    torch alone, or a changed verdict could be another package's doing."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert "torch-2.14.1" not in tox["tox"]["env_list"].split()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            package, version = line.split("==")
            pins[package.strip()] = version.strip()
    assert pins["torch"] == "2.13.0"
    deps = dict(line.strip().split("==") for line in tox["testenv:torch-2.14.1"]["deps"].split())
    assert deps.pop("torch") == "2.14.1"
    assert all(pins[package] == version for package, version in deps.items()), (deps, pins)


def test_replay_writes_its_verdicts_as_json_on_live_ranks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two files on real ranks: a seed file that keeps the contract and a
    known issue that reproduces; the JSON says which, with the violations
    today's FSDP committed and the record they match."""
    seed = Path("corpus/seed/train_eval-full_shard.json")
    known = Path("corpus/known/later-check-ignores-repeats.json")
    output = tmp_path / "replay.json"
    code = main(["replay", str(ROOT / seed), str(ROOT / known), "--json", str(output), "--log-dir", str(tmp_path)])
    terminal = capsys.readouterr().out
    assert code == 0, terminal
    assert f"{REPRODUCES:<19} {ROOT / known}" in terminal
    report = json.loads(output.read_text())
    assert report["torch"] == str(torch.__version__)
    assert report["torch_release"] == torch_release() == str(torch.__version__).split("+")[0]
    assert report["placement"]["summary"] == "cpu with gloo"
    assert (report["files_passed"], report["files_total"]) == (2, 2)
    clean, reproduced = report["files"]
    assert clean["path"].endswith(seed.as_posix()) and clean["status"] == KEEPS_CONTRACT
    assert clean["clean"] and clean["violations"] == [] and clean["known_issue_matched"] is None
    assert reproduced["path"].endswith(known.as_posix()) and reproduced["status"] == REPRODUCES
    assert reproduced["known_issue_recorded"] == reproduced["known_issue_matched"] == "later-check-ignores-repeats"
    assert not reproduced["clean"]
    assert {violation["clause"] for violation in reproduced["violations"]} == {"later-deviation-warns"}
    assert all(record["seconds"] > 0 for record in report["files"])
