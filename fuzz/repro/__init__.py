"""One-screen reproducers: a scenario as a script that reads like a hand-written test.

``python -m fsdp_fuzz repro FILE`` writes one. It needs only torch: the
model as an ``nn.Module`` with named submodules (``model``), the engine's
wrapping calls written out (``engines``), each rank's program as
straight-line code (``schedule``), the inputs drawn exactly as the executor
draws them, and the contract the fuzzer judged by as assertions on what the
ranks saw (``contract``, from ``fsdp_fuzz.judge.oracles``), with the
single-process reference computed in the script where the numbers matter
(``harness``). It prints one sentence and exits 1 when FSDP breaks its
promise, 0 when it keeps it, within its own timeout whatever FSDP does.

The script is a second implementation of the executor's semantics;
``tests/test_repro_scripts.py`` keeps the two in step by running the script
of every ``corpus/known/`` file and comparing its verdict with replay's.

``style="unittest"`` writes the same case as a test in PyTorch's own
``MultiProcessTestCase`` (``torch.testing._internal``, which needs the
``expecttest`` package PyTorch's test suite uses), ready for a pull request.
"""

from __future__ import annotations

import re

from fsdp_fuzz.corpus import CorpusEntry
from fsdp_fuzz.data import Scenario
from fsdp_fuzz.judge.known_issues import issue_named
from fsdp_fuzz.repro import harness
from fsdp_fuzz.repro.contract import contract_for, numbers_matter
from fsdp_fuzz.repro.engines import engine_source
from fsdp_fuzz.repro.model import block_paths, model_source
from fsdp_fuzz.repro.schedule import schedule_source
from fsdp_fuzz.repro.text import docstring, literal

__all__ = ["STYLES", "reproducer_script"]

STYLES = ("script", "unittest")


def reproducer_script(
    case: CorpusEntry | Scenario,
    *,
    style: str = "script",
    device: str = "cpu",
    timeout_s: float = harness.DEFAULT_TIMEOUT_S,
) -> str:
    """The text of a script (``style`` ``script``) or a ``MultiProcessTestCase`` test (``unittest``)
    that runs ``case`` on its own ranks and asserts what FSDP promises for it."""
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of ('cpu', 'cuda')")
    entry = case if isinstance(case, CorpusEntry) else None
    scenario = case.scenario if isinstance(case, CorpusEntry) else case
    model = model_source(scenario)
    engine = engine_source(scenario)
    numbers = numbers_matter(entry)
    contract = contract_for(scenario, numbers)
    needs = harness.Needs.of(scenario, contract)
    local = scenario.runs_on.local_tensors
    program = "    schedule(rank, step)" if contract.reference else schedule_source(scenario, inline=True)
    imports = _imports(style, model.imports, engine.imports, needs)
    constants = [
        f"WORLD_SIZE, STEPS, SEED, BATCH, IN_FEATURES = {scenario.world_size}, {scenario.num_steps}, "
        f"{scenario.seed}, {scenario.batch_size}, {scenario.model.in_features}",
        f"TIMEOUT_S = {float(timeout_s)!r}  # FSDP's process groups fail a collective that waits longer: hangs end"
        + ("; ranks on GPUs rank mod n" if device == "cuda" else ""),
    ]
    if contract.reference:
        constants.insert(1, "RANKS = range(WORLD_SIZE)")
    if scenario.model.choices():
        constants.append("PATH = {}  # branch point -> the alternatives the forwards of the step under way run there")
    constants += contract.constants
    sections = [
        _docstring(entry, scenario, style),
        "\n".join(imports),
        "\n".join(constants),
        model.classes,
        model.build,
        engine.wrap,
        *([engine.stepping] if engine.stepping else []),
        *([schedule_source(scenario)] if contract.reference else []),  # the reference runs it too
        harness.STEP_INPUT.strip("\n"),
        *([harness.forwards_source(scenario, needs)] if needs.numbers else []),
        harness.rank_source(scenario, engine, contract, needs, program, style, device),
        *([harness.LOCAL.strip("\n")] if local and (needs.numbers or contract.digest) else []),
        *([_digest(scenario)] if contract.digest else []),
        *([harness.reference_source(scenario, needs)] if contract.reference else []),
        contract.source(),
        *(helper.strip("\n") for helper in contract.helpers),
    ]
    if style == "script":
        main = harness.SCRIPT_MAIN.strip("\n").replace("KEPT", literal(_kept(numbers)))
        if device == "cuda":
            main = main.replace("def main():\n", "def main():" + harness.CUDA_CHECK.rstrip(" "), 1)
        sections.append(main)
    else:
        name = entry.path.stem if entry is not None else "scenario"
        sections.append(
            harness.UNITTEST_MAIN.strip("\n").format(cls=_class_name(entry, scenario), test=_test_name(name))
        )
    head, rest = sections[:3], [_comment_docstrings(section) for section in sections[3:] if section]
    return "\n\n".join(head) + "\n\n\n" + "\n\n\n".join(rest) + "\n"


