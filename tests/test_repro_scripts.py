"""Reproducers kept honest: a generated script is a second implementation of
the executor's semantics and of the contract, so its verdict must be the
fuzzer's.

For a corpus file, the script runs in a clean interpreter (``python -I``:
nothing of the fuzzer importable) and exits 1 when FSDP breaks its promise
(the failing rank's traceback on stderr), 0 when it keeps it (saying so); the
fuzzer replays the same file on its own ranks and judges it. The two must
agree: 1 exactly where the judge finds violations.
CI runs a representative subset (FSDP1 and FSDP2, an error, a warning, a
hang, the numbers, a silent mismatch, a seed that keeps the contract); the
rest of ``corpus/known/`` is marked ``repro_slow``:

    pytest tests/test_repro_scripts.py -m repro_slow    # every other known issue

``--style unittest`` output runs under pytest in PyTorch's own
``MultiProcessTestCase`` (which needs ``expecttest``, as PyTorch's test
suite does): it must fail for the reason the script fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_fuzz.corpus import load_entry
from fsdp_fuzz.execute.pool import PoolSet
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.repro import reproducer_script

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "corpus" / "known"
TIMEOUT_S = 5.0
"""The scripts' collective timeout: the pool's, so a hang is a hang on both sides."""

REPRESENTATIVE = {
    "known/later-check-ignores-repeats": "FSDP1: a warning where none is due",
    "known/first-iteration-order-ends-early": "FSDP1: the first-iteration error never comes",
    "known/backward-on-some-ranks-only": "FSDP1: a hang, ended by the script's own timeout",
    "known/rank-dependent-freeze-drops-grads-with-orig-params": "FSDP1: gradients against the reference",
    "known/order-unchecked-below-detail": "FSDP1: units paired silently, seen in the outputs",
    "known/fsdp2-reshard-after-backward-off-loses-the-optimizer-step": "FSDP2: numbers against the reference",
    "known/fsdp2-method-before-forward-makes-a-unit-root": "FSDP2: a step that must succeed fails",
    "seed/train_eval-full_shard": "the seed test's train/eval schedule keeps the contract: exit 0",
}


def _cases() -> list:
    files = sorted(KNOWN.glob("*.json")) + sorted((ROOT / "corpus" / "seed").glob("*train_eval*.json"))
    cases = []
    for path in files:
        name = f"{path.parent.name}/{path.stem}"
        marks = () if name in REPRESENTATIVE else (pytest.mark.repro_slow,)
        cases.append(pytest.param(path, id=name, marks=marks))
    return cases


@pytest.fixture(scope="module")
def pools():
    with PoolSet(group_timeout_s=TIMEOUT_S) as pools:
        yield pools


def run_script(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """In a clean interpreter, from the script's own directory."""
    command = [sys.executable, "-I", str(script), *args]
    return subprocess.run(command, cwd=script.parent, capture_output=True, text=True, timeout=timeout)


def test_representative_files_exist():
    """The CI subset names real files, one per kind it stands for."""
    missing = [name for name in REPRESENTATIVE if not (ROOT / "corpus" / f"{name}.json").is_file()]
    assert missing == []


@pytest.mark.parametrize("path", _cases())
def test_script_verdict_is_replays(path: Path, tmp_path: Path, pools: PoolSet, request: pytest.FixtureRequest):
    if request.node.get_closest_marker("repro_slow") and "repro_slow" not in (request.config.option.markexpr or ""):
        pytest.skip("in the repro_slow set: pytest tests/test_repro_scripts.py -m repro_slow")
    entry = load_entry(path)
    violations = judge(entry.scenario, pools.run(entry.scenario))
    script = tmp_path / "repro.py"
    script.write_text(reproducer_script(entry, timeout_s=TIMEOUT_S))
    ran = run_script(script)
    replay = "violations:\n" + "\n".join(map(str, violations)) if violations else "keeps the contract"
    shown = f"stdout:\n{ran.stdout[-2000:]}\nstderr:\n{ran.stderr[-4000:]}\nreplay: {replay}"
    assert ran.returncode == int(bool(violations)), f"exit {ran.returncode}\n{shown}"
    if violations:  # the failing rank's traceback, from FSDP, not from the script's own code
        assert "Traceback (most recent call last)" in ran.stderr, shown
        assert not any(f"{error}:" in ran.stderr for error in SCRIPT_ERRORS), shown
    else:
        assert ran.stdout.strip().splitlines()[-1].startswith("FSDP kept its promise"), shown


SCRIPT_ERRORS = ("NameError", "UnboundLocalError", "SyntaxError", "IndentationError")
"""Errors only a script of its own makes: never FSDP's finding."""


UNITTEST_CASES = {
    "later-check-ignores-repeats": "UserWarning: Forward order differs from that of the first iteration",
    "fsdp2-reshard-after-backward-off-loses-the-optimizer-step": "gradients after step 0: Tensor-likes are not close",
    "first-iteration-order-ends-early": "Timed out",
}


@pytest.mark.parametrize(
    "stem",
    [
        pytest.param(stem, marks=() if index == 0 else (pytest.mark.repro_slow,))
        for index, stem in enumerate(UNITTEST_CASES)
    ],
)
def test_unittest_style_fails_for_the_right_reason(stem: str, tmp_path: Path, request: pytest.FixtureRequest):
    """The test a pull request would add fails on today's torch, and says why as the script does."""
    if request.node.get_closest_marker("repro_slow") and "repro_slow" not in (request.config.option.markexpr or ""):
        pytest.skip("in the repro_slow set: pytest tests/test_repro_scripts.py -m repro_slow")
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (the test extra installs it)")
    entry = load_entry(KNOWN / f"{stem}.json")
    test = tmp_path / f"test_{stem.replace('-', '_')}.py"
    test.write_text(reproducer_script(entry, style="unittest", timeout_s=TIMEOUT_S))
    command = [sys.executable, "-I", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    ran = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = ran.stdout + ran.stderr
    assert ran.returncode == 1, output[-4000:]
    assert "1 failed" in output, output[-4000:]
    assert UNITTEST_CASES[stem] in output, output[-4000:]
