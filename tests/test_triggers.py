"""Known-issue records' triggers (``KnownIssue.trigger``), on recorded files
only: no ranks, no torch.

A trigger states features a record's predicate requires before it reads any
observation, and triage asks it first: one that claimed a feature the
predicate can do without would stop a record matching its own cases. So
every file that names a record (``corpus/known/``, and the recorded runs of
``tests/recorded/`` named after it) meets the record's trigger, triage on
every recorded case names what it names with the triggers ignored, and a
near miss per kind of clause (an engine setting, a scenario field, a step
field, the schedule, the model, one of several features) shows that the
check does refuse: the recorded case with one required feature put back at
its default no longer triages to its record.

The corpus files are read with ``fsdp_fuzz.data``'s decoders, the fields
``fsdp_fuzz.corpus.load_entry`` reads, because ``fsdp_fuzz.corpus`` imports
torch.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fsdp_fuzz.data import observations_from_json, read_json, scenario_from_json
from fsdp_fuzz.features import NOTHING, Feature, Scope, features_of
from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES, triage
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.models.spec import Choice, Sequential
from tests.conftest import RECORDED, load_recorded

ROOT = Path(__file__).parent.parent
KNOWN = ROOT / "corpus" / "known"


def named_files() -> list[tuple[str, Path]]:
    """(record, file) for every corpus/known file that names a record, and
    every recorded run named after one (as ``tests/test_triage.py`` finds
    a record's reproducers)."""
    found = [(document["known_issue"], path) for path, document in _documents(KNOWN) if document.get("known_issue")]
    for path in sorted(RECORDED.glob("*.json")):
        found += [(name, path) for name in KNOWN_ISSUES if path.stem == name or path.stem.startswith(f"{name}-")]
    return found


def _documents(folder: Path):
    return [(path, read_json(path)) for path in sorted(folder.glob("*.json"))]


def judged_files() -> list[Path]:
    """Every corpus/known file and recorded run that holds observations."""
    known = [path for path, document in _documents(KNOWN) if document.get("observations")]
    return known + sorted(RECORDED.glob("*.json"))


def load_case(path: Path):
    document = read_json(path)
    return scenario_from_json(document["scenario"]), observations_from_json(document["observations"])


def file_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize(
    "name, path", [pytest.param(name, path, id=f"{name}:{file_id(path)}") for name, path in named_files()]
)
def test_every_file_that_names_a_record_meets_its_trigger(name, path):
    scenario = scenario_from_json(read_json(path)["scenario"])
    trigger = KNOWN_ISSUES[name].trigger
    assert trigger.met_by(features_of(scenario)), (
        f"{file_id(path)} names {name}, whose trigger ({trigger}) it does not meet: "
        f"it exercises {', '.join(sorted(map(str, features_of(scenario)))) or 'nothing'}"
    )


def test_every_record_is_named_by_some_file():
    """So the test above checks every record's trigger against a real case."""
    assert {name for name, _ in named_files()} == set(KNOWN_ISSUES)


@pytest.mark.parametrize("path", [pytest.param(path, id=file_id(path)) for path in judged_files()])
def test_triggers_change_no_verdict_on_a_recorded_case(monkeypatch, path):
    scenario, observations = load_case(path)
    violations = judge(scenario, observations)
    with_triggers = triage(scenario, observations, violations)
    for name, issue in list(KNOWN_ISSUES.items()):
        monkeypatch.setitem(KNOWN_ISSUES, name, replace(issue, trigger=NOTHING))
    without = triage(scenario, observations, violations)
    assert (with_triggers and with_triggers.name) == (without and without.name)


# Near misses: one required feature back at its default --------------------------


def with_fsdp(scenario, **changes):
    return replace(scenario, fsdp=replace(scenario.fsdp, **changes))


def with_fsdp2(scenario, **changes):
    return replace(scenario, fsdp2=replace(scenario.fsdp2, **changes))


def every_step(scenario, **changes):
    return replace(scenario, ranks=tuple(tuple(replace(step, **changes) for step in steps) for steps in scenario.ranks))


def rank_zero_everywhere(scenario):
    return replace(scenario, ranks=(scenario.ranks[0],) * scenario.world_size)


def every_sequential(scenario, **changes):
    def changed(node):
        if isinstance(node, Sequential):
            return replace(node, children=tuple(changed(child) for child in node.children), **changes)
        if isinstance(node, Choice):
            return replace(node, alternatives=tuple(changed(alternative) for alternative in node.alternatives))
        return node

    return replace(scenario, model=replace(scenario.model, root=changed(scenario.model.root)))


SCENARIO = Scope.SCENARIO
NEAR_MISSES = {
    "setting": (
        "order-error-key-error-with-orig-params",
        "order-error-key-error-with-orig-params",
        lambda scenario: with_fsdp(scenario, use_orig_params=False),
        {Feature(Scope.SETTING, "use_orig_params")},
    ),
    "setting-strategy": (
        "hybrid-warning-names-intra-node-rank",
        "hybrid-warning-names-intra-node-rank",
        lambda scenario: with_fsdp(scenario, sharding_strategy="FULL_SHARD"),
        {Feature(Scope.SETTING, "sharding_strategy")},
    ),
    "setting-fsdp2": (
        "fsdp2-reshard-after-backward-off-loses-the-optimizer-step",
        "fsdp2-reshard-after-backward-off-loses-the-optimizer-step",
        lambda scenario: with_fsdp2(scenario, reshard_after_backward=True),
        {Feature(Scope.SETTING, "reshard_after_backward")},
    ),
    "scenario": (
        "order-unchecked-below-detail",
        "order-unchecked-below-detail",
        lambda scenario: replace(scenario, debug_level="DETAIL"),
        {Feature(SCENARIO, "debug_level")},
    ),
    "step": (
        "optimizer-step-before-backward-uses-stale-params",
        "optimizer-step-before-backward-uses-stale-params-eval",
        lambda scenario: every_step(scenario, optimizer_step=False),
        {Feature(Scope.STEP, "optimizer_step")},
    ),
    "step-fsdp2": (
        "fsdp2-reset-iter-state-before-first-forward",
        "fsdp2-reset-iter-state-before-first-forward",
        lambda scenario: every_step(scenario, reset_iter_state=False),
        {Feature(Scope.STEP, "reset_iter_state")},
    ),
    "schedule": (
        "backward-on-some-ranks-only",
        "backward-on-some-ranks-only",
        rank_zero_everywhere,
        {Feature(Scope.SCHEDULE, "divergence")},
    ),
    "model": (
        "fsdp1-tie-across-units",
        "fsdp1-tie-across-units",
        lambda scenario: every_sequential(scenario, tied_to=None),
        {Feature(Scope.MODEL, "ties")},
    ),
    "model-checkpoint": (
        "reentrant-checkpoint-recompute-after-reshard",
        "reentrant-checkpoint-recompute-after-reshard-one-forward",
        lambda scenario: every_sequential(scenario, checkpoint=None),
        {Feature(Scope.MODEL, "checkpoint.reentrant")},
    ),
    "one-of-freezing": (
        "refreeze-after-forward-without-backward",
        "refreeze-after-forward-without-backward-full_shard",
        lambda scenario: replace(scenario, freeze_untaken=False),
        {Feature(SCENARIO, "freeze_untaken")},
    ),
    "one-of-checkpoint": (
        "checkpoint-recompute-recorded-in-first-iteration-order",
        "checkpoint-recompute-recorded-in-first-iteration-order",
        lambda scenario: every_sequential(scenario, checkpoint=None),
        {Feature(Scope.MODEL, "checkpoint.non_reentrant")},
    ),
    "one-of-frozen-by-the-model": (
        "frozen-unit-backward-state-error-with-orig-params",
        "frozen-unit-backward-state-error-with-orig-params-frozen-by-the-model",
        lambda scenario: every_sequential(scenario, frozen=False),
        {Feature(Scope.MODEL, "frozen")},
    ),
    "one-of-orig-params": (
        "frozen-unit-backward-state-error-with-orig-params",
        "frozen-unit-backward-state-error-with-orig-params",
        lambda scenario: with_fsdp(scenario, use_orig_params=False),
        {Feature(Scope.SETTING, "use_orig_params")},
    ),
}
"""By kind of trigger clause: (record, its recorded run, the change, the
features the change turns off, and nothing else)."""


@pytest.mark.parametrize("kind", sorted(NEAR_MISSES))
def test_a_near_miss_fails_the_trigger_and_triage(kind):
    name, stem, change, turned_off = NEAR_MISSES[kind]
    scenario, observations = load_recorded(stem)
    violations = judge(scenario, observations)
    assert triage(scenario, observations, violations).name == name, "the recorded case triages to its record"
    issue = KNOWN_ISSUES[name]
    assert issue.trigger.met_by(features_of(scenario))

    near = change(scenario)
    assert features_of(scenario) - features_of(near) == turned_off, "the change turns off exactly one feature"
    assert not issue.trigger.met_by(features_of(near))
    assert not issue.explains(near, observations, violations)
    triaged = triage(near, observations, violations)
    assert triaged is None or triaged.name != name


def test_one_feature_of_a_group_is_enough():
    """``FREEZES_AFTER_WRAPPING``: a freezing schedule meets it without
    ``freeze_untaken``."""
    scenario, _ = load_recorded("rank-dependent-freeze-drops-grads-with-orig-params-freezing-schedule")
    issue = KNOWN_ISSUES["rank-dependent-freeze-drops-grads-with-orig-params"]
    near = replace(scenario, freeze_untaken=False)
    assert Feature(SCENARIO, "freeze_untaken") not in features_of(near)
    assert issue.trigger.met_by(features_of(near))
    assert not issue.trigger.met_by(features_of(every_step(near, frozen=())))


def test_this_module_imports_no_torch():
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(Path(__file__))!r})\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))"
    )
    ran = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"
