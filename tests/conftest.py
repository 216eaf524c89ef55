"""Shared tiny configurations: every test runs on 2 CPU cores in seconds."""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

import pytest
import torch

from mixmim.config import recipe_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "reference" / "golden_tiny_s0.pt"

# 128 px: stage grids 32/16/8/4. Windows 16 and 8 in stages 1-2 straddle the 32-px cells (4 and 2
# windows per side, 2x2 cells each), stages 3-4 are global: every kind of attention appears.
TINY = dict(img_size=128, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=(16, 8, 8, 4),
            decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_ENCODER = {k: v for k, v in TINY.items() if not k.startswith("decoder")}

# One tiny configuration per encoder family, at 128 px (a 4 x 4 grid of 32-pixel mixing cells), for
# the conformance tests of tests/test_encoders.py. Windows and strides are chosen so that some
# attention windows or convolution kernels straddle cell borders.
TINY_ENCODERS = {
    "mixmim_tiny": TINY_ENCODER,
    "vit_tiny": dict(img_size=128, embed_dim=32, depth=2, num_heads=2),
    "swin_tiny": dict(img_size=128, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4),
    "swinv2_tiny": dict(img_size=128, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4),
    "pvt_v2_b2": dict(img_size=128, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 5, 8),
                      mlp_ratios=(2, 2, 2, 2)),
    "resnetv2_50": dict(img_size=128, layers=(1, 1, 1, 1), channels=(128, 256, 512, 1024), stem_chs=32),
    # SVT: a local-window block then a sub-sampled global one per stage; windows 6/6/3 straddle the cells
    # (8/4/2 tokens) and need padding, stage 4's window is global.
    "twins_svt_small": dict(img_size=128, embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(2, 2, 2, 2),
                            wss=(6, 6, 3, 4)),
}
TINY_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Two xdist workers share two cores: tiny models are dominated by threading overhead, and two
    # intra-op threads per worker oversubscribe the machine (10-40x slower when it is busy).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden case not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


def tiny_run(tmp_path, *extra: str, name: str = "t") -> list[str]:
    """Overrides for a training run of the TINY model that takes a few seconds on 2 CPU cores."""
    return [f"output_dir={tmp_path}", f"name={name}", "model.name=mixmim_tiny", "model.img_size=128",
            "model.embed_dim=16", "model.depths=[1,1,2,1]", "model.num_heads=[1,2,2,4]",
            "model.window_size=[16,8,8,4]", "method.decoder_dim=32", "method.decoder_depth=1",
            "method.decoder_num_heads=2", "data.source=bundled", "data.bundled_epoch_size=64",
            "train.batch_size=4", "train.epochs=100", "train.max_steps=6", "train.num_workers=0",
            "train.log_every=1", "train.checkpoint_every=3", "train.progress=false", "optim.lr=2e-3",
            "optim.warmup_steps=2", *extra]


def header_command(path: Path) -> list[str]:
    """The words of a recipe header's "Run it small" command (continued lines joined)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Run it small" in line)
    words: list[str] = []
    for line in lines[start + 1:]:
        text = line.lstrip("#").strip()
        words += shlex.split(text.rstrip("\\"))
        if not text.endswith("\\"):
            break
    return words


def small_run(path: Path) -> list[str]:
    """A recipe header's "Run it small" command (the one a user copies to try a recipe on a CPU) as config
    overrides: ``--data X`` as data.source, ``--name`` as name; ``-c`` must name the recipe itself (by its
    recipe name, ``ablations/table6_filling_zero``, or by a path from the repository root)."""
    words = header_command(path)
    assert words[:2] == ["mixmim", "pretrain"], words
    overrides, i = [], 2
    while i < len(words):
        word = words[i]
        if word in ("-c", "--config"):
            given = ROOT / words[i + 1] if (ROOT / words[i + 1]).is_file() else recipe_path(words[i + 1])
            assert given.resolve() == path.resolve(), words[i + 1]
            i += 2
        elif word == "--data":
            overrides.append(f"data.source={words[i + 1]}")
            i += 2
        elif word == "--name":
            overrides.append(f"name={words[i + 1]}")
            i += 2
        else:
            assert "=" in word and not word.startswith("-"), word
            overrides.append(word)
            i += 1
    return overrides


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Two colour classes of eight noisy 48 px PNGs each: a labelled folder any classifier separates."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30)}.items():
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@contextlib.contextmanager
def crashing_step(number: int):
    """The loop's ``number``-th optimiser step raises "simulated crash" (a killed run, for resume tests)."""
    from mixmim.training import loop

    real, calls = loop.Trainer.train_step, {"n": 0}

    def step(self, micro):
        calls["n"] += 1
        if calls["n"] == number:
            raise RuntimeError("simulated crash")
        return real(self, micro)

    loop.Trainer.train_step = step
    try:
        yield
    finally:
        loop.Trainer.train_step = real


