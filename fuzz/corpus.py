"""Saved scenarios: the three kinds of corpus file, reading and writing them.

- A bare scenario (``corpus/seed/``) must keep the contract.
- ``{"known_issue": NAME, "scenario": ...}`` (``corpus/known/``) reproduces a
  triaged FSDP misbehaviour and must keep failing in that known way.
- A finding (``corpus/found/<id>.json``), written by a campaign after
  shrinking: the scenario with the verdict, observations, torch version,
  backend and placement (device, backend, visible GPUs) it was found with
  (files saved before placements were recorded load as well). Its name is a hash of the scenario, so finding
  the same minimal case twice gives one file. ``"fully_shrunk": false``
  marks one whose shrink the campaign's deadline cut short.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fsdp_fuzz.data import (
    Clause,
    Observations,
    Scenario,
    ScenarioError,
    Violation,
    observations_from_json,
    observations_to_json,
    read_json,
    scenario_from_json,
    scenario_to_json,
)
from fsdp_fuzz.execute.devices import Placement, visible_gpus
from fsdp_fuzz.jsonfmt import format_json
from fsdp_fuzz.judge.known_issues import KnownIssue, issue_named
from fsdp_fuzz.reduce.record import Reduction

if TYPE_CHECKING:
    import pytest

    from fsdp_fuzz.reduce.reducer import Reduced

FOUND_DIR = "found"
Signature = tuple[tuple[Clause, int, "int | None"], ...]


@dataclass(frozen=True)
class RecordedFinding:
    """What a finding looked like when the campaign saved it."""

    violations: tuple[str, ...]
    signature: Signature
    """(clause, rank, step) of each violation: what replay compares. Saved
    with the clause's stable id; files saved before ids read as well."""
    torch_version: str
    backend: str
    observations: Observations | None
    placement: dict[str, Any] | None = None
    """``{"device", "backend", "gpus"}``; None in files saved before it was recorded."""
    fully_shrunk: bool = True
    """False where the campaign's deadline cut the shrink short: the scenario
    is Hypothesis's best so far, and a later campaign shrinks it further."""

    def where(self) -> str:
        """``gloo``, or where the placement was recorded ``cuda with gloo, 1 GPU(s)``."""
        if self.placement is None:
            return self.backend
        gpus = f", {self.placement['gpus']} GPU(s)" if self.placement["device"] == "cuda" else ""
        return f"{self.placement['device']} with {self.placement['backend']}{gpus}"


@dataclass(frozen=True)
class CorpusEntry:
    path: Path
    scenario: Scenario
    known_issue: str | None = None
    finding: RecordedFinding | None = None
    reduction: Reduction | None = None
    """What the reducer kept and measured (``fsdp_fuzz.reduce``), where it ran."""

    @property
    def keeps_contract(self) -> bool:
        """Whether the entry promises a clean verdict (a seed file)."""
        return self.known_issue is None and self.finding is None


def signature(violations: tuple[Violation, ...]) -> Signature:
    return tuple((v.clause, v.rank, v.step) for v in violations)


