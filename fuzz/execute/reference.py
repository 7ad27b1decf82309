"""The single-process reference run that clause 4 compares FSDP with.

Data parallelism promises each rank the outputs of the shared parameters on
its own batch, and every rank the same update: gradients averaged over the
ranks. One process can compute that without FSDP or a process group, so the
reference cannot share a bug with what it checks. It runs in plain torch on
the CPU, with the executor's own ``build_model`` and ``run_forwards``: the
same parameters, batches and forwards as the ranks.
"""

from __future__ import annotations

import torch

from fsdp_fuzz.data import ReferenceStep, Scenario, Step, scenario_to_json
from fsdp_fuzz.execute.executor import LEARNING_RATE, build_model, run_forwards

CPU = torch.device("cpu")


def aligned(scenario: Scenario) -> bool:
    """Whether the ranks' schedules agree step by step on everything but the
    path, which is what makes "the same update on every rank" well defined."""

    def shape(step: Step) -> tuple:
        return (step.mode, step.forwards, step.backward, step.grad_enabled, step.optimizer_step)

    return all(len({shape(steps[index]) for steps in scenario.ranks}) == 1 for index in range(scenario.num_steps))


def reference_run(scenario: Scenario) -> tuple[ReferenceStep, ...] | None:
    """What a data-parallel run of the scenario must compute; ``None`` when
    the schedules are not ``aligned``."""
    if not aligned(scenario):
        return None
    encoded = scenario_to_json(scenario, complete=True)
    built = build_model(encoded["model"], scenario.seed, scenario.freeze_untaken)
    parameters = list(built.module.parameters())
    optimizer = torch.optim.SGD(parameters, lr=LEARNING_RATE)
    world_size = scenario.world_size
    steps = []
    for index in range(scenario.num_steps):
        output_sums = []
        summed: dict[int, torch.Tensor] = {}
        for rank in range(world_size):
            step = scenario.ranks[rank][index]
            total = run_forwards(encoded, built, rank, index, CPU)
            output_sums.append(float(total.detach()))
            if step.backward and total.requires_grad:
                trainable = [p for p in parameters if p.requires_grad]
                grads = torch.autograd.grad(total, trainable, allow_unused=True)
                for parameter, grad in zip(trainable, grads, strict=True):
                    if grad is not None:
                        summed[id(parameter)] = summed.get(id(parameter), 0) + grad
        step = scenario.ranks[0][index]
        grad_sum = None
        if step.backward:
            for parameter in parameters:
                if id(parameter) in summed:
                    average = summed[id(parameter)] / world_size
                    parameter.grad = average if parameter.grad is None else parameter.grad + average
            grad_sum = float(sum((p.grad.sum() for p in parameters if p.grad is not None), torch.zeros(())))
        if step.optimizer_step:
            optimizer.step()
            optimizer.zero_grad()
        steps.append(ReferenceStep(tuple(output_sums), grad_sum))
    return tuple(steps)
