"""The SLURM templates in examples/slurm: valid bash, the launcher command line they build from SLURM's
environment, and the stop-then-requeue path (with fake srun/scontrol/python on PATH that record their
arguments; the fake ``python -m mixmim.launch`` checkpoints on SIGTERM and exits 0, as the real one does:
tests/test_launch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT

SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + [SLURM / "common.sh"]

FAKES = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a1\\ngpu-a2\\n'; fi
""",
    # Real srun forwards SIGTERM to its tasks; exec keeps the pid, which does the same here.
    "srun": """#!/bin/bash
echo "srun $*" >> "$LOG"
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
""",
    "python": """#!/bin/bash
[ "$1 $2" = "-m mixmim.launch" ] || { echo "unexpected python $*" >&2; exit 2; }
shift 2
echo "launch $*" >> "$LOG"
if [ -n "${HANG:-}" ]; then
    trap 'echo "launch got TERM" >> "$LOG"; sleep 0.5; echo "launch checkpointed" >> "$LOG"; exit 0' TERM
    echo "launch started" >> "$LOG"
    while true; do sleep 0.1; done
fi
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NAME": "mixmim-pretrain", "PYTHON": str(bin_dir / "python")}
    return env, log


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _calls(log, tool: str) -> list[str]:
    return [line[len(tool) + 1:] for line in log.read_text().splitlines() if line.startswith(tool + " ")]


def test_pretrain_builds_one_launcher_per_node_with_the_rendezvous_on_the_first(fake_slurm):
    env, log = fake_slurm
    done = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "train.distributed=fsdp"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [srun] = _calls(log, "srun")
    assert srun.startswith(f"--ntasks-per-node=1 --kill-on-bad-exit=1 {env['PYTHON']} -m mixmim.launch ")
    [launch] = _calls(log, "launch")
    assert launch.split() == [
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a1:29500", "--rdzv-id=4242",
        "--max-restarts=0", "-m", "mixmim", "pretrain", "--config", "configs/mixmim_base_in1k.yaml",
        "--data", "/data/imagenet/train", "--name", "mixmim-pretrain", "--resume", "train.distributed=fsdp"]
    assert not _calls(log, "scontrol requeue")
    assert (ROOT / "configs" / "mixmim_base_in1k.yaml").is_file()  # the default config exists


def test_finetune_passes_resume(fake_slurm):
    env, log = fake_slurm
    env = {**env, "CHECKPOINT": "runs/x/encoder", "DATA": "fashion_mnist", "OUTPUT": "runs/ft"}
    done = subprocess.run(["bash", str(SLURM / "finetune.sbatch"), "--epochs", "3"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [launch] = _calls(log, "launch")
    words = launch.split()
    assert "--nproc-per-node=1" in words
    assert words[words.index("-m"):] == ["-m", "mixmim", "finetune", "--checkpoint", "runs/x/encoder", "--data",
                                         "fashion_mnist", "--output", "runs/ft", "--resume", "--epochs", "3"]


def test_finetune_without_a_checkpoint_says_so(fake_slurm):
    env, _ = fake_slurm
    done = subprocess.run(["bash", str(SLURM / "finetune.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "CHECKPOINT" in done.stderr


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["usr1", "term"])
def test_a_signal_stops_the_step_and_usr1_requeues_after_it_ended(fake_slurm, sig, requeued):
    env, log = fake_slurm
    job = subprocess.Popen(["bash", str(SLURM / "pretrain.sbatch")], env={**env, "HANG": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "launch started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and job.poll() is None, "the fake launcher never started"
        time.sleep(0.05)
    job.send_signal(sig)  # what SLURM's --signal=B:USR1@120 (or scancel) sends to the batch shell
    _, err = job.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert "launch got TERM" in lines  # forwarded as SIGTERM, which the launcher turns into a stop request
    assert lines[-1] == ("scontrol requeue 4242" if requeued else "launch checkpointed")  # only after the step ended
    assert _calls(log, "scontrol requeue") == (["4242"] if requeued else [])
    assert job.returncode == 0, err  # the launcher exits 0 after a clean stop
