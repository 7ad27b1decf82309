"""The script around the scenario: how a rank runs its steps and reports
them, the single-process reference, and the two ways of starting the ranks
(a plain script that exits 1 when the finding reproduces, or a test in
PyTorch's ``MultiProcessTestCase``)."""

from __future__ import annotations

from fsdp_fuzz.data import Scenario
from fsdp_fuzz.execute.reference import LEARNING_RATE
from fsdp_fuzz.repro.contract import Contract
from fsdp_fuzz.repro.engines import EngineSource
from fsdp_fuzz.repro.model import block_paths
from fsdp_fuzz.repro.text import call_lines, literal

DEFAULT_TIMEOUT_S = 10.0

STEP_INPUT = '''
def step_input(rank, step, forward):
    """A batch that depends only on where it is used (the fuzzer's step_input)."""
    generator = torch.Generator().manual_seed(((SEED * 1009 + rank) * 1009 + step) * 1009 + forward)
    return torch.randn((BATCH, IN_FEATURES), generator=generator)
'''


def forwards_source(scenario: Scenario, cast: bool) -> str:
    """``run_forwards``: what the user's program does in one step before the backward."""
    parameters = 'mode="train", forwards=1, grad_enabled=True, method="forward", frozen=()'
    parameters += (", cast=(None, None)" if cast else "") + ", **_"
    lines = [
        "def run_forwards(model, rank, index, path, device,",
        f"                 {parameters}):",
        '    """The step\'s forwards: mode, path, freezing, grad mode, entry point; their outputs\' sum (float32)',
        '    and the sum of its absolute values."""',
        '    model.train(mode == "train")',
        "    PATH.update(path)",
    ]
    if scenario.freeze_untaken:
        lines.append("    freeze_untaken(model)")
    scheduled = scenario.scheduled_frozen()
    if scheduled:
        paths = block_paths(scenario.model)
        lines.append(f"    for name, block in {literal({name: paths[name] for name in scheduled})}.items():")
        lines.append("        for parameter in model.get_submodule(block).parameters():")
        lines.append("            parameter.requires_grad = name not in frozen")
    lines.append('    entry = model if method == "forward" else getattr(model, method)')
    lines.append("    with torch.set_grad_enabled(grad_enabled):")
    if cast:
        lines.append("        batches = [step_input(rank, index, k).to(device, cast[0]) for k in range(forwards)]")
        lines.append("        outputs = [entry(batch).to(cast[1]).float() for batch in batches]")
    else:
        lines.append(
            "        outputs = [entry(step_input(rank, index, k).to(device)).float() for k in range(forwards)]"
        )
    lines.append("        total = sum((output.sum() for output in outputs), torch.zeros((), device=device))")
    lines.append("    return total, sum(float(output.detach().abs().sum()) for output in outputs)")
    return "\n".join(lines)


