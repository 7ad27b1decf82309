"""Orders and iterations are derived from the scenario alone."""

from __future__ import annotations

from fsdp_fuzz.generate.seed_family import (
    _scenario,
    invalid_first_iter_order,
    invalid_later_iter_order,
    seed_step,
    train_eval,
)
from fsdp_fuzz.judge.orders import eval_divergence_step, first_iteration_divergence, forward_units, iterations
from fsdp_fuzz.models.seed import SEED_CHOICE, seed_model


def test_forward_units_of_the_seed_paths():
    model = seed_model()
    assert forward_units(model, {SEED_CHOICE: (0,)}) == ("model", "layer1")
    assert forward_units(model, {SEED_CHOICE: (1,)}) == ("model", "layer2")
    assert forward_units(model, {}) == ("model", "layer1")
    assert forward_units(model, {SEED_CHOICE: ()}) == ("model",)
    assert forward_units(model, {SEED_CHOICE: (1, 0, 1)}) == ("model", "layer2", "layer1", "layer2")


def test_iterations_close_at_backwards_and_skip_eval():
    scenario = train_eval("FULL_SHARD", iterations=2, epochs=1)
    found = iterations(scenario, 0)
    assert [it.order for it in found] == [("model", "layer1")] * 2
    assert [it.steps for it in found] == [(0,), (1,)]
    assert all(it.complete for it in found)


def test_first_iteration_divergence_names_the_position_and_units():
    divergence = first_iteration_divergence(invalid_first_iter_order("FULL_SHARD"))
    assert (divergence.position, divergence.units) == (1, ("layer1", "layer2"))
    assert first_iteration_divergence(invalid_later_iter_order("FULL_SHARD", 1)) is None


def test_eval_divergence_step():
    diverging = _scenario(
        "FULL_SHARD",
        [[seed_step(0, "eval", False)] * 2, [seed_step(0, "eval", False), seed_step(1, "eval", False)]],
        "",
    )
    assert eval_divergence_step(diverging) == 1
    assert eval_divergence_step(train_eval("FULL_SHARD")) is None
