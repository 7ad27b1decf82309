"""Re-record the observations the oracle unit tests judge.

    python tests/record_observations.py [NAME ...]

With names, re-records only those (a corpus file's stem or a clean run's name).
Runs every corpus scenario, and the clean runs below, on CPU ranks and saves
scenario plus observations (with the single-process reference) under
``tests/recorded/``. The oracle tests read these files
instead of spawning ranks, so they are fast and show exactly which real
observations each verdict rests on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fsdp_fuzz.corpus import load_entry
from fsdp_fuzz.data import (
    FsdpSettings,
    Scenario,
    Step,
    observations_to_json,
    scenario_to_json,
)
from fsdp_fuzz.execute.spawn import run_scenario
from fsdp_fuzz.jsonfmt import format_json
from fsdp_fuzz.models.seed import seed_model

ROOT = Path(__file__).resolve().parent.parent


def clean_runs() -> dict[str, Scenario]:
    """Four ranks keeping one order through optimizer steps and gradient
    accumulation, for clause 4's numbers."""
    schedule = (Step(), Step(optimizer_step=True), Step(optimizer_step=True), Step(backward=False))
    return {
        f"clean-{strategy.lower().replace('_', '-')}-sgd": Scenario(
            model=seed_model(),
            ranks=(schedule,) * 4,
            fsdp=FsdpSettings(sharding_strategy=strategy),
            description="every rank takes the same path; outputs and gradients must match the reference",
        )
        for strategy in ("HYBRID_SHARD", "NO_SHARD")
    }


def main() -> None:
    target = ROOT / "tests" / "recorded"
    target.mkdir(exist_ok=True)
    scenarios = {path.stem: load_entry(path).scenario for path in sorted((ROOT / "corpus").rglob("*.json"))}
    scenarios.update(clean_runs())
    if sys.argv[1:]:
        unknown = set(sys.argv[1:]) - set(scenarios)
        if unknown:
            sys.exit(f"no recorded scenario named {sorted(unknown)}; choose from {sorted(scenarios)}")
        scenarios = {name: scenarios[name] for name in sys.argv[1:]}
    for name, scenario in scenarios.items():
        observations = run_scenario(scenario)
        document = {"scenario": scenario_to_json(scenario), "observations": observations_to_json(observations)}
        (target / f"{name}.json").write_text(format_json(document) + "\n")
        print(f"recorded {name}")


if __name__ == "__main__":
    main()
