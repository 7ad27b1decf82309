"""Standalone reproducers: a scenario as one Python script that needs only torch.

``reproducer_script(scenario)`` returns the text of a script for an upstream
bug report. It embeds the model and every rank's schedule as plain literals,
rebuilds the model exactly as ``models.build.build_model`` does (same
parameters, same frozen ones, same path mechanism), runs the ranks the way
``fuzz.spawn.run_scenario`` and ``fuzz.execute`` do (file rendezvous, the
scenario's own process groups, the debug level set before wrapping, the same
inputs), and prints what each rank did in each step, ending with one line
``REPRO-RESULT <json>`` for machines. ``python -m fuzz repro FILE`` writes one.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from fuzz.scenario import HYBRID_NODE_SIZE, HYBRID_STRATEGIES, Scenario, step_to_json
from models.spec import spec_to_json

__all__ = ["reproducer_script"]

WIDTH = 120
"""ruff's line length, which the generated script keeps."""
MODEL_WIDTH = 100
"""Narrower for the model tree, so that its nesting shows."""
DEFAULT_TIMEOUT_S = 10


def reproducer_script(scenario: Scenario, *, title: str = "", notes: str = "") -> str:
    """The text of a self-contained script (torch and the standard library
    only) that runs ``scenario`` on freshly spawned ranks and reports what
    FSDP did. ``title`` and ``notes`` open its docstring."""
    hybrid = scenario.fsdp.sharding_strategy in HYBRID_STRATEGIES
    code = [
        _MODEL_CODE,
        _HYBRID_GROUP_CODE if hybrid else _GROUP_CODE,
        _RANK_CODE,
        _PARENT_CODE,
    ]
    head = [_docstring(scenario, title, notes), _IMPORTS.strip(), _scenario_constants(scenario, hybrid)]
    return "\n\n".join(head) + "\n\n\n" + "\n\n\n".join(part.strip("\n") for part in code) + "\n"


# The generated parts ---------------------------------------------------------


def _docstring(scenario: Scenario, title: str, notes: str) -> str:
    paragraphs = [_wrap(title.strip() or "FSDP forward-order reproducer")]
    if notes.strip():
        paragraphs.append(_wrap(notes.strip()))
    if scenario.description:
        paragraphs.append(_wrap(f"Scenario: {scenario.description}"))
    paragraphs.append(
        _wrap(
            f"{scenario.world_size} ranks run the steps in SCHEDULE on the model in MODEL, every unit wrapped in "
            f"FullyShardedDataParallel with FSDP_KWARGS, at distributed debug level {scenario.debug_level}. "
            "Needs only torch:"
        )
        + "\n\n"
        + "    python repro.py                  # gloo on CPU\n"
        + "    python repro.py --device cuda    # NCCL, one GPU per rank\n"
        + f"    python repro.py --timeout 30     # seconds before a collective counts as hung "
        f"(default {DEFAULT_TIMEOUT_S})"
    )
    paragraphs.append(
        _wrap(
            "It prints each rank's outcome per step (ok, error, hang, crash or not_run, with the warnings FSDP "
            "raised) and ends with one line `REPRO-RESULT <json>`."
        )
    )
    text = "\n\n".join(paragraphs).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'"""{text}\n"""'


