"""Issue 30: a hostile but fair user. No code runs from a checkpoint, no file the project did not write
is deleted, nothing hangs, and every expected failure is one line with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ENCODER, tiny_run
from mixmim.cli import main as cli
from mixmim.interop.checkpoint import CheckpointManager, load_checkpoint

SMALL_ENCODER = {**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}


class Payload:
    """What a hostile checkpoint carries: unpickling it (weights_only=False) creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line_error(capsys, code: int, *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, captured.out[-2000:], err[-2000:])
    assert "Traceback" not in captured.err + captured.out, err
    lines = [line for line in err.splitlines() if line.startswith("mixmim ") and "error:" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, class_folder):
    """Every kind of file the verbs read: a pretraining run, exports, a fine-tuned model.pt, a release
    checkpoint, labelled and segmentation folders, and broken files."""
    from mixmim.interop.export import save_encoder
    from mixmim.interop.hub import save_hub_folder
    from mixmim.models.registry import create_encoder
    from mixmim.transfer.classifier import Classifier, classifier_payload

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    classes = class_folder  # two colour classes of eight images
    seg = root / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    for i in range(4):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8 + 4 * i:40] = 1
        Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(seg / "images" / f"im{i}.jpg")
        Image.fromarray(mask).save(seg / "masks" / f"im{i}.png")
    assert cli(["pretrain", *tiny_run(root, "train.max_steps=3", "train.checkpoint_every=3", name="run")]) == 0
    encoder = create_encoder("mixmim_tiny", **SMALL_ENCODER)
    save_encoder(encoder, root / "pair")
    save_hub_folder(encoder, root / "hub", card={"model": "mixmim_tiny"})
    torch.save(classifier_payload(Classifier(create_encoder("mixmim_tiny", **SMALL_ENCODER, num_classes=2)),
                                  ["green", "red"], {}), root / "model.pt")
    torch.save([torch.ones(3)], root / "list.pt")
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    newest = CheckpointManager(root / "run" / "checkpoints").latest()
    (root / "truncated.pt").write_bytes(newest.read_bytes()[:5000])
    (root / "file.png").write_bytes((classes / "red" / "0.png").read_bytes())
    (root / "a_file").write_text("not a folder\n")
    # A release pretraining checkpoint as the authors' code saves it: the model in their names, and `args`.
    import mixmim
    from mixmim.interop.official import to_official

    release_model = mixmim.create_pretrainer("mixmim", "mixmim_tiny")
    args = argparse.Namespace(model="mixmim_tiny", lr=np.float64(1.5e-4), input_size=np.int64(224), mask_ratio=0.5)
    torch.save({"model": to_official(release_model.state_dict()), "args": args, "epoch": 299}, root / "release.pth")
    return {"root": root, "classes": classes, "seg": seg, "run": root / "run", "checkpoint": newest,
            "release": root / "release.pth", "release_state": release_model.state_dict()}


def _evil_checkpoint(world, folder: Path) -> tuple[Path, Path]:
    """A copy of the run's real checkpoint with one more key that runs code, its checksum rewritten to
    match (a hostile file can carry a matching .sha256)."""
    from mixmim.utils.files import sha256_of

    marker = folder / "marker"
    state = torch.load(world["checkpoint"], weights_only=True)
    state["extra"] = Payload(marker)
    path = folder / "checkpoints" / world["checkpoint"].name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    path.with_name(path.name + ".sha256").write_text(f"{sha256_of(path)}  {path.name}\n")
    return path, marker


