"""Reproducers, read without starting ranks: what the generator writes for every corpus file, and that the
script's model is the executor's (same parameters, freezing and forwards on every rank and step). Running
the scripts is ``tests/test_repro_scripts.py``."""

from __future__ import annotations

import ast
import functools
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_fuzz.cli import main as cli
from fsdp_fuzz.corpus import corpus_files, load_entry
from fsdp_fuzz.execute.model import build_model, freeze_scheduled, freeze_untaken_alternatives
from fsdp_fuzz.judge.oracles import FIRST_ITERATION_ERROR, expectations
from fsdp_fuzz.repro import reproducer_script
from fsdp_fuzz.repro.model import model_source
from fsdp_fuzz.repro.schedule import Grid, Schedule, expression

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
FILES = corpus_files(CORPUS)
MEDIAN_LINES_AT_MOST, LINES_AT_MOST = 60, 100
"""Non-blank lines over ``corpus/known/`` (see the README's "Reproducers"): the median and the longest
script's, the targets (60 on 2026-12-07, on the corpus whose reductions kept each symptom)."""


def script_for(stem: str, **options) -> str:
    return reproducer_script(load_entry(next(CORPUS.rglob(f"{stem}.json"))), **options)


def loaded(script: str) -> dict:
    """The script's top-level names, as ``import repro`` would give them (``main`` not run)."""
    namespace: dict = {"__name__": "repro"}
    exec(compile(script, "repro.py", "exec"), namespace)  # noqa: S102 - the generator's own output
    return namespace


@pytest.fixture(scope="module")
def scripts() -> dict[Path, str]:
    return {path: reproducer_script(load_entry(path)) for path in FILES}


def non_blank(script: str) -> int:
    return sum(1 for line in script.splitlines() if line.strip())


def test_every_script_compiles_and_imports_only_torch_and_the_standard_library(scripts):
    for path, script in scripts.items():
        tree = ast.parse(script, filename=str(path))
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported - {"torch"} <= set(sys.stdlib_module_names), path
        assert "import fsdp_fuzz" not in script and "from fsdp_fuzz" not in script, path


