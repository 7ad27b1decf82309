"""The script around the model: one rank's ``run`` (its process group, the engine's wrapping, the loop
over its steps and what it asserts), the single-process reference where the numbers are checked, and
the two ways of starting the ranks: a script (``torch.multiprocessing`` spawn, or ``torchrun``) that
exits 1 exactly when a rank fails or hangs, or a test in PyTorch's ``MultiProcessTestCase``.

A rank asserts its own promise (``fsdp_fuzz.repro.contract``): an error it must raise is caught and
checked, anything else propagates with its traceback; an order warning it must not see is an error
(``warnings.filterwarnings``), one it must see is recorded and checked; numbers are compared with
``torch.testing.assert_close``. Hangs end: FSDP's collectives run on groups with ``TIMEOUT``, and the
launcher kills a rank still running at its deadline.
"""

from __future__ import annotations

import ast

from fsdp_fuzz.data import UNIT_ROUNDOFF, Scenario
from fsdp_fuzz.engines.base import EngineSource
from fsdp_fuzz.execute.model import LEARNING_RATE
from fsdp_fuzz.repro.contract import ORDER_WARNING, Contract, Raise, later_warning
from fsdp_fuzz.repro.model import ModelSource
from fsdp_fuzz.repro.schedule import Grid, Schedule, _member, expression, guarded
from fsdp_fuzz.repro.text import literal, split_literal

DEFAULT_TIMEOUT_S = 10.0

CHECK = """
def check(what, actual, expected, tolerance):  # assert_close within the tolerance of the fuzzer's judge
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}")
"""

REPLICAS = """
def check_replicas(model, group, step):  # ranks that hold the same shards hold the same values
    {parameters}mine = torch.cat([p.detach().reshape(-1).float() for p in {listed}])

    theirs = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(theirs, mine, group=group)
    assert all(torch.equal(mine, other) for other in theirs), f"replicas hold other parameters after step {{step}}"
"""

MAIN = """
if __name__ == "__main__":
    if "RANK" in os.environ:  # torchrun --nproc-per-node {world} repro.py: this process is one rank
        run(int(os.environ["RANK"]))
    else:  # every rank a process of its own: mp.spawn raises if one fails or hangs{cuda}
        mp.spawn(run, args=(f"file://{{tempfile.mkdtemp()}}/store",), nprocs=WORLD_SIZE)
        print(f"FSDP kept its promise on torch {{torch.__version__}}: {{PROMISE}}")
"""

CUDA_CHECK = """
        if not torch.cuda.is_available():  # neither verdict: exit 3
            print("written for CUDA, but torch sees no GPU here: write the script with --device cpu", file=sys.stderr)
            sys.exit(3)"""


UNITTEST = """
class {cls}(MultiProcessTestCase):
    @property
    def world_size(self):
        return WORLD_SIZE

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def {test}(self):
        run(self.rank, f"file://{{self.file_name}}")


if __name__ == "__main__":
    run_tests()
"""


def constants(scenario: Scenario, contract: Contract, timeout_s: float, promise: str) -> list[str]:
    lines = [
        f"WORLD_SIZE, STEPS, TIMEOUT = {scenario.world_size}, {scenario.num_steps}, "
        f"timedelta(seconds={float(timeout_s)!r})  # a collective waiting longer fails",
        *split_literal("PROMISE", promise),
    ]
    numbers = contract.numbers
    if numbers.reference:
        coarsest = max(scenario.dtypes, key=lambda name: UNIT_ROUNDOFF[name])
        why = "1e-4" if coarsest == "float32" else f"{coarsest}'s rounding over {numbers.operations} additions"
        lines.append(
            f"TOLERANCE = {numbers.output_tolerance!r}, {numbers.grad_tolerance!r}  # outputs, gradients: the judge's"
            f" ({why})"
        )
    if any(promised.warned_in for promised in contract.ranks):
        lines += split_literal("WARNING", later_warning("{}"))
    documented = {p.may_raise.words for p in contract.ranks if p.may_raise is not None and len(p.may_raise.words) > 1}
    for words in documented:
        lines += [
            "DOCUMENTED = (  # how FSDP2 documents refusing a method it was not told of",
            *(f"    {literal(phrase)}," for phrase in words),
            ")",
        ]
    return lines


# A rank ---------------------------------------------------------------------


