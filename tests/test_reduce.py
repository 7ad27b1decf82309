"""The reducer: its simplifications judged on scenarios alone (no ranks),
then one reduction on live ranks, checked to keep its class, to end at a
fixpoint no single simplification leaves (re-run live), to repeat exactly,
and to be what ``python -m fsdp_fuzz reduce`` writes and ``show`` reads."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from fsdp_fuzz.cli import main
from fsdp_fuzz.corpus import corpus_files, load_entry, write_document
from fsdp_fuzz.data import Scenario, Step, scenario_to_json
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.models.seed import SEED_CHOICE, seed_model
from fsdp_fuzz.models.spec import Linear, ModelSpec, Norm, ReLU, Sequential, numel
from fsdp_fuzz.reduce.passes import Hint, candidates, collapse_branch_points, narrow_widths, size, truncate_steps, valid
from fsdp_fuzz.reduce.record import CLEAN, Flip, Reduction
from fsdp_fuzz.reduce.reducer import ReductionError, reduce
from fsdp_fuzz.verdict import judged_run

ROOT = Path(__file__).resolve().parent.parent
KNOWN = "first-iteration-order-ends-early"


def skipping_on_rank_1(world_size: int = 2, steps: int = 1) -> Scenario:
    """The seed model; rank 0 takes layer1, the others skip the branch point,
    in a first iteration without backward, then eval steps."""
    first = (Step(path={SEED_CHOICE: (0,)}, backward=False),)
    others = (Step(path={SEED_CHOICE: ()}, backward=False),)
    later = tuple(Step(mode="eval", backward=False) for _ in range(steps - 1))
    ranks = (first + later,) + tuple(others + later for _ in range(world_size - 1))
    return Scenario(model=seed_model(), ranks=ranks, freeze_untaken=True)


# The passes, on scenarios alone ---------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_files(ROOT / "corpus" / "known"), ids=lambda path: path.stem)
def test_every_candidate_of_a_corpus_scenario_is_valid_and_smaller(path):
    scenario = load_entry(path).scenario
    found = list(candidates(scenario, Hint(first_failing_step=0)))
    assert all(valid(candidate.scenario) for candidate in found)
    assert all(size(candidate.scenario) < size(scenario) for candidate in found)
    assert len({candidate.change for candidate in found}) == len(found), "each change named once"


def test_a_branch_point_every_rank_takes_one_way_becomes_that_alternative():
    scenario = dataclasses.replace(skipping_on_rank_1(), ranks=((Step(path={SEED_CHOICE: (1,)}),),) * 2)
    (collapsed,) = [c for c in collapse_branch_points(scenario, Hint()) if "becomes" in c.change]
    assert collapsed.change == "branch becomes layer2, the one alternative every rank takes"
    model = collapsed.scenario.model
    assert not list(model.choices()) and model.block("layer2").fsdp_unit
    assert all(step.path == {} for steps in collapsed.scenario.ranks for step in steps)
    assert valid(collapsed.scenario)


def test_untaken_alternatives_go_and_the_paths_follow():
    scenario = dataclasses.replace(
        skipping_on_rank_1(), ranks=((Step(path={SEED_CHOICE: (1,)}),), (Step(path={SEED_CHOICE: ()}),))
    )
    (dropped,) = [c for c in candidates(scenario) if "no rank takes" in c.change]
    assert dropped.change == "drop layer1 (no rank takes it) from branch"
    (choice,) = dropped.scenario.model.choices()
    assert [alternative.name for alternative in choice.alternatives] == ["layer2"]
    assert [steps[0].path for steps in dropped.scenario.ranks] == [{}, {SEED_CHOICE: ()}], "index 1 is now 0"


def test_narrowing_a_width_keeps_every_shape_matching():
    scenario = skipping_on_rank_1()
    narrowed = {c.change: c.scenario for c in narrow_widths(scenario, Hint())}
    assert set(narrowed) >= {"width 6 narrowed to 1", "width 6 narrowed to 3", "batch of 4 (was 8)"}
    model = narrowed["width 6 narrowed to 3"].model
    assert model.block("layer1").children == (Linear(3, 3, bias=False),)
    assert all(valid(candidate) for candidate in narrowed.values())
    # Unequal numel is kept where it comes: the class decides, not the generator's rule.
    assert numel(model.block("layer1")) != numel(model.block("layer2"))


def test_the_steps_after_the_first_failing_one_go_first():
    scenario = skipping_on_rank_1(steps=4)
    (truncated,) = truncate_steps(scenario, Hint(first_failing_step=0))
    assert truncated.change == "drop the steps after step 0" and truncated.scenario.num_steps == 1
    assert list(truncate_steps(scenario, Hint(first_failing_step=None))) == []


def test_no_candidate_backs_a_loss_that_cannot_require_grad():
    stem, head = Sequential("stem", (Norm(2),), fsdp_unit=True), Sequential("head", (Linear(2, 2),), fsdp_unit=True)
    model = ModelSpec(2, Sequential("model", (stem, head)))
    backward = Scenario(model=model, ranks=((Step(),), (Step(),)))
    assert valid(backward), "a norm's affine parameters require grad"
    frozen = dataclasses.replace(backward, ranks=((Step(frozen=("stem", "head")),), (Step(),)))
    assert not valid(frozen), "rank 0's loss has no grad_fn"
    assert valid(dataclasses.replace(backward, ranks=((Step(frozen=("head",)),), (Step(),))))
    relu_only = ModelSpec(2, Sequential("model", (ReLU(),)))
    assert not valid(Scenario(model=relu_only, ranks=((Step(),), (Step(),))))


def test_a_reduction_record_round_trips_and_says_what_the_finding_needs():
    reduction = Reduction(
        KNOWN, ("drop rank 2",), (Flip("layer1 not its own FSDP unit", CLEAN), Flip("batch of 2", KNOWN)), False, 9, 1.5
    )
    assert Reduction.from_json(reduction.to_json()) == reduction
    assert reduction.needs() == (Flip("layer1 not its own FSDP unit", CLEAN),)
    said = "\n".join(reduction.summary())
    assert "layer1 not its own FSDP unit: clean" in said and "batch of 2" not in said.split("does not need")[0]
    assert "budget ended before a fixpoint" in said and "- drop rank 2" in said


@pytest.mark.parametrize("path", corpus_files(ROOT / "corpus" / "known"), ids=lambda path: path.stem)
def test_a_recorded_reduction_is_a_fixpoint_of_its_scenario(path):
    """What the reducer recorded for a corpus file (its last round, run
    live) covers every simplification of the scenario as it stands, and
    none of them kept the class."""
    entry = load_entry(path)
    if entry.reduction is None or not entry.reduction.complete:
        pytest.skip("not reduced to a fixpoint (a variant kept as it was)")
    possible = {candidate.change for candidate in candidates(entry.scenario)}
    recorded = {flip.change: flip for flip in entry.reduction.flips}
    assert possible <= set(recorded), f"simplifications never run: {sorted(possible - set(recorded))}"
    assert entry.reduction.failure_class.startswith(entry.known_issue)
    assert not [flip for flip in recorded.values() if flip.keeps(entry.reduction.failure_class)]


# Live ranks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pools():
    with PoolSet(group_timeout_s=5.0) as running:
        yield running


def test_reduce_keeps_the_class_ends_at_a_fixpoint_and_repeats(tmp_path, pools, capsys):
    original = skipping_on_rank_1(world_size=3, steps=3)
    path = tmp_path / "case.json"
    write_document(path, {"known_issue": KNOWN, "scenario": scenario_to_json(original)})

    assert main(["reduce", str(path), "-o", str(tmp_path / "out.json"), "--log-dir", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "needs (each change below, alone, loses first-iteration-order-ends-early (" in said
    entry = load_entry(tmp_path / "out.json")
    reduced, reduction = entry.scenario, entry.reduction
    assert entry.known_issue == KNOWN and reduction.complete
    assert reduced.world_size == 2 and reduced.num_steps < original.num_steps
    assert size(reduced) < size(original) and "drop rank 2" in reduction.removed
    assert reduction.failure_class.startswith(KNOWN)
    assert judged_run(reduced, pools.run(reduced)).outcome == reduction.failure_class

    # No single simplification of the result keeps the class, run live here.
    kept = [
        c.change
        for c in candidates(reduced)
        if judged_run(c.scenario, pools.run(c.scenario)).outcome == reduction.failure_class
    ]
    assert kept == []
    assert main(["show", str(tmp_path / "out.json")]) == 0
    shown = capsys.readouterr().out
    assert all(f"- {flip.change}: {flip.outcome}" in shown for flip in reduction.needs())

    again = reduce(original, pools, failure_class=KNOWN)
    assert again.scenario == dataclasses.replace(reduced, description=original.description), "the same every time"


def test_a_reduction_stops_at_its_deadline_and_says_so(pools):
    reduced = reduce(skipping_on_rank_1(world_size=3, steps=3), pools, deadline=time.monotonic())
    assert not reduced.reduction.complete and reduced.reduction.removed == ()
    assert reduced.reduction.failure_class.startswith(KNOWN)


def test_a_scenario_that_keeps_the_contract_is_refused(pools):
    clean = Scenario(model=seed_model(), ranks=((Step(),),) * 2)
    with pytest.raises(ReductionError, match="keeps the contract"):
        reduce(clean, pools)
