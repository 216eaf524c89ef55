"""torchrun with the gloo backend on CPU: two processes train the same model as one process that
accumulates the same global batch (issue 6), and a run resumes on another world size."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import tiny_run
from mixmim.config import load_config
from mixmim.interop.checkpoint import load_checkpoint
from mixmim.training.pretrain import run_pretraining


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "mixmim", "pretrain", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _rows(run_dir) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_accumulation(tmp_path, mode):
    # Global batch 8: two ranks of 4, or one process with two micro-batches of 4. Micro-batch m of
    # the global batch draws the same images, augmentation and mask in both set-ups.
    steps = ["train.max_steps=4", "train.batch_size=8", "train.checkpoint_every=2"]
    done = _torchrun(2, tiny_run(tmp_path, *steps, f"train.distributed={mode}", name="ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    single_args = tiny_run(tmp_path, *steps, "train.accum_steps=2", name="single")
    run_pretraining(load_config(None, single_args))

    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000004.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "step_00000004.pt")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    worst = max(float((ddp["model"][k] - single["model"][k]).abs().max()) for k in single["model"])
    assert worst < 1e-5, worst
    torch.manual_seed(0)
    assert any(not torch.equal(ddp["model"][k], v) for k, v in _initial_state(tmp_path).items())

    # The 2-process run, interrupted after its step-2 checkpoint, continues in one process (same
    # global batch, accumulation 2): weights, optimiser state and logged losses follow the
    # uninterrupted run (the optimiser's moments matter from the first resumed step on).
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ddp", resumed)
    for path in (resumed / "checkpoints").glob("step_00000004.pt*"):
        path.unlink()
    summary = run_pretraining(load_config(None, tiny_run(tmp_path, *steps, "train.accum_steps=2", name="resumed")),
                              resume=True)
    assert summary["step"] == 4
    after = load_checkpoint(resumed / "checkpoints" / "step_00000004.pt")
    worst = max(float((after["model"][k] - ddp["model"][k]).abs().max()) for k in ddp["model"])
    assert worst < 1e-5, worst
    a, b = _rows(tmp_path / "ddp"), _rows(resumed)
    assert [s for s, _ in b] == [1, 2, 3, 4]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5


def _initial_state(tmp_path) -> dict:
    from mixmim.methods.factory import build_method

    config = load_config(None, tiny_run(tmp_path))
    torch.manual_seed(config.train.seed)
    return build_method(config).state_dict()


def test_fsdp_of_a_bf16_run_gathers_in_bf16_and_reduces_in_fp32(monkeypatch):
    """Issue 33: FSDP had no mixed-precision policy, so a bf16 run gathered parameters and reduced
    gradients in float32. Every unit (each block, then the root) now gets bf16 parameters and float32
    reduction when the run is bf16, and FSDP's defaults otherwise."""
    import torch.distributed.fsdp as fsdp

    from mixmim.training import distributed as D

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw["mp_policy"])))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    info = D.DistInfo(rank=0, world_size=2)
    D.wrap(model, info, torch.device("cpu"), "fsdp", blocks=list(model), param_dtype=torch.bfloat16)
    assert [m for m, _ in calls] == [model[0], model[1], model]
    assert all(p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32 for _, p in calls)
    calls.clear()
    D.wrap(model, info, torch.device("cpu"), "fsdp", blocks=list(model))
    assert all(p.param_dtype is None and p.reduce_dtype is None for _, p in calls)
