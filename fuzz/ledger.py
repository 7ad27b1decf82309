"""Which failure classes a campaign has saved, shared by all its workers.

One file per class in the campaign's directory, created exclusively: the
worker that creates it saves the class's finding, every other worker counts
the class from then on without failing on it. A directory, not a server, so
workers need nothing but a file system between them; workers on other
machines share the Hypothesis database instead, and their corpora merge by
content hash.

A shrink cut short by the deadline is claimed apart (``finished=False``):
one worker saves it, but the class stays unsettled, so a later run in the
campaign, or a later campaign, fails on it again and shrinks it further.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fsdp_fuzz.verdict import FailureClass


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, failure_class: FailureClass, suffix: str = ".claim") -> Path:
        digest = hashlib.sha256(failure_class.name.encode()).hexdigest()[:16]
        return self.directory / f"{digest}{suffix}"

    def claim(self, failure_class: FailureClass, scenario_id: str, finished: bool = True) -> bool:
        """True for the first worker to claim the class (with the scenario it
        saves), False for any other. An unfinished claim settles nothing."""
        path = self._path(failure_class, ".claim" if finished else ".unfinished")
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as claim:
            claim.write(f"{failure_class.name}\n{scenario_id}\n")
        return True

    def claims(self) -> dict[str, str]:
        """Class name to saved scenario id, for every class claimed so far."""
        claimed = {}
        for path in self.directory.glob("*.claim"):
            try:
                name, scenario_id = path.read_text().splitlines()[:2]
            except (OSError, ValueError):
                continue  # being written: the next look sees it
            claimed[name] = scenario_id
        return claimed
