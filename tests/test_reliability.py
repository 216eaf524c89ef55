"""Issue 7: bad files are skipped and listed, checkpoints survive crashes, signals stop cleanly,
non-finite losses never reach the weights."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import tiny_run
from mixmim.cli import main as cli
from mixmim.config import ConfigError, load_config
from mixmim.data.images import BadImage, load_rgb
from mixmim.data.scan import scan_images
from mixmim.interop.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from mixmim.methods.factory import build_method
from mixmim.training.logs import DataQualityError
from mixmim.training.pretrain import NonFiniteLossError, run_pretraining


def _photo(size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_messy_folder(root: Path) -> dict[str, str]:
    """Readable images of every awkward kind, plus broken files. Returns {bad file name: expected reason}."""
    (root / "a" / "b").mkdir(parents=True)
    photo = _photo()
    photo.save(root / "rgb.jpg")
    photo.convert("L").save(root / "a" / "grey.png")
    photo.convert("RGBA").save(root / "a" / "rgba.png")
    photo.convert("P").save(root / "a" / "palette.png")
    photo.convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray(np.arange(80 * 96, dtype=np.uint16).reshape(80, 96) * 8).save(root / "a" / "b" / "deep16.png")
    photo.save(root / "a" / "b" / "pic.webp")
    photo.save(root / "a" / "b" / "pic.BMP")
    _photo((5, 7)).save(root / "tiny.png")  # smaller than any crop
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo.save(root / "rotated.jpg", exif=exif)
    for i in range(6):
        _photo((64 + i, 64)).save(root / f"plain{i}.png")
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return {"empty.jpg": "empty file", "truncated.jpg": "Error", "notes.png": "not an image"}


def test_every_readable_kind_becomes_rgb(tmp_path):
    make_messy_folder(tmp_path)
    for name in ("a/grey.png", "a/rgba.png", "a/palette.png", "a/cmyk.jpg", "a/b/deep16.png", "a/b/pic.webp",
                 "a/b/pic.BMP", "tiny.png"):
        assert load_rgb(tmp_path / name).mode == "RGB", name
    assert load_rgb(tmp_path / "rotated.jpg").size == (80, 96)  # EXIF orientation applied
    deep = np.asarray(load_rgb(tmp_path / "a" / "b" / "deep16.png"))
    assert 0 < deep.mean() < 255 and deep.std() > 10  # rescaled, not clipped to white
    for name, reason in make_messy_folder(tmp_path / "again").items():
        with pytest.raises(BadImage, match=reason):
            load_rgb(tmp_path / "again" / name)


def test_scan_survives_symlink_loops_and_unreadable_folders(tmp_path, monkeypatch):
    make_messy_folder(tmp_path)
    real_walk = os.walk

    def walk_with_a_locked_folder(top, **kwargs):
        # Running as root, chmod cannot lock a folder; report what os.walk reports for one.
        onerror = kwargs.get("onerror")
        error = PermissionError(13, "Permission denied")
        error.filename = str(Path(top) / "locked")
        onerror(error)
        yield from real_walk(top, **kwargs)

    monkeypatch.setattr("mixmim.data.scan.os.walk", walk_with_a_locked_folder)
    result = scan_images(tmp_path)
    names = {p.name for p in result.files}
    assert {"rgb.jpg", "grey.png", "deep16.png", "pic.BMP", "notes.png"} <= names and "readme.txt" not in names
    assert len(result.files) == len(set(p.resolve() for p in result.files))  # the loop added nothing twice
    reasons = " ".join(r for _, r in result.problems)
    assert "Permission denied" in reasons and "symlink loop" in reasons


def test_training_on_a_messy_folder_skips_and_lists_bad_files(tmp_path):
    data = tmp_path / "data"
    bad = make_messy_folder(data)
    overrides = tiny_run(tmp_path, "data.source=folder", f"data.path={data}", "train.max_steps=8",
                         "data.max_bad_fraction=0.25")
    summary = run_pretraining(load_config(None, overrides))
    assert summary["step"] == 8
    listed = (tmp_path / "t" / "skipped.txt").read_text()
    for name in bad:
        assert name in listed
    assert "symlink loop" in listed
    assert summary["skipped"] == len(bad)


def test_too_many_bad_files_stop_the_run_with_a_clear_error(tmp_path):
    data = tmp_path / "data"
    make_messy_folder(data)
    overrides = tiny_run(tmp_path, "data.source=folder", f"data.path={data}", "train.max_steps=8")
    with pytest.raises(DataQualityError, match=r"unreadable.*max_bad_fraction"):
        run_pretraining(load_config(None, overrides))


def test_too_many_bad_files_are_one_line_on_the_command_line(tmp_path):
    data = tmp_path / "data"
    make_messy_folder(data)
    done = subprocess.run([sys.executable, "-m", "mixmim", "pretrain", *tiny_run(tmp_path, "data.source=folder",
                                                                              f"data.path={data}",
                                                                              "train.max_steps=8")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "mixmim pretrain: error:" in done.stderr and "max_bad_fraction" in done.stderr.splitlines()[-1]


def test_empty_folder_fails_at_start_naming_it(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "a.txt").write_text("x")
    assert cli(["pretrain", *tiny_run(tmp_path), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nothing") in err and "no images" in err


def test_batch_smaller_than_world_size_is_refused():
    from mixmim.training.distributed import DistInfo
    from mixmim.training.loop import Trainer
    from mixmim.training.pretrain import PretrainTask

    config = load_config(None, ["train.batch_size=2"])
    with pytest.raises(ConfigError, match="train.batch_size.*smaller than the world size 4"):
        Trainer(PretrainTask(config), DistInfo(rank=0, world_size=4), torch.device("cpu"))


def test_window_that_does_not_fit_is_refused_before_work():
    with pytest.raises(ConfigError, match=r"window_size=\d+ does not divide the stage-1 feature map 40x40"):
        load_config(None, ["model.img_size=160"])


def test_checkpoint_of_another_architecture_lists_the_keys(tmp_path):
    run_pretraining(load_config(None, tiny_run(tmp_path, "train.max_steps=3")))
    other = load_config(None, tiny_run(tmp_path, "train.max_steps=6", "model.embed_dim=32"))
    with pytest.raises(CheckpointError, match=r"another architecture: shape differs for .*encoder\.absolute_pos_embed "
                                              r"\(1, 1024, 16\) vs \(1, 1024, 32\)"):
        run_pretraining(other, resume=True)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=3)
    assert manager.save({"value": torch.arange(5)}, step=1) is not None
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"value": torch.arange(9)}, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in manager.all_steps()] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert torch.equal(load_checkpoint(manager.latest())["value"], torch.arange(5))


def test_truncated_checkpoint_is_detected_and_passed_over(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({"value": torch.arange(5)}, step=1)
    newest = manager.save({"value": torch.arange(7)}, step=2)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(newest)
    assert manager.latest().name == "step_00000001.pt"


def test_keep_last_n_but_never_the_only_good_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save({"value": torch.tensor(step)}, step=step)
    assert [s for s, _ in manager.all_steps()] == [2, 3]
    (tmp_path / "step_00000003.pt").write_bytes(b"garbage")  # newest damaged
    manager.save({"value": torch.tensor(4)}, step=4)
    # 3 is damaged, so the two good ones kept are 4 and 2
    assert manager.latest().name == "step_00000004.pt"
    assert (tmp_path / "step_00000002.pt").exists()


def test_disk_full_during_a_save_keeps_training(tmp_path, monkeypatch):
    from mixmim.interop import checkpoint as ckpt

    real = ckpt.atomic_write
    calls = {"n": 0}

    def full_disk_once(path, write):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", full_disk_once)
    summary = run_pretraining(load_config(None, tiny_run(tmp_path)))
    assert summary["step"] == 6
    assert "No space left on device" in (tmp_path / "t" / "log.txt").read_text()
    assert [s for s, _ in CheckpointManager(tmp_path / "t" / "checkpoints").all_steps()] == [6]


# ---------------------------------------------------------------------------------------------- signals
def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle)}


def test_sigterm_checkpoints_exits_zero_and_resume_matches(tmp_path):
    args = tiny_run(tmp_path, "train.max_steps=30", "train.checkpoint_every=100", name="stopped")
    # One intra-op thread, as in this test process (conftest), so both runs sum in the same order.
    process = subprocess.Popen([sys.executable, "-m", "mixmim", "pretrain", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "stopped" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-2000:]
    assert "resume with" in out and "--resume" in out
    stopped_at = load_checkpoint(CheckpointManager(tmp_path / "stopped" / "checkpoints").latest())["step"]
    assert 2 <= stopped_at < 30

    run_pretraining(load_config(None, args), resume=True)
    run_pretraining(load_config(None, tiny_run(tmp_path, "train.max_steps=30", "train.checkpoint_every=100",
                                               name="straight")))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6


# ---------------------------------------------------------------------------------------------- NaNs
class NaNOnCalls(nn.Module):
    """Wraps a method; training calls whose number is in ``bad`` return a NaN loss. It records the
    weights at every bad call and whether the next call still saw exactly those weights."""

    def __init__(self, inner: nn.Module, bad: set[int]):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0
        self.cell, self.config = inner.cell, inner.config
        self.snapshot: dict | None = None
        self.unchanged_after_bad: list[bool] = []

    def __getattr__(self, name):
        # The rest of the method contract (encoder, num_groups, lr_batch, repeated_blocks, ...) is the
        # wrapped method's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, images, picture=None):
        if self.training and self.snapshot is not None:
            self.unchanged_after_bad.append(all(torch.equal(p, self.snapshot[n])
                                                for n, p in self.inner.named_parameters()))
            self.snapshot = None
        out = self.inner(images, picture=picture)
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                self.snapshot = {n: p.detach().clone() for n, p in self.inner.named_parameters()}
                out.loss = out.loss * float("nan")
        return out


def _wrapped(config, bad):
    torch.manual_seed(config.train.seed)
    return NaNOnCalls(build_method(config), bad)


def test_a_nan_step_is_skipped_and_never_reaches_the_weights(tmp_path):
    config = load_config(None, tiny_run(tmp_path, "train.max_steps=4"))
    method = _wrapped(config, {2})
    summary = run_pretraining(config, method=method)
    assert summary["step"] == 4 and method.calls == 5  # one extra call for the skipped step
    # No optimiser step at all: AdamW's decay and momentum would move the weights even with zero
    # gradients.
    assert method.unchanged_after_bad == [True]
    assert "not finite" in (tmp_path / "t" / "log.txt").read_text()


def test_repeated_nans_reload_the_checkpoint_and_halve_the_lr(tmp_path):
    from mixmim.training.schedule import lr_at

    config = load_config(None, tiny_run(tmp_path, "train.max_steps=6", "train.nan_patience=2"))
    method = _wrapped(config, {5, 6})  # steps 1-3 fine (checkpoint at 3), step 4 fine, then two NaNs
    summary = run_pretraining(config, method=method)
    assert summary["step"] == 6
    log_text = (tmp_path / "t" / "log.txt").read_text()
    assert "reloaded" in log_text and "step_00000003.pt" in log_text and "halved the learning rate" in log_text
    state = load_checkpoint(tmp_path / "t" / "checkpoints" / "step_00000006.pt")
    assert state["lr_scale"] == 0.5 and state["lowered_lr"]
    # The learning rate the optimiser used, as logged: full before the reload, halved after it, and
    # the step-4 row of the abandoned attempt replaced, not duplicated.
    with open(tmp_path / "t" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    peak, total, warmup = config.optim.lr, 6, config.optim.warmup_steps
    for r in rows:
        step = int(r["step"])
        expected = lr_at(step - 1, total, warmup, peak, warmup_lr=config.optim.warmup_lr) * (0.5 if step > 3 else 1.0)
        assert float(r["lr"]) == pytest.approx(expected, rel=1e-9), r


def test_nans_that_persist_after_lowering_the_lr_stop_the_run(tmp_path):
    config = load_config(None, tiny_run(tmp_path, "train.max_steps=6", "train.nan_patience=2"))
    method = _wrapped(config, set(range(5, 100)))
    with pytest.raises(NonFiniteLossError, match="even after reloading"):
        run_pretraining(config, method=method)
