"""The single-process reference run that clause 4 compares FSDP with.

Data parallelism promises each rank the outputs of the shared parameters on
its own batch, and every rank the same update: gradients averaged over the
ranks. One process can compute that without FSDP or a process group, so the
reference cannot share a bug with what it checks. It runs in plain torch on
the CPU, with the ranks' own ``build_model`` and ``run_forwards``: the
same parameters, batches and forwards as the ranks.

It works in the scenario's dtypes, as mixed precision promises: float32
master parameters, a copy in ``param_dtype`` that the forwards run on (the
inputs cast to it, the outputs to ``output_dtype``), buffers in
``buffer_dtype``, and gradients averaged into the masters. Buffers are each
rank's own (no engine synchronises them), so each rank's running statistics
are kept apart.

Parameters the engine was told to ignore are each rank's own too: each rank
updates its copy with its own gradient. A gradient divide factor replaces
the world size as the divisor of the ranks' summed gradients.
"""

from __future__ import annotations

import warnings

import torch

from fsdp_fuzz.data import ReferenceStep, Scenario, Step
from fsdp_fuzz.execute.model import LEARNING_RATE, build_model, dtype_named, run_forwards

CPU = torch.device("cpu")


def aligned(scenario: Scenario) -> bool:
    """Whether the ranks' schedules agree step by step on everything but the
    path, which is what makes "the same update on every rank" well defined."""

    def shape(step: Step) -> tuple:
        return (step.mode, step.forwards, step.backward, step.grad_enabled, step.optimizer_step)

    return all(len({shape(steps[index]) for steps in scenario.ranks}) == 1 for index in range(scenario.num_steps))


def reference_run(scenario: Scenario) -> tuple[ReferenceStep, ...] | None:
    """What a data-parallel run of the scenario must compute; ``None`` when
    the schedules are not ``aligned``. Its warnings (torch's checkpoint
    warns of inputs without gradients) are the ranks' to report, not its."""
    if not aligned(scenario):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _reference_steps(scenario)


def _reference_steps(scenario: Scenario) -> tuple[ReferenceStep, ...]:
    built = build_model(scenario.model, scenario.seed, scenario.freeze_untaken)
    dtypes = _Dtypes(scenario)
    parameters = list(built.module.parameters())
    masters = [parameter.detach().clone() for parameter in parameters]
    for master in masters:
        master.grad = None
    optimizer = torch.optim.SGD(masters, lr=LEARNING_RATE)
    if dtypes.buffer is not None:
        for buffer in built.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtypes.buffer)
    buffers = [[buffer.detach().clone() for buffer in built.module.buffers()] for _ in range(scenario.world_size)]
    ignored = _ignored_positions(scenario, built, parameters)
    own = [{position: masters[position].clone() for position in ignored} for _ in range(scenario.world_size)]
    divisor = _gradient_divisor(scenario)
    steps = []
    for index in range(scenario.num_steps):
        output_sums, magnitudes = [], []
        summed: dict[int, torch.Tensor] = {}
        for rank in range(scenario.world_size):
            step = scenario.ranks[rank][index]
            _load(built.module.buffers(), buffers[rank])
            _load(
                parameters,
                [own[rank].get(position, master).to(dtypes.param) for position, master in enumerate(masters)],
            )
            forwards = run_forwards(scenario, built, rank, index, CPU, dtypes.param, dtypes.output)
            output_sums.append(float(forwards.total.detach()))
            magnitudes.append(forwards.magnitude)
            if step.backward and forwards.total.requires_grad:
                # .backward(), not autograd.grad: reentrant checkpointing supports only the former.
                forwards.total.backward()
                for position, parameter in enumerate(parameters):
                    if parameter.grad is not None and position in ignored:
                        mine = own[rank][position]
                        mine.grad = parameter.grad.float() if mine.grad is None else mine.grad + parameter.grad.float()
                    elif parameter.grad is not None:
                        summed[position] = summed.get(position, 0) + parameter.grad.float()
                    parameter.grad = None
            # After the backward: a checkpointed block's recompute runs its norms
            # again in training mode, updating their running statistics twice, as
            # torch's checkpoint does on the ranks too.
            buffers[rank] = [buffer.detach().clone() for buffer in built.module.buffers()]
        step = scenario.ranks[0][index]
        grad_sum = grad_magnitude = None
        if step.backward:
            for position, master in enumerate(masters):
                if position in summed:
                    average = summed[position] / divisor
                    master.grad = average if master.grad is None else master.grad + average
            grads = [master.grad for master in masters if master.grad is not None]
            grad_sum = float(sum((grad.sum() for grad in grads), torch.zeros(())))
            grad_magnitude = float(sum((grad.abs().sum() for grad in grads), torch.zeros(())))
        if step.optimizer_step:
            optimizer.step()
            optimizer.zero_grad()
            for copies in own:
                for mine in copies.values():
                    if mine.grad is not None:
                        mine.sub_(LEARNING_RATE * mine.grad)
                        mine.grad = None
        steps.append(ReferenceStep(tuple(output_sums), grad_sum, tuple(magnitudes), grad_magnitude))
    return tuple(steps)


def _ignored_positions(scenario: Scenario, built, parameters: list) -> frozenset[int]:
    ids = {id(parameter) for name in scenario.ignored_blocks for parameter in built.block(name).parameters()}
    return frozenset(position for position, parameter in enumerate(parameters) if id(parameter) in ids)


def _gradient_divisor(scenario: Scenario) -> float:
    """What the ranks' summed gradients are divided by: the world size, or
    FSDP2's ``gradient_divide_factor``."""
    return scenario.runs_on.gradient_divisor(scenario)


class _Dtypes:
    """The dtypes the engine's mixed-precision setting computes in."""

    def __init__(self, scenario: Scenario) -> None:
        self.param = dtype_named(scenario.param_dtype)
        policy = scenario.mixed_precision
        self.output = dtype_named(getattr(policy, "output_dtype", None))
        self.buffer = dtype_named(getattr(policy, "buffer_dtype", None))


def _load(targets, values) -> None:
    with torch.no_grad():
        for target, value in zip(targets, values, strict=True):
            target.data = value.clone()