def run_source(
    scenario: Scenario,
    model: ModelSource,
    engine: EngineSource,
    contract: Contract,
    schedule: Schedule,
    cuda: bool,
    forwards: list[str] | None,
) -> str:
    """``run(rank, init_method)``: the rank's group, wrapping and steps, asserting its promise. ``forwards``:
    the step's forwards written inline (``None``: ``forward()`` computes them, as for the reference)."""
    head: list[str] = [
        "faulthandler.dump_traceback_later(120 + 3 * TIMEOUT.seconds, exit=True)  # still running then: hung, see where"
    ]
    if cuda:
        head += [
            'device = torch.device("cuda", rank % torch.cuda.device_count())',
            "torch.cuda.set_device(device)",
            'backend = "nccl" if torch.cuda.device_count() >= WORLD_SIZE else "gloo"  # NCCL: a GPU per rank',
        ]
    checked = scenario.collective_checker
    if checked and not scenario.hybrid:
        head.append("dist.set_debug_level(dist.DebugLevel.DETAIL)  # before the group: FSDP's collectives checked")
    backend = "backend" if cuda else '"gloo"'
    head.append(
        f"dist.init_process_group({backend}, init_method=init_method, rank=rank, world_size=WORLD_SIZE, "
        "timeout=TIMEOUT)"
    )
    if checked and scenario.hybrid:
        head.append("dist.set_debug_level(dist.DebugLevel.DETAIL)  # before the groups: FSDP's collectives checked")
    head += engine.groups
    head.append("finished = dist.new_group(timeout=2 * TIMEOUT)  # where a rank waits for the others at the end")
    reshard = scenario.fsdp2.reshard_after_forward  # an int: FSDP2 makes groups of its own, after this
    later_groups = scenario.runs_on.name == "fsdp1" or (isinstance(reshard, int) and not isinstance(reshard, bool))

    if scenario.debug_level != "OFF" and not (checked and scenario.debug_level == "DETAIL") and later_groups:
        head.append(f"dist.set_debug_level(dist.DebugLevel.{scenario.debug_level})")
    if contract.numbers.reference:
        head.append("expected = list(reference(rank))")
    moved = ".to(device)" if scenario.runs_on.name == "fsdp2" and cuda and not scenario.cpu_offload else ""
    built = f"{model.constructor}({'rank' if model.takes_rank else ''}){moved}"
    setup = [f"model = {built}", *engine.wrap]
    if len(setup) == 2 and setup[1].startswith("model = FSDP(model, "):  # the root the only unit
        one = setup[1].replace("FSDP(model, ", f"FSDP({built}, ", 1)
        setup = [one] if len(one) <= 116 else setup

    if any(step.optimizer_step for steps in scenario.ranks for step in steps):
        setup.append(f"optimizer = torch.optim.SGD(model.parameters(), lr={LEARNING_RATE})")
    grid = Grid(scenario.world_size, 1)
    due = _due(contract, grid)
    step = _step(scenario, engine, contract, schedule, due is not None, forwards)
    single = scenario.num_steps == 1 and forwards is not None  # one step: no loop
    loop = step if single else ["for step in range(STEPS):", *_indent(step)]
    promised = _promised_errors(contract, grid, single)
    unwarned = [rank for rank, p in enumerate(contract.ranks) if p.unwarned and not p.warned_in and p.raises is None]
    if due is None and unwarned:
        warns = f'warnings.filterwarnings("error", "{ORDER_WARNING}")  # an order warning fails the step'
        head += guarded(_member("rank", unwarned, scenario.world_size)[0], [warns])
    if due is not None:
        head += [f"due, warned = {due}, []  # the steps FSDP warns in, and its warnings"]

    body: list[str] = []
    if promised is None:
        body = [*setup, *loop]
    else:
        test, required = promised
        setup_fails = not single and any(-1 in (p.raises or p.may_raise or _NONE).steps for p in contract.ranks)
        before = (
            ["step = -1  # the wrapping", "try:", *_indent(setup), *_indent(loop)]
            if setup_fails
            else [
                *setup,
                "try:",
                *_indent(loop),
            ]
        )
        exception, accepted = test
        body = [
            *before,
            f"except {exception} as error:",
            f"    if {_negated(accepted)}:",
            "        raise",
        ]
        if required != "False":
            missing = 'raise AssertionError(f"rank {rank} ran every step, though FSDP promises: {PROMISE}")'
            body += ["else:", *_indent(guarded(required, [missing]))]
    if due is not None:
        body.append('assert warned or not due, f"rank {rank} was never warned in step(s) {due}: {PROMISE}"')
    lines = [
        'def run(rank, init_method="env://"):  # one rank\'s steps, asserting what FSDP promises for them',
        *_indent(head + body),
        "    dist.barrier(group=finished)  # a peer still in one of FSDP's collectives then times out, as a hang does",
        "    dist.destroy_process_group()  # before exit: gloo's threads alive at exit abort the process",
    ]
    return "\n".join(lines)


