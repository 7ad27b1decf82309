"""Reproducers: a scenario as the short script a PyTorch maintainer would paste into a bug report.

``python -m fsdp_fuzz repro FILE`` writes one. It needs only torch: the model as a plain ``nn.Module``
with named submodules (``model``), the engine's calls written out (``Engine.source``, with what the
engines share in ``engines``), each rank's steps as one loop whose every field is an expression of the
rank and the step (``schedule``), batches from ``torch.manual_seed`` per rank and step, and in each
rank the promise the fuzzer's judge holds FSDP to for this scenario (``contract``, from
``fsdp_fuzz.judge.oracles``): the error it must raise, the warning it must or must not give, and where
the numbers matter each rank's outputs and the gradients against the same steps run in one process
without FSDP (``harness``, which also starts the ranks). A rank that breaks the promise fails with its
traceback; the script exits 1 exactly then (a hung rank included), 0 when FSDP keeps it.

The script is a second implementation of the executor's semantics; ``tests/test_repro_scripts.py``
keeps the two in step by running the script of every ``corpus/known/`` file and comparing its exit code
with the judge's verdict on a replay.

``style="unittest"`` writes the same rank code as a test in PyTorch's own ``MultiProcessTestCase``
(``torch.testing._internal``, which needs the ``expecttest`` package PyTorch's test suite uses).
"""

from __future__ import annotations

import re

from fsdp_fuzz.corpus import CorpusEntry
from fsdp_fuzz.data import Scenario
from fsdp_fuzz.judge.known_issues import issue_named
from fsdp_fuzz.repro import harness
from fsdp_fuzz.repro.contract import Contract, contract_for, numbers_matter
from fsdp_fuzz.repro.model import model_source
from fsdp_fuzz.repro.schedule import Schedule, forward_lines, forward_source
from fsdp_fuzz.repro.text import docstring

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
    cuda = device == "cuda"
    entry = case if isinstance(case, CorpusEntry) else None
    scenario = case.scenario if isinstance(case, CorpusEntry) else case
    schedule = Schedule(scenario)
    model = model_source(scenario, schedule)
    engine = scenario.runs_on.source(scenario, model, schedule, cuda)
    contract = contract_for(scenario, numbers_matter(entry))
    numbers = contract.numbers
    promise = contract.promise("FSDP")
    cast = scenario.param_dtype if scenario.param_dtype != "float32" and numbers.reference else None
    setter = f"{engine.module}.step = step" if model.steps_choose else None
    options = dict(step_setter=setter, cast=bool(cast), cuda=cuda)
    sections = [*model.classes, model.model, *engine.helpers]
    inline = None
    if numbers.reference:  # the reference runs the same model and forwards: functions of their own
        lines = forward_lines(scenario, schedule, model.trainable, returned=True, **options)
        sections += [
            forward_source(lines, cast),
            harness.CHECK.strip("\n"),
            harness.reference_source(scenario, model, schedule, engine.flat_gradients, cuda),
        ]
    else:
        used = any(step.backward for steps in scenario.ranks for step in steps)
        loss = all(step.backward for steps in scenario.ranks for step in steps) and engine.step_context is None
        nested = [  # what the step's body sits in, inside run(): the loop, a try, a record of warnings, no_sync
            scenario.num_steps > 1,
            any(p.raises or p.may_raise for p in contract.ranks),
            any(p.warned_in for p in contract.ranks),
            engine.step_context is not None,
        ]
        indent = 4 + 4 * sum(nested)
        inline = forward_lines(
            scenario, schedule, model.trainable, returned=False, used=used, loss=loss, indent=indent, **options
        )

    if numbers.grad_steps:
        sections.append(engine.gradients)
    if numbers.replicas_until:
        sections.append(harness.replicas_source(scenario, engine, model))
    sections.append(harness.run_source(scenario, model, engine, contract, schedule, cuda, inline))
    if style == "script":
        sections.append(harness.main_source(scenario, cuda))
    else:
        name = entry.path.stem if entry is not None else "scenario"
        sections.append(harness.unittest_source(scenario.runs_on.test_class, _test_name(name)))
    head = [
        _docstring(entry, scenario, contract, promise, style),
        "\n".join(_imports(style, model.imports, engine.imports, sections)),
        "\n".join(
            harness.constants(scenario, contract, timeout_s, promise)
            + harness.ignored_constant(scenario, model)
            + model.constants
        ),
    ]
    return "\n\n".join(head) + "\n\n\n" + "\n\n\n".join(sections) + "\n"


def _imports(style: str, model: set[str], engine: tuple[str, ...], sections: list[str]) -> list[str]:
    text = "\n".join(sections)
    standard = {"import faulthandler", "from datetime import timedelta"}
    standard |= {line for line in (*model, *engine) if "torch" not in line}
    if "warnings." in text:
        standard.add("import warnings")
    third = {"import torch", "import torch.distributed as dist", "from torch import nn"}
    third |= {line for line in (*model, *engine) if "torch" in line}
    if style == "script":
        standard |= {"import os", "import tempfile"} | ({"import sys"} if "sys." in text else set())

        third.add("import torch.multiprocessing as mp")
    else:
        third.add("from torch.testing._internal.common_distributed import MultiProcessTestCase")
        third.add("from torch.testing._internal.common_utils import run_tests")
    if not re.search(r"\bDTensor\)", text):  # isinstance(..., DTensor), not the word in a message
        third.discard("from torch.distributed.tensor import DTensor")
    if "nn." not in text:
        third.discard("from torch import nn")
    return [*_sorted(standard), "", *_sorted(third)]


def _sorted(lines: set[str]) -> list[str]:
    """isort's order: ``import x`` lines first, then ``from x import y``, each by module."""
    plain = sorted((line for line in lines if line.startswith("import ")), key=lambda line: line.split()[1])
    froms = sorted(
        (line for line in lines if line.startswith("from ")), key=lambda line: (line.split()[1], line.lower())
    )
    return plain + froms


SUMMARY_CHARS = 110
"""About a line of the docstring for the issue's (or the scenario's) summary."""


def _docstring(entry: CorpusEntry | None, scenario: Scenario, contract: Contract, promise: str, style: str) -> str:
    """What the finding is, its upstream threads, FSDP's promise here, and how to run the script."""
    lines = []
    if entry is not None and entry.known_issue:
        issue = issue_named(entry.known_issue)
        lines.append(_summary(f"FSDP known issue {entry.known_issue}:", issue.description))
        if issue.upstream:
            lines.append("Upstream: " + ", ".join(reference.thread for reference in issue.upstream))
    else:
        if entry is not None and entry.finding is not None:
            title = f"FSDP fuzz finding {entry.path.stem}"
        elif entry is not None:
            title = f"FSDP scenario {entry.path.stem}, from the fuzzer's corpus"
        else:
            title = "FSDP scenario, generated by fsdp_fuzz"
        lines.append(_summary(f"{title}:", scenario.description or ""))
        if entry is not None and entry.finding is not None:
            lines.append(f"The fuzzer saw (torch {entry.finding.torch_version}): {entry.finding.violations[0]}")
    reasons = "; ".join(contract.reasons())
    if style == "script":
        run = f"Run: python repro.py (or torchrun --nproc-per-node {scenario.world_size} repro.py); it exits 1 while"
    else:
        run = "Run with pytest (PyTorch's test harness needs expecttest); the test fails while"
    because = f" ({reasons})" if reasons else ""
    lines.append(f"{run} FSDP breaks PROMISE{because}.")

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


def _test_name(stem: str) -> str:
    return "test_" + re.sub(r"\W+", "_", stem).strip("_").lower()
