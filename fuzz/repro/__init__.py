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
from fsdp_fuzz.repro.contract import contract_for
from fsdp_fuzz.repro.engines import FSDP2_CONTROLS, engine_source
from fsdp_fuzz.repro.model import block_paths, model_source
from fsdp_fuzz.repro.schedule import schedule_source
from fsdp_fuzz.repro.text import docstring, literal

__all__ = ["STYLES", "reproducer_script"]

STYLES = ("script", "unittest")
MACHINERY = (
    "# " + "-" * 98 + "\n"
    "# Below: how each rank runs its program and reports what it saw, the unsharded reference, and\n"
    "# the checks check() calls. The same in every reproducer (fsdp_fuzz.repro generates it)."
)
ORDER_WARNING = "Forward order differs"


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
    contract = contract_for(scenario)
    fsdp2 = scenario.engine == "fsdp2"
    cast = scenario.param_dtype != "float32" or getattr(scenario.mixed_precision, "output_dtype", None) is not None
    imports = _imports(style, model.imports, engine.imports)
    constants = [
        f"WORLD_SIZE, STEPS, SEED, BATCH, IN_FEATURES = {scenario.world_size}, {scenario.num_steps}, "
        f"{scenario.seed}, {scenario.batch_size}, {scenario.model.in_features}",
        "RANKS = range(WORLD_SIZE)",
        f'DEVICE, TIMEOUT_S = "{device}", {float(timeout_s)!r}  # TIMEOUT_S: seconds before a collective is hung',
        "PATH = {}  # branch point -> the alternatives the forwards of the step under way run there",
        f"ORDER_WARNING = {literal(ORDER_WARNING)}  # FSDP's order error and warning start so",
    ]
    if engine.stepping is not None:
        controls = (
            [
                name
                for name in (*FSDP2_CONTROLS, "reset_iter_state", "reshard_after_forward", "unshard", "reshard")
                if f"{name}=" in engine.stepping
            ]
            if fsdp2
            else ["gradient_sync"]
        )
        constants.append(f"CONTROLS = {literal(controls)}  # step fields the engine applies around a step")
    if style == "script":
        constants.append(f"KEPT = {literal(_kept(scenario))}")
    constants += contract.constants
    sections = [
        _docstring(entry, scenario, style, device),
        "\n".join(imports),
        "\n".join(constants),
        model.classes,
        model.build,
        engine.wrap,
        *([engine.stepping] if engine.stepping else []),
        schedule_source(scenario),
        contract.source(),
        MACHINERY + "\n\n\n" + harness.STEP_INPUT.strip("\n"),
        harness.forwards_source(scenario, cast),
        *([harness.LOCAL.strip("\n")] if fsdp2 else []),
        *([_digest(scenario)] if contract.digest else []),
        harness.rank_source(scenario, engine, contract),
        *([harness.reference_source(scenario)] if contract.reference else []),
        *(helper.strip("\n") for helper in contract.helpers),
    ]
    if style == "script":
        sections.append(harness.SCRIPT_MAIN.strip("\n"))
    else:
        name = entry.path.stem if entry is not None else "scenario"
        sections.append(
            harness.UNITTEST_MAIN.strip("\n").format(cls=_class_name(entry, scenario), test=_test_name(name))
        )
    head, rest = sections[:3], [section for section in sections[3:] if section]
    return "\n\n".join(head) + "\n\n\n" + "\n\n\n".join(rest) + "\n"


def _imports(style: str, model: tuple[str, ...], engine: tuple[str, ...]) -> list[str]:
    standard = {"import warnings", "from datetime import timedelta", *(line for line in model if "torch" not in line)}
    if style == "script":
        standard |= {"import argparse", "import os", "import queue", "import sys", "import tempfile", "import time"}
        standard.add("import traceback")
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
    source = harness.DIGEST.strip("\n").format(local="local(parameter)" if scenario.engine == "fsdp2" else "parameter")
    if not scenario.ignored_blocks:
        return source
    paths = [block_paths(scenario.model)[name] for name in scenario.ignored_blocks]
    skip = f"    skip = {{id(p) for name in {literal(paths)} for p in model.get_submodule(name).parameters()}}\n"
    source = source.replace("    total = 0.0\n", "    total = 0.0\n" + skip)
    return source.replace(
        "for parameter in model.parameters():",
        "for parameter in model.parameters():\n        if id(parameter) in skip:\n            continue",
    )


def _kept(scenario: Scenario) -> str:
    engine = "fully_shard" if scenario.engine == "fsdp2" else "FullyShardedDataParallel"
    return f"FSDP kept its promise: {engine} ran every rank's program as the contract says."


def _docstring(entry: CorpusEntry | None, scenario: Scenario, style: str, device: str) -> str:
    if entry is not None and entry.known_issue:
        title = f"FSDP known issue {entry.known_issue}."
    elif entry is not None and entry.finding is not None:
        title = f"FSDP fuzz finding {entry.path.stem}."
    elif entry is not None:
        title = f"FSDP scenario {entry.path.stem}, from the fuzzer's corpus: FSDP must keep its promise."
    else:
        title = "FSDP forward-path scenario, generated by fsdp_fuzz."
    paragraphs = [title]
    if scenario.description:
        paragraphs.append(scenario.description[0].upper() + scenario.description[1:].rstrip(".") + ".")
    if entry is not None and entry.known_issue:
        issue = issue_named(entry.known_issue)
        paragraphs.append(issue.description)
        if issue.upstream:
            paragraphs.append("Upstream: " + ", ".join(reference.url for reference in issue.upstream))
    if entry is not None and entry.finding is not None:
        paragraphs.append(f"The fuzzer saw (torch {entry.finding.torch_version}): {entry.finding.violations[0]}")
    engine = "fully_shard" if scenario.engine == "fsdp2" else "FullyShardedDataParallel"
    if style == "script":
        paragraphs.append(
            f"{scenario.world_size} ranks, {engine}, debug level {scenario.debug_level}. Needs only torch: "
            f"`python repro.py [--device cuda] [--timeout S] [--verbose]` prints one sentence and exits 1 when "
            "FSDP breaks its promise, 0 when it keeps it."
        )
    else:
        paragraphs.append(
            f"{scenario.world_size} ranks, {engine}, debug level {scenario.debug_level}; gloo on CPU (NCCL where "
            "every rank has a GPU of its own). Run with pytest or python; PyTorch's test harness needs expecttest."
        )
    return docstring("\n\n".join(paragraphs))


def _class_name(entry: CorpusEntry | None, scenario: Scenario) -> str:
    return "TestFullyShardRepro" if scenario.engine == "fsdp2" else "TestFSDPRepro"


def _test_name(stem: str) -> str:
    return "test_" + re.sub(r"\W+", "_", stem).strip("_").lower()
