"""Where a world's ranks run and what carries their collectives.

The choice is a pure function of four numbers and names
(``choose_placement``): the device asked for, the backend asked for (or
none), how many GPUs are visible, and how many ranks the world has. Rank r
runs on GPU r mod n. NCCL needs a GPU of its own per rank (it refuses two
ranks on one device), so it is the default only when every rank has one;
otherwise gloo carries the CUDA tensors through host memory, which FSDP
accepts with the same order checks as on CPU. Anything that cannot run is
refused before a rank starts, with the fix in the message
(``refuse_offload_on_cpu`` for a scenario that offloads to the CPU).

Rank-side helpers live here too (the current device, the NCCL settings a
rank needs before its first group, memory released between scenarios, when
a rank set must be replaced), so that the pool and the fresh-process
spawner share them. This module needs only torch and the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fsdp_fuzz.data import Scenario, Status, StepOutcome

DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")
WORLD_SIZES = (2, 3, 4)
"""The world sizes scenarios have: what a campaign checks its placement for."""
BACKEND_OPTIONS = "--backend (pytest: --fuzz-backend)"


class DeviceError(RuntimeError):
    """The requested device or backend cannot run the scenario: the message
    says what is missing and what to ask for instead."""


@dataclass(frozen=True)
class Placement:
    """Where one world's ranks run: rank r computes on ``cuda:(r % gpus)`` (on
    the CPU when ``device`` is ``cpu``) and its groups use ``backend``.

    Build one with ``choose_placement`` (or ``DeviceRequest.place``), which
    refuses what cannot run; ``Placement()`` is the CPU with gloo."""

    device: str = "cpu"
    backend: str = "gloo"
    gpus: int = 0
    """GPUs visible to the ranks; 0 on the CPU."""

    def check(self, world_size: int) -> None:
        """Refuse, with the fix, a placement that cannot run ``world_size`` ranks."""
        choose_placement(self.device, self.backend, self.gpus, world_size)

    def gpu_of(self, rank: int) -> int | None:
        return rank % self.gpus if self.device == "cuda" else None

    def rank_device(self, rank: int) -> torch.device:
        """The rank's device, made current for it (NCCL and FSDP's streams use the current one)."""
        index = self.gpu_of(rank)
        if index is None:
            return torch.device("cpu")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def describe(self, world_size: int) -> str:
        """For a summary line: ``cpu with gloo``, ``cuda with nccl, one GPU per
        rank`` or ``cuda with gloo, 3 ranks on 2 GPU(s) (rank r on cuda:r mod 2)``."""
        if self.device == "cpu":
            return f"cpu with {self.backend}"
        if self.gpus >= world_size:
            return f"cuda with {self.backend}, one GPU per rank"
        return f"cuda with {self.backend}, {world_size} ranks on {self.gpus} GPU(s) (rank r on cuda:r mod {self.gpus})"

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "backend": self.backend, "gpus": self.gpus}


CPU = Placement()


def choose_placement(device: str, backend: str | None, gpus: int, world_size: int) -> Placement:
    """The placement of ``world_size`` ranks on ``device`` with ``gpus`` GPUs
    visible: ``backend`` if one is forced, else NCCL when every rank has a GPU
    of its own and gloo otherwise. Raises ``DeviceError`` naming the fix
    for what cannot run. Pure: the caller counts the GPUs."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if backend is not None and backend not in BACKENDS:
        raise DeviceError(f"unknown backend {backend!r}: use 'gloo' or 'nccl', or leave it to the device")
    if world_size < 1:
        raise ValueError(f"a world has at least one rank, not {world_size}")
    if device == "cpu":
        if backend == "nccl":
            raise DeviceError(
                "NCCL runs on GPUs only: with device 'cpu' use backend 'gloo' (or no backend option), "
                "or ask for device 'cuda' (--device cuda; pytest: --fuzz-device=cuda)"
            )
        return Placement("cpu", "gloo", 0)
    if gpus < 1:
        raise DeviceError(
            "device 'cuda' needs a GPU, but no GPU is visible to torch (torch.cuda.device_count() is 0): "
            "run on the CPU (device 'cpu'), or on a machine with a GPU and a CUDA build of torch "
            "(check CUDA_VISIBLE_DEVICES)"
        )
    if backend == "nccl" and gpus < world_size:
        raise DeviceError(
            f"backend 'nccl' needs one GPU per rank: the scenario has {world_size} ranks and {gpus} GPU(s) "
            f"are visible; leave the backend to the device, or ask for 'gloo' ({BACKEND_OPTIONS} gloo), "
            f"so that ranks share GPUs (rank r on GPU r mod {gpus}), or run on a machine with {world_size} GPUs"
        )
    chosen = backend or ("nccl" if gpus >= world_size else "gloo")
    return Placement("cuda", chosen, gpus)


def visible_gpus() -> int:
    """How many GPUs this process can see, without initialising CUDA:
    ``torch.cuda.device_count`` asks NVML first, which leaves a later fork
    usable; 0 on a CPU build of torch."""
    return torch.cuda.device_count()