def train_two_steps(tmp_path, config=None, method=None, img_size: int | None = None, decoder: bool = True):
    """Two optimiser steps through the training loop (its optimiser, schedule, data and seeding) on the
    bundled photos, for a recipe's ``config`` (its optimiser settings kept, a short warm-up) and/or a
    ``method`` built elsewhere; the method trained, after checking that every loss is finite and that the
    encoder's blocks (and the decoder's, with ``decoder``) moved. The one helper behind every "this
    recipe trains" test."""
    import csv
    import math

    from mixmim.config import load_config
    from mixmim.methods.factory import build_method
    from mixmim.training.pretrain import run_pretraining

    if config is None:
        size = img_size or (method.encoder.img_size[0] if method is not None else 128)
        config = load_config(None, tiny_run(tmp_path, f"model.img_size={size}", "model.window_size=[8,8,4,2]"
                                            if size == 64 else "model.window_size=[16,8,8,4]"))
    if method is None:
        method = build_method(config)
    multiple = int(method.batch_multiple)
    t = config.train
    config.output_dir, config.name = str(tmp_path), "two_steps"
    config.data.source, config.data.bundled_epoch_size = "bundled", 16
    needed = max(4, int(method.num_groups))  # MixMIM with k images mixes k per sample
    t.batch_size, t.accum_steps = multiple * -(-needed // multiple), 1
    t.max_steps, t.epochs, t.num_workers, t.progress, t.trackers = 2, 100, 0, False, ["csv"]
    t.checkpoint_every, t.log_every, t.picture_every, t.device, t.amp = 100, 1, 0, "cpu", "fp32"
    t.monitor.data = None
    config.optim.lr, config.optim.warmup_steps = 1e-3, 1
    before = {k: v.detach().clone() for k, v in method.named_parameters() if v.requires_grad}
    from unittest import mock

    from mixmim.training.pretrain import PretrainTask

    # The end-of-run files (encoder export, pictures, curves) are other tests' subject; two steps do not
    # need them, and drawing them would double this helper's time over some 80 recipes.
    with mock.patch.object(PretrainTask, "finish", lambda self, run, summary: None):
        summary = run_pretraining(config, method=method, overwrite=True)
    assert summary["step"] == 2
    with open(tmp_path / "two_steps" / "metrics.csv", newline="") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle) if r.get("loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    changed = {k for k, v in method.named_parameters() if v.requires_grad and not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.") and "block" in k or k.startswith("encoder.stages") or
               k.startswith("encoder.layers") for k in changed), sorted(changed)[:8]
    if decoder and any(k.startswith("decoder") for k in before):
        assert any(k.startswith("decoder") for k in changed)
    return method


def stop_with_sigterm(verb: str, args: list[str], metrics: Path, rows: int = 3, timeout: float = 240):
    """Run ``mixmim VERB ARGS`` in a process (one intra-op thread, as this test process), send it SIGTERM
    once ``metrics`` (its metrics.csv) has ``rows`` lines, and return (returncode, stdout, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "mixmim", verb, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def torchrun_verb(nproc: int, verb: str, args: list[str], timeout: int = 600):
    """``mixmim VERB ARGS`` under torchrun on ``nproc`` gloo processes (one thread each); the finished
    process (``returncode``, ``stderr``)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                *sys.path])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "mixmim", verb, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """A small stand-in for Debian's Fashion-MNIST (same IDX files), found through MIXMIM_FASHION_MNIST."""
    from test_study import write_fashion_mnist

    folder = write_fashion_mnist(tmp_path / "fmnist")
    monkeypatch.setenv("MIXMIM_FASHION_MNIST", str(folder))
    return folder
