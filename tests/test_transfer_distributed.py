"""Transfer at the papers' scale on the pretraining engine (issue 19): fine-tuning on two gloo processes
equals one process accumulating the same global batch (DDP and FSDP, MixMIM and ViT encoders), a
fine-tune stopped by SIGTERM resumes on another world size to the uninterrupted run, and the
distributed evaluation counts exactly what one process counts."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ENCODER
from distributed_transfer import finetune_overrides
from mixmim.interop.checkpoint import CheckpointManager, load_checkpoint
from mixmim.interop.export import save_encoder
from mixmim.transfer.run import load_transfer_config, run_transfer

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Three colour classes (10, 10 and 15 images: a held-out split of 7), a MixMIM and a ViT export."""
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(0)
    for (name, colour), count in zip({"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items(),
                                     (10, 10, 15)):
        (root / "data" / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    from mixmim.models.registry import create_encoder

    save_encoder(create_encoder("mixmim_tiny", **{**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}),
                 root / "mixmim")
    save_encoder(create_encoder("vit_tiny", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                 root / "vit")
    return root


@pytest.fixture(scope="module")
def two_processes(workspace) -> Path:
    done = _torchrun(2, str(HERE / "distributed_transfer.py"), str(workspace))
    assert done.returncode == 0, done.stderr[-4000:]
    return workspace


def _weights(run: Path, step: int) -> dict:
    return load_checkpoint(run / "checkpoints" / f"step_{step:08d}.pt")["model"]


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("encoder", ["mixmim", "vit"])
def test_two_processes_equal_one_process_accumulating(two_processes, encoder):
    ws = two_processes
    single = run_transfer(load_transfer_config("finetune", None, finetune_overrides(
        ws, encoder, f"{encoder}_1p", "train.accum_steps=2")))
    assert single["step"] == 6
    one = _weights(ws / f"{encoder}_1p", 6)
    for mode in ("ddp", "fsdp"):
        two = _weights(ws / f"{encoder}_{mode}_2p", 6)
        worst = max(float((two[k] - one[k]).abs().max()) for k in one)
        assert worst < 1e-5, (mode, worst)
        a, b = _rows(ws / f"{encoder}_1p"), _rows(ws / f"{encoder}_{mode}_2p")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert max(abs(float(x["loss"]) - float(y["loss"])) for x, y in zip(a, b)) < 1e-5
        # The evaluation at each epoch's end counted the same images on both set-ups.
        assert [r["acc1"] for r in a if r["acc1"]] == [r["acc1"] for r in b if r["acc1"]]
    # Training moved the weights: the comparison is not between two untouched models.
    from safetensors.torch import load_file

    start = load_file(ws / f"{encoder}.safetensors")
    assert any(not torch.allclose(one[f"encoder.{k}"], v) for k, v in start.items() if f"encoder.{k}" in one)


def test_distributed_evaluation_counts_what_one_process_counts(two_processes):
    from mixmim.data.labelled import eval_transform
    from mixmim.evaluation.sharded import evaluate_classifier
    from mixmim.transfer.classifier import build_classifier, resolve_model
    from mixmim.transfer.data import load_labelled

    ws = two_processes
    two = json.loads((ws / "distributed.json").read_text())
    config = load_transfer_config("finetune", None, finetune_overrides(ws, "vit", "eval"))
    torch.manual_seed(0)
    model = build_classifier(resolve_model(config), config, 3)
    odd = load_labelled(config.data, None, eval_transform(32, 1.0), 0).test
    assert len(odd) == 7  # not divisible by the two processes: the last batch of one of them is short
    one = evaluate_classifier(model, odd, torch.device("cpu"), 3, batch_size=2)
    assert (two["samples"], two["correct1"], two["correct5"]) == (one.samples, one.correct1, one.correct5) == \
           (7, one.correct1, 7)
    assert two["confusion"] == one.confusion.tolist() and sum(map(sum, two["confusion"])) == 7
    assert two["loss"] == pytest.approx(one.loss, rel=1e-5)
    knn = run_transfer(load_transfer_config("knn", None, [
        f"checkpoint={ws / 'vit.safetensors'}", "data.source=folder", f"data.path={ws / 'data'}",
        "data.val_fraction=0.2",
        f"output_dir={ws}", "name=knn_1p", "train.batch_size=4", "train.num_workers=0", "train.progress=false",
        "knn.k=5"]))["results"]
    assert (two["knn"]["acc1"], two["knn"]["test_samples"], two["knn"]["processes"]) == (knn["acc1"], 7, 2)


def test_sigterm_mid_epoch_resumes_on_another_world_size(workspace):
    ws = workspace
    # 7 steps per epoch of two micro-batches of 2 (Mixup mixes within a micro-batch): one process
    # accumulating two, or two processes of one each.
    # 64 px: steps slow enough that the signal lands inside the first epoch on a fast, quiet machine too.
    extra = ["train.batch_size=4", "train.accum_steps=2", "train.epochs=2", "train.checkpoint_every=100",
             "model.img_size=64"]
    args = [a for a in finetune_overrides(ws, "vit", "stopped", *extra)]
    process = subprocess.Popen([sys.executable, "-m", "mixmim", "finetune", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = ws / "stopped" / "metrics.csv", time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # a step logged: mid-epoch
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert "--resume" in out
    stopped_at = load_checkpoint(CheckpointManager(ws / "stopped" / "checkpoints").latest())["step"]
    assert 1 <= stopped_at < 14 and stopped_at % 7, stopped_at  # inside an epoch of 7 steps

    done = _torchrun(2, "-m", "mixmim", "finetune", *args, "train.accum_steps=1", "--resume")  # on two processes
    assert done.returncode == 0, done.stderr[-3000:]
    straight = run_transfer(load_transfer_config("finetune", None, finetune_overrides(ws, "vit", "straight", *extra)))
    assert straight["step"] == 14
    a, b = _weights(ws / "straight", 14), _weights(ws / "stopped", 14)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows_a, rows_b = _rows(ws / "straight"), _rows(ws / "stopped")
    assert [int(r["step"]) for r in rows_b] == list(range(1, 15))  # no duplicate rows after the resume
    assert max(abs(float(x["loss"]) - float(y["loss"])) for x, y in zip(rows_a, rows_b)) <= 1e-6
    assert json.loads((ws / "stopped" / "results.json").read_text())["acc1"] == \
           json.loads((ws / "straight" / "results.json").read_text())["acc1"]