def test_scripts_are_ruff_clean(scripts, tmp_path):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[test]')")
    for path, script in scripts.items():
        (tmp_path / f"{path.parent.name}_{path.stem}.py").write_text(script)
        if path.parent.name == "known":  # and the same case as a MultiProcessTestCase test, and for GPUs
            entry = load_entry(path)
            (tmp_path / f"test_{path.stem.replace('-', '_')}.py").write_text(reproducer_script(entry, style="unittest"))
            (tmp_path / f"cuda_{path.stem.replace('-', '_')}.py").write_text(reproducer_script(entry, device="cuda"))
    rules = ["--select", "E,F,W,I,B,UP"]
    checked = subprocess.run(
        [ruff, "check", "--isolated", "--line-length", "120", *rules, str(tmp_path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout[-4000:]


def test_lengths_over_the_known_issues(scripts):
    lengths = {path.stem: non_blank(script) for path, script in scripts.items() if path.parent.name == "known"}
    assert statistics.median(lengths.values()) <= MEDIAN_LINES_AT_MOST
    assert max(lengths.values()) <= LINES_AT_MOST, max(lengths, key=lengths.get)


def test_the_model_is_plain_modules_with_named_submodules_each_unit_wrapped_by_name():
    script = script_for("invalid_later_iter_order-full_shard-iters1")
    assert "class Model(nn.Module):" in script and "class Branch" not in script and "PATH" not in script
    assert "self.layer1 = nn.Sequential(nn.Linear(6, 6, bias=False))" in script
    assert 'model.layer1 = FSDP(model.layer1, device_id=torch.device("cpu"))' in script
    assert 'model = FSDP(model, device_id=torch.device("cpu"))' in script
    assert "step_input" not in script and "torch.manual_seed(100 * rank + step + 1)" in script
    forward = script.split("    def forward(self, x):", 1)[1].split("\n\n", 1)[0]
    assert "self.layer2(" in forward and "self.step" in forward  # a rank turns to layer2 in a later step


def test_ranks_that_run_different_alternatives_say_so_in_the_forward():
    script = script_for("invalid_first_iter_order-full_shard")
    forward = script.split("    def forward(self, x):", 1)[1].split("\n\n", 1)[0]
    assert "self.rank" in forward and "self.step" not in forward and "Branch" not in script


def test_fsdp2_units_are_fully_shard_calls_and_setters():
    script = script_for("fsdp2-train_eval-full_shard")
    assert "fully_shard(model.layer1, " in script and "fully_shard(model, " in script

    assert 'init_device_mesh("cpu", (WORLD_SIZE,))' in script
    assert "FullyShardedDataParallel" not in script.split('"""', 2)[2]
    assert "model.set_reshard_after_backward(False)" in script_for(
        "fsdp2-reshard-after-backward-off-loses-the-optimizer-step"
    )


def accepted(script: str):
    """The test ``run``'s ``except`` applies to an error, as a function of (rank, step, error)."""
    tree = ast.parse(script)
    run = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    handler = next(node for node in ast.walk(run) if isinstance(node, ast.ExceptHandler))
    test = handler.body[0].test  # if not ...: raise
    code = compile(ast.Expression(test), "rejected", "eval")
    return lambda rank, step, error: not eval(code, {"rank": rank, "step": step, "error": error})  # noqa: S307


def test_promised_errors_are_the_oracles_expectations():
    """Each rank accepts the first-iteration error, or FSDP2's documented refusal, in exactly the steps the
    oracle names (-1: the wrapping), and no other error."""
    timeout = RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    checked = 0
    for path in FILES:
        scenario = load_entry(path).scenario
        promised = [(e.error_steps, e.refusal) for e in expectations(scenario)]
        if not any(steps or refusal for steps, refusal in promised):
            continue
        checked += 1
        test = accepted(reproducer_script(scenario))
        for rank, (steps, refusal) in enumerate(promised):
            for step in range(-1 if scenario.num_steps > 1 else 0, scenario.num_steps):  # one step: wrapped before
                order = RuntimeError(f"{FIRST_ITERATION_ERROR}: rank 0 is all-gathering ...")
                assert test(rank, step, order) == (step in steps), (path.stem, rank, step)
                if refusal is not None:
                    refused = {"ValueError": ValueError, "RuntimeError": RuntimeError}[refusal.error_type]
                    due = step in (-1, refusal.step) or scenario.num_steps == 1
                    assert test(rank, step, refused(f"... {refusal.words} ...")) == due, (path.stem, rank, step)
                assert not test(rank, step, timeout), (path.stem, rank, step)
    assert checked


def test_every_expression_of_the_schedule_is_its_table():
    """The loop's fields as expressions of rank and step: each evaluates to the scenario's value everywhere."""
    for path in FILES:
        scenario = load_entry(path).scenario
        schedule = Schedule(scenario)
        grid = Grid(scenario.world_size, scenario.num_steps)
        for field in ("mode", "forwards", "backward", "optimizer_step", "gradient_sync", "method", "path"):
            table = schedule.table(lambda step, field=field: repr(getattr(step, field)))
            text = expression(table, grid)
            for (rank, step), value in table.items():
                assert eval(text, {"rank": rank, "step": step}) == value, (path.stem, field, text)  # noqa: S307


def parameters(module: torch.nn.Module) -> list[tuple[tuple[int, ...], list[float], bool]]:
    return [(tuple(p.shape), p.detach().reshape(-1).tolist(), p.requires_grad) for p in module.parameters()]


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_the_scripts_model_is_the_executors(path: Path):
    """Built on each rank, the script's model holds the executor's parameters in the executor's order (the
    same units flatten the same parameters), frozen alike; and at every step, after the script's freezing,
    its forward on a batch is the executor's on that rank's path."""
    scenario = load_entry(path).scenario
    schedule = Schedule(scenario)
    source = model_source(scenario, schedule)
    namespace = loaded(reproducer_script(scenario))
    for rank, steps in enumerate(scenario.ranks):
        mine = namespace[source.constructor](rank) if source.takes_rank else namespace[source.constructor]()

        theirs = build_model(scenario.model, scenario.seed, scenario.freeze_untaken)
        assert parameters(mine) == parameters(theirs.module), path.stem
        for index, step in enumerate(steps):
            mine.step = index
            for block, table in source.trainable:
                for parameter in functools.reduce(getattr, block.split("."), mine).parameters():
                    parameter.requires_grad = table[(rank, index)]
            theirs.set_path(step.path)
            if scenario.freeze_untaken:
                freeze_untaken_alternatives(theirs, step.path)
            freeze_scheduled(theirs, scenario, step.frozen)
            assert [p for *_, p in parameters(mine)] == [p for *_, p in parameters(theirs.module)], (path.stem, index)
            if not step.forwards:
                continue
            mine.train(step.training)
            theirs.module.train(step.training)
            batch = torch.randn(scenario.batch_size, scenario.model.in_features)
            entry = "encode" if step.method == "encode" else "forward"
            with torch.no_grad():
                torch.testing.assert_close(getattr(mine, entry)(batch), getattr(theirs.module, entry)(batch))


def test_numbers_are_checked_against_a_run_without_fsdp_only_where_the_contract_compares_them():
    script = script_for("train_eval-full_shard")
    assert "def reference(rank)" in script and "expected = list(reference(rank))" in script
    assert "def gradients(model)" in script and "torch.testing.assert_close" in script
    assert "def reference(" not in script_for("backward-on-some-ranks-only")  # its finding is not about numbers


def test_device_and_style_options():
    cuda = script_for("later-check-ignores-repeats", device="cuda")
    assert "torch.cuda.set_device(device)" in cuda and '"nccl" if torch.cuda.device_count() >= WORLD_SIZE' in cuda
    assert "cuda" not in script_for("later-check-ignores-repeats").split('"""', 2)[2]  # CPU: gloo only
    test = script_for("later-check-ignores-repeats", style="unittest")
    assert "class TestFSDPRepro(MultiProcessTestCase):" in test and "def test_later_check_ignores_repeats" in test
    assert "run_tests()" in test and "mp.spawn" not in test
    ast.parse(test)
    with pytest.raises(ValueError, match="style"):
        script_for("later-check-ignores-repeats", style="nose")


def test_cli_writes_both_styles(tmp_path, capsys):
    source = CORPUS / "known" / "later-check-ignores-repeats.json"
    assert cli(["repro", str(source), "-o", str(tmp_path / "r.py")]) == 0
    assert "python" in capsys.readouterr().out and (tmp_path / "r.py").read_text().startswith('"""FSDP known issue')
    assert cli(["repro", str(source), "--style", "unittest", "-o", str(tmp_path / "t.py")]) == 0
    assert "MultiProcessTestCase" in (tmp_path / "t.py").read_text()
    assert cli(["repro", str(source), "--timeout", "0"]) == 2


def test_cuda_without_a_gpu_exits_naming_the_problem(tmp_path):
    """Neither verdict (exit 3) where the script was written for GPUs and torch sees none."""
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU may be visible here")
    script = tmp_path / "repro.py"
    script.write_text(script_for("later-check-ignores-repeats", device="cuda"))
    ran = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True)
    assert ran.returncode == 3 and "no GPU" in ran.stderr and ran.stdout == ""


def test_scripts_without_numbers_show_their_issue_otherwise():
    """A known issue's script that compares no numbers: in the recorded replay of its file some violation
    is not about numbers (else the script would exit 0 while replay finds the issue)."""
    import json

    from fsdp_fuzz.data import observations_from_json, scenario_from_json
    from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
    from fsdp_fuzz.judge.oracles import judge
    from fsdp_fuzz.repro.contract import NOT_ABOUT_NUMBERS, NUMBERS, numbers_matter

    assert set(NOT_ABOUT_NUMBERS) <= set(KNOWN_ISSUES)
    left_out = 0
    for path in sorted((CORPUS / "known").glob("*.json")):
        entry = load_entry(path)
        script = reproducer_script(entry)
        if numbers_matter(entry):
            continue
        left_out += 1
        recorded = json.loads((ROOT / "tests" / "recorded" / path.name).read_text())
        # The recorded run (of the file before its reduction, which kept its violation kinds).
        scenario = scenario_from_json(recorded["scenario"])
        violations = judge(scenario, observations_from_json(recorded["observations"]))
        assert any(v.clause not in NUMBERS for v in violations), (path.stem, violations)
        assert "def reference(" not in script, path.stem
    assert left_out > 0
