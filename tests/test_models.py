"""Specs and the builder: equal-numel alternatives, seeded parameters, paths."""

from __future__ import annotations

import pytest
import torch

from fsdp_fuzz.execute.model import build_model, freeze_untaken_alternatives
from fsdp_fuzz.models.seed import SEED_CHOICE, seed_model
from fsdp_fuzz.models.spec import (
    Choice,
    Linear,
    ModelSpec,
    Sequential,
    SpecError,
    numel,
    unit_numel,
    validate,
)

SEED_MODEL = seed_model()


def test_seed_alternatives_have_equal_numel():
    (choice,) = seed_model().choices()
    assert [numel(alternative) for alternative in choice.alternatives] == [36, 36]


def test_seed_units_own_the_seed_parameters():
    assert unit_numel(seed_model()) == {"model": 5 * 6 + 6, "layer1": 36, "layer2": 36}


def test_same_seed_gives_identical_parameters_and_another_seed_does_not():
    first, second, other = (build_model(SEED_MODEL, seed, False).module for seed in (7, 7, 8))
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_forward_follows_the_path_set_before_it():
    built = build_model(SEED_MODEL, 0, False)
    x = torch.randn(4, 5)
    outputs = {}
    for path in ((0,), (1,), (), (1, 0)):
        built.set_path({SEED_CHOICE: path})
        outputs[path] = built.module(x)
    assert not torch.allclose(outputs[(0,)], outputs[(1,)])
    layer0 = built.module.layer0(x)
    assert torch.allclose(outputs[()], torch.relu(layer0))
    assert torch.allclose(outputs[(1, 0)], torch.relu(built.module.branch.layer1(built.module.branch.layer2(layer0))))


def test_freezing_follows_the_path_like_the_seed_flip():
    built = build_model(SEED_MODEL, 0, True)
    trainable = {name for name, p in built.module.named_parameters() if p.requires_grad}
    assert trainable == {"layer0.0.weight", "layer0.0.bias", "branch.layer1.0.weight"}
    freeze_untaken_alternatives(built, {SEED_CHOICE: (1,)})
    trainable = {name for name, p in built.module.named_parameters() if p.requires_grad}
    assert trainable == {"layer0.0.weight", "layer0.0.bias", "branch.layer2.0.weight", "branch.layer2.2.weight"}


def test_validation_accepts_what_the_reducer_leaves_and_rejects_duplicate_names():
    # Alternatives of unequal numel, and a branch point of one alternative,
    # are what a reduction may keep (the generator draws neither).
    unequal = Choice("c", (Sequential("a", (Linear(4, 4),)), Sequential("b", (Linear(4, 4, bias=False),))))
    validate(ModelSpec(4, Sequential("root", (unequal,))))
    validate(ModelSpec(4, Sequential("root", (Choice("c", (Sequential("a", (Linear(4, 4),)),)),))))
    with pytest.raises(SpecError, match="1 to 4 alternatives"):
        validate(ModelSpec(4, Sequential("root", (Linear(4, 4), Choice("c", ())))))
    twice = Sequential("root", (Sequential("x", (Linear(4, 4),)), Sequential("x", (Linear(4, 4),))))
    with pytest.raises(SpecError, match="unique"):
        validate(ModelSpec(4, twice))
    with pytest.raises(SpecError, match="receives 3 features"):
        validate(ModelSpec(3, Sequential("root", (Linear(4, 4),))))
