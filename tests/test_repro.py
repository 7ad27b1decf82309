"""Standalone reproducers: the script needs only torch, rebuilds the fuzzer's
model exactly, and observes what the fuzzer observes for the same scenario."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fsdp_fuzz.corpus import corpus_files, load_entry
from fsdp_fuzz.data import FsdpSettings, Scenario, Step, StepOutcome
from fsdp_fuzz.execute.executor import build_model
from fsdp_fuzz.execute.spawn import DEFAULT_GROUP_TIMEOUT_S, run_scenario
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, ReLU, Sequential, validate
from fsdp_fuzz.repro import reproducer_script

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
REPLAYED = sorted((CORPUS / "seed").glob("*.json")) + [
    CORPUS / "known" / "order-error-key-error-with-orig-params.json",
    CORPUS / "known" / "first-iteration-order-ends-early.json",
]
GROUP_TIMEOUT_S = 20.0
"""For both the script and the fuzzer; generous, so that a loaded machine
does not turn a slow peer into a hang. Only hanging scenarios wait for it."""
HANGING = {"first-iteration-order-ends-early": DEFAULT_GROUP_TIMEOUT_S}
"""Scenarios whose ranks hang by design wait for the spawner's own timeout instead."""
ORDER_WARNING = "Forward order differs"


def write_script(directory: Path, scenario: Scenario, **kwargs) -> Path:
    script = directory / "repro.py"
    script.write_text(reproducer_script(scenario, **kwargs))
    return script