def rank_source(scenario: Scenario, engine: EngineSource, contract: Contract) -> str:
    """``run_rank``: one rank's setup and steps, each reported as it ends; after a failed step the
    rank runs nothing more (FSDP's state is undefined then), as the executor does."""
    grad = "local(g)" if scenario.engine == "fsdp2" else "g"
    body = [
        "total, _ = run_forwards(model, rank, index, path, device, **kwargs)",
        "if backward:",
        "    total.backward()",
        "    grads = [p.grad for p in model.parameters() if p.grad is not None]",
        f'    outcome["grad"] = float(sum({grad}.float().sum() for g in grads))',
        "if optimizer_step:",
        "    optimizer.step()",
        "    optimizer.zero_grad()",
        'outcome["output"] = float(total.detach().cpu())',
    ]
    if contract.digest:
        body.append('outcome["digest"] = digest(model)')
    indent = " " * 16
    if engine.stepping is not None:
        body = ["with stepping(model, **{name: kwargs.pop(name) for name in CONTROLS if name in kwargs}):"] + [
            f"    {line}" for line in body
        ]
    lines = [
        "def run_rank(rank, device, timeout_s, report):",
        '    """Build, wrap and run this rank\'s program, calling report(step, outcome) as each step ends."""',
        "",
        "    def new_group(ranks=None):  # FSDP's own: a collective waiting past the timeout fails, so hangs end",
        "        return dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))",
        "",
    ]
    if scenario.collective_checker:
        lines.append(
            "    dist.set_debug_level(dist.DebugLevel.DETAIL)  # groups created now get the collective checker"
        )
    lines += [
        engine.groups,
        f"    dist.set_debug_level(dist.DebugLevel.{scenario.debug_level})",
        "    try:",
        "    " + engine.wrap_call,
        f"        optimizer = torch.optim.SGD(model.parameters(), lr={LEARNING_RATE})",
        "    except Exception as exc:  # noqa: BLE001 - what FSDP raised is the observation",
        '        return report(-1, {"error": f"{type(exc).__name__}: {exc}"})',
        "    report(-1, {})  # built and wrapped",
        "    failed = []",
        "",
        "    def step(index, path, backward=True, optimizer_step=False, **kwargs):",
        "        if failed:  # after a failed step a rank runs nothing more: FSDP's state is undefined",
        "            return",
        '        outcome = {"mode": kwargs.get("mode", "train"), "grad": None}',
        "        with warnings.catch_warnings(record=True) as caught:",
        '            warnings.simplefilter("always")',
        "            try:",
        *(indent + line for line in body),
        "            except Exception as exc:  # noqa: BLE001",
        '                failed.append(outcome.setdefault("error", f"{type(exc).__name__}: {exc}"))',
        '        outcome["warnings"] = [str(w.message) for w in caught if str(w.message).startswith(ORDER_WARNING)]',
        "        report(index, outcome)",
        "",
        "    schedule(rank, step)",
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


def reference_source(scenario: Scenario) -> str:
    """``reference()``: the unsharded run of every rank's program in one process (``fsdp_fuzz.execute.reference``)."""
    policy = scenario.mixed_precision
    param = scenario.param_dtype
    output = getattr(policy, "output_dtype", None)
    buffer = getattr(policy, "buffer_dtype", None)
    cast = param != "float32" or output is not None
    divisor = scenario.world_size
    if scenario.engine == "fsdp2" and scenario.fsdp2.gradient_divide_factor is not None:
        divisor = scenario.fsdp2.gradient_divide_factor
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
    dtypes = [f"cast=(torch.{param}, {'None' if output is None else 'torch.' + output})"] if cast else []
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
    ]
    if ignored:
        lines += [
            "                    if parameter.grad is not None and i not in own:",
        ]
    else:
        lines.append("                    if parameter.grad is not None:")
    lines += [
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
def rank_process(rank, store, args, results):
    \"\"\"One rank in a process of its own; with --device cuda on GPU rank mod n, NCCL where every rank has
    a GPU of its own, else gloo.\"\"\"
    if not args.verbose:  # FSDP's own prints (an assert prints the module) stay out of the verdict
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1), os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    backend = "nccl" if gpus >= WORLD_SIZE else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    run_rank(rank, device, args.timeout, lambda index, outcome: results.put((rank, index, outcome)))
    dist.barrier()  # done: wait for peers still in a collective, which end by their own timeout
    results.put((rank, None, None))
    results.close()
    results.join_thread()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=DEVICE, help="where the ranks compute")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds before a collective is hung")
    parser.add_argument("--verbose", action="store_true", help="show the ranks' own output")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; run on the CPU (--device cpu)")
    context, seen, done = mp.get_context("spawn"), [{} for _ in RANKS], set()
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [context.Process(target=rank_process, args=(r, f"{tmp}/store", args, results)) for r in RANKS]
        for process in ranks:
            process.start()
        deadline = time.monotonic() + 120 + 3 * args.timeout  # the script ends, whatever FSDP does
        while len(done) < WORLD_SIZE and time.monotonic() < deadline:
            try:
                rank, index, outcome = results.get(timeout=1)
            except queue.Empty:  # a rank that died says nothing more
                done |= {rank for rank in RANKS if not ranks[rank].is_alive()}
                continue
            seen[rank].update({} if index is None else {index: outcome})
            done |= {rank} if index is None else set()
        for process in ranks:
            process.kill()
    for rank in RANKS:  # one that stopped reporting before its last step, not after a failure: hung or died
        last, code = max(seen[rank], default=-2), ranks[rank].exitcode
        if last + 1 < STEPS and "error" not in seen[rank].get(last, {}):
            said = f"the rank died (exit code {code})" if code not in (None, 0, -9) else "the rank went silent (hung)"
            seen[rank][last + 1] = {"error": said, "mode": "", "warnings": []}
    broken = check(seen)
    print(f"FSDP broke its promise (torch {torch.__version__}): {broken.splitlines()[0]}" if broken else KEPT)
    return 1 if broken else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # the script itself failed: neither verdict
        traceback.print_exc()
        sys.exit(3)
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
        gpus = torch.cuda.device_count() if DEVICE == "cuda" else 0
        device = torch.device("cuda", self.rank % gpus) if gpus else torch.device("cpu")
        backend = "nccl" if gpus >= WORLD_SIZE else "gloo"  # gloo on CPU
        store = f"file://{{self.file_name}}"
        dist.init_process_group(backend, init_method=store, rank=self.rank, world_size=WORLD_SIZE)
        seen = {{}}
        run_rank(self.rank, device, TIMEOUT_S, seen.__setitem__)
        everything = [None] * WORLD_SIZE
        dist.all_gather_object(everything, seen)
        broken = check(everything)
        if broken is not None:
            self.fail(f"FSDP broke its promise: {{broken}}")


if __name__ == "__main__":
    run_tests()
"""
