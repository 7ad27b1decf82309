"""Re-record the observations the oracle unit tests judge.

    python tests/record_observations.py

Runs every seed corpus scenario on two CPU ranks and saves scenario plus
observations under ``tests/recorded/``. The oracle tests read these files
instead of spawning ranks, so they are fast and show exactly which real
observations each verdict rests on.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.corpus import load_entry  # noqa: E402
from fuzz.jsonfmt import format_json  # noqa: E402
from fuzz.observations import observations_to_json  # noqa: E402
from fuzz.scenario import scenario_to_json  # noqa: E402
from fuzz.spawn import run_scenario  # noqa: E402


def main() -> None:
    target = ROOT / "tests" / "recorded"
    target.mkdir(exist_ok=True)
    for path in sorted((ROOT / "corpus").rglob("*.json")):
        entry = load_entry(path)
        observations = run_scenario(entry.scenario)
        document = {"scenario": scenario_to_json(entry.scenario), "observations": observations_to_json(observations)}
        (target / path.name).write_text(format_json(document) + "\n")
        print(f"recorded {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