def _indent(lines: list[str], by: str = "    ") -> list[str]:
    return [f"{by}{line}" if line else line for line in lines]


def _step(
    scenario: Scenario,
    engine: EngineSource,
    contract: Contract,
    schedule: Schedule,
    record: bool,
    forwards: list[str] | None,
) -> list[str]:
    """One step's body: the engine's controls, the forwards, backward, optimizer step, and the checks."""
    numbers = contract.numbers
    inner = ["outputs = forward(model, rank, step)"] if forwards is None else list(forwards)
    if numbers.outputs_until:
        compare = ['check(f"rank {rank}\'s outputs in step {step}", outputs, expected[step][0], TOLERANCE[0])']
        inner += guarded(_below("step", numbers.outputs_until, scenario.num_steps), compare)
    if not inner[-1].endswith(".backward()"):  # the forwards are not the backward already
        backward = ["sum(output.sum() for output in outputs).backward()"]
        inner += guarded(schedule.when(lambda step: step.backward), backward)
    if numbers.grad_steps:
        compare = [f'check(f"gradients after step {{step}}", {engine.gradients_call}, expected[step][1], TOLERANCE[1])']
        inner += guarded(_member("step", numbers.grad_steps, scenario.num_steps)[0], compare)
    inner += guarded(schedule.when(lambda step: step.optimizer_step), ["optimizer.step()", "optimizer.zero_grad()"])
    if engine.step_context is not None:
        inner = [f"with {engine.step_context}:", *_indent(inner)]
    lines = [*engine.before_step, *_merged(inner), *engine.after_step]
    if numbers.replicas_until:
        table = {(rank, 0): until for rank, until in enumerate(numbers.replicas_until)}
        until = expression(table, Grid(scenario.world_size, 1))
        group = engine.replicas or "None"
        lines += guarded(
            _below("step", until, scenario.num_steps) if until.isdigit() else f"step < {until}",
            [f"check_replicas(model, {group}, step)"],
        )
    if record:
        eval_steps = any(step.mode == "eval" for steps in scenario.ranks for step in steps)
        due = "step in due" + (" and model.training" if eval_steps else "")
        lines = [
            "with warnings.catch_warnings(record=True) as caught:",
            '    warnings.simplefilter("always")',
            *_indent(lines),
            f'seen = [str(w.message) for w in caught if str(w.message).startswith("{ORDER_WARNING}")]',
            f"assert all({due} and w.startswith(WARNING.format(rank)) for w in seen), (step, seen)",
            "warned += seen",
        ]
    return lines


def _negated(test: str) -> str:
    """``not (test)``, as ruff would write it: ``a not in b`` for ``a in b``."""
    tree = ast.parse(test, mode="eval").body
    if isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.ops[0], ast.In):
        return f"{ast.unparse(tree.left)} not in {ast.unparse(tree.comparators[0])}"
    return f"not ({test})" if isinstance(tree, ast.BoolOp) else f"not {test}"


def _merged(lines: list[str]) -> list[str]:
    """Consecutive ``if`` blocks of one condition as one block."""
    merged: list[str] = []
    for line in lines:
        if line.startswith("if ") and merged and line in merged:
            start = len(merged) - 1 - merged[::-1].index(line)
            if all(other.startswith("    ") for other in merged[start + 1 :]):
                continue
        merged.append(line)
    return merged


def _below(name: str, until: int | str, size: int) -> str | None:
    return None if int(until) >= size else f"{name} < {until}"


def _due(contract: Contract, grid: Grid) -> str | None:
    """``due``: per rank, the steps FSDP1 must warn in; ``None`` where no rank records warnings."""
    if not any(promised.warned_in for promised in contract.ranks):
        return None
    table = {(rank, 0): tuple(promised.warned_in) for rank, promised in enumerate(contract.ranks)}
    return expression(table, grid)


_NONE = Raise("", (), ())