@dataclass(frozen=True)
class DeviceRequest:
    """What the user asked for (``--device``, ``--backend``), placed once per
    world size: a campaign runs worlds of 2 to 4 ranks, and with 2 GPUs the
    first gets NCCL and the others gloo."""

    device: str = "cpu"
    backend: str | None = None
    """None: NCCL where every rank has its own GPU, gloo elsewhere."""
    gpus: int | None = None
    """Visible GPUs; None counts them (``visible_gpus``) when placing."""

    def visible(self) -> int:
        if self.device == "cpu":
            return 0
        return visible_gpus() if self.gpus is None else self.gpus

    def place(self, world_size: int) -> Placement:
        return choose_placement(self.device, self.backend, self.visible(), world_size)

    def check(self, world_sizes: tuple[int, ...] = WORLD_SIZES) -> None:
        """Refuse, before any rank starts, what cannot run every one of ``world_sizes``."""
        for world_size in world_sizes:
            self.place(world_size)

    def backends(self, world_sizes: tuple[int, ...] = WORLD_SIZES) -> dict[int, str]:
        return {world_size: self.place(world_size).backend for world_size in world_sizes}

    def describe(self, world_sizes: tuple[int, ...] = WORLD_SIZES) -> str:
        """For a summary line: ``cpu with gloo``, ``cuda with gloo, 1 GPU(s)
        (rank r on cuda:r mod 1)`` or, where world sizes differ, ``cuda with
        nccl for 2 ranks, gloo for 3-4 ranks, 2 GPU(s) (...)``."""
        by_backend: dict[str, list[int]] = {}
        for world_size, backend in self.backends(world_sizes).items():
            by_backend.setdefault(backend, []).append(world_size)
        if self.device == "cpu":
            return f"cpu with {', '.join(by_backend)}"
        if len(by_backend) == 1:
            backends = next(iter(by_backend))
        else:
            backends = ", ".join(f"{backend} for {_span(sizes)} ranks" for backend, sizes in by_backend.items())
        gpus = self.visible()
        return f"cuda with {backends}, {gpus} GPU(s) (rank r on cuda:r mod {gpus})"

    def to_json(self, world_sizes: tuple[int, ...] = WORLD_SIZES) -> dict[str, Any]:
        """The request and what it became: ``backends`` maps each world size to its backend."""
        return {
            "device": self.device,
            "backend": self.backend or "auto",
            "gpus": self.visible(),
            "backends": {str(world_size): backend for world_size, backend in self.backends(world_sizes).items()},
        }


def _span(sizes: list[int]) -> str:
    if len(sizes) > 1 and sizes == list(range(sizes[0], sizes[-1] + 1)):
        return f"{sizes[0]}-{sizes[-1]}"
    return ", ".join(map(str, sizes))


def as_request(placement: Placement | DeviceRequest) -> DeviceRequest:
    """A fixed placement as the request that chooses it for every world size it can run."""
    if isinstance(placement, DeviceRequest):
        return placement
    return DeviceRequest(placement.device, placement.backend, placement.gpus)


def refuse_offload_on_cpu(scenario: Scenario, placement: Placement) -> None:
    """CPU offload moves parameters between the CPU and the device: there
    is nothing to offload from ranks on the CPU (FSDP2 fails to find an
    accelerator), so such a scenario needs CUDA ranks."""
    if scenario.cpu_offload and placement.device != "cuda":
        raise DeviceError(
            f"the scenario offloads parameters to the CPU (cpu_offload), which needs CUDA ranks, but it would run "
            f"on {placement.device}; run it with --device cuda, or drop cpu_offload"
        )


# In a rank ---------------------------------------------------------------------------------

NCCL_ENVIRONMENT = {"TORCH_NCCL_BLOCKING_WAIT": "1"}
"""Set before a rank's first NCCL group. Blocking wait makes a collective
that times out abort its communicator and raise in the thread that waits
for it (the step, then reported as a hang), instead of the watchdog taking
the whole process down (a crash) or, with error handling off, a rank that
waits forever on the GPU. It turns the watchdog's asynchronous error
handling off, by torch's own rule."""


def prepare_rank(placement: Placement, rank: int) -> torch.device:
    """Before a rank's first group: NCCL's settings, and the rank's GPU made current."""
    if placement.backend == "nccl":
        for name, value in NCCL_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    return placement.rank_device(rank)


def release_memory(placement: Placement) -> None:
    """Give the GPU memory of a finished scenario back to the device, so that
    ranks sharing a GPU do not each hold their peak in the caching allocator.
    FSDP's modules hold reference cycles: collect them first."""
    if placement.device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


DEVICE_FAILURE_MARKERS = (
    "CUDA error",
    "CUDA out of memory",
    "cudaError",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "device-side assert",
    "illegal memory access",
    "NCCL error",
    "ncclInternalError",
    "ncclUnhandledCudaError",
    "ncclSystemError",
    "communicator was aborted",
)
DEVICE_FAILURE_TYPES = ("AcceleratorError", "OutOfMemoryError", "DistBackendError")


def device_failure(outcome: StepOutcome) -> str | None:
    """What in a reported outcome says the rank's device or communicator may
    be broken for what follows: a CUDA or NCCL error (a sticky CUDA error
    fails every later call in the process). None if nothing does."""
    text = f"{outcome.error_type or ''}: {outcome.error_message or ''}"
    if outcome.error_type in DEVICE_FAILURE_TYPES:
        return text
    return text if any(marker in text for marker in DEVICE_FAILURE_MARKERS) else None


def needs_fresh_ranks(placement: Placement, outcomes: list[list[StepOutcome]]) -> str | None:
    """Why the ranks that reported ``outcomes`` must not run another
    scenario, or None. On the CPU nothing here applies (the pool's own rules
    do). On a GPU: a CUDA or NCCL error leaves the process's context or
    communicators unusable, so one scenario's error would poison the next;
    on NCCL, a collective that timed out leaves an aborted communicator and
    kernels that may never finish."""
    if placement.device != "cuda":
        return None
    for rank, reported in enumerate(outcomes):
        for outcome in reported:
            failure = device_failure(outcome)
            if failure is not None:
                return f"rank {rank}: {failure.splitlines()[0][:200]}"
            if placement.backend == "nccl" and outcome.status is Status.HANG:
                return f"rank {rank}: an NCCL collective timed out"
    return None