def _wrap(text: str) -> str:
    """Wrap long lines, keep short ones (and their indentation) as they are."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        if len(line) <= MODEL_WIDTH:
            lines.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        lines.extend(
            textwrap.wrap(
                line,
                width=MODEL_WIDTH,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def _scenario_constants(scenario: Scenario, hybrid: bool) -> str:
    settings = scenario.fsdp
    prefetch = f"BackwardPrefetch.{settings.backward_prefetch}" if settings.backward_prefetch else "None"
    fsdp = [
        f'    "sharding_strategy": ShardingStrategy.{settings.sharding_strategy},',
        f'    "use_orig_params": {settings.use_orig_params},',
        f'    "forward_prefetch": {settings.forward_prefetch},',
        f'    "backward_prefetch": {prefetch},',
        f'    "limit_all_gathers": {settings.limit_all_gathers},',
        f'    "sync_module_states": {settings.sync_module_states},',
    ]
    model = spec_to_json(scenario.model)
    lines = [
        "# The scenario " + "-" * 64,
        "",
        f"WORLD_SIZE = {scenario.world_size}",
        f"SEED = {scenario.seed}  # torch.manual_seed for building the model; also seeds every input batch",
        f"BATCH_SIZE = {scenario.batch_size}",
        f"DEBUG_LEVEL = {_inline(scenario.debug_level)}  # dist.set_debug_level before wrapping in FSDP",
        f"COLLECTIVE_CHECKER = {scenario.collective_checker}"
        "  # create FSDP's process groups at DETAIL: torch wraps them in its collective checker",
        f"FREEZE_UNTAKEN = {scenario.freeze_untaken}"
        "  # before each step, make trainable exactly the alternatives its path runs",
    ]
    if hybrid:
        lines.append(f"NODE_SIZE = {HYBRID_NODE_SIZE}  # hybrid sharding: a node is this many consecutive ranks")
    lines += [
        "",
        "# Every FSDP(...) gets these, plus process_group and device_id.",
        "FSDP_KWARGS = {",
        *fsdp,
        "}",
        "",
        "# A tree of sequentials (fsdp_unit: wrapped in FSDP of its own; the root always is) and branch points",
        "# (choice), whose alternatives the path of each step picks. linear: [in_features, out_features].",
        f"IN_FEATURES = {model['in_features']}",
        f"MODEL = {_literal(model['root'], 0, len('MODEL = '), MODEL_WIDTH)}",
        "",
        "# Per rank, one step per line. path: branch point -> the alternatives its forwards run, in order",
        "# (a branch point left out runs alternative 0 once; [] skips it). Unless a step says otherwise:",
        '# "forwards": 1, "backward": True (of the sum of the outputs), "grad_enabled": True, "optimizer_step": False.',
        "SCHEDULE = [",
    ]
    for rank, steps in enumerate(scenario.ranks):
        lines.append(f"    [  # rank {rank}")
        for index, step in enumerate(steps):
            text = _literal(step_to_json(step), 8, 8, WIDTH) + ","
            comment = f"  # step {index}"
            if "\n" in text:
                lines.append(" " * 8 + comment.strip())
                lines.append(" " * 8 + text)
            elif 8 + len(text) + len(comment) <= WIDTH:
                lines.append(" " * 8 + text + comment)
            else:
                lines.append(" " * 8 + text)
        lines.append("    ],")
    lines.append("]")
    return "\n".join(lines)


def _inline(value: Any) -> str:
    """``value`` as a one-line Python literal; strings in double quotes where that is exact."""
    if isinstance(value, str):
        return json.dumps(value) if value.isascii() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_inline(key)}: {_inline(item)}" for key, item in value.items()) + "}"
    return repr(value)


def _literal(value: Any, indent: int, column: int, width: int) -> str:
    """``value`` as a Python literal that starts at ``column``: on one line where
    it fits (with a trailing comma), else one item per line at ``indent + 4``."""
    inline = _inline(value)
    if column + len(inline) + 1 <= width or not isinstance(value, (dict, list, tuple)) or not value:
        return inline
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            head = f"{pad}{_inline(key)}: "
            items.append(head + _literal(item, indent + 4, len(head), width) + ",")
        opener, closer = "{", "}"
    else:
        items = [pad + _literal(item, indent + 4, indent + 4, width) + "," for item in value]
        opener, closer = "[", "]"
    return opener + "\n" + "\n".join(items) + "\n" + " " * indent + closer


# The fixed parts: plain code, written out as it runs ---------------------------

_IMPORTS = """
import argparse
import json
import os
import queue
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
"""

_MODEL_CODE = '''
# The model -------------------------------------------------------------------

PATH = {}
"""The path of the forward in progress, read by every branch point: set before each step."""


class Sequential(nn.Module):
    """Children run one after another; sequentials and branch points are named, others numbered."""

    def __init__(self, node):
        super().__init__()
        self.child_names = []
        for index, child in enumerate(node["children"]):
            name = child.get("sequential", child.get("choice", str(index)))
            self.add_module(name, build(child))
            self.child_names.append(name)

    def forward(self, x):
        for name in self.child_names:
            x = getattr(self, name)(x)
        return x


class BranchPoint(nn.Module):
    """Runs the alternatives PATH lists for it, in order; left out of PATH: alternative 0 once."""

    def __init__(self, node):
        super().__init__()
        self.choice_name = node["choice"]
        self.alternative_names = [alternative["sequential"] for alternative in node["alternatives"]]
        for alternative in node["alternatives"]:
            self.add_module(alternative["sequential"], Sequential(alternative))

    def forward(self, x):
        for index in PATH.get(self.choice_name, [0]):
            x = getattr(self, self.alternative_names[index])(x)
        return x


def build(node):
    if "linear" in node:
        return nn.Linear(*node["linear"], bias=node.get("bias", True))
    if "relu" in node:
        return nn.ReLU()
    return Sequential(node) if "sequential" in node else BranchPoint(node)


def named_nodes(node, module, enclosing):
    """(node, module, innermost enclosing alternative) of every sequential and branch point, outer first."""
    yield node, module, enclosing
    for child in node.get("children", node.get("alternatives", [])):
        name = child.get("sequential", child.get("choice"))
        if name is not None:
            yield from named_nodes(child, getattr(module, name), name if "choice" in node else enclosing)


def build_model():
    """The model with parameters that depend on SEED alone, and its branch points (node, module, enclosing)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Sequential(MODEL)
    nodes = list(named_nodes(MODEL, model, MODEL["sequential"]))
    for node, module, _ in nodes:
        if node.get("frozen"):
            for parameter in module.parameters():
                parameter.requires_grad = False
    branch_points = [entry for entry in nodes if "choice" in entry[0]]
    if FREEZE_UNTAKEN:
        freeze_untaken(branch_points, {})
    return model, branch_points


