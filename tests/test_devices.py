"""Device placement and backend choice, decided without a GPU: which backend
each world gets on 1, 2, 3 and 8 visible GPUs, which GPU each rank gets,
what is refused and with which fix, what the reports and saved findings
record, and that the pool's fork server leaves CUDA alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fsdp_fuzz.cli import main
from fsdp_fuzz.corpus import load_entry, save_finding
from fsdp_fuzz.data import Status, StepOutcome
from fsdp_fuzz.execute.devices import (
    CPU,
    DeviceError,
    DeviceRequest,
    Placement,
    choose_placement,
    device_failure,
    needs_fresh_ranks,
)
from fsdp_fuzz.execute.pool import PRELOAD, PoolSet, fork_server_state
from fsdp_fuzz.judge.oracles import judge
from fsdp_fuzz.report import CampaignReport

NO_GPU = torch.cuda.device_count() == 0

# (visible GPUs, ranks) -> the backend left to the device: NCCL only where every rank has a GPU of its own.
AUTOMATIC = {
    (1, 2): "gloo",
    (1, 3): "gloo",
    (1, 4): "gloo",
    (2, 2): "nccl",
    (2, 3): "gloo",
    (2, 4): "gloo",
    (3, 2): "nccl",
    (3, 3): "nccl",
    (3, 4): "gloo",
    (8, 2): "nccl",
    (8, 3): "nccl",
    (8, 4): "nccl",
}


@pytest.mark.parametrize(("gpus", "ranks"), sorted(AUTOMATIC))
def test_cuda_chooses_nccl_only_when_every_rank_has_its_own_gpu(gpus, ranks):
    placement = choose_placement("cuda", None, gpus, ranks)
    assert placement == Placement("cuda", AUTOMATIC[gpus, ranks], gpus)


@pytest.mark.parametrize(("gpus", "ranks"), sorted(AUTOMATIC))
def test_gloo_can_be_forced_on_any_number_of_gpus(gpus, ranks):
    assert choose_placement("cuda", "gloo", gpus, ranks) == Placement("cuda", "gloo", gpus)


@pytest.mark.parametrize(("gpus", "ranks"), sorted(AUTOMATIC))
def test_nccl_can_be_forced_only_with_a_gpu_per_rank_and_the_refusal_names_the_fix(gpus, ranks):
    if gpus >= ranks:
        assert choose_placement("cuda", "nccl", gpus, ranks) == Placement("cuda", "nccl", gpus)
        return
    with pytest.raises(DeviceError) as refused:
        choose_placement("cuda", "nccl", gpus, ranks)
    message = str(refused.value)
    assert f"{ranks} ranks and {gpus} GPU(s)" in message
    assert "'gloo'" in message and "--backend" in message and f"GPU r mod {gpus}" in message


@pytest.mark.parametrize(
    ("gpus", "ranks", "expected"),
    [
        (1, 2, [0, 0]),
        (1, 4, [0, 0, 0, 0]),
        (2, 3, [0, 1, 0]),
        (3, 4, [0, 1, 2, 0]),
        (8, 4, [0, 1, 2, 3]),
    ],
)
def test_rank_r_runs_on_gpu_r_mod_n(gpus, ranks, expected):
    placement = choose_placement("cuda", None, gpus, ranks)
    assert [placement.gpu_of(rank) for rank in range(ranks)] == expected


@pytest.mark.parametrize("backend", [None, "gloo", "nccl"])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_cuda_without_a_gpu_is_refused_naming_the_cpu(backend, ranks):
    with pytest.raises(DeviceError, match=r"no GPU is visible.*device 'cpu'"):
        choose_placement("cuda", backend, 0, ranks)


@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_the_cpu_is_gloo_whatever_the_gpus_and_refuses_nccl(gpus):
    assert choose_placement("cpu", None, gpus, 2) == choose_placement("cpu", "gloo", gpus, 4) == CPU
    assert CPU.gpu_of(1) is None and CPU.rank_device(1) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"NCCL runs on GPUs only.*'gloo'.*--device cuda"):
        choose_placement("cpu", "nccl", gpus, 2)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(DeviceError, match="use 'cpu' or 'cuda'"):
        choose_placement("mps", None, 1, 2)
    with pytest.raises(DeviceError, match="use 'gloo' or 'nccl'"):
        choose_placement("cuda", "mpi", 1, 2)


def test_a_request_is_placed_per_world_size():
    """Two GPUs: a 2-rank world runs NCCL, 3 and 4 ranks share over gloo;
    forcing NCCL refuses the worlds it cannot run, naming the world size."""
    request = DeviceRequest("cuda", gpus=2)
    assert request.backends() == {2: "nccl", 3: "gloo", 4: "gloo"}
    assert request.describe() == "cuda with nccl for 2 ranks, gloo for 3-4 ranks, 2 GPU(s) (rank r on cuda:r mod 2)"
    assert request.to_json() == {
        "device": "cuda",
        "backend": "auto",
        "gpus": 2,
        "backends": {"2": "nccl", "3": "gloo", "4": "gloo"},
    }
    DeviceRequest("cuda", "nccl", gpus=2).check((2,))
    with pytest.raises(DeviceError, match="3 ranks and 2 GPU"):
        DeviceRequest("cuda", "nccl", gpus=2).check()
    assert DeviceRequest().describe() == "cpu with gloo"
    assert DeviceRequest("cuda", gpus=1).describe() == "cuda with gloo, 1 GPU(s) (rank r on cuda:r mod 1)"


def test_the_pool_refuses_a_world_it_cannot_place_before_starting_ranks(recorded):
    scenario, _ = recorded("eval-backward-ends-first-iteration-four-ranks")
    assert scenario.world_size == 4
    with PoolSet(DeviceRequest("cuda", "nccl", gpus=2)) as pools:
        with pytest.raises(DeviceError, match="4 ranks and 2 GPU"):
            pools.run(scenario)
        assert pools.pools == {}


# When ranks must be replaced -------------------------------------------------------------

CUDA_ERROR = StepOutcome(Status.ERROR, "AcceleratorError", "CUDA error: an illegal memory access was encountered")
NCCL_TIMEOUT = StepOutcome(
    Status.HANG, "DistBackendError", "Work WorkNCCL(SeqNum=3, OpType=ALLGATHER) timed out in blocking wait"
)
GLOO_TIMEOUT = StepOutcome(Status.HANG, "RuntimeError", "[gloo] Timed out waiting 1000ms")
ORDER_ERROR = StepOutcome(Status.ERROR, "RuntimeError", "Forward order differs across ranks")
OK = StepOutcome(Status.OK)


def test_a_cuda_error_replaces_the_ranks_on_any_gpu_backend_and_never_on_the_cpu():
    for backend in ("gloo", "nccl"):
        reason = needs_fresh_ranks(Placement("cuda", backend, 1 if backend == "gloo" else 2), [[OK], [OK, CUDA_ERROR]])
        assert reason is not None and reason.startswith("rank 1: AcceleratorError: CUDA error")
    assert needs_fresh_ranks(CPU, [[OK], [OK, CUDA_ERROR]]) is None


def test_an_nccl_timeout_replaces_the_ranks_a_gloo_timeout_does_not():
    assert needs_fresh_ranks(Placement("cuda", "nccl", 2), [[OK, NCCL_TIMEOUT], [OK, OK]]) is not None
    assert needs_fresh_ranks(Placement("cuda", "nccl", 2), [[OK, ORDER_ERROR], [OK, ORDER_ERROR]]) is None
    assert needs_fresh_ranks(Placement("cuda", "gloo", 1), [[OK, GLOO_TIMEOUT], [OK, OK]]) is None
    assert needs_fresh_ranks(Placement("cuda", "gloo", 1), [[OK, ORDER_ERROR], [OK, ORDER_ERROR]]) is None


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        "CUDA error: device-side assert triggered",
    ],
)
def test_device_failures_are_read_from_the_message(message):
    assert device_failure(StepOutcome(Status.ERROR, "RuntimeError", message))
    assert not device_failure(StepOutcome(Status.ERROR, "RuntimeError", "shape mismatch"))


# What reports and findings record ------------------------------------------------------------


def test_the_report_records_the_placement():
    placement = DeviceRequest("cuda", gpus=2).to_json()
    document = CampaignReport().to_json("ci", "gloo,nccl", placement=placement)
    assert document["backend"] == "gloo,nccl" and document["placement"] == placement
    assert "placement" not in CampaignReport().to_json("ci", "gloo")


def test_a_saved_finding_records_its_placement_and_old_files_still_load(tmp_path, recorded):
    scenario, observations = recorded("backward-on-some-ranks-only")
    path, _ = save_finding(tmp_path, scenario, observations, judge(scenario, observations), found_by="test")
    document = json.loads(path.read_text())
    assert document["finding"]["placement"] == {"device": "cpu", "backend": "gloo", "gpus": 0}
    finding = load_entry(path).finding
    assert finding.placement == {"device": "cpu", "backend": "gloo", "gpus": 0}
    assert finding.where() == "cpu with gloo"
    del document["finding"]["placement"]
    path.write_text(json.dumps(document))
    old = load_entry(path).finding
    assert old.placement is None and old.where() == "gloo"


def test_a_cli_campaign_names_the_placement_in_its_summary_and_report(tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(
        ["run", "--target", "seed", "--examples", "1", "--seed", "1", "--workers", "1", "--database", "none"]
        + ["--corpus", str(tmp_path / "corpus"), "--report", str(report), "--log-dir", str(tmp_path / "logs")]
    )
    assert code in (0, 1)
    shown = capsys.readouterr().out
    summary = next(line for line in shown.splitlines() if line.startswith("summary: "))
    assert "on cpu with gloo," in summary
    document = json.loads(report.read_text())
    assert document["backend"] == "gloo"
    assert document["placement"] == {
        "device": "cpu",
        "backend": "auto",
        "gpus": 0,
        "backends": {"2": "gloo", "3": "gloo", "4": "gloo"},
    }


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--backend", "nccl"], "NCCL runs on GPUs only"),
        pytest.param(
            ["--device", "cuda"],
            "no GPU is visible",
            marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU"),
        ),
    ],
)
def test_the_cli_refuses_what_cannot_run_with_exit_code_4(options, refusal, capsys, tmp_path):
    assert main(["replay", "corpus/seed", "--log-dir", str(tmp_path), *options]) == 4
    assert refusal in capsys.readouterr().err


def test_pytest_refuses_a_backend_that_cannot_run():
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "fuzz/test_corpus.py", "-q", "--fuzz-backend=nccl", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 4, ran.stdout + ran.stderr
    assert "NCCL runs on GPUs only" in ran.stdout + ran.stderr


# The fork server ------------------------------------------------------------------------------

SPY = """
import importlib, json, torch

called = []
for name in ("init", "_lazy_init", "device_count", "is_available", "set_device", "current_device",
             "get_device_name", "get_device_properties", "mem_get_info", "empty_cache", "synchronize"):
    original = getattr(torch.cuda, name)

    def spy(*args, _name=name, _original=original, **kwargs):
        called.append(_name)
        return _original(*args, **kwargs)

    setattr(torch.cuda, name, spy)
for module in PRELOAD:
    importlib.import_module(module)
print(json.dumps({"called": called, "initialized": torch.cuda.is_initialized()}))
"""


def test_the_fork_servers_preload_touches_no_cuda_function():
    """A fork server that initialised CUDA, or even counted GPUs through the
    CUDA runtime, would hand every worker a CUDA it cannot use: the preload
    must call nothing in ``torch.cuda`` (checked in a clean interpreter)."""
    code = f"PRELOAD = {PRELOAD!r}\n" + textwrap.dedent(SPY)
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1]) == {"called": [], "initialized": False}


def test_a_worker_forked_from_the_fork_server_can_use_cuda():
    assert fork_server_state() == {"bad_fork": False, "cuda_initialized": False, "preloaded": True}