def _reading_verbs(world, checkpoint: Path, out: Path) -> dict[str, list[str]]:
    common = ["--num-workers", "0", "--no-progress", "--batch-size", "4", "--img-size", "64"]
    return {
        "finetune": ["finetune", "--checkpoint", str(checkpoint), "--data", str(world["classes"]), "--epochs", "1",
                     "--output", str(out / "ft"), *common],
        "linprobe": ["linprobe", "--checkpoint", str(checkpoint), "--data", str(world["classes"]), "--epochs", "1",
                     "--output", str(out / "lp"), *common],
        "knn": ["knn", "--checkpoint", str(checkpoint), "--data", str(world["classes"]), "--output", str(out / "knn"),
                *common],
        "segment": ["segment", "--checkpoint", str(checkpoint), "--data", str(world["seg"]), "--epochs", "1",
                    "--channels", "8", "--crop-size", "64", "segment.scale=[256,64]", "--output", str(out / "seg"),
                    *common],
        "reconstruct": ["reconstruct", "--checkpoint", str(checkpoint), "--images", str(world["classes"]),
                        "--output", str(out / "r.png")],
        "export": ["export", "--checkpoint", str(checkpoint), "--output", str(out / "export")],
        "convert": ["convert", str(checkpoint), "--output", str(out / "converted.pt"), "--model", "mixmim_tiny"],
    }


# ---------------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("verb", ["finetune", "linprobe", "knn", "segment", "reconstruct", "export", "convert",
                                  "pretrain --resume"])
def test_a_checkpoint_that_runs_code_is_refused_by_every_verb(world, tmp_path, capsys, verb):
    if verb == "pretrain --resume":  # the payload in the run folder's own checkpoints, checksum matching
        run = tmp_path / "run"
        shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("checkpoints", "run.lock"))
        _, marker = _evil_checkpoint(world, run)
        argv = ["pretrain", *tiny_run(tmp_path, "train.max_steps=6", "train.checkpoint_every=3", name="run"),
                "--resume"]
    else:
        path, marker = _evil_checkpoint(world, tmp_path)
        argv = _reading_verbs(world, path, tmp_path)[verb]
    line = _one_line_error(capsys, cli(argv), "not weights", "never runs code")
    assert not marker.exists(), f"{verb} ran code from the checkpoint"
    assert "re-save" in line


def test_release_checkpoints_with_args_convert_and_load(world, tmp_path, capsys):
    """A release file holds ``args`` (an argparse.Namespace, NumPy numbers inside): allowed, nothing else;
    the README's snippet works on it."""
    import mixmim

    fresh = mixmim.create_pretrainer("mixmim", "mixmim_tiny")
    fresh.load_state_dict(mixmim.load_release(world["release"]), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in world["release_state"].items())
    out = tmp_path / "converted.safetensors"
    assert cli(["convert", str(world["release"]), "--output", str(out), "--model", "mixmim_tiny"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert cli(["export", "--checkpoint", str(world["release"]), "--model", "mixmim_tiny",
                "--output", str(tmp_path / "e")]) == 0, capsys.readouterr().err


def test_a_damaged_checkpoint_named_directly_is_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    path = CheckpointManager(run / "checkpoints").latest()
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x03\x04", len(data) // 2)  # inside the zip, among the tensor records
    data[at + 100: at + 116] = b"\xff" * 16
    path.write_bytes(bytes(data))  # the old .sha256 stays beside it
    for argv in (["export", "--checkpoint", str(path), "--output", str(tmp_path / "e")],
                 ["knn", "--checkpoint", str(path), "--data", str(world["classes"]), "--num-workers", "0",
                  "--no-progress", "--output", str(tmp_path / "k")]):
        _one_line_error(capsys, cli(argv), "damaged", str(path.name))
    assert not (tmp_path / "e").exists() and not (tmp_path / "k" / "results.json").exists()


def test_run_files_follow_the_umask(tmp_path):
    before = os.umask(0o022)
    try:
        assert cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=3", "train.checkpoint_every=3",
                                          "train.picture_every=3")]) == 0
    finally:
        os.umask(before)
    run = tmp_path / "t"
    for name in ("config.yaml", "encoder.safetensors", "encoder.json", "metrics.csv", "reconstruction.png",
                 "loss.png", "checkpoints/step_00000003.pt", "checkpoints/step_00000003.pt.sha256"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------------------------------------------- data loss
def test_overwrite_with_a_typo_deletes_nothing(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    code = cli(["pretrain", *tiny_run(tmp_path, name="run"), "--overwrite", "--data", str(tmp_path / "typo")])
    _one_line_error(capsys, code, "typo", "does not exist")
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before


def test_overwrite_removes_only_the_earlier_runs_files(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "notes.md").write_text("my notes")
    (run / "checkpoints" / "my_backup.pt").write_bytes(b"mine")
    assert cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=2", "train.checkpoint_every=2", name="run"),
                "--overwrite"]) == 0
    assert (run / "notes.md").read_text() == "my notes"
    assert (run / "checkpoints" / "my_backup.pt").read_bytes() == b"mine"
    assert [s for s, _ in CheckpointManager(run / "checkpoints").all_steps()] == [2]