def run_script(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """In a clean interpreter (``-I``: no ``fuzz`` on the path), from the script's own directory."""
    return subprocess.run(
        [sys.executable, "-I", str(script), *args],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def repro_result(stdout: str) -> dict:
    (line,) = [line for line in stdout.splitlines() if line.startswith("REPRO-RESULT ")]
    return json.loads(line.removeprefix("REPRO-RESULT "))


def settled(status: str, error_type: str | None, message: str | None) -> tuple[str, str | None]:
    """A rank stuck in a collective ends by its own timeout or, when the peer
    that timed out first closes its connections, by "Connection closed by
    peer": which comes first is a race inside gloo. The fuzzer counts both as
    a hang (``fuzz.execute``); the script reports the message as it came."""
    if status == "error" and "Connection closed by peer" in (message or ""):
        return "hang", error_type
    return status, error_type


@pytest.mark.parametrize("path", REPLAYED, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_script_observes_what_the_fuzzer_observes(path, tmp_path):
    scenario = load_entry(path).scenario
    script = write_script(tmp_path, scenario, title=path.stem)
    timeout_s = HANGING.get(path.stem, GROUP_TIMEOUT_S)
    # The script runs beside the fuzzer's own run: two cores, half the wall time.
    process = subprocess.Popen(
        [sys.executable, "-I", str(script), "--timeout", str(timeout_s)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        observations = run_scenario(scenario, group_timeout_s=timeout_s)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    result = repro_result(stdout)

    observed = [[summary_of(outcome) for outcome in (rank.setup, *rank.steps)] for rank in observations.ranks]
    reproduced = [[setup, *steps] for setup, steps in zip(result["setup"], result["ranks"], strict=True)]
    assert [[comparable(s) for s in rank] for rank in reproduced] == [
        [comparable(s) for s in rank] for rank in observed
    ], stdout
    # Same model, same inputs: what succeeded on both sides computed the same sums, and was warned alike.
    for rank_observed, rank_reproduced in zip(observed, reproduced, strict=True):
        for fuzzer, script in zip(rank_observed, rank_reproduced, strict=True):
            assert script["order_warnings"] == fuzzer["order_warnings"]
            for key in ("output_sum", "grad_sum"):
                if fuzzer[key] is None:
                    assert script[key] is None
                else:
                    assert script[key] == pytest.approx(fuzzer[key], rel=1e-6), key


def summary_of(outcome: StepOutcome) -> dict:
    """A fuzzer outcome as the script's REPRO-RESULT writes one."""
    return {
        "status": outcome.status,
        "error_type": outcome.error_type,
        "error_message": outcome.error_message.splitlines()[0] if outcome.error_message else outcome.error_message,
        "order_warnings": [w.message.splitlines()[0] for w in outcome.warnings if w.message.startswith(ORDER_WARNING)],
        "output_sum": outcome.output_sum,
        "grad_sum": outcome.grad_sum,
    }


def comparable(summary: dict) -> tuple[str, str | None, int]:
    """Status, error type and number of order warnings, with the harness's race settled."""
    return (
        *settled(summary["status"], summary["error_type"], summary["error_message"]),
        len(summary["order_warnings"]),
    )


def _script_imports(text: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("path", corpus_files(CORPUS), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_script_imports_only_torch_and_the_standard_library(path):
    modules = _script_imports(reproducer_script(load_entry(path).scenario))
    assert "torch" in modules
    assert modules - {"torch"} <= set(sys.stdlib_module_names)


def test_scripts_are_ruff_clean(tmp_path):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    for index, path in enumerate(corpus_files(CORPUS)):
        entry = load_entry(path)
        notes = 'Seen on every run.\n\nA "quoted" note with a backslash \\ and """triple quotes""".'
        script = reproducer_script(entry.scenario, title=f"{path.stem} " * 12, notes=notes)
        (tmp_path / f"repro_{index}.py").write_text(script)
    # A step too long for one line, and the hybrid groups.
    long_step = Step(path={"outer": (0, 1) * 8, "inner": (1, 0) * 8}, forwards=3, backward=False, optimizer_step=True)
    nested = nested_scenario(True)
    scenario = replace(nested, ranks=((long_step,),) * 4, fsdp=FsdpSettings(sharding_strategy="HYBRID_SHARD"))
    script = reproducer_script(scenario)
    assert "NODE_SIZE = 2" in script and "intra" in script
    (tmp_path / "repro_long.py").write_text(script)
    for command in (["check", "--no-cache"], ["format", "--check", "--diff", "--no-cache"]):
        checked = subprocess.run(
            [ruff, *command, "--config", str(ROOT / "pyproject.toml"), str(tmp_path)],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_docstring_carries_title_and_notes():
    scenario = load_entry(REPLAYED[0]).scenario
    notes = 'Seen on every run; "quoted" \\ and """ survive.'
    text = reproducer_script(scenario, title="KeyError instead of the order error", notes=notes)
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring.splitlines()[0] == "KeyError instead of the order error"
    assert notes in docstring
    assert scenario.description.split()[0] in docstring


def nested_scenario(freeze_untaken: bool) -> Scenario:
    """Nested branch points, frozen sequentials, a branch point that is a unit
    of its own: corners of the builder that the seed model does not reach."""
    inner = Choice(
        "inner",
        (
            Sequential("inner_a", (Linear(4, 4),), fsdp_unit=True),
            Sequential("inner_b", (Linear(4, 2, bias=False), ReLU(), Linear(2, 4)), frozen=True),
        ),
        fsdp_unit=True,
    )
    outer = Choice(
        "outer",
        (
            Sequential("outer_a", (Linear(4, 4), ReLU(), inner), fsdp_unit=True),
            Sequential("outer_b", (Linear(4, 4), ReLU(), Linear(4, 4), ReLU(), Linear(4, 4))),
        ),
    )
    root = Sequential("model", (Sequential("stem", (Linear(3, 4), ReLU()), frozen=True), outer, Linear(4, 2)))
    steps = (Step(path={"outer": (0, 1), "inner": (1,)}), Step(path={"outer": ()}))
    return Scenario(ModelSpec(3, root), (steps, steps), FsdpSettings(), freeze_untaken=freeze_untaken, seed=7)


@pytest.mark.parametrize("freeze_untaken", [True, False], ids=["freeze-untaken", "frozen-only"])
def test_script_builds_the_same_initial_parameters(freeze_untaken, tmp_path):
    scenario = nested_scenario(freeze_untaken)
    validate(scenario.model)
    script = write_script(tmp_path, scenario)
    dumped = run_script(script, "--dump-initial-state", str(tmp_path / "state.pt"))
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    built = build_model(scenario.model, scenario.seed, freeze_untaken=freeze_untaken).module
    expected = built.state_dict()
    assert list(state["state_dict"]) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state["state_dict"][name], tensor), name
    trainable = {name: parameter.requires_grad for name, parameter in built.named_parameters()}
    assert state["requires_grad"] == trainable
    assert not all(trainable.values()) and any(trainable.values())


def test_cuda_without_enough_gpus_exits_naming_the_shortfall(tmp_path):
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    script = write_script(tmp_path, load_entry(REPLAYED[0]).scenario)
    completed = run_script(script, "--device", "cuda", timeout=120)
    assert completed.returncode != 0
    assert "needs 2 GPUs" in completed.stderr
    assert "REPRO-RESULT" not in completed.stdout


def test_bad_arguments_exit_nonzero(tmp_path):
    script = write_script(tmp_path, load_entry(REPLAYED[0]).scenario)
    completed = run_script(script, "--timeout", "0", timeout=120)
    assert completed.returncode == 2
    assert "--timeout must be positive" in completed.stderr
    assert "REPRO-RESULT" not in completed.stdout
