"""The GPU path, validated by one command on a machine with a GPU.

    python benchmarks/gpu_check.py                 # on the GPU: about 7 minutes, never more than --budget
    python benchmarks/gpu_check.py --device cpu --quick    # the same plumbing on the CPU, tiny budgets

Runs from the working tree on the machine's own torch and packages and
downloads nothing; if ``fsdp_fuzz`` is not importable it installs the tree
first (``pip install --no-deps --no-build-isolation -e .``). Then, each in a
subprocess with its own timeout, all within ``--budget`` seconds:

1. the seed corpus of both engines (``corpus/seed``, ``corpus/seed-fsdp2``)
   replayed on the device's ranks, each verdict against the recorded one;
2. the ``gpu``-marked tests (``tests/test_gpu.py``);
3. a campaign per engine (``python -m fsdp_fuzz run --time 2m``):
   scenarios per second and the failure classes met;
4. the pool benchmark (``benchmarks/pool_vs_spawn.py``) on the device's
   ranks, next to the same on CPU ranks.

It prints exactly one line on stdout, a JSON object (the steps' own output
goes to files under ``--out``), and exits 0 when every step passed, 1 when
one did not, 2 when the device cannot be used (no GPU visible: the line
says so). A step that outruns its timeout gets SIGINT (a campaign still
writes its report), then SIGKILL for its whole process group.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 20.0
"""At most this long before its timeout a step gets SIGINT, to write its
report before the SIGKILL at the timeout itself."""


class Deadline:
    """The whole check's budget: each step gets its own cap, or what is left
    after keeping the minimum every later step needs."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def timeout(self, cap_s: float, reserved_s: float) -> float:
        return max(0.0, min(cap_s, self.left() - reserved_s))


