"""``python -m mixmim.launch``: torchrun with a clean stop (issue 23). A SIGTERM to the launcher (what a
scheduler sends) makes every rank checkpoint after its step; the launcher exits 0 and says how to go
on, no rank logs a checkpoint it did not write, and ``--resume`` continues from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import tiny_run
from mixmim.interop.checkpoint import CheckpointManager, load_checkpoint
from test_distributed import _free_port
from test_shards import _wait_for_rows


def _launch(tmp_path, *extra: str) -> subprocess.Popen:
    args = tiny_run(tmp_path, "train.batch_size=8", "train.max_steps=40", "train.checkpoint_every=100", name="ddp")
    return subprocess.Popen([sys.executable, "-m", "mixmim.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                             f"--master_port={_free_port()}", "-m", "mixmim", "pretrain", *args, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigterm_to_the_launcher_checkpoints_and_exits_0(tmp_path):
    process = _launch(tmp_path)
    _wait_for_rows(tmp_path / "ddp" / "metrics.csv", process, 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped cleanly after SIGTERM" in err and "Traceback" not in err and "SignalException" not in err
    assert "checkpoint None" not in err + out
    stopped_at = load_checkpoint(CheckpointManager(tmp_path / "ddp" / "checkpoints").latest())["step"]
    assert 2 <= stopped_at < 40
    assert "stopped by stop file" in err  # the ranks stopped on the launcher's request, at a step boundary
    resumed = _launch(tmp_path, "train.max_steps=" + str(stopped_at + 2), "--resume-with-changes")  # a shorter run
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in err and load_checkpoint(
        CheckpointManager(tmp_path / "ddp" / "checkpoints").latest())["step"] == stopped_at + 2


def test_the_launcher_returns_torchruns_failure(tmp_path):
    process = _launch(tmp_path, "train.no_such_key=1")
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "no_such_key" in err
