"""Standalone reproducers: the executor's own source plus the scenario, runnable
with nothing but torch, observing what the fuzzer observed."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_fuzz.corpus import corpus_files, load_entry
from fsdp_fuzz.data import Status, outcome_from_json
from fsdp_fuzz.execute import devices, executor
from fsdp_fuzz.repro import reproducer_script

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"


def write_script(directory: Path, stem: str) -> Path:
    entry = load_entry(next(CORPUS.rglob(f"{stem}.json")))
    script = directory / "repro.py"
    script.write_text(reproducer_script(entry.scenario, title=f"FSDP known issue {stem}", notes="Seen by the fuzzer."))
    return script


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """In a clean interpreter (``-I``: nothing of the fuzzer importable), from the script's own directory."""
    command = [sys.executable, "-I", str(script), *args]
    return subprocess.run(command, cwd=script.parent, capture_output=True, text=True, timeout=300)


def repro_outcomes(stdout: str) -> list[list]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("REPRO-RESULT ")]
    return [[outcome_from_json(o) for o in rank] for rank in json.loads(line.removeprefix("REPRO-RESULT "))["ranks"]]


def test_the_script_is_the_executor_verbatim_plus_the_scenario(tmp_path):
    """The executor's source, its import of ``devices`` replaced by that
    module's own source (its docstring and imports aside)."""
    script = write_script(tmp_path, "hybrid-order-check-intra-node-only").read_text()
    body = inspect.getsource(executor).split('"""', 2)[2].strip("\n")
    head, tail = body.split("from fsdp_fuzz.execute.devices import (", 1)
    tail = tail.split(")\n", 1)[1]
    inlined = inspect.getsource(devices).split("import torch\n", 1)[1].strip("\n")
    assert head + inlined in script and tail in script
    outside = script.replace(head, "").replace(inlined, "").replace(tail, "")
    definitions = [node for node in ast.parse(outside).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert definitions == [], "execution code outside the executor would drift from it"
    assert "SCENARIO = {" in outside and "sys.exit(main(SCENARIO))" in outside


@pytest.mark.parametrize("path", corpus_files(CORPUS), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_scripts_import_only_torch_and_the_standard_library(path):
    tree = ast.parse(reproducer_script(load_entry(path).scenario))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported - {"torch", "__future__"} <= set(sys.stdlib_module_names)


def test_scripts_are_ruff_clean(tmp_path):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[test]')")
    script = write_script(tmp_path, "later-check-ignores-repeats")
    checked = subprocess.run(
        [ruff, "check", "--isolated", "--line-length", "120", "--select", "E,F,W,I,B,UP", str(script)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout


def test_docstring_carries_title_and_notes(tmp_path):
    script = write_script(tmp_path, "order-unchecked-below-detail").read_text()
    docstring = ast.get_docstring(ast.parse(script))
    assert docstring.startswith("FSDP known issue order-unchecked-below-detail\n\nSeen by the fuzzer.")
    assert "python repro.py --device cuda" in docstring


@pytest.mark.parametrize(
    "stem",
    [
        "invalid_later_iter_order-full_shard-iters1",
        "hybrid-warning-names-intra-node-rank",
        "fsdp2-assumes-the-same-program-experts",
    ],
)
def test_script_in_a_clean_interpreter_observes_what_the_fuzzer_recorded(stem, tmp_path, recorded):
    """Same statuses, errors, warnings, output and gradient sums, and the same
    collectives attributed to the same units, as the recorded fuzzer run."""
    _, observations = recorded(stem)
    ran = run_script(write_script(tmp_path, stem))
    assert ran.returncode == 0, ran.stderr
    for rank, (observed, reproduced) in enumerate(zip(observations.ranks, repro_outcomes(ran.stdout), strict=True)):
        # Recorded before parameter digests were reported.
        reproduced = [dataclasses.replace(outcome, param_digest=None) for outcome in reproduced]
        assert [observed.setup, *observed.steps] == reproduced, f"rank {rank}"


def test_a_hang_in_a_clean_interpreter_is_a_hang(tmp_path):
    ran = run_script(write_script(tmp_path, "first-iteration-order-ends-early"), "--timeout", "3")
    assert ran.returncode == 0, ran.stderr
    statuses = [[outcome.status for outcome in rank] for rank in repro_outcomes(ran.stdout)]
    assert Status.HANG in {status for rank in statuses for status in rank}
    assert "hang" in ran.stdout


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_cuda_without_a_gpu_exits_naming_the_fix(tmp_path):
    ran = run_script(write_script(tmp_path, "train_eval-full_shard"), "--device", "cuda")
    assert ran.returncode == 2
    assert "no GPU is visible" in ran.stderr and "device 'cpu'" in ran.stderr


def test_nccl_on_the_cpu_exits_naming_the_fix(tmp_path):
    ran = run_script(write_script(tmp_path, "train_eval-full_shard"), "--backend", "nccl")
    assert ran.returncode == 2
    assert "NCCL runs on GPUs only" in ran.stderr


def test_bad_arguments_exit_nonzero(tmp_path):
    ran = run_script(write_script(tmp_path, "train_eval-full_shard"), "--timeout", "0")
    assert ran.returncode == 2 and "--timeout must be positive" in ran.stderr
