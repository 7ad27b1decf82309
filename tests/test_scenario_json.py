"""Scenarios are plain data: JSON round-trips, and bad input is named."""

from __future__ import annotations

import json

import pytest

from fsdp_fuzz.data import SCHEMA_VERSION, ScenarioError, Step, load_scenario, scenario_from_json, scenario_to_json
from fsdp_fuzz.generate.seed_family import on_fsdp2, seed_scenarios


@pytest.mark.parametrize("name", sorted(seed_scenarios()))
def test_json_round_trip_is_the_identity(name):
    scenario = seed_scenarios()[name]
    encoded = scenario_to_json(scenario)
    assert scenario_from_json(json.loads(json.dumps(encoded))) == scenario
    assert encoded["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("name", sorted(seed_scenarios()))
def test_fsdp2_scenarios_round_trip_and_name_their_engine(name):
    scenario = on_fsdp2(seed_scenarios()[name])
    encoded = scenario_to_json(scenario)
    assert encoded["engine"] == "fsdp2" and "fsdp2" in encoded
    assert scenario_from_json(json.loads(json.dumps(encoded))) == scenario
    assert "engine" not in scenario_to_json(seed_scenarios()[name]), "FSDP1 files stay as they were"


def test_steps_read_every_field_they_write():
    """The step codec walks ``Step``'s fields: a field added to ``Step`` is
    saved and read back with no second list to update."""
    from dataclasses import fields

    from fsdp_fuzz.data import step_from_json, step_to_json

    changed = Step(
        mode="eval", path={"b": (1, 0)}, forwards=2, backward=False, grad_enabled=False, optimizer_step=True,
        gradient_sync=False, unshard=True, reshard=True, method="encode", frozen=("x", "y"), all_reduce=False,
        last_backward=False, reshard_after_forward=False, reset_iter_state=True,
    )  # fmt: skip
    assert {item.name for item in fields(Step)} == set(step_to_json(changed)), "every field differs from Step()"
    assert step_from_json(json.loads(json.dumps(step_to_json(changed)))) == changed
    with pytest.raises(ScenarioError, match="unknown step fields"):
        step_from_json({"mode": "train", "path": {}, "forwardz": 2})


def test_steps_write_only_fields_that_differ_from_the_default():
    from fsdp_fuzz.data import step_to_json

    assert step_to_json(Step(path={"b": (1,)})) == {"mode": "train", "path": {"b": [1]}}
    assert step_to_json(Step(mode="eval", backward=False, forwards=2)) == {
        "mode": "eval",
        "path": {},
        "forwards": 2,
        "backward": False,
    }


def _seed_json():
    return scenario_to_json(seed_scenarios()["train_eval-full_shard"])


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d.update(schema_version=99), "schema_version is 99"),
        (lambda d: d.pop("ranks"), "missing field 'ranks'"),
        (lambda d: d["ranks"][1].pop(), "same number of steps"),
        (lambda d: (d["ranks"].pop(), d.pop("world_size")), "at least 2 ranks"),
        (lambda d: d.update(world_size=3), "world_size is 3"),
        (lambda d: d["ranks"][0][0].update(path={"nowhere": [0]}), "unknown branch point 'nowhere'"),
        (lambda d: d["ranks"][0][0].update(path={"branch": [2]}), "has 2 alternatives"),
        (lambda d: d["ranks"][0][0].update(mode="predict"), "mode 'predict'"),
        (lambda d: d["ranks"][0][3].update(backward=True, grad_enabled=False), "backward needs"),
        (lambda d: d["fsdp"].update(sharding_strategy="ZERO9"), "ZERO9"),
        (lambda d: d["fsdp"].update(colour="blue"), "colour"),
        (lambda d: d.update(debug_level="LOUD"), "LOUD"),
        (lambda d: d.update(engine="fsdp3"), "engine 'fsdp3'"),
        (lambda d: d.update(fsdp2={"hsdp": True}), "'fsdp2' settings need engine 'fsdp2'"),
        (lambda d: d["ranks"][0][0].update(all_reduce=False), "'all_reduce' needs engine 'fsdp2'"),
        (lambda d: d["fsdp"].update(ignored=["nowhere"]), "ignored block 'nowhere'"),
        (
            lambda d: (d.update(engine="fsdp2"), d["fsdp"].update(sharding_strategy="SHARD_GRAD_OP")),
            "engine 'fsdp2' takes 'fsdp2' settings",
        ),
        (
            lambda d: (d.update(engine="fsdp2", fsdp2={"reshard_after_forward": 2}), d.pop("fsdp")),
            "must be a divisor of the shard group's size",
        ),
        (lambda d: d["model"]["root"]["children"][1].update(alternatives=[]), "1 to 4 alternatives"),
        (
            lambda d: d["model"]["root"]["children"][1]["alternatives"][0]["children"][0].update(linear=[6, 7]),
            "maps 6 features to 7",
        ),
    ],
)
def test_malformed_scenarios_are_rejected_with_the_reason(mutate, problem):
    encoded = _seed_json()
    mutate(encoded)
    with pytest.raises(ScenarioError, match=problem):
        scenario_from_json(encoded)


def test_a_bad_file_is_named_in_the_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,')
    with pytest.raises(ScenarioError, match=r"broken\.json: not valid JSON"):
        load_scenario(broken)
    missing = tmp_path / "missing.json"
    with pytest.raises(ScenarioError, match=r"missing\.json: cannot read"):
        load_scenario(missing)