def freeze_untaken(branch_points, path):
    """Make trainable exactly the alternatives the path runs; an untaken alternative freezes all it holds."""
    active = {MODEL["sequential"]}
    for node, module, enclosing in branch_points:
        runs = path.get(node["choice"], [0])
        for index, alternative in enumerate(node["alternatives"]):
            trainable = enclosing in active and index in runs
            if trainable:
                active.add(alternative["sequential"])
            # Once wrapped, getattr finds the alternative's FSDP wrapper: its flat (or original) parameters.
            for parameter in getattr(module, alternative["sequential"]).parameters():
                parameter.requires_grad = trainable


def wrap_units(node, module, fsdp_kwargs):
    """Wrap every fsdp_unit below node in FSDP, innermost first."""
    for child in node.get("children", node.get("alternatives", [])):
        name = child.get("sequential", child.get("choice"))
        if name is None:
            continue
        child_module = getattr(module, name)
        wrap_units(child, child_module, fsdp_kwargs)
        if child.get("fsdp_unit"):
            setattr(module, name, FSDP(child_module, **fsdp_kwargs))


def step_input(rank, step, forward):
    """A batch that depends only on where it is used, never on RNG history."""
    generator = torch.Generator().manual_seed(((SEED * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((BATCH_SIZE, IN_FEATURES), generator=generator)
'''

_GROUP_CODE = '''
# The ranks -------------------------------------------------------------------


def fsdp_group(rank, timeout_s):
    """FSDP's process group: a group of its own, so a stuck collective fails after timeout_s."""
    dist.set_debug_level(dist.DebugLevel.DETAIL if COLLECTIVE_CHECKER else dist.DebugLevel.OFF)
    group = dist.new_group(timeout=timedelta(seconds=timeout_s))
    dist.set_debug_level(dist.DebugLevel.OFF)
    return group
'''

_HYBRID_GROUP_CODE = '''
# The ranks -------------------------------------------------------------------


def fsdp_group(rank, timeout_s):
    """FSDP's process groups for hybrid sharding, (intra-node, inter-node), with nodes of NODE_SIZE
    consecutive ranks; a stuck collective fails after timeout_s. Every rank creates every group, in order."""
    dist.set_debug_level(dist.DebugLevel.DETAIL if COLLECTIVE_CHECKER else dist.DebugLevel.OFF)
    timeout = timedelta(seconds=timeout_s)
    nodes, local = range(WORLD_SIZE // NODE_SIZE), range(NODE_SIZE)
    intra = [dist.new_group([node * NODE_SIZE + i for i in local], timeout=timeout) for node in nodes]
    inter = [dist.new_group([node * NODE_SIZE + i for node in nodes], timeout=timeout) for i in local]
    dist.set_debug_level(dist.DebugLevel.OFF)
    return intra[rank // NODE_SIZE], inter[rank % NODE_SIZE]
'''

_RANK_CODE = '''
# How gloo and NCCL word a collective that outlived the group's timeout; a peer
# that timed out first may close the connection before this rank's timeout fires.
TIMEOUT_MARKERS = (
    "Timed out",
    "timed out",
    "Watchdog caught collective operation timeout",
    "Connection closed by peer",
)


@contextmanager
def observed():
    """Yields the outcome of the block: ok, or error/hang (the exception is swallowed), and every warning."""
    outcome = {"status": "ok"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield outcome
        except Exception as exc:
            message = str(exc) or "".join(traceback.format_exception_only(exc)).strip()
            timed_out = any(marker in message for marker in TIMEOUT_MARKERS)
            outcome.update(status="hang" if timed_out else "error", error_type=type(exc).__name__)
            outcome["error_message"] = message
    outcome["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]


def run_step(model, optimizer, branch_points, rank, index, step, device):
    model.train(step["mode"] == "train")
    PATH.clear()
    PATH.update(step["path"])
    if FREEZE_UNTAKEN:
        freeze_untaken(branch_points, step["path"])
    with torch.set_grad_enabled(step.get("grad_enabled", True)):
        outputs = [model(step_input(rank, index, k).to(device)) for k in range(step.get("forwards", 1))]
    total = sum((output.sum() for output in outputs), torch.zeros((), device=device))
    grad_sum = None
    if step.get("backward", True):
        total.backward()
        grads = [p.grad.sum() for p in model.parameters() if p.grad is not None]
        grad_sum = float(sum(grads, torch.zeros((), device=device)).cpu())
    if step.get("optimizer_step", False):
        optimizer.step()
        optimizer.zero_grad()
    return {"output_sum": float(total.detach().cpu()), "grad_sum": grad_sum}


def rank_main(rank, store_path, use_cuda, timeout_s, reports, release):
    """One rank: report setup's outcome, then each step's; after a failed step run nothing more."""
    # The default group only creates FSDP's groups, and never carries the collective checker.
    dist.set_debug_level(dist.DebugLevel.OFF)
    store = dist.FileStore(store_path, WORLD_SIZE)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    group = fsdp_group(rank, timeout_s)
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    fsdp_kwargs = {"process_group": group, "device_id": device, **FSDP_KWARGS}

    with observed() as setup:
        model, branch_points = build_model()
        dist.set_debug_level(getattr(dist.DebugLevel, DEBUG_LEVEL))
        wrap_units(MODEL, model, fsdp_kwargs)
        model = FSDP(model, **fsdp_kwargs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reports.put((rank, setup))
    if setup["status"] == "ok":
        for index, step in enumerate(SCHEDULE[rank]):
            with observed() as outcome:
                outcome.update(run_step(model, optimizer, branch_points, rank, index, step, device))
            reports.put((rank, outcome))
            if outcome["status"] != "ok":
                break
    reports.put((rank, None))
    # Stay until every rank is done, so that a stuck peer ends by its own timeout, not by our exit.
    while not release.wait(timeout=1) and mp.parent_process().is_alive():
        pass
    os._exit(0)
'''

_PARENT_CODE = '''
# The parent ------------------------------------------------------------------

STARTUP_S = 180  # for the first report: starting Python, importing torch, the rendezvous


def collect(processes, reports, timeout_s):
    """Each rank's outcomes, setup first, until every rank is done, has died (crash) or is silent for longer
    than any collective may take (hang: it is killed)."""
    outcomes = [[] for _ in processes]
    done = set()
    last_report, limit = time.monotonic(), STARTUP_S
    while len(done) < len(processes):
        try:
            rank, outcome = reports.get(timeout=0.1)
        except queue.Empty:
            for rank in sorted(set(range(len(processes))) - done):
                if not processes[rank].is_alive():
                    message = f"rank {rank} died (exit code {processes[rank].exitcode})"
                    outcomes[rank].append({"status": "crash", "error_message": message})
                    done.add(rank)
            if time.monotonic() - last_report > limit:
                for rank in sorted(set(range(len(processes))) - done):
                    message = f"no report from rank {rank} for {limit:.0f} s: killed"
                    outcomes[rank].append({"status": "hang", "error_message": message})
                break
            continue
        last_report, limit = time.monotonic(), 2 * timeout_s + 30
        if outcome is None:
            done.add(rank)
        else:
            outcomes[rank].append(outcome)
    # Steps a rank never reached did not run.
    total = 1 + len(SCHEDULE[0])
    return [(reported + [{"status": "not_run"}] * total)[:total] for reported in outcomes]


def first_line(text):
    return text.splitlines()[0] if text else text


def is_order_warning(warning):
    return warning[1].startswith("Forward order differs")


def describe(step):
    words = [step["mode"]] + [f"{name}={taken}" for name, taken in step["path"].items()]
    if step.get("forwards", 1) != 1:
        words.append(f"forwards={step['forwards']}")
    if not step.get("grad_enabled", True):
        words.append("no grad")
    if not step.get("backward", True):
        words.append("no backward")
    if step.get("optimizer_step", False):
        words.append("optimizer step")
    return ", ".join(words)


def print_outcomes(outcomes):
    labels = [["setup"] + [f"step {i}: {describe(step)}" for i, step in enumerate(steps)] for steps in SCHEDULE]
    width = max(len(label) for rank_labels in labels for label in rank_labels)
    for rank, rank_outcomes in enumerate(outcomes):
        print(f"rank {rank}")
        for label, outcome in zip(labels[rank], rank_outcomes, strict=True):
            status = outcome["status"]
            if status == "ok" and "output_sum" in outcome:
                status += f" (output sum {outcome['output_sum']:.6g}"
                if outcome["grad_sum"] is not None:
                    status += f", grad sum {outcome['grad_sum']:.6g}"
                status += ")"
            elif status in ("error", "hang", "crash"):
                said = [outcome.get("error_type"), first_line(outcome["error_message"])]
                status += ": " + ": ".join(part for part in said if part)
            print(f"  {label:<{width}}  {status}")
            others = {}
            for warning in outcome.get("warnings", []):
                if is_order_warning(warning):
                    print(textwrap.indent(f"{warning[0]}: {warning[1]}", " " * (width + 6)))
                else:
                    key = f"{warning[0]}: {first_line(warning[1])[:100]}"
                    others[key] = others.get(key, 0) + 1
            for key, count in others.items():
                print(" " * (width + 6) + f"(other warning{f' x{count}' if count > 1 else ''}) {key}")


def result(outcomes):
    def summary(outcome):
        return {
            "status": outcome["status"],
            "error_type": outcome.get("error_type"),
            "error_message": first_line(outcome.get("error_message")),
            "order_warnings": [first_line(w[1]) for w in outcome.get("warnings", []) if is_order_warning(w)],
            "output_sum": outcome.get("output_sum"),
            "grad_sum": outcome.get("grad_sum"),
        }

    return {
        "ranks": [[summary(outcome) for outcome in steps] for _, *steps in outcomes],
        "setup": [summary(setup) for setup, *_ in outcomes],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a collective counts as hung")
    parser.add_argument("--dump-initial-state", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.dump_initial_state:
        model, _ = build_model()
        trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
        torch.save({"state_dict": model.state_dict(), "requires_grad": trainable}, args.dump_initial_state)
        return 0
    use_cuda = args.device == "cuda"
    if use_cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < WORLD_SIZE:
            print(
                f"error: --device cuda runs each of the {WORLD_SIZE} ranks on a GPU of its own with NCCL: "
                f"it needs {WORLD_SIZE} GPUs, but {available} are visible. Run with --device cpu instead.",
                file=sys.stderr,
            )
            return 2

    context = mp.get_context("spawn")
    reports, release = context.Queue(), context.Event()
    workdir = tempfile.mkdtemp(prefix="fsdp-repro-")
    store_path = os.path.join(workdir, "store")  # rendezvous through a file: no ports
    processes = [
        context.Process(
            target=rank_main, args=(rank, store_path, use_cuda, args.timeout, reports, release), daemon=True
        )
        for rank in range(WORLD_SIZE)
    ]
    try:
        for process in processes:
            process.start()
        outcomes = collect(processes, reports, args.timeout)
    finally:
        release.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        shutil.rmtree(workdir, ignore_errors=True)

    backend = "nccl" if use_cuda else "gloo"
    print(f"\\n{WORLD_SIZE} ranks, {backend} on {args.device}, torch {torch.__version__}, timeout {args.timeout:g} s")
    print_outcomes(outcomes)
    print("REPRO-RESULT " + json.dumps(result(outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

