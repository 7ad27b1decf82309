"""``--time T`` holds: a campaign ends within T plus a tenth, shrinking or
not, and what a cut-short shrink had reached is saved, marked, and resumed
by the next run.

The campaign test runs live processes (real ranks, real FSDP). The
Hypothesis tests pin down the two behaviours of Hypothesis's database the
campaign relies on, so that a Hypothesis upgrade that changes them fails
here, not silently in a nightly campaign."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.database import InMemoryExampleDatabase, choices_to_bytes
from hypothesis.internal.reflection import function_digest

from fsdp_fuzz.campaign import ALLOWANCE, Stop, _forget, _resume_later, deadline
from fsdp_fuzz.cli import main
from fsdp_fuzz.corpus import load_entry, save_finding
from fsdp_fuzz.judge.oracles import judge
from tests.test_campaigns import run_campaign

SECONDS = 40
"""Long enough that the deadline keeps no shrinking past the budget at all
(``TEARDOWN_S`` takes the whole allowance below 40 s) yet finds several
classes after the workers' and pools' start-up (about 11 s on 2 cores)."""


def test_a_strict_campaign_that_finds_several_classes_ends_within_a_tenth_more(tmp_path):
    started = time.monotonic()
    result = run_campaign(
        tmp_path,
        *("--target", "seed", "--strict", "--seed", "7", "--workers", "2"),
        *("--time", f"{SECONDS}s", "--database", str(tmp_path / "db")),
        timeout=SECONDS * (1 + ALLOWANCE) + 120,  # long enough to see by how much a run overshoots
    )
    wall = time.monotonic() - started
    print(f"--time {SECONDS}s ended after {wall:.1f} s of wall time")
    assert result.returncode == 1, result.stdout + result.stderr
    assert wall <= SECONDS * (1 + ALLOWANCE), f"--time {SECONDS}s ended after {wall:.1f} s:\n{result.stdout}"

    report = json.loads((tmp_path / "report.json").read_text())
    (tally,) = report["targets"].values()
    assert len(tally["classes"]) >= 3, "a strict run finds several classes"
    cut_short = {name for name, saved in tally["saved"].items() if saved.get("fully_shrunk") is False}
    entries = [load_entry(path) for path in sorted((tmp_path / "corpus" / "found").glob("*.json"))]
    unfinished = [entry for entry in entries if not entry.finding.fully_shrunk]
    assert len(unfinished) == len(cut_short), "each cut-short class saved once, marked in its file"
    assert len(report["not_fully_shrunk"]) == len(unfinished)
    if not cut_short:
        # On a quiet machine every shrink may end before the deadline (seen
        # once in CI): then nothing may claim otherwise.
        assert "not fully shrunk" not in result.stdout, result.stdout
    else:
        assert {entry.known_issue for entry in unfinished} - {None} <= cut_short, "unknown classes save no name"
        assert f"{len(unfinished)} finding(s) saved as they stood, not fully shrunk" in result.stdout
        assert "keeps their progress" in result.stdout

    spent = report["time"]
    assert spent["shrinking"] > 0 and spent["exploring"] > 0
    charged = sum(spent[activity] for activity in ("exploring", "shrinking", "replaying", "reducing", "other"))
    assert charged == pytest.approx(spent["wall"] * spent["workers"], abs=1.0)
    assert sum(tally["seconds"].values()) <= charged + 1.0


def test_the_deadline_keeps_the_teardown_inside_the_allowance():
    assert deadline(0.0, 240) == pytest.approx(240 + 24 - 12), "4 minutes: half the allowance kept for ending"
    assert deadline(0.0, 40) == pytest.approx(40), "40 s: all of it"
    assert deadline(0.0, 10) == pytest.approx(10), "never before the budget itself"


def test_a_cut_short_finding_says_so_until_a_finished_shrink_reaches_it(tmp_path, capsys, recorded):
    scenario, observations = recorded("backward-on-some-ranks-only")
    violations = judge(scenario, observations)
    path, new = save_finding(tmp_path, scenario, observations, violations, found_by="test", fully_shrunk=False)
    assert new and not load_entry(path).finding.fully_shrunk
    assert main(["show", str(path)]) == 0
    assert "not fully shrunk: the campaign's deadline cut its shrink short" in capsys.readouterr().out

    again, new = save_finding(tmp_path, scenario, observations, violations, found_by="test")
    assert again == path and not new
    assert load_entry(path).finding.fully_shrunk, "a finished shrink that ends here marks the file"
    assert main(["show", str(path)]) == 0
    assert "not fully shrunk" not in capsys.readouterr().out


def failing_above(limit: int, calls: list[int]):
    def test(n: int) -> None:
        calls.append(n)
        assert n < limit

    return test


def once(test, database, phases=(Phase.reuse, Phase.shrink)):
    run = settings(database=database, phases=phases, verbosity=Verbosity.quiet, deadline=None)(
        given(st.integers(0, 10**6))(test)
    )
    with pytest.raises(AssertionError):
        run()


def test_hypothesis_shrinks_a_case_left_by_a_cut_short_shrink_only_if_it_does_not_replay_exactly():
    """Hypothesis does not shrink a failure it replays exactly from the
    database (it takes it for a finished shrink's minimal case);
    ``_resume_later`` stores it so that it resumes."""
    calls: list[int] = []
    test = failing_above(1000, calls)
    key = function_digest(test)

    exact = InMemoryExampleDatabase()
    exact.save(key, choices_to_bytes((5000,)))
    once(test, exact)
    assert calls[-1] == 5000, "replayed exactly: not shrunk"

    calls.clear()
    resumed = InMemoryExampleDatabase()
    _resume_later(resumed, key, (5000,))
    once(test, resumed)
    assert calls[0] == 5000 and calls[-1] == 1000, "replayed with a choice to spare: shrunk to the minimum"


def test_hypothesis_keeps_the_case_a_stop_refused_unless_forgotten():
    """Any ``BaseException`` leaving the test, ``Stop`` included, makes
    Hypothesis save the case as a failure; left there, every later run
    would replay a case that never ran."""
    calls: list[int] = []

    def stopped(n: int) -> None:
        calls.append(n)
        raise Stop

    key = function_digest(stopped)
    database = InMemoryExampleDatabase()
    with pytest.raises(Stop):
        settings(database=database, phases=(Phase.generate,), verbosity=Verbosity.quiet)(
            given(st.integers(0, 10**6))(stopped)
        )()
    refused = choices_to_bytes((calls[-1],))
    assert list(database.fetch(key)) == [refused]
    _forget(database, key, [refused])
    assert not list(database.fetch(key))
