"""The seed test's model (``test_fsdp_exec_order.py``) as a spec.

``layer0 -> relu -> (layer1 | layer2) -> relu``, where ``layer1`` is
``Linear(6, 6)`` and ``layer2`` is ``Linear(6, 3) -> ReLU -> Linear(3, 6)``:
36 parameters each, so their all-gathers could pair up silently. Both
alternatives are FSDP units; ``layer0`` falls into the root's unit.
"""

from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, ReLU, Sequential

SEED_CHOICE = "branch"


def seed_model() -> ModelSpec:
    return ModelSpec(
        in_features=5,
        root=Sequential(
            "model",
            (
                Sequential("layer0", (Linear(5, 6), ReLU())),
                Choice(
                    SEED_CHOICE,
                    (
                        Sequential("layer1", (Linear(6, 6, bias=False),), fsdp_unit=True),
                        Sequential(
                            "layer2",
                            (Linear(6, 3, bias=False), ReLU(), Linear(3, 6, bias=False)),
                            fsdp_unit=True,
                        ),
                    ),
                ),
                ReLU(),
            ),
        ),
    )