def _promised_errors(contract: Contract, grid: Grid, single: bool) -> tuple[tuple[str, str], str | None] | None:
    """((exception class, the test an error must pass), the condition of the ranks that must raise) for the
    errors some rank is promised or may give, or ``None``."""
    kinds: dict[tuple, dict[int, tuple[int, ...]]] = {}
    for rank, promised in enumerate(contract.ranks):
        for error in (promised.raises, promised.may_raise):
            if error is not None:
                kinds.setdefault(error.kind, {})[rank] = error.steps
    if not kinds:
        return None
    types = {kind[0] for kind in kinds}
    tests = []
    for (error_type, words, starts), steps in kinds.items():
        table = {(rank, 0): tuple(steps.get(rank, ())) for rank in range(grid.world)}
        values = set(table.values())
        if single and all(0 in value for value in values):  # the only step, or the wrapping before it
            step_test = ""
        elif single:
            step_test = _member("rank", [rank for (rank, _), value in table.items() if 0 in value], grid.world)[0]
        elif len(values) == 1:
            (only,) = values
            step_test = (
                f"step == {only[0]}"
                if len(only) == 1
                else f"step in {literal(only)}".replace("[", "(").replace("]", ")")
            )
        else:
            where = expression(table, grid)
            step_test = f"step in ({where})" if " if " in where else f"step in {where}"
        if starts:
            text = f"str(error).startswith({literal(words[0])})"
        elif len(words) == 1:
            text = f"{literal(words[0])} in str(error)"
        else:
            text = "any(words in str(error) for words in DOCUMENTED)"
        kind = [f"isinstance(error, {error_type})"] if len(types) > 1 else []
        tests.append(" and ".join(part for part in [step_test, *kind, text] if part))
    test = tests[0] if len(tests) == 1 else " or ".join(f"({test})" for test in tests)
    required = [rank for rank, promised in enumerate(contract.ranks) if promised.raises is not None]
    condition = _member("rank", required, grid.world)[0]
    exception = types.pop() if len(types) == 1 else "Exception"
    return (exception, test), None if condition == "True" else condition


# The numbers ----------------------------------------------------------------


def reference_source(scenario: Scenario, model: ModelSource, schedule: Schedule, flat: bool, cuda: bool) -> str:
    """``reference(rank)``: every rank's steps in one process without FSDP (``fsdp_fuzz.execute.reference``):
    this rank's outputs and the gradients averaged over the ranks, after each step. One model runs every
    rank's forwards (``model.rank`` switching its path) unless the ranks need copies of their own: norm
    statistics that an eval step reads, ignored parameters, or low precision (float32 weights apart)."""
    copies = (
        scenario.param_dtype != "float32"
        or scenario.ignored_blocks
        or (scenario.model.has_norms() and any(step.mode == "eval" for steps in scenario.ranks for step in steps))
    )
    if copies:
        return _reference_copies(scenario, model, schedule, flat, cuda)
    divisor = scenario.runs_on.gradient_divisor(scenario)
    divide = "WORLD_SIZE" if divisor == scenario.world_size else repr(divisor)
    grads = "{name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in model.named_parameters()}"
    whole = "grad.reshape(-1).clone()" if flat else "grad.clone()"
    backward = [f"(sum(output.sum() for output in outputs[r]) / {divide}).backward()"]
    lines = [
        "def reference(rank):  # what FSDP must compute: every rank's steps in one process, gradients averaged",
        f"    model = {model.constructor}({'rank' if model.takes_rank else ''})" + (".cuda()" if cuda else ""),
    ]
    updates = any(step.optimizer_step for steps in scenario.ranks for step in steps)
    if updates:
        lines.append(f"    optimizer = torch.optim.SGD(model.parameters(), lr={LEARNING_RATE})")
    lines += [
        "    for step in range(STEPS):",
        "        outputs = []",
        "        for r in range(WORLD_SIZE):",
        *(["            model.rank = r"] if model.takes_rank else []),
        "            outputs.append(forward(model, r, step))",
        *_indent(guarded(schedule.when(lambda step: step.backward, rank="r"), backward), " " * 12),
        f"        grads = {grads}",
        f"        yield outputs[rank], {{name: {whole} for name, grad in grads.items()}}",
    ]
    if updates:
        update = schedule.when(lambda step: step.optimizer_step, rank="0")
        lines += _indent(guarded(update, ["optimizer.step()", "optimizer.zero_grad()"]), " " * 8)
    return "\n".join(lines)


