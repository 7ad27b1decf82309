"""One-screen reproducers, read without running them: what the generator
writes for every corpus file. Running them is ``tests/test_repro_scripts.py``."""

from __future__ import annotations

import ast
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_fuzz.cli import main as cli
from fsdp_fuzz.corpus import corpus_files, load_entry
from fsdp_fuzz.judge.oracles import expectations
from fsdp_fuzz.repro import reproducer_script

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
FILES = corpus_files(CORPUS)
MEDIAN_LINES_AT_MOST = 195
"""The median length over ``corpus/known/`` (see the README's "Reproducers"); a guard against growth."""


def script_for(stem: str, **options) -> str:
    return reproducer_script(load_entry(next(CORPUS.rglob(f"{stem}.json"))), **options)


@pytest.fixture(scope="module")
def scripts() -> dict[Path, str]:
    return {path: reproducer_script(load_entry(path)) for path in FILES}


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
        if path.parent.name == "known":  # and the same case as a MultiProcessTestCase test
            (tmp_path / f"test_{path.stem.replace('-', '_')}.py").write_text(
                reproducer_script(load_entry(path), style="unittest")
            )
    rules = ["--select", "E,F,W,I,B,UP"]
    checked = subprocess.run(
        [ruff, "check", "--isolated", "--line-length", "120", *rules, str(tmp_path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout[-4000:]


def test_median_length_over_the_known_issues(scripts):
    lengths = [len(script.splitlines()) for path, script in scripts.items() if path.parent.name == "known"]
    assert statistics.median(lengths) <= MEDIAN_LINES_AT_MOST


def test_the_model_has_named_submodules_and_each_unit_is_wrapped_by_name():
    script = script_for("later-check-ignores-repeats")
    assert 'branch=Branch(\n            "branch",' in script or 'branch=Branch("branch"' in script
    assert "model.branch.layer1 = FSDP(model.branch.layer1, **fsdp)" in script
    assert "model.branch.layer2 = FSDP(model.branch.layer2, **fsdp)" in script
    assert "return FSDP(model, **fsdp)" in script
    assert 'step(0, {"branch": [0]}, forwards=2)' in script


def test_fsdp2_units_are_fully_shard_calls_and_setters():
    script = script_for("fsdp2-reshard-after-backward-off-loses-the-optimizer-step")
    assert "units = dict(mesh=mesh)" in script and "fully_shard(model, **units)" in script
    assert "model.set_reshard_after_backward(False)" in script
    assert "FullyShardedDataParallel" not in script.split('"""', 2)[2].split("KEPT")[0]


def test_ranks_with_different_programs_get_their_own_block():
    script = script_for("first-iteration-order-ends-early")
    assert "    if rank == 0:\n        step(0," in script and "    if rank == 1:\n        step(0," in script


def asserted_order_errors(script: str) -> dict[int, list[int]]:
    """Rank -> the steps ``check`` demands the first-iteration error in, read from the script's syntax: the
    loop ``for rank, steps in {rank: steps, ...}.items()`` whose body tests for ``FIRST_ITERATION_ERROR``."""
    tree = next(node for node in ast.parse(script).body if isinstance(node, ast.FunctionDef) and node.name == "check")
    found: dict[int, list[int]] = {}
    for loop in (statement for statement in tree.body if isinstance(statement, ast.For)):
        if "FIRST_ITERATION_ERROR" in ast.unparse(loop) and isinstance(loop.iter, ast.Call):
            found.update(ast.literal_eval(loop.iter.func.value))
    return found


def test_the_contract_is_the_oracles_expectation():
    """The first-iteration error is asserted for each rank in exactly the steps the oracle names."""
    for stem in ("first-iteration-order-ends-early", "hybrid-order-check-intra-node-only-one-node-diverges"):
        entry = load_entry(CORPUS / "known" / f"{stem}.json")
        promised = {rank: sorted(e.error_steps) for rank, e in enumerate(expectations(entry.scenario)) if e.error_steps}
        assert promised and asserted_order_errors(reproducer_script(entry)) == promised


def test_numbers_are_checked_against_an_unsharded_reference_only_where_the_contract_compares_them():
    assert "expect_reference(broken, seen, reference()" in script_for(
        "rank-dependent-freeze-drops-grads-with-orig-params"
    )
    assert "def reference()" not in script_for("backward-on-some-ranks-only")  # the schedules are not aligned


def test_device_and_style_options():
    cuda = script_for("later-check-ignores-repeats", device="cuda")
    assert "torch.cuda.set_device(device)" in cuda and '"nccl" if gpus >= WORLD_SIZE else "gloo"' in cuda
    assert "cuda" not in script_for("later-check-ignores-repeats").split('"""', 2)[2]  # CPU: gloo only
    test = script_for("later-check-ignores-repeats", style="unittest")
    assert "class TestFSDPRepro(MultiProcessTestCase):" in test and "def test_later_check_ignores_repeats" in test
    assert "run_tests()" in test and "argparse" not in test
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
    is not about numbers (else the script would exit 0 while replay finds the issue), and the script says
    that it left them out when FSDP keeps its promise."""
    import json

    from fsdp_fuzz.data import observations_from_json
    from fsdp_fuzz.judge.known_issues import KNOWN_ISSUES
    from fsdp_fuzz.judge.oracles import judge
    from fsdp_fuzz.repro.contract import NOT_ABOUT_NUMBERS, NUMBERS, numbers_matter

    assert set(NOT_ABOUT_NUMBERS) <= set(KNOWN_ISSUES)
    left_out = 0
    for path in sorted((CORPUS / "known").glob("*.json")):
        entry = load_entry(path)
        script = reproducer_script(entry)
        if numbers_matter(entry):
            assert "numbers not compared" not in script, path.stem
            continue
        left_out += 1
        recorded = json.loads((ROOT / "tests" / "recorded" / path.name).read_text())
        violations = judge(entry.scenario, observations_from_json(recorded["observations"]))
        assert any(v.clause not in NUMBERS for v in violations), (path.stem, violations)
        assert "def reference()" not in script and "numbers not compared" in script, path.stem
    assert left_out > 0
