"""The seed test's scenarios, exactly, and the Hypothesis family around them.

``test_fsdp_exec_order.py`` checks one model on two ranks with three
hand-written schedules; here each becomes a ``Scenario`` (the files under
``corpus/seed/`` are these, saved), and ``seed_family_scenarios`` generalises
them: any rank may flip its path before any step, steps alternate freely
between training and eval, either sharding strategy.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from fsdp_fuzz.data import Fsdp2Settings, FsdpSettings, Scenario, Step
from fsdp_fuzz.models.seed import SEED_CHOICE, seed_model

SEED_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")
WORLD_SIZE = 2


def seed_step(alternative: int, mode: str = "train", backward: bool = True) -> Step:
    return Step(mode=mode, path={SEED_CHOICE: (alternative,)}, backward=backward)


def _scenario(strategy: str, ranks: list[list[Step]], description: str) -> Scenario:
    return Scenario(
        model=seed_model(),
        ranks=tuple(tuple(steps) for steps in ranks),
        fsdp=FsdpSettings(sharding_strategy=strategy),
        freeze_untaken=True,
        description=description,
    )


def invalid_first_iter_order(strategy: str) -> Scenario:
    """Rank 0 takes layer1, every other rank layer2, in the first forward."""
    return _scenario(
        strategy,
        [[seed_step(0 if rank == 0 else 1, backward=False)] for rank in range(WORLD_SIZE)],
        f"seed test_invalid_first_iter_order, {strategy}: ranks diverge in the first forward",
    )


def invalid_later_iter_order(strategy: str, iters_before_path_change: int) -> Scenario:
    """All ranks agree for some iterations, then every rank but 0 flips for good."""
    ranks = []
    for rank in range(WORLD_SIZE):
        after = 0 if rank == 0 else 1
        ranks.append([seed_step(0)] * iters_before_path_change + [seed_step(after), seed_step(after)])
    return _scenario(
        strategy,
        ranks,
        f"seed test_invalid_later_iter_order, {strategy}, iters_before_path_change={iters_before_path_change}: "
        "ranks but 0 flip after agreeing, warned once",
    )


def train_eval(strategy: str, iterations: int = 3, epochs: int = 2) -> Scenario:
    epoch = [seed_step(0)] * iterations + [seed_step(0, mode="eval", backward=False)] * iterations
    return _scenario(
        strategy,
        [epoch * epochs for _ in range(WORLD_SIZE)],
        f"seed test_train_eval, {strategy}: train and eval epochs, never warned",
    )


def order_ends_early(strategy: str = "FULL_SHARD") -> Scenario:
    """Rank 1 skips the branch point in its only forward, so rank 0's order
    check for layer1 waits for a peer that never comes: a hang, every time."""
    return _scenario(
        strategy,
        [[seed_step(0, backward=False)], [Step(path={SEED_CHOICE: ()}, backward=False)]],
        f"rank 1 skips the branch point in the first forward, {strategy}",
    )


def seed_scenarios() -> dict[str, Scenario]:
    """Every seed test and parameter combination, by corpus file stem."""
    found = {}
    for strategy in SEED_STRATEGIES:
        tag = strategy.lower()
        found[f"invalid_first_iter_order-{tag}"] = invalid_first_iter_order(strategy)
        for iters in (1, 3):
            found[f"invalid_later_iter_order-{tag}-iters{iters}"] = invalid_later_iter_order(strategy, iters)
        found[f"train_eval-{tag}"] = train_eval(strategy)
    return found


def on_fsdp2(scenario: Scenario) -> Scenario:
    """The scenario under ``fully_shard``: FULL_SHARD's resharding after
    forward is ``reshard_after_forward=True``, SHARD_GRAD_OP's keeping the
    parameters until backward is ``False``."""
    return replace(
        scenario,
        engine="fsdp2",
        fsdp=FsdpSettings(),
        fsdp2=Fsdp2Settings(reshard_after_forward=scenario.fsdp.sharding_strategy == "FULL_SHARD"),
        description=f"{scenario.description} (fully_shard)",
    )


def seed_family_scenarios(max_steps: int = 6, engine: str = "fsdp1") -> st.SearchStrategy[Scenario]:
    """Seed model, two ranks; each rank may flip its path before any step;
    under ``engine``. Shrinks toward one training step, no flips, FULL_SHARD."""
    family = _seed_family(max_steps)
    return family.map(on_fsdp2) if engine == "fsdp2" else family


@st.composite
def _seed_family(draw: st.DrawFn, max_steps: int) -> Scenario:
    strategy = draw(st.sampled_from(SEED_STRATEGIES))
    modes = draw(st.lists(st.sampled_from(("train", "eval")), min_size=1, max_size=max_steps))
    ranks = []
    for _ in range(WORLD_SIZE):
        flips = draw(st.lists(st.booleans(), min_size=len(modes), max_size=len(modes)))
        alternative, steps = 0, []
        for mode, flip in zip(modes, flips, strict=True):
            alternative ^= flip
            steps.append(seed_step(alternative, mode=mode, backward=mode == "train"))
        ranks.append(steps)
    return _scenario(strategy, ranks, "seed family")


def write_seed_corpus(directory: str) -> None:
    """(Re)write ``corpus/seed`` from the definitions above.

    ``python -c "from fsdp_fuzz.generate.seed_family import write_seed_corpus as w; w('corpus/seed')"``
    """
    from pathlib import Path

    from fsdp_fuzz.data import dumps

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for stem, scenario in seed_scenarios().items():
        (target / f"{stem}.json").write_text(dumps(scenario))