def scenario_id(scenario: Scenario) -> str:
    """A stable content hash: the scenario's JSON without its description,
    keys sorted, so neither wording nor field order changes it."""
    encoded = scenario_to_json(scenario)
    encoded.pop("description", None)
    canonical = json.dumps(encoded, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def corpus_root(config: pytest.Config) -> Path:
    """``--corpus`` if given, else ``corpus/`` under pytest's rootdir."""
    option = config.getoption("--corpus", default=None)
    return Path(option) if option else config.rootpath / "corpus"


def corpus_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json"))


def load_entry(path: Path) -> CorpusEntry:
    """Read any kind of corpus file; every problem is a ``ScenarioError``
    that starts with the file's name."""
    path = Path(path)
    document = read_json(path)
    try:
        if isinstance(document, dict) and "scenario" in document:
            name = document.get("known_issue")
            if name is not None:
                issue_named(name)
            finding = _finding_from_json(document) if "finding" in document else None
            reduction = Reduction.from_json(document["reduction"]) if document.get("reduction") else None
            return CorpusEntry(path, scenario_from_json(document["scenario"]), name, finding, reduction)
        return CorpusEntry(path, scenario_from_json(document))
    except (ScenarioError, KeyError) as exc:
        raise ScenarioError(f"{path}: {exc.args[0]}") from None


def finding_document(
    scenario: Scenario,
    observations: Observations,
    violations: tuple[Violation, ...],
    known: KnownIssue | None,
    found_by: str,
    fully_shrunk: bool = True,
    reduction: Reduction | None = None,
) -> dict[str, Any]:
    document = {
        "id": scenario_id(scenario),
        "known_issue": known.name if known else None,
        "finding": {
            "violations": [str(v) for v in violations],
            "signature": [list(entry) for entry in signature(violations)],
            "found_by": found_by,
            "torch_version": torch.__version__,
            "backend": observations.backend,
            "placement": recorded_placement(observations).to_json(),
            "fully_shrunk": fully_shrunk,
        },
        "scenario": scenario_to_json(scenario),
        "observations": observations_to_json(observations),
    }
    if reduction is not None:
        document["reduction"] = reduction.to_json()
    return document


def reduced_document(entry: CorpusEntry, reduced: Reduced) -> dict[str, Any]:
    """``entry`` as a file of the same kind holding ``reduced``'s scenario,
    its run and the reduction's record."""
    scenario = replace(reduced.scenario, description=_reduced_description(entry, reduced.reduction))
    run = reduced.run
    if entry.finding is not None:
        found_by = read_json(entry.path).get("finding", {}).get("found_by", "")
        return finding_document(
            scenario, run.observations, run.violations, run.known, found_by, True, reduced.reduction
        )
    return {
        "known_issue": entry.known_issue,
        "scenario": scenario_to_json(scenario),
        "reduction": reduced.reduction.to_json(),
    }


def _reduced_description(entry: CorpusEntry, reduction: Reduction) -> str:
    said = entry.scenario.description
    return f"reduced from {entry.path.name} in {reduction.runs} live runs" + (f"; before: {said}" if said else "")


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write a corpus document whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, document)


def recorded_placement(observations: Observations) -> Placement:
    """Where the observed ranks ran: this process saves what its own ranks
    observed, so the GPUs they saw are the ones it sees."""
    gpus = visible_gpus() if observations.device == "cuda" else 0
    return Placement(observations.device, observations.backend, gpus)


def save_finding(
    root: Path,
    scenario: Scenario,
    observations: Observations,
    violations: tuple[Violation, ...],
    known: KnownIssue | None = None,
    found_by: str = "",
    fully_shrunk: bool = True,
    reduction: Reduction | None = None,
) -> tuple[Path, bool]:
    """Write the finding under ``root/found/``; returns its path and whether
    it is new. An existing file is kept as first recorded, except that a
    finished shrink ending where a cut-short one stood marks it fully shrunk."""
    path = Path(root) / FOUND_DIR / f"{scenario_id(scenario)}.json"
    if path.exists():
        if fully_shrunk:
            document = read_json(path)
            if document.get("finding", {}).get("fully_shrunk") is False:
                document["finding"]["fully_shrunk"] = True
                _write(path, document)
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, finding_document(scenario, observations, violations, known, found_by, fully_shrunk, reduction))
    return path, True


def _write(path: Path, document: dict[str, Any]) -> None:
    """Whole or not at all: a reader never sees half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(format_json(document) + "\n")
    temporary.replace(path)


def _finding_from_json(document: dict[str, Any]) -> RecordedFinding:
    encoded = document["finding"]
    if not isinstance(encoded, dict):
        raise ScenarioError("'finding' must be an object")
    try:
        observations = document.get("observations")
        recorded = RecordedFinding(
            violations=tuple(str(line) for line in encoded["violations"]),
            signature=tuple(
                (Clause.parse(str(clause)), int(rank), None if step is None else int(step))
                for clause, rank, step in encoded["signature"]
            ),
            torch_version=str(encoded["torch_version"]),
            backend=str(encoded["backend"]),
            observations=None if observations is None else observations_from_json(observations),
            placement=_placement_from_json(encoded.get("placement")),
            fully_shrunk=encoded.get("fully_shrunk", True) is not False,
        )
    except KeyError as exc:
        raise ScenarioError(f"finding: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"finding: malformed signature ({exc})") from None
    return recorded


def _placement_from_json(encoded: Any) -> dict[str, Any] | None:
    if encoded is None:
        return None
    if not isinstance(encoded, dict) or not {"device", "backend", "gpus"} <= encoded.keys():
        raise ScenarioError("finding: 'placement' must be an object with device, backend and gpus")
    return {"device": str(encoded["device"]), "backend": str(encoded["backend"]), "gpus": int(encoded["gpus"])}