def test_shards_overwrite_never_touches_archives_it_did_not_write(world, tmp_path, capsys):
    out = tmp_path / "shards"
    assert cli(["shards", "--data", str(world["classes"]), "--output", str(out), "--no-progress", "--workers",
                "1"]) == 0
    ours = sorted(p.name for p in out.glob("*.tar"))
    (out / "backup.tar").write_bytes(b"the user's archive")
    _one_line_error(capsys, cli(["shards", "--data", str(world["classes"]), "--output", str(out), "--overwrite",
                                 "--no-progress", "--workers", "1"]), "backup.tar", "did not write")
    assert (out / "backup.tar").read_bytes() == b"the user's archive"
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ours
    (out / "backup.tar").rename(tmp_path / "backup.tar")
    (out / "notes.txt").write_text("mine")
    assert cli(["shards", "--data", str(world["classes"]), "--output", str(out), "--overwrite", "--no-progress",
                "--workers", "1"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.glob("*.tar")) == ours


def test_export_into_an_export_keeps_the_users_files(world, tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(world["run"]), "--output", str(out)]
    assert cli(argv) == 0
    (out / "evaluation.json").write_text("{}")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    _one_line_error(capsys, cli(argv), "--overwrite")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert cli([*argv, "--overwrite"]) == 0
    assert (out / "evaluation.json").read_text() == "{}" and (out / "model.safetensors").stat().st_mtime_ns != stamp
    pair = tmp_path / "pair"
    assert cli(["export", "--checkpoint", str(world["run"]), "--output", str(pair), "--format", "pair"]) == 0
    _one_line_error(capsys, cli(["export", "--checkpoint", str(world["run"]), "--output", str(pair), "--format",
                                 "pair"]), "--overwrite")


def _wait_for(path: Path, process: subprocess.Popen, text: str | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and (text is None or text in path.read_text()):
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {path} had {text!r}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {path}")


def test_two_runs_in_one_folder_the_second_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    first = subprocess.Popen([sys.executable, "-m", "mixmim", "pretrain", *tiny_run(
        tmp_path, "train.max_steps=400", "train.checkpoint_every=2")], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(tmp_path / "t" / "checkpoints" / "step_00000002.pt.sha256", first)
        rows = (tmp_path / "t" / "metrics.csv").read_text()
        code = cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=400", "train.checkpoint_every=2"), "--resume"])
        line = _one_line_error(capsys, code, "in use by another run", str(first.pid))
        assert "run.lock" in line
        assert (tmp_path / "t" / "metrics.csv").read_text().startswith(rows)  # the first run's rows untouched
    finally:
        first.kill()  # kill -9: its lock stays behind
        first.wait()
    assert (tmp_path / "t" / "run.lock").is_file()
    assert cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=400", "train.checkpoint_every=2",
                                      "train.max_steps=4"), "--resume-with-changes"]) == 0
    assert "stale lock" in (tmp_path / "t" / "log.txt").read_text() or "stale lock" in capsys.readouterr().err
    assert not (tmp_path / "t" / "run.lock").exists()