def _comment_docstrings(section: str) -> str:
    """A top-level function's one-line docstring as a comment on its ``def`` line, where that fits."""

    def as_comment(match: re.Match) -> str:
        line = f"{match[1]}  # {match[2].rstrip('.')}"
        return line + "\n" if len(line) <= 120 else match[0]

    return re.sub(r'^(def [^\n]*:)\n    """([^"\n]+)"""\n', as_comment, section, flags=re.M)


def _imports(style: str, model: tuple[str, ...], engine: tuple[str, ...], needs: harness.Needs) -> list[str]:
    standard = {"from datetime import timedelta", *(line for line in model if "torch" not in line)}
    if needs.warnings:
        standard.add("import warnings")
    if style == "script":
        standard |= {"import json", "import os", "import sys", "import tempfile", "import time", "import traceback"}
    standard |= {line for line in engine if not line.startswith("from torch")}
    third = {"import torch", "import torch.distributed as dist", "from torch import nn", *engine, *model}
    third = {line for line in third if line.startswith(("import torch", "from torch"))}
    if style == "script":
        third.add("import torch.multiprocessing as mp")
    else:
        third.add("from torch.testing._internal.common_distributed import MultiProcessTestCase")
        third.add("from torch.testing._internal.common_utils import run_tests")
    return [*_sorted(standard), "", *_sorted(third)]


def _sorted(lines: set[str]) -> list[str]:
    """isort's order: ``import x`` lines first, then ``from x import y``, each by module."""
    plain = sorted((line for line in lines if line.startswith("import ")), key=lambda line: line.split()[1])
    froms = sorted(
        (line for line in lines if line.startswith("from ")), key=lambda line: (line.split()[1], line.lower())
    )
    return plain + froms


def _digest(scenario: Scenario) -> str:
    source = harness.DIGEST.strip("\n").format(
        local="local(parameter)" if scenario.runs_on.local_tensors else "parameter"
    )
    if not scenario.ignored_blocks:
        return source
    paths = [block_paths(scenario.model)[name] for name in scenario.ignored_blocks]
    skip = f"    skip = {{id(p) for name in {literal(paths)} for p in model.get_submodule(name).parameters()}}\n"
    source = source.replace("    total = 0.0\n", "    total = 0.0\n" + skip)
    return source.replace(
        "for parameter in model.parameters():",
        "for parameter in model.parameters():\n        if id(parameter) in skip:\n            continue",
    )


def _kept(numbers: bool) -> str:
    return "FSDP kept its promise" + ("" if numbers else " (its numbers not compared: this issue is not about them)")


SUMMARY_CHARS = 330
"""About three lines of the docstring for the issue's (or the scenario's) summary."""


def _docstring(entry: CorpusEntry | None, scenario: Scenario, style: str) -> str:
    """The issue (or the scenario) summarised in about three lines, its upstream threads, and how to run it."""
    setting = f"{scenario.world_size} ranks, {scenario.runs_on.api}, debug level {scenario.debug_level}"
    lines = []
    if entry is not None and entry.known_issue:
        issue = issue_named(entry.known_issue)
        lines.append(_summary(f"FSDP known issue {entry.known_issue} ({setting}):", issue.description))
        if issue.upstream:
            lines.append("Upstream: " + ", ".join(reference.url for reference in issue.upstream))
    else:
        if entry is not None and entry.finding is not None:
            title = f"FSDP fuzz finding {entry.path.stem}"
        elif entry is not None:
            title = f"FSDP scenario {entry.path.stem}, from the fuzzer's corpus"
        else:
            title = "FSDP scenario, generated by fsdp_fuzz"
        lines.append(_summary(f"{title} ({setting}).", scenario.description or ""))
        if entry is not None and entry.finding is not None:
            lines.append(f"The fuzzer saw (torch {entry.finding.torch_version}): {entry.finding.violations[0]}")
    if style == "script":
        lines.append(
            "Run `python repro.py` (torch only): one sentence; exit 1 while FSDP breaks its promise, 0 if not."
        )
    else:
        lines.append("Run with pytest or python; PyTorch's test harness needs expecttest.")
    return docstring("\n".join(lines))


def _summary(head: str, description: str) -> str:
    """``head`` and the description's first sentences within ``SUMMARY_CHARS`` (at least one, cut short if
    longer)."""
    sentences = re.split(r"(?<=[.!?])\s+", description.strip())
    text = head
    for index, sentence in enumerate(sentence for sentence in sentences if sentence):
        if len(text) + 1 + len(sentence) > SUMMARY_CHARS and index:
            break
        text += " " + sentence
    if len(text) > SUMMARY_CHARS:
        text = text[: SUMMARY_CHARS - 4].rsplit(" ", 1)[0] + " ..."
    return text


def _class_name(entry: CorpusEntry | None, scenario: Scenario) -> str:
    return scenario.runs_on.test_class


def _test_name(stem: str) -> str:
    return "test_" + re.sub(r"\W+", "_", stem).strip("_").lower()
