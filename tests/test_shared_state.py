"""What a campaign's workers share: the ledger of saved classes and the
example database that never loses a finding."""

from __future__ import annotations

import pytest

from fsdp_fuzz.cli import main
from fsdp_fuzz.ledger import Ledger
from fsdp_fuzz.verdict import FailureClass
from fsdp_fuzz.workers import KeepingFindings, open_database

ISSUE = FailureClass("first-iteration-order-ends-early")
UNKNOWN = FailureClass(None, ("clean-run",), ("step-failed",))


def test_the_first_claim_of_a_class_wins_and_names_its_scenario(tmp_path):
    mine, theirs = Ledger(tmp_path), Ledger(tmp_path)
    assert mine.claim(ISSUE, "aaaa") is True
    assert theirs.claim(ISSUE, "bbbb") is False
    assert theirs.claim(UNKNOWN, "cccc") is True
    assert mine.claims() == {ISSUE.name: "aaaa", UNKNOWN.name: "cccc"}


def test_a_shared_database_keeps_its_findings_but_tends_the_rest(tmp_path):
    database = open_database(str(tmp_path))
    assert isinstance(database, KeepingFindings)
    database.save(b"key", b"minimal")
    database.delete(b"key", b"minimal")
    assert list(database.fetch(b"key")) == [b"minimal"], "a settled finding must survive for the next worker"
    database.save(b"key.secondary", b"larger")
    database.delete(b"key.secondary", b"larger")
    assert list(database.fetch(b"key.secondary")) == []
    database.move(b"key", b"key.secondary", b"minimal")
    assert list(database.fetch(b"key.secondary")) == [b"minimal"]


def test_no_database_when_asked_for_none():
    assert open_database("none") is None and open_database(None) is None


@pytest.mark.parametrize(("options", "said"), [(["--workers", "0"], "--workers must be at least 1")])
def test_bad_campaign_options_are_named(capsys, options, said):
    assert main(["run", *options]) == 2
    assert said in capsys.readouterr().err
