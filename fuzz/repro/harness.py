"""The script around the scenario: how a rank runs its steps and reports
them, the single-process reference where the numbers are checked, and the
two ways of starting the ranks (a plain script that exits 1 when the
finding reproduces, or a test in PyTorch's ``MultiProcessTestCase``).

Each piece is written for the scenario at hand: a step takes only the
fields its schedule sets, and the forwards, the gradients, the optimizer,
the warnings and the numbers appear only where a step or a check uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from fsdp_fuzz.data import Scenario, Step
from fsdp_fuzz.engines.base import EngineSource
from fsdp_fuzz.execute.reference import LEARNING_RATE
from fsdp_fuzz.repro.contract import Contract
from fsdp_fuzz.repro.model import block_paths
from fsdp_fuzz.repro.text import call_lines, literal

DEFAULT_TIMEOUT_S = 10.0
FORWARD_FIELDS = ("mode", "forwards", "grad_enabled", "method", "frozen")
"""The step fields the forwards read; the rest are the step's backward, optimizer and the engine's controls."""

STEP_INPUT = """
def step_input(rank, step, forward):  # the fuzzer's inputs: a batch that depends only on where it is used
    generator = torch.Generator().manual_seed(((SEED * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((BATCH, IN_FEATURES), generator=generator)
"""


@dataclass(frozen=True)
class Needs:
    """What the scenario's steps and checks use, so the script writes nothing else."""

    fields: tuple[str, ...]
    """Step fields some step sets (``Step``'s names, ``mode`` where a step evaluates), in ``Step``'s order."""
    cast: bool
    """Mixed precision: the reference casts inputs and outputs as the engine does."""
    numbers: bool
    """The checks compare outputs or gradients with the unsharded reference."""
    warnings: bool
    """The checks read FSDP1's order warnings."""
    zero_forwards: bool

    @classmethod
    def of(cls, scenario: Scenario, contract: Contract) -> Needs:
        default, steps = Step(), [step for steps in scenario.ranks for step in steps]
        used = tuple(
            f.name
            for f in fields(Step)
            if f.name != "path" and any(getattr(step, f.name) != getattr(default, f.name) for step in steps)
        )
        cast = scenario.param_dtype != "float32" or getattr(scenario.mixed_precision, "output_dtype", None) is not None
        return cls(
            used, cast, contract.reference, scenario.runs_on.order_warnings, any(step.forwards == 0 for step in steps)
        )


def _default(name: str) -> str:
    return "()" if name == "frozen" else literal(getattr(Step(), name))


def _forward_lines(scenario: Scenario, needs: Needs, magnitude: bool) -> list[str]:
    """The step's forwards as the user's program runs them: mode, path, freezing, grad mode, entry point;
    ``total`` their outputs' sum (and ``size``, the sum of its absolute values, for the reference)."""
    used = set(needs.fields)
    lines = ['model.train(mode == "train")'] if "mode" in used else []
    if scenario.model.choices():
        lines.append("PATH.update(path)")
    if scenario.freeze_untaken:
        lines.append("freeze_untaken(model)")
    scheduled = scenario.scheduled_frozen()
    if scheduled:
        paths = block_paths(scenario.model)
        lines += [
            f"for name, block in {literal({name: paths[name] for name in scheduled})}.items():",
            "    for parameter in model.get_submodule(block).parameters():",
            "        parameter.requires_grad = name not in frozen",
        ]
    entry = "model"
    if "method" in used:
        lines.append('entry = model if method == "forward" else getattr(model, method)')
        entry = "entry"
    cast = needs.cast and magnitude  # the reference's casts; the ranks' engine casts for itself
    count = "forwards" if "forwards" in used else "1"
    k = "k" if count != "1" or magnitude or needs.zero_forwards else "0"
    batch = f"step_input(rank, index, {k}).to(device" + (", cast[0])" if cast else ")")
    output = f"{entry}({batch})" + (".to(cast[1]).float()" if cast else "")
    inner = []
    if magnitude or needs.zero_forwards:
        inner.append(f"outputs = [{output} for k in range({count})]")
        inner.append(
            "total = sum((output.sum() for output in outputs), torch.zeros((), device=device))"
            if needs.zero_forwards
            else "total = sum(output.sum() for output in outputs)"
        )
    elif count == "1":
        inner.append(f"total = {output}.sum()")
    else:
        inner.append(f"total = sum({output}.sum() for k in range({count}))")
    if "grad_enabled" in used:
        lines += ["with torch.set_grad_enabled(grad_enabled):", *(f"    {line}" for line in inner)]
    else:
        lines += inner
    if magnitude:
        lines.append("size = sum(float(output.detach().abs().sum()) for output in outputs)")
    return lines


def forwards_source(scenario: Scenario, needs: Needs) -> str:
    """``run_forwards``, which the ranks and the reference share where the numbers are checked."""
    keywords = [f"{name}={_default(name)}" for name in FORWARD_FIELDS if name in needs.fields]
    keywords += ["cast=(None, None)"] * needs.cast + ["**_"]
    head = f"def run_forwards(model, rank, index, path, device, {', '.join(keywords)}):"
    if len(head) > 120:
        head = f"def run_forwards(\n    model, rank, index, path, device, {', '.join(keywords)}\n):"
    return "\n".join(
        [
            head,
            '    """The step\'s forwards: their outputs\' sum (float32) and the sum of its absolute values."""',
            *(f"    {line}" for line in _forward_lines(scenario, needs, magnitude=True)),
            "    return total, size",
        ]
    )


def rank_source(
    scenario: Scenario, engine: EngineSource, contract: Contract, needs: Needs, program: str, style: str, device: str
) -> str:
    """``run_rank``: one rank's setup and steps, each reported as it ends; after a failed step (or wrapping)
    the rank runs nothing more (FSDP's state is undefined then), as the executor does. In a script, the rank
    is a process of its own that writes each outcome as a JSON line; in a test, it calls ``report``."""
    used = set(needs.fields)
    optimizer = "optimizer_step" in used
    parameters = [f"{name}={_default(name)}" for name in needs.fields]
    if needs.numbers:
        forwards = [name for name in FORWARD_FIELDS if name in used]
        arguments = ["model", "rank", "index", "path", "device", *(f"{name}={name}" for name in forwards)]
        body = [line[16:] for line in call_lines(" " * 16, "run_forwards", arguments, lead="total, _ = ")]
    else:
        body = _forward_lines(scenario, needs, magnitude=False)
    backward = ["total.backward()"]
    if needs.numbers:
        grad = "local(g)" if scenario.runs_on.local_tensors else "g"
        backward += [
            "grads = [p.grad for p in model.parameters() if p.grad is not None]",
            f'outcome["grad"] = float(sum({grad}.float().sum() for g in grads))',
        ]
    body += ["if backward:", *(f"    {line}" for line in backward)] if "backward" in used else backward
    if optimizer:
        body += ["if optimizer_step:", "    optimizer.step()", "    optimizer.zero_grad()"]
    if needs.numbers:
        body.append('outcome["output"] = float(total.detach().cpu())')
    if contract.digest:
        body.append('outcome["digest"] = digest(model)')
    if engine.stepping is not None:
        controls = ", ".join(f"{name}={name}" for name in engine.controls)
        body = [f"with stepping(model, {controls}):", *(f"    {line}" for line in body)]
    outcome = '{"mode": mode}' if "mode" in used and needs.warnings else "{}"
    if needs.numbers:
        outcome = outcome[:-1] + (", " if outcome != "{}" else "") + '"grad": None}'
    guarded = [
        "try:",
        *(f"    {line}" for line in body),
        "except Exception as exc:",
        '    failed.append(outcome.setdefault("error", f"{type(exc).__name__}: {exc}"))',
    ]
    if needs.warnings:
        guarded = [
            "with warnings.catch_warnings(record=True) as caught:",
            '    warnings.simplefilter("always")',
            *(f"    {line}" for line in guarded),
            'outcome["warnings"] = [str(w.message) for w in caught if str(w.message).startswith("Forward order differs")]',  # noqa: E501
        ]
    signature = call_lines("    ", "def step", ["index", "path", *parameters])
    signature[-1] += ":"
    if style == "script":
        report = "print(json.dumps([{}, {}]), file=log)".format
        lines = [
            "def run_rank(rank, tmp):",
            '    """One rank, in a process of its own: build, wrap and run its program, each step\'s outcome a JSON',
            '    line in tmp/rank (-1: wrapping), kept if the rank hangs or dies."""',
            "    for fd in (1, 2):  # FSDP's own prints (an assert prints the module) stay out of the verdict",
            "        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)",
            '    log = open(f"{tmp}/{rank}", "a", buffering=1)',
        ]
        store = 'f"file://{tmp}/store"'
    else:
        report = "report({}, {})".format
        lines = [
            "def run_rank(rank, store, report):",
            '    """Join the ranks at store, build, wrap and run this rank\'s program; report(step, outcome) as each',
            '    step ends (-1: wrapping)."""',
        ]
        store = "store"
    if device == "cuda":
        lines += [
            "    gpus = torch.cuda.device_count()",
            '    device = torch.device("cuda", rank % gpus)',
            "    torch.cuda.set_device(device)",
            '    backend = "nccl" if gpus >= WORLD_SIZE else "gloo"  # NCCL where every rank has a GPU of its own',
        ]
    else:
        lines.append('    device, backend = torch.device("cpu"), "gloo"')
    lines.append(f"    dist.init_process_group(backend, init_method={store}, rank=rank, world_size=WORLD_SIZE)")
    if scenario.hybrid:
        lines += [
            "    def new_group(ranks=None):  # FSDP's own: a collective waiting past TIMEOUT_S fails, so hangs end",
            "        return dist.new_group(ranks, timeout=timedelta(seconds=TIMEOUT_S))",
            "",
        ]
        groups = engine.groups
    else:
        own = "dist.new_group(timeout=timedelta(seconds=TIMEOUT_S))  # FSDP's own: a collective waiting past it fails"
        groups = engine.groups.replace("new_group()", own)
    if scenario.collective_checker:
        lines.append(
            "    dist.set_debug_level(dist.DebugLevel.DETAIL)  # groups created now get the collective checker"
        )
    lines += [
        groups,
        f"    dist.set_debug_level(dist.DebugLevel.{scenario.debug_level})",
        "    failed = []",
        "    try:",
        "    " + engine.wrap_call,
        *([f"        optimizer = torch.optim.SGD(model.parameters(), lr={LEARNING_RATE})"] if optimizer else []),
        "    except Exception as exc:",
        '        failed.append(f"{type(exc).__name__}: {exc}")',
        "    " + report("-1", '{"error": failed[0]} if failed else {}'),
        "",
        *signature,
        "        if failed:  # after a failed step a rank runs nothing more: FSDP's state is undefined",
        "            return",
        f"        outcome = {outcome}",
        *(f"        {line}" for line in guarded),
        "        " + report("index", "outcome"),
        "",
        program,
    ]
    if style == "script":
        lines += [
            "    dist.barrier()  # done: wait for peers still in a collective, which end by their own timeout",
            "    os._exit(0)",
        ]
    return "\n".join(lines)


LOCAL = '''
def local(tensor):
    """This rank's part of a tensor (FSDP2's are DTensors, whose own sum would be a collective)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
'''

DIGEST = '''
def digest(model):
    """A fingerprint of this rank's local parameters: equal values, equal digests."""
    total = 0.0
    for parameter in model.parameters():
        values = {local}.detach().reshape(-1).double().cpu()
        total += float((values * torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()).sum())
    return total
'''


def reference_source(scenario: Scenario, needs: Needs) -> str:
    """``reference()``: the unsharded run of every rank's program in one process (``fsdp_fuzz.execute.reference``)."""
    policy = scenario.mixed_precision
    param = scenario.param_dtype
    output = getattr(policy, "output_dtype", None)
    buffer = getattr(policy, "buffer_dtype", None)
    divisor = scenario.runs_on.gradient_divisor(scenario)
    ignored = scenario.ignored_blocks
    lines = [
        "def reference():",
        '    """What data parallelism promises, computed in one process without FSDP: per step, each rank\'s',
        "    outputs on its own batches, and the gradient averaged over the ranks, accumulated until SGD",
        '    updates the one set of parameters."""',
        "    models = [build() for _ in RANKS]  # one per rank: each keeps its own running statistics",
    ]
    if buffer is not None:
        lines += [
            "    for buffer in (b for model in models for b in model.buffers() if b.is_floating_point()):",
            f"        buffer.data = buffer.data.to(torch.{buffer})",
        ]
    lines += [
        "    parameters = [list(model.parameters()) for model in models]",
        "    masters = [parameter.detach().clone() for parameter in parameters[0]]",
        f"    optimizer = torch.optim.SGD(masters, lr={LEARNING_RATE})",
    ]
    if ignored:
        paths = block_paths(scenario.model)
        names = " ".join(f"*models[0].get_submodule({literal(paths[name])}).parameters()," for name in ignored)
        lines.append("    # ignored: each rank's own, updated by its own gradient")
        lines.append(f"    own = {{id(p) for p in [{names}]}}")
        lines.append("    own = {i for i, parameter in enumerate(parameters[0]) if id(parameter) in own}")
    lines += [
        '    calls, cpu = [[] for _ in RANKS], torch.device("cpu")',
        "    for rank in RANKS:",
        "        schedule(rank, lambda index, path, rank=rank, **kwargs: calls[rank].append((path, kwargs)))",
        "    expected = []",
        "    for index in range(STEPS):",
        "        outputs, summed = [], {}",
        "        for rank in RANKS:",
        "            path, kwargs = calls[rank][index]",
        "            for i, parameter in enumerate(parameters[rank]):",
    ]
    load = f"masters[i].to(torch.{param}, copy=True)"
    if ignored:
        lines.append(f"                parameter.data = parameter.data if i in own else {load}")
    else:
        lines.append(f"                parameter.data = {load}")
    dtypes = [f"cast=(torch.{param}, {'None' if output is None else 'torch.' + output})"] if needs.cast else []
    lines += [
        *call_lines(
            " " * 12,
            "run_forwards",
            ["models[rank]", "rank", "index", "path", "cpu", *dtypes, "**kwargs"],
            "total, size = ",
        ),
        "            outputs.append((float(total.detach()), size))",
        '            if kwargs.get("backward", True) and total.requires_grad:',
        "                total.backward()",
        "                for i, parameter in enumerate(parameters[rank]):",
        f"                    if parameter.grad is not None{' and i not in own' if ignored else ''}:",
        "                        summed[i] = summed.get(i, 0) + parameter.grad.float()",
        "                        parameter.grad = None",
        "        grad = size = None",
        '        if calls[0][index][1].get("backward", True):',
        "            for i, gradient in summed.items():",
        f"                average = gradient / {divisor!r}",
        "                masters[i].grad = average if masters[i].grad is None else masters[i].grad + average",
        "            grads = [master.grad for master in masters if master.grad is not None]",
        "            grad = float(sum((g.sum() for g in grads), torch.zeros(())))",
        "            size = float(sum((g.abs().sum() for g in grads), torch.zeros(())))",
        '        if calls[0][index][1].get("optimizer_step"):',
        "            optimizer.step()",
        "            optimizer.zero_grad()",
    ]
    if ignored:
        lines += [
            "            for rank, i in ((rank, i) for rank in RANKS for i in own):",
            "                mine = parameters[rank][i]",
            "                if mine.grad is not None:",
            f"                    mine.data, mine.grad = mine.data - {LEARNING_RATE} * mine.grad, None",
        ]
    lines += [
        "        expected.append((outputs, grad, size))",
        "    return expected",
    ]
    return "\n".join(lines)


SCRIPT_MAIN = """
def main():
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [mp.get_context("spawn").Process(target=run_rank, args=(rank, tmp)) for rank in range(WORLD_SIZE)]
        for rank, process in enumerate(ranks):
            open(f"{tmp}/{rank}", "w").close()
            process.start()
        deadline, seen = time.monotonic() + 120 + 3 * TIMEOUT_S, []  # the script ends, whatever FSDP does
        for rank, process in enumerate(ranks):
            process.join(max(0.0, deadline - time.monotonic()))
            process.kill()
            with open(f"{tmp}/{rank}") as log:
                seen.append(dict(json.loads(line) for line in log))
            last, code = max(seen[rank], default=-2), process.exitcode  # None, -9: killed at the deadline
            if last + 1 < STEPS and "error" not in seen[rank].get(last, {}):  # stopped early, not after an error
                died = code not in (None, 0, -9)
                seen[rank][last + 1] = {"error": f"the rank died (exit code {code})" if died else "the rank hung"}
    broken = check(seen)
    print(f"FSDP broke its promise (torch {torch.__version__}): {broken.splitlines()[0]}" if broken else
          KEPT)
    return 1 if broken else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # the script itself failed: neither verdict
        traceback.print_exc()
        sys.exit(3)
"""

CUDA_CHECK = """
    if not torch.cuda.is_available():
        raise RuntimeError("the script was written for CUDA, but torch sees no GPU here: write it with --device cpu")
"""

UNITTEST_MAIN = """
class {cls}(MultiProcessTestCase):
    @property
    def world_size(self):
        return WORLD_SIZE

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def {test}(self):
        seen = {{}}
        run_rank(self.rank, f"file://{{self.file_name}}", seen.__setitem__)
        everything = [None] * WORLD_SIZE
        dist.all_gather_object(everything, seen)
        broken = check(everything)
        if broken is not None:
            self.fail(f"FSDP broke its promise: {{broken}}")


if __name__ == "__main__":
    run_tests()
"""