def test_a_resume_that_changes_the_trajectory_is_refused_naming_the_keys(tmp_path, capsys):
    args = tiny_run(tmp_path, "train.max_steps=6", "train.checkpoint_every=3")
    assert cli(["pretrain", *args]) == 0
    config, metrics = (tmp_path / "t" / "config.yaml").read_text(), (tmp_path / "t" / "metrics.csv").read_text()
    code = cli(["pretrain", *args, "optim.lr=5e-3", "method.mask_ratio=0.6", "train.max_steps=9", "--resume"])
    line = _one_line_error(capsys, code, "optim.lr", "method.mask_ratio", "train.max_steps", "--resume-with-changes")
    assert "0.002 -> 0.005" in line
    assert (tmp_path / "t" / "config.yaml").read_text() == config
    assert (tmp_path / "t" / "metrics.csv").read_text() == metrics
    # Changes that do not alter what is computed are accepted as they are.
    assert cli(["pretrain", *args, "train.max_steps=6", "train.log_every=2", "train.num_workers=1", "--resume"]) == 0
    assert cli(["pretrain", *args, "optim.lr=5e-3", "train.max_steps=9", "--resume-with-changes"]) == 0
    state = load_checkpoint(CheckpointManager(tmp_path / "t" / "checkpoints").latest())
    assert state["step"] == 9 and state["optimizer"] is not None
    assert {(c["key"], c["step"]) for c in state["config_changes"]} == {("optim.lr", 6), ("train.max_steps", 6)}
    assert state["commit"] and state["command"].startswith("mixmim pretrain") or state["command"]


def test_a_resume_whose_checkpoints_are_all_damaged_stops_and_changes_nothing(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for _, path in CheckpointManager(run / "checkpoints").all_steps():
        path.write_bytes(path.read_bytes()[:300])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=3", "train.checkpoint_every=3", name="run"),
                "--resume"])
    _one_line_error(capsys, code, "every checkpoint", "damaged")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert after == {p: b for p, b in before.items() if p.name != "log.txt"}


def test_a_full_disk_during_a_save_keeps_training_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    """torch.save fails the way it does on a full disk (RuntimeError from the zip writer, a partial file
    behind it) on the second save; training goes on, the first checkpoint stays intact."""
    real, calls = torch.save, {"n": 0}

    def full_disk_on_the_second_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "mixmim-checkpoint/1":
            calls["n"] += 1
            if calls["n"] == 2:
                Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 1000)
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 512: "
                                   "PytorchStreamWriter failed writing file data/3: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_second_save)
    stale = tmp_path / "t" / "checkpoints" / ".step_00000001.pt.a1b2c3d4.tmp"  # a kill -9 during an earlier save
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    assert cli(["pretrain", *tiny_run(tmp_path, "train.max_steps=9", "train.checkpoint_every=3")]) == 0
    folder = tmp_path / "t" / "checkpoints"
    assert [s for s, _ in CheckpointManager(folder).all_steps()] == [3, 9]
    assert load_checkpoint(folder / "step_00000003.pt")["step"] == 3  # verified against its checksum
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert "could not write checkpoint" in (tmp_path / "t" / "log.txt").read_text()