def run(command: list[str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run ``command`` from the repository root in a process group of its
    own, output to ``log``, for at most ``timeout_s``: SIGINT a little
    before (``GRACE_S``, or a quarter of the time), SIGKILL to the whole
    group at the timeout, and to whatever the step left behind."""
    started = time.monotonic()
    grace = min(GRACE_S, timeout_s / 4)
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=max(0.0, timeout_s - grace))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        finally:
            _signal_group(process, signal.SIGKILL)
    return {"rc": process.returncode, "timed_out": timed_out, "wall_s": round(time.monotonic() - started, 1)}


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def tail(log: Path, lines: int = 6) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, read in a subprocess so that this process
    never initialises CUDA."""
    probe = (
        "import json, platform, torch\n"
        "n = torch.cuda.device_count()\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
        "'cuda': torch.version.cuda, 'gpus': n, "
        "'gpu_name': torch.cuda.get_device_name(0) if n else None}))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if ran.returncode != 0:
        return {"python": platform.python_version(), "error": ran.stderr.strip().splitlines()[-1:]}
    return json.loads(ran.stdout.strip().splitlines()[-1])


def ensure_installed(out: Path) -> dict[str, Any]:
    probe = subprocess.run([sys.executable, "-c", "import fsdp_fuzz"], capture_output=True, timeout=120, cwd=ROOT)
    if probe.returncode == 0:
        return {"installed_here": False}
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    result = run(command, 180, out / "install.log")
    return {"installed_here": True, **result}


REPLAY_LINE = re.compile(r"^(?P<status>.+?)\s{2,}(?P<path>\S+\.json)$")


def replay(device: str, quick: bool, timeout_s: float, out: Path) -> dict[str, Any]:
    paths = ["corpus/seed/train_eval-full_shard.json", "corpus/seed-fsdp2/fsdp2-train_eval-full_shard.json"]
    paths = paths if quick else ["corpus/seed", "corpus/seed-fsdp2"]
    log = out / "replay.log"
    command = [sys.executable, "-m", "fsdp_fuzz", "replay", *paths, "--device", device]
    result = run(command + ["--log-dir", str(out / "replay-ranks")], timeout_s, log)
    statuses: dict[str, int] = {}
    not_passed = []
    for line in tail(log, 10_000):
        match = REPLAY_LINE.match(line.rstrip())
        if match:
            status = match.group("status").strip()
            statuses[status] = statuses.get(status, 0) + 1
            if status not in ("keeps the contract", "still reproduces"):
                not_passed.append(f"{status}: {match.group('path')}")
    files = sum(statuses.values())
    passed = result["rc"] == 0 and files > 0 and not not_passed
    return {**result, "files": files, "statuses": statuses, "not_passed": not_passed, "passed": passed}


def gpu_tests(timeout_s: float, out: Path) -> dict[str, Any]:
    junit = out / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rs", f"--junitxml={junit}"]
    command += ["-p", "no:cacheprovider"]
    if _has_module("pytest_timeout"):
        command.append(f"--timeout={max(30, int(timeout_s) - 10)}")
    result = run(command, timeout_s, out / "gpu-tests.log")
    counts: dict[str, Any] = {}
    try:
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    except (OSError, ElementTree.ParseError, AttributeError):
        counts = {"tail": tail(out / "gpu-tests.log")}
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    passed = result["rc"] == 0 and ran > 0 and not counts.get("failures") and not counts.get("errors")
    return {**result, **counts, "passed": passed}


def _has_module(name: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, timeout=60)
    return probe.returncode == 0


def campaign(engine: str, device: str, seconds: float, workers: int, timeout_s: float, out: Path) -> dict[str, Any]:
    report = out / f"campaign-{engine}.json"
    command = [sys.executable, "-m", "fsdp_fuzz", "run", "--device", device, "--engine", engine]
    command += ["--time", f"{seconds:g}s", "--report", str(report), "--workers", str(workers)]
    command += ["--database", "none", "--corpus", str(out / "corpus"), "--log-dir", str(out / "campaign-ranks")]
    result = run(command, timeout_s, out / f"campaign-{engine}.log")
    try:
        document = json.loads(report.read_text())
    except (OSError, ValueError):
        return {**result, "passed": False, "tail": tail(out / f"campaign-{engine}.log")}
    targets = document["targets"]
    scenarios = sum(tally["examples"] for tally in targets.values())
    classes: dict[str, int] = {}
    for tally in targets.values():
        for name, count in tally["classes"].items():
            classes[name] = classes.get(name, 0) + count
    return {
        **result,
        "budget_s": seconds,
        "workers": workers,
        "scenarios": scenarios,
        "per_s": round(scenarios / seconds, 2),
        "classes": classes,
        "findings": len(document["findings"]),
        "placement": document.get("placement"),
        # 0: nothing unexplained, 1: a finding (a result, not a failure of the check)
        "passed": result["rc"] in (0, 1) and scenarios > 0,
    }


def pool_benchmark(device: str, rounds: int, timeout_s: float, out: Path) -> dict[str, Any]:
    log = out / f"pool-{device}.log"
    command = [sys.executable, "benchmarks/pool_vs_spawn.py", "--device", device, "--rounds", str(rounds)]
    result = run(command + ["--spawn-rounds", "0"], timeout_s, log)
    last = tail(log, 1)
    try:
        measured = json.loads(last[0])
    except (IndexError, ValueError):
        return {**result, "passed": False, "tail": tail(log)}
    keep = ("pool_per_s", "pool_start_s", "split_s", "placement")
    return {**result, **{key: measured.get(key) for key in keep}, "passed": result["rc"] == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the plumbing, no GPU needed")
    parser.add_argument("--budget", type=float, default=465.0, help="seconds for everything (default %(default)s)")
    parser.add_argument("--campaign", type=float, default=120.0, help="seconds per engine's campaign (%(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="campaign workers (%(default)s; each keeps up to 18 ranks, each with its own CUDA context)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: one file per engine, 10 s campaigns")
    parser.add_argument("--out", type=Path, help="where the steps' logs and reports go (default: a temporary dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fsdp-fuzz-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.budget)
    seconds = 10.0 if args.quick else args.campaign
    rounds = 1 if args.quick else 2
    result: dict[str, Any] = {
        "check": "benchmarks/gpu_check.py",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "out": str(out),
    }
    code = 1
    try:
        result.update(environment(args.device))
        if args.device == "cuda" and not result.get("gpus"):
            result["error"] = (
                f"no GPU visible (torch {result.get('torch')}, CUDA build {result.get('cuda')}): "
                "run on a machine with a GPU, or --device cpu to check the plumbing"
            )
            code = 2
            return code
        result["install"] = ensure_installed(out)
        # Minimum seconds each later step keeps for itself: replay, tests, two campaigns, two benchmarks.
        reserve = {"replay": 30, "tests": 30, "campaign": seconds + 15, "bench": 25}
        later = reserve["tests"] + 2 * reserve["campaign"] + 2 * reserve["bench"]
        result["replay"] = replay(args.device, args.quick, deadline.timeout(90, later), out)
        later -= reserve["tests"]
        result["gpu_tests"] = gpu_tests(deadline.timeout(100, later), out)
        result["campaigns"] = {}
        for engine in ("fsdp1", "fsdp2"):
            later -= reserve["campaign"]
            timeout_s = deadline.timeout(seconds + 30, later)
            result["campaigns"][engine] = campaign(engine, args.device, seconds, args.workers, timeout_s, out)
        result["pool_benchmark"] = {}
        for device in dict.fromkeys((args.device, "cpu")):
            later -= reserve["bench"]
            result["pool_benchmark"][device] = pool_benchmark(device, rounds, deadline.timeout(60, max(later, 0)), out)
        steps = [result["replay"], result["gpu_tests"], *result["campaigns"].values()]
        steps += list(result["pool_benchmark"].values())
        if args.device == "cpu":
            steps.remove(result["gpu_tests"])  # skipped on the CPU, by design
        code = 0 if all(step["passed"] for step in steps) else 1
        return code
    except Exception as exc:  # noqa: BLE001 - the one JSON line must come out whatever happened
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
        return code
    finally:
        result["ok"] = code == 0
        result["wall_s"] = round(time.monotonic() - deadline.started, 1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