def _reference_copies(scenario: Scenario, model: ModelSource, schedule: Schedule, flat: bool, cuda: bool) -> str:
    """The reference with a copy of the model per rank, in the scenario's dtypes (the executor's own)."""
    param = scenario.param_dtype
    output = getattr(scenario.mixed_precision, "output_dtype", None)
    divisor = scenario.runs_on.gradient_divisor(scenario)
    divide = "WORLD_SIZE" if divisor == scenario.world_size else repr(divisor)
    ignored = bool(scenario.ignored_blocks)
    build = f"{model.constructor}({'r' if model.takes_rank else ''})" + (".cuda()" if cuda else "")
    cast = param != "float32"
    update = schedule.when(lambda step: step.optimizer_step, rank="0")
    updates = update != "False" and any(step.optimizer_step for steps in scenario.ranks for step in steps)
    lines = [
        "def reference(rank):",
        '    """What FSDP must compute: every rank\'s steps in one process, on a copy of the model each (its own',
        '    path and norm statistics), in FSDP\'s dtypes, the gradients averaged over the ranks."""',
        f"    models = [{build} for r in range(WORLD_SIZE)]",
    ]
    if cast and updates:
        lines.append("    weights = {name: p.detach().clone() for name, p in models[0].named_parameters()}  # float32")
    if cast:
        lines += ["    for model in models:", f"        model.to(torch.{param})  # computing in {param}"]
    lines.append("    grads = {name: torch.zeros_like(p).float() for name, p in models[0].named_parameters()}")
    call = f"forward(model, r, step{f', torch.{param}' if cast else ''})"
    backward = schedule.when(lambda step: step.backward, rank="r")
    keep = " and not name.startswith(IGNORED)" if ignored else ""
    lines += [
        "    for step in range(STEPS):",
        f"        outputs = [{call} for r, model in enumerate(models)]",
        "        for r, model in enumerate(models):",
        *_indent(guarded(backward, ["sum(output.sum() for output in outputs[r]).backward()"]), " " * 12),
        "            for name, p in model.named_parameters():",
        f"                if p.grad is not None{keep}:",
        f"                    grads[name] = grads[name] + p.grad.float() / {divide}",
        "                    p.grad = None",
    ]
    mine = "outputs[rank]" if output is None else f"[output.to(torch.{output}) for output in outputs[rank]]"
    shaped = "{name: grad.reshape(-1) for name, grad in grads.items()}" if flat else "dict(grads)"
    lines.append(f"        yield {mine}, {shaped}")
    if updates:
        sgd = [f"with torch.no_grad():  # SGD, lr {LEARNING_RATE}, on the averaged gradients"]
        if cast:
            sgd += [
                "    for name, weight in weights.items():",
                f"        weight -= {LEARNING_RATE} * grads[name]",
                "    for model in models:",
                "        for name, p in model.named_parameters():",
                "            p.copy_(weights[name])",
            ]
        else:
            sgd += [
                "    for model in models:",
                "        for name, p in model.named_parameters():",
                f"            p -= {LEARNING_RATE} * grads[name]",
            ]
        if ignored:
            sgd += [
                "    for model in models:  # the ignored parameters: each rank's own, by its own gradient",
                "        for name, p in model.named_parameters():",
                "            if name.startswith(IGNORED) and p.grad is not None:",
                f"                p -= {LEARNING_RATE} * p.grad",
                "                p.grad = None",
            ]
        sgd.append("grads = {name: torch.zeros_like(grad) for name, grad in grads.items()}")
        lines += _indent(guarded(update, sgd), "        ")
    return "\n".join(lines)


def replicas_source(scenario: Scenario, engine: EngineSource, model: ModelSource) -> str:
    if scenario.ignored_blocks:
        params = (
            'name, p in model.named_parameters() if not name.replace("_fsdp_wrapped_module.", "").startswith(IGNORED)'
        )
        params = params.replace(" if ", "\n        if ", 1) if len(params) > 80 else params
    else:
        params = "p in model.parameters()"
    local = engine.local.format("p")
    if local == "p" and not scenario.ignored_blocks:  # the parameters themselves: no list of their own
        return REPLICAS.strip("\n").format(parameters="", listed="model.parameters()")
    return REPLICAS.strip("\n").format(parameters=f"parameters = [{local} for {params}]\n    ", listed="parameters")


def ignored_constant(scenario: Scenario, model: ModelSource) -> list[str]:
    if not scenario.ignored_blocks:
        return []
    prefixes = tuple(model.paths[name] + "." for name in scenario.ignored_blocks)
    return [
        f"IGNORED = {literal(prefixes).replace('[', '(').replace(']', ',)' if len(prefixes) == 1 else ')')}"
        "  # the engine ignores them: each rank's own"
    ]


def main_source(scenario: Scenario, cuda: bool) -> str:
    return MAIN.strip("\n").format(cuda=CUDA_CHECK if cuda else "", world=scenario.world_size)


def unittest_source(cls: str, test: str) -> str:
    return UNITTEST.strip("\n").format(cls=cls, test=test)


__all__ = [
    "CHECK",
    "DEFAULT_TIMEOUT_S",
    "constants",
    "ignored_constant",
    "main_source",
    "reference_source",
    "replicas_source",
    "run_source",
    "unittest_source",
]