def test_a_full_disk_at_the_start_or_the_end_is_one_line(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from mixmim.training import run_folder

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the first file a run writes is its lock
        patch.setattr(run_folder.json, "dump", no_space)
        _one_line_error(capsys, cli(["pretrain", *tiny_run(tmp_path)]), "no space left on device", "run.lock")
    assert not (tmp_path / "t" / "run.lock").exists()

    class SafetensorError(Exception):  # what safetensors raises for a failed write
        pass

    def serialize_fails(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", serialize_fails)
    monkeypatch.setattr("mixmim.interop.export.save_file", serialize_fails)
    _one_line_error(capsys, cli(["pretrain", *tiny_run(tmp_path)]), "could not write", "encoder.safetensors",
                    "no space left")
    assert not [p for p in (tmp_path / "t").rglob("*.tmp")] and not (tmp_path / "t" / "run.lock").exists()
    assert CheckpointManager(tmp_path / "t" / "checkpoints").latest() is not None  # the training is kept


def test_a_second_ctrl_c_during_a_save_is_one_line_and_leaves_whole_files(tmp_path, monkeypatch, capsys):
    real, calls = torch.save, {"n": 0}

    def interrupted(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "mixmim-checkpoint/1":
            calls["n"] += 1
            if calls["n"] == 2:
                Path(f).write_bytes(b"PK\x03\x04 half")
                raise KeyboardInterrupt
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    code = cli(["pretrain", *tiny_run(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "interrupted" in err
    folder = tmp_path / "t" / "checkpoints"
    assert [s for s, _ in CheckpointManager(folder).all_steps()] == [3] and CheckpointManager(folder).latest()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")] and not (tmp_path / "t" / "run.lock").exists()


def test_a_tracker_that_cannot_start_stops_the_run_before_step_one(tmp_path, monkeypatch, capsys):
    from mixmim.training import trackers

    def refuses(cls, *args, **kwargs):
        raise RuntimeError("Could not find a registered store for 'sqlite': install mlflow")

    monkeypatch.setattr(trackers.MlflowTracker, "open", classmethod(refuses))
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: True)
    code = cli(["pretrain", *tiny_run(tmp_path, "train.trackers=[csv,mlflow]")])
    _one_line_error(capsys, code, "mlflow could not start", "MLFLOW_TRACKING_URI")
    assert not CheckpointManager(tmp_path / "t" / "checkpoints").all_steps()
    assert not (tmp_path / "t" / "metrics.csv").exists()


# ---------------------------------------------------------------------------------------------------- hangs
def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("verb", ["pretrain", "segment"])
def test_an_error_in_a_data_worker_ends_the_run_in_seconds(tmp_path, verb):
    rng = np.random.default_rng(0)
    if verb == "pretrain":
        data = tmp_path / "imgs"
        data.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(data / f"good{i}.png")
        for i in range(40):
            (data / f"bad{i:02d}.png").write_bytes(b"not an image" * 8)
        argv = ["pretrain", *tiny_run(tmp_path, "train.num_workers=2", "data.max_bad_fraction=0.9", "model.img_size=64",
                                      "model.window_size=[8,8,4,2]", "train.max_steps=20"),
                "--data", str(data)]
        expected = "consecutive unreadable images"
    else:
        data = tmp_path / "seg"
        (data / "images").mkdir(parents=True)
        (data / "masks").mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(data / "images" / f"im{i}.jpg")
            Image.fromarray(np.zeros((64, 64), np.uint8) + (i % 2)).save(data / "masks" / f"im{i}.png")
        for i in (3, 4):  # a mask of another size than its image: one of them is a training image
            Image.fromarray(np.zeros((60, 64), np.uint8)).save(data / "masks" / f"im{i}.png")
        from mixmim.interop.export import save_encoder
        from mixmim.models.registry import create_encoder

        save_encoder(create_encoder("mixmim_tiny", **SMALL_ENCODER), tmp_path / "enc")
        argv = ["segment", "--checkpoint", str(tmp_path / "enc.safetensors"), "--data", str(data), "--epochs", "2",
                "--batch-size", "2", "--channels", "8", "--num-workers", "2", "--crop-size", "64",
                "segment.scale=[256,64]", "--no-progress", "--output", str(tmp_path / "out")]
        expected = "its image"
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "mixmim", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.time() - start < 100 and "Traceback" not in done.stderr and expected in done.stderr
    time.sleep(0.5)
    assert not _processes_mentioning(str(tmp_path)), "data workers outlived the run"


def test_a_study_stopped_during_evaluation_exits_0_with_the_resume_line(tmp_path):
    from test_study import write_fashion_mnist

    folder = write_fashion_mnist(tmp_path / "fmnist")
    log = tmp_path / "err.txt"
    argv = [sys.executable, "-m", "mixmim", "study", "--profile", "quick", "--arms", "random", "--output",
            str(tmp_path / "study")]
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MIXMIM_FASHION_MNIST": str(folder), "OMP_NUM_THREADS": "1"})
        try:
            _wait_for(log, process, "study: evaluating")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
        finally:
            process.kill()
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "Resume with the same command" in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------------- one line
def _bad_inputs(world, tmp: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    r, run, ckpt = world["root"], str(world["run"]), str(world["checkpoint"])
    pair = str(r / "pair.safetensors")
    no_config = tmp / "noconfig"
    shutil.copy(r / "pair.safetensors", no_config.with_suffix(".safetensors"))
    no_config.with_suffix(".json").write_text(json.dumps({"format": "mixmim-encoder/1"}))
    huge = tmp / "huge"
    shutil.copytree(r / "hub", huge)
    meta = json.loads((huge / "config.json").read_text())
    meta["mixmim"]["config"]["img_size"] = 1_000_000
    (huge / "config.json").write_text(json.dumps(meta))
    classes, seg = str(world["classes"]), str(world["seg"])
    tiny = tiny_run(tmp, name="bad")
    knn = ["knn", "--data", classes, "--num-workers", "0", "--no-progress", "--output", str(tmp / "k")]
    return [
        ("device", ["pretrain", *tiny, "train.device=banana"], ("train.device", "banana")),
        ("output_dir is a file", ["pretrain", *tiny, f"output_dir={r / 'a_file'}"], ("a_file", "is a file")),
        ("data is an image file", ["pretrain", *tiny, "--data", str(r / "file.png")], ("file.png", "is a file")),
        ("img size negative", ["finetune", "--checkpoint", run, "--data", classes, "--img-size", "-8"],
         ("model.img_size", "minimum")),
        ("checkpoint a list", [*knn, "--checkpoint", str(r / "list.pt")], ("list.pt", "holds a list")),
        ("checkpoint random bytes", [*knn, "--checkpoint", str(r / "random.pt")], ("random.pt",)),
        ("checkpoint truncated", [*knn, "--checkpoint", str(r / "truncated.pt")], ("truncated.pt", "truncated")),
        ("finetune list", ["finetune", "--checkpoint", str(r / "list.pt"), "--data", classes], ("holds a list",)),
        ("linprobe list", ["linprobe", "--checkpoint", str(r / "list.pt"), "--data", classes], ("holds a list",)),
        ("export list", ["export", "--checkpoint", str(r / "list.pt"), "--output", str(tmp / "e1")], ("holds a list",)),
        ("wrong family", [*knn, "--checkpoint", run, "--model", "vit_tiny"], ("vit_tiny", "mixmim_tiny")),
        ("reconstruct truncated", ["reconstruct", "--checkpoint", str(r / "truncated.pt"), "--images", classes,
                                   "--output", str(tmp / "r.png")], ("truncated",)),
        ("reconstruct random", ["reconstruct", "--checkpoint", str(r / "random.pt"), "--images", classes,
                                "--output", str(tmp / "r.png")], ("random.pt",)),
        ("reconstruct pair", ["reconstruct", "--checkpoint", pair, "--images", classes, "--output", str(tmp / "r.png")],
         ("encoder export",)),
        ("reconstruct model.pt", ["reconstruct", "--checkpoint", str(r / "model.pt"), "--images", classes, "--output",
                                  str(tmp / "r.png")], ("classifier",)),
        ("reconstruct output folder", ["reconstruct", "--checkpoint", run, "--images", classes, "--output", str(tmp)],
         ("is a folder",)),
        ("reconstruct max images", ["reconstruct", "--checkpoint", run, "--images", classes, "--max-images", "-3"],
         ("--max-images",)),
        ("reconstruct wrong model", ["reconstruct", "--checkpoint", str(r / "release.pth"), "--model", "mixmim_base",
                                     "--images", classes, "--output", str(tmp / "r.png")], ("does not fit",)),
        ("export huge img_size", ["export", "--checkpoint", str(huge), "--output", str(tmp / "e2")], ("GiB",)),
        ("export pair without config", ["export", "--checkpoint", str(no_config.with_suffix(".safetensors")),
                                        "--output", str(tmp / "e3")], ("has no 'config'",)),
        ("convert random", ["convert", str(r / "random.pt"), "--output", str(tmp / "c.pt")], ("random.pt",)),
        ("convert truncated", ["convert", str(r / "truncated.pt"), "--output", str(tmp / "c.pt")], ("truncated",)),
        ("convert list", ["convert", str(r / "list.pt"), "--output", str(tmp / "c.pt")], ("holds a list",)),
        ("convert our checkpoint", ["convert", ckpt, "--output", str(tmp / "c.pt")], ("already a mixmim file",)),
        ("convert wrong model", ["convert", str(r / "release.pth"), "--model", "mixmim_base",
                                 "--output", str(tmp / "c.pt")], ("does not fit",)),
        ("convert img size 0", ["convert", str(r / "release.pth"), "--img-size", "0", "--output", str(tmp / "c.pt")],
         ("--img-size",)),
        ("shards output is a file", ["shards", "--data", classes, "--output", str(r / "a_file")], ("is a file",)),
        ("shards negative workers", ["shards", "--data", classes, "--output", str(tmp / "s"), "--workers", "-2"],
         ("--workers",)),
        ("info img size 0", ["info", "--img-size", "0"], ("--img-size",)),
        ("stats negative workers", ["stats", "--data", classes, "--num-workers", "-1"], ("--num-workers",)),
        ("segment one class", ["segment", "--checkpoint", pair, "--data", seg, "--num-classes", "1"],
         ("segment.num_classes",)),
        ("monitor with one class", ["pretrain", *tiny, f"train.monitor.data={tmp / 'one'}"], ("one class", "two")),
        ("finetune data is a file", ["finetune", "--checkpoint", run, "--data", str(r / "file.png")], ("image file",)),
    ]


def test_bad_inputs_are_one_line_across_verbs(world, tmp_path, capsys):
    (tmp_path / "one" / "cats").mkdir(parents=True)
    for i in range(4):
        shutil.copy(world["classes"] / "red" / f"{i}.png", tmp_path / "one" / "cats" / f"{i}.png")
    failures = []
    for name, argv, words in _bad_inputs(world, tmp_path):
        code = cli(argv)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.startswith("mixmim ") and "error:" in line]
        ok = (code == 2 and "Traceback" not in captured.err and len(lines) == 1
              and all(w.lower() in lines[0].lower() for w in words))
        if not ok:
            failures.append(f"{name}: exit {code}; {captured.err.strip()[-600:]}")
    assert not failures, "\n".join(failures)


def test_permission_errors_are_one_line(world, tmp_path, capsys, monkeypatch):
    """Running as root, chmod cannot lock a file: open() refuses the locked paths instead."""
    import builtins
    import io

    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(world["checkpoint"], locked / "step.pt")
    (locked / "recipe.yaml").write_text("train: {epochs: 1}\n")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(locked) in str(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    cases = [(["export", "--checkpoint", str(locked / "step.pt"), "--output", str(tmp_path / "e")], "step.pt"),
             (["pretrain", "--config", str(locked / "recipe.yaml"), *tiny_run(tmp_path)], "recipe.yaml"),
             (["pretrain", *tiny_run(locked / "runs")], "locked"),
             (["reconstruct", "--checkpoint", str(world["run"]), "--images", str(locked / "step.pt"),
               "--output", str(tmp_path / "r.png")], "step.pt")]
    for argv, word in cases:
        line = _one_line_error(capsys, cli(argv), word)
        assert "permission denied" in line.lower() or "unreadable" in line.lower(), line


def test_nans_that_outlive_the_patience_are_one_line(tmp_path, monkeypatch, capsys):
    from mixmim.training.pretrain import PretrainTask
    from mixmim.training.task import StepOutput

    def nan_step(self, model, batch):
        out = model(batch["image"])
        return StepOutput(out.loss * float("nan"), {})

    monkeypatch.setattr(PretrainTask, "step", nan_step)
    code = cli(["pretrain", *tiny_run(tmp_path, "train.nan_patience=1")])
    _one_line_error(capsys, code, "not finite")


# ---------------------------------------------------------------------------------------------------- a new user
def test_knn_counts_only_readable_images(world, tmp_path):
    """An unreadable file is skipped, not replaced by its neighbour in the totals (or the bank)."""
    data = tmp_path / "classes"
    shutil.copytree(world["classes"], data)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    assert cli(["knn", "--checkpoint", str(world["run"]), "--data", str(data), "--val-fraction", "0.5",
                "--num-workers", "0", "--no-progress", "--output", str(tmp_path / "k")]) == 0
    results = json.loads((tmp_path / "k" / "results.json").read_text())
    assert results["train_samples"] + results["test_samples"] == 16  # 17 files, 16 images


def test_fine_tuning_says_its_rule_and_uses_the_cores_it_has(world, tmp_path, monkeypatch, capsys):
    from mixmim.utils import cpus

    monkeypatch.setattr(cpus, "available_cpus", lambda: 1)
    assert cli(["finetune", "--checkpoint", str(world["run"]), "--data", str(world["classes"]), "--epochs", "1",
                "--batch-size", "4", "--img-size", "64", "--num-workers", "3", "--no-progress",
                "finetune.probe_steps=1", "--output", str(tmp_path / "ft")]) == 0
    err = capsys.readouterr().err
    assert "small-data rule for" in err and "labelled images of 2 classes" in err
    assert "train.num_workers 3 -> 1" in err and "worker processes in total" not in err


def test_a_finished_run_on_another_process_says_nothing_of_a_stop(capsys):
    from mixmim.cli.args import finished_results

    assert finished_results({"results": None, "stopped": None, "step": 7}) is None  # rank 1 of a finished run
    assert capsys.readouterr().out == ""
    assert finished_results({"results": None, "stopped": "SIGTERM", "step": 7}) is None
    assert "stopped by SIGTERM at step 7" in capsys.readouterr().out


def test_the_model_card_holds_the_commit_and_the_command(world, tmp_path):
    from mixmim.utils.provenance import git_commit

    state = load_checkpoint(world["checkpoint"])
    assert state["commit"] == git_commit() and state["command"].split()[:2] == ["mixmim", "pretrain"]
    assert cli(["export", "--checkpoint", str(world["run"]), "--output", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    assert "not recorded" not in card and state["command"] in card and state["commit"] in card


def test_a_decompression_bomb_mask_is_one_line(world, tmp_path, monkeypatch, capsys):
    # A mask of more pixels than PIL's limit (set low here instead of writing a gigapixel PNG).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code = cli(["segment", "--checkpoint", str(world["root"] / "pair.safetensors"), "--data", str(world["seg"]),
                "--epochs", "1", "--batch-size", "2", "--channels", "8", "--num-workers", "0", "--no-progress",
                "--crop-size", "64", "--output", str(tmp_path / "seg")])
    _one_line_error(capsys, code, "cannot read mask", "decompression bomb")


def test_what_a_resume_may_change():
    from mixmim.training.run_folder import config_changes

    saved = {"checkpoint": "runs/pre/", "data": {"path": "photos", "source": "folder"}, "optim": {"betas": [0.9, 0.95],
             "lr": 1e-3}, "train": {"num_workers": 8, "trackers": ["csv"], "seed": 0, "monitor": {"every": 5}}}
    same = {"checkpoint": "runs/./pre", "data": {"path": "./photos", "source": "folder"}, "optim": {"betas": (0.9,
                                                                                                              0.95),
            "lr": 0.001}, "train": {"num_workers": 2, "trackers": ["csv", "wandb"], "seed": 0, "monitor": {"every": 9}}}
    assert config_changes(saved, same) == []
    other = {**same, "data": {"path": "others", "source": "folder"}, "train": {**same["train"], "seed": 1}}
    assert [k for k, _, _ in config_changes(saved, other)] == ["data.path", "train.seed"]


def test_a_batch_that_does_not_fit_the_device_names_the_accum_steps_to_use(tmp_path, monkeypatch, capsys):
    """Issue 33: a recipe's batch (1024 for mixmim_base_in1k, 8 GPUs' worth) on one device runs out of
    memory in its first step; the error says which train.accum_steps keeps the global batch."""
    from mixmim.training.pretrain import PretrainTask

    def out_of_memory(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(PretrainTask, "step", out_of_memory)
    code = cli(["pretrain", *tiny_run(tmp_path, "train.batch_size=8", "train.accum_steps=2")])
    line = _one_line_error(capsys, code, "out of memory", "micro-batches of 4", "train.accum_steps=4",
                           "global batch 8", "model.grad_checkpointing=true")
    assert "20.00 GiB" not in line  # the advice, not torch's allocator report
