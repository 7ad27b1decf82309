"""``python -m fsdp_fuzz replay`` keeps the ranks' output out of the terminal.

A known issue that makes FSDP assert prints the assertion and the stack of
every rank that hit it; replayed, that is the expected outcome, and on the
terminal it reads as the fuzzer crashing. The command is run as a user runs
it, in a fresh interpreter with live ranks, and both sides are checked: the
terminal has the verdict and the log's name, the log has what the ranks said.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSERTING = ROOT / "corpus" / "known" / "refreeze-after-forward-without-backward-full_shard.json"
FSDP_ASSERTION = "Invalid: ``_post_backward_hook_state``"
STACK_LINE = re.compile(r'^\s*File "[^"]+", line \d+', re.MULTILINE)


def test_replay_names_the_ranks_log_and_keeps_their_stacks_in_it(tmp_path: Path) -> None:
    replay = subprocess.run(
        [sys.executable, "-m", "fsdp_fuzz", "replay", str(ASSERTING), "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    terminal = replay.stdout + replay.stderr
    assert replay.returncode == 0, terminal
    assert f"still reproduces    {ASSERTING}" in terminal
    assert FSDP_ASSERTION not in terminal
    assert "Traceback" not in terminal and not STACK_LINE.search(terminal), terminal

    logs = list(tmp_path.glob("replay-*/ranks.log"))
    assert len(logs) == 1, logs
    assert terminal.count(f"ranks' output: {logs[0]}") == 2, terminal  # at the start and in the summary
    said = logs[0].read_text()
    assert said.count(FSDP_ASSERTION) == 2, said  # one line per rank: the issue asserts on every rank
    assert "_finalize_params" in said and STACK_LINE.search(said), said
