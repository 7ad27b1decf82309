"""Scenarios as text a maintainer reads at a glance: the model tree with its
FSDP units, each rank's steps side by side, the orders those steps give and
what the contract expects of them."""

from __future__ import annotations

from fsdp_fuzz.data import Scenario, Step
from fsdp_fuzz.engines import Promise
from fsdp_fuzz.judge.oracles import consistent, expectations
from fsdp_fuzz.judge.orders import fsdp2_promises, iterations
from fsdp_fuzz.models.spec import Choice, Linear, ModelSpec, Node, Norm, ReLU, Sequential, unit_numel


def render_scenario(scenario: Scenario) -> str:
    lines = [
        f"{scenario.world_size} ranks, debug level {scenario.debug_level}"
        + (", collective checker" if scenario.collective_checker else "")
        + (", untaken alternatives frozen each step" if scenario.freeze_untaken else "")
        + f", seed {scenario.seed}, batch {scenario.batch_size}",
        scenario.runs_on.describe(scenario),
    ]
    if scenario.description:
        lines.insert(0, scenario.description)
    lines += ["", "model:", *render_model(scenario.model), "", "steps:", *render_steps(scenario)]
    lines += ["", "forward orders (training iterations):", *render_orders(scenario)]
    lines += ["", "the contract expects:", *render_expectations(scenario)]
    return "\n".join(lines)


def render_model(spec: ModelSpec) -> list[str]:
    sizes = unit_numel(spec)

    def label(node: Node, index: int | None, is_root: bool) -> str:
        prefix = f"[{index}] " if index is not None else ""
        if isinstance(node, Linear):
            return f"{prefix}Linear({node.in_features} -> {node.out_features}{', bias' if node.bias else ''})"
        if isinstance(node, ReLU):
            return f"{prefix}ReLU"
        if isinstance(node, Norm):
            return f"{prefix}BatchNorm1d({node.features})"
        kind = "branch point " if isinstance(node, Choice) else ""
        notes = []
        if is_root or node.fsdp_unit:
            notes.append(f"FSDP unit{' (root)' if is_root else ''}, {sizes.get(node.name, 0)} parameters")
        if isinstance(node, Sequential) and node.frozen:
            notes.append("frozen")
        if isinstance(node, Sequential) and node.checkpoint:
            notes.append(f"checkpoint {node.checkpoint}")
        if isinstance(node, Sequential) and node.tied_to:
            notes.append(f"tied to {node.tied_to}")
        return f"{prefix}{kind}{node.name}" + (f"  [{'; '.join(notes)}]" if notes else "")

    lines: list[str] = []

    def visit(node: Node, indent: str, last: bool, index: int | None, is_root: bool = False) -> None:
        branch = "" if is_root else ("└─ " if last else "├─ ")
        lines.append(f"  {indent}{branch}{label(node, index, is_root)}")
        inner = indent if is_root else indent + ("   " if last else "│  ")
        if isinstance(node, Sequential):
            children = [(child, None) for child in node.children]
        elif isinstance(node, Choice):
            children = list(zip(node.alternatives, range(len(node.alternatives)), strict=True))
        else:
            return
        for position, (child, child_index) in enumerate(children):
            visit(child, inner, position == len(children) - 1, child_index)

    visit(spec.root, "", True, None, is_root=True)
    return lines


def describe_step(step: Step) -> str:
    path = " ".join(f"{name}={list(taken)}" for name, taken in sorted(step.path.items())) or "(defaults)"
    actions = ["unshard"] if step.unshard else []
    if step.frozen:
        actions.append(f"freeze {','.join(step.frozen)}")
    call = "fwd" if step.method == "forward" else step.method
    actions.append(f"{step.forwards} {call}" if step.forwards != 1 else call)
    if not step.grad_enabled:
        actions.append("no-grad")
    if step.backward:
        actions.append("bwd")
    if step.reset_iter_state:
        actions.insert(0, "reset_iter_state")
    if step.reshard_after_forward is not None:
        actions.insert(0, f"reshard_after_forward={step.reshard_after_forward}")
    if step.backward and not step.gradient_sync:
        actions.append("(no sync)")
    if step.backward and not step.all_reduce:
        actions.append("(no all-reduce)")
    if step.backward and not step.last_backward:
        actions.append("(not last)")
    if step.optimizer_step:
        actions.append("opt")
    if step.reshard:
        actions.append("reshard")
    return f"{step.mode:<5} {path} {' '.join(actions)}"


def render_steps(scenario: Scenario) -> list[str]:
    cells = [[describe_step(step) for step in steps] for steps in scenario.ranks]
    width = max(len(cell) for column in cells for cell in column) if scenario.num_steps else 6
    header = "  step | " + " | ".join(f"{'rank ' + str(rank):<{width}}" for rank in range(scenario.world_size))
    lines = [header.rstrip()]
    for index in range(scenario.num_steps):
        row = " | ".join(f"{cells[rank][index]:<{width}}" for rank in range(scenario.world_size))
        lines.append(f"  {index:>4} | {row}".rstrip())
    return lines


def render_orders(scenario: Scenario) -> list[str]:
    lines = []
    for rank in range(scenario.world_size):
        for number, iteration in enumerate(iterations(scenario, rank)):
            state = "" if iteration.complete else " (no backward yet)"
            order = " > ".join(iteration.order) or "nothing"
            lines.append(f"  rank {rank} iteration {number} (steps {list(iteration.steps)}): {order}{state}")
    return lines or ["  (no training forwards)"]


def render_expectations(scenario: Scenario) -> list[str]:
    if scenario.runs_on.promise is Promise.SAME_PROGRAM:
        if fsdp2_promises(scenario):
            return [
                "  FSDP2's promise holds (the same program, or the same units with unused parameters "
                "reduce-scattered): no error or hang; results match the reference run"
            ]
        return ["  outside FSDP2's promise (the ranks' programs differ): whatever happens is recorded, by design"]
    if not scenario.runs_on.checks_order(scenario):
        lines = [f"  debug level {scenario.debug_level}: no order check; clauses 4 and 5 only"]
    else:
        lines = []
        for rank, expected in enumerate(expectations(scenario)):
            if expected.error_steps:
                lines.append(f"  rank {rank}: the first-iteration error in step(s) {sorted(expected.error_steps)}")
            elif expected.warning_steps:
                lines.append(f"  rank {rank}: one later-order warning in step(s) {sorted(expected.warning_steps)}")
        if lines:
            reason = next(e.reason for e in expectations(scenario) if e.reason)
            lines.append(f"  because {reason}")
    if consistent(scenario):
        lines.append("  every rank keeps one order: no error, warning or hang; results match the reference run")
    return lines
