"""Issue 20: WebDataset shards written by ``mixmim shards`` and read map-style through a cached index;
bad members skipped and listed, truncated shards refused in one line, ImageNet's tar of tars, labelled
splits from shards, and pretraining on shards resumed after SIGTERM like a folder run."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_run
from mixmim.cli import main as cli
from mixmim.config import load_config
from mixmim.data import open_source
from mixmim.data.datasets import SourceDataset, collate
from mixmim.data.labelled import eval_transform, load_splits
from mixmim.data.sampler import ResumableSampler
from mixmim.data.shards import ShardError, ShardSource, index_shard, parse_size, write_shards
from mixmim.data.sources import FolderSource
from mixmim.data.transforms import pretrain_transform
from mixmim.interop.checkpoint import CheckpointManager, load_checkpoint
from mixmim.training.pretrain import run_pretraining

CLASSES = ("cat", "dog", "fox")


def picture(seed: int, size=(72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (3,), dtype=np.uint8)
    noise = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray((base + noise).astype(np.uint8))


def labelled_folder(root: Path, per_class: int = 6, bad: bool = True) -> dict[str, str]:
    """DATA/<class>/*.jpg|png, plus (``bad``) broken files. Returns {bad file name: reason fragment}."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            picture(10 * c + i).save(root / name / f"{i}.{'png' if i % 3 == 0 else 'jpg'}")
    if not bad:
        return {}
    (root / "dog" / "empty.jpg").write_bytes(b"")
    data = (root / "cat" / "1.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "fox" / "notes.jpg").write_text("not a picture\n")
    return {"empty.jpg": "empty file", "truncated.jpg": "Error", "notes.jpg": "not an image"}


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="--shard-size 'lots'"):
        parse_size("lots")


def test_shards_hold_the_readable_images_with_classes_and_list_the_others(tmp_path):
    bad = labelled_folder(tmp_path / "data")
    out = tmp_path / "shards"
    assert cli(["shards", "--data", str(tmp_path / "data"), "--output", str(out), "--shard-size", "20kB",
                "--workers", "1", "--no-progress"]) == 0
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 3 and all(p.stat().st_size <= 20_000 or len(tarfile.open(p).getnames()) == 3 for p in shards)
    assert json.loads((out / "classes.json").read_text()) == list(CLASSES)
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["samples"] == 18 and manifest["skipped"] == 3
    listed = (out / "skipped.txt").read_text()
    for name, reason in bad.items():
        line = next(line for line in listed.splitlines() if name in line)
        assert reason in line.split("\t")[1]
    # WebDataset members: <key>.<ext> with the original bytes, <key>.cls, <key>.path
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert {f"{key}.png", f"{key}.path", f"{key}.cls"} <= set(names)
        rel = tar.extractfile(f"{key}.path").read().decode()
        assert tar.extractfile(f"{key}.png").read() == (tmp_path / "data" / rel).read_bytes()
        assert int(tar.extractfile(f"{key}.cls").read()) == CLASSES.index(rel.split("/")[0])
    source = ShardSource(out)
    assert len(source) == 18 and source.classes == list(CLASSES)
    assert source.labels.tolist() == sorted(source.labels.tolist())  # the folder's order, class by class
    # An existing shard set is not overwritten by accident: one line, exit 2.
    assert cli(["shards", "--data", str(tmp_path / "data"), "--output", str(out), "--no-progress"]) == 2


def test_same_batches_from_a_folder_and_from_its_shards(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    write_shards(tmp_path / "data", tmp_path / "shards", "30kB")
    transform = pretrain_transform(32)
    folder = SourceDataset(FolderSource(tmp_path / "data"), transform)
    shards = SourceDataset(open_source(tmp_path / "shards"), transform)  # auto-detected
    assert isinstance(shards.source, ShardSource) and len(folder) == len(shards) == 18
    sampler = ResumableSampler(18, 6, seed=3)
    sampler.set_epoch(1)
    keys = list(sampler)
    for start in range(0, 18, 6):
        a = collate([folder[k] for k in keys[start:start + 6]])
        b = collate([shards[k] for k in keys[start:start + 6]])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


def test_index_is_cached_beside_the_shards_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
    labelled_folder(tmp_path / "data", bad=False)
    out = tmp_path / "shards"
    write_shards(tmp_path / "data", out, "30kB")
    ShardSource(out)
    assert (out / ".mixmim-index.json").is_file()
    calls = []
    import mixmim.data.shards.index as shards_module  # where load_index looks index_shard up

    real = shards_module.index_shard
    monkeypatch.setattr(shards_module, "index_shard", lambda p: calls.append(p.name) or real(p))
    ShardSource(out)
    assert calls == []  # every shard from the cache
    first = sorted(out.glob("*.tar"))[0]
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
    ShardSource(out)
    assert calls == [first.name]


def _hand_made_shard(path: Path) -> dict[str, str]:
    """A shard with good members and bad ones (zero bytes, truncated JPEG, text named .jpg)."""
    good = io.BytesIO()
    picture(1).save(good, "JPEG")
    data = good.getvalue()
    members = {"a.jpg": data, "b.jpg": b"", "c.jpg": data[: len(data) // 3], "d.jpg": b"plain text\n",
               "e.jpg": data}
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"b.jpg": "empty file", "c.jpg": "Error", "d.jpg": "not an image"}


def test_bad_members_are_skipped_and_named_by_shard_and_member(tmp_path):
    (tmp_path / "s").mkdir()
    bad = _hand_made_shard(tmp_path / "s" / "shard-000000.tar")
    ds = SourceDataset(ShardSource(tmp_path / "s"), pretrain_transform(32))
    assert len(ds) == 5
    item = ds[(1, 0)]
    assert item["index"] == 4  # b, c, d are unreadable: the next readable member stands in
    assert [name for name, _ in item["skipped"]] == [f"shard-000000.tar:{n}" for n in bad]
    for (_, reason), fragment in zip(item["skipped"], bad.values()):
        assert fragment in reason


def test_class_members_before_or_after_their_image(tmp_path):
    # WebDataset groups members by key whatever their order in the tar.
    (tmp_path / "s").mkdir()
    image = io.BytesIO()
    picture(2).save(image, "PNG")
    with tarfile.open(tmp_path / "s" / "x.tar", "w") as tar:
        for name, payload in [("k1.cls", b"2"), ("k1.png", image.getvalue()), ("k2.png", image.getvalue()),
                              ("k2.cls", b"0"), ("dir/k3.png", image.getvalue()), ("dir/k3.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    source = ShardSource(tmp_path / "s")
    assert source.labels.tolist() == [2, 0, 1] and source.classes == ["0", "1", "2"]
    assert source.name(2) == "x.tar:dir/k3.png"


def test_truncated_shard_is_one_line_naming_it(tmp_path, capsys):
    labelled_folder(tmp_path / "data", bad=False)
    out = tmp_path / "shards"
    write_shards(tmp_path / "data", out, "1GB")
    shard = out / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match="shard-000000.tar is truncated"):
        index_shard(shard)
    assert cli(["pretrain", *tiny_run(tmp_path), "--data", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-000000.tar" in err[0] and "truncated" in err[0]


def _imagenet_style_tarball(path: Path) -> None:
    """ILSVRC2012_img_train.tar's layout: one uncompressed tar per class, each holding that class's JPEGs."""
    with tarfile.open(path, "w") as outer:
        for c, wnid in enumerate(("n02", "n01")):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(4):
                    buffer = io.BytesIO()
                    picture(100 * c + i).save(buffer, "JPEG")
                    info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(inner.getvalue())
            outer.addfile(info, io.BytesIO(inner.getvalue()))


def test_the_imagenet_train_tarball_is_read_without_extracting(tmp_path):
    tarball = tmp_path / "ILSVRC2012_img_train.tar"
    _imagenet_style_tarball(tarball)
    source = open_source(tarball)
    assert source.classes == ["n01", "n02"] and len(source) == 8
    for i in range(len(source)):
        wnid, number = source.name(i).split(":")[1].split("/")[1].split(".")[0].split("_")
        expected = io.BytesIO()
        picture(100 * ("n02", "n01").index(wnid) + int(number)).save(expected, "JPEG")
        assert source.read(i) == expected.getvalue() and source.classes[source.label(i)] == wnid
    splits = load_splits(tarball, None, None, val_fraction=0.25)
    assert len(splits.train) == 6 and len(splits.test) == 2 and splits.classes == ["n01", "n02"]


def test_labelled_splits_from_shards(tmp_path):
    labelled_folder(tmp_path / "one", bad=False)
    write_shards(tmp_path / "one", tmp_path / "one_shards", "1GB")
    tf = eval_transform(32)
    from_folder = load_splits(tmp_path / "one", tf, tf, seed=2)
    from_shards = load_splits(tmp_path / "one_shards", tf, tf, seed=2)
    assert from_shards.classes == list(CLASSES) and len(from_shards.train) == 15 and len(from_shards.test) == 3
    for i in range(3):  # the same held-out images, the same tensors
        a, b = from_folder.test[(i, 0)], from_shards.test[(i, 0)]
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
    for split in ("train", "val"):
        labelled_folder(tmp_path / "two" / split, per_class=2, bad=False)
    write_shards(tmp_path / "two", tmp_path / "two_shards", "1GB")
    assert sorted(p.name for p in (tmp_path / "two_shards").iterdir()) == ["train", "val"]
    splits = load_splits(tmp_path / "two_shards", tf, tf)
    assert len(splits.train) == len(splits.test) == 6 and splits.train[(0, 0)]["label"] == 0
    (tmp_path / "two_shards" / "val" / "classes.json").write_text('["cat", "dog", "wolf"]')
    with pytest.raises(ValueError, match="has classes"):
        load_splits(tmp_path / "two_shards", tf, tf)


# ---------------------------------------------------------------------------------------------- resume
def _shard_run(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    labelled_folder(data, per_class=8, bad=False)
    write_shards(data, tmp_path / "shards", "40kB")
    assert len(list((tmp_path / "shards").glob("*.tar"))) >= 2
    return tmp_path / "shards"


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle)}


def _wait_for_rows(metrics: Path, process: subprocess.Popen, rows: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)


def test_pretraining_on_shards_resumed_after_sigterm_matches_the_straight_run(tmp_path):
    shards = _shard_run(tmp_path)
    extra = [f"data.path={shards}", "data.source=folder", "train.max_steps=12", "train.checkpoint_every=100"]
    args = tiny_run(tmp_path, *extra, name="stopped")
    process = subprocess.Popen([sys.executable, "-m", "mixmim", "pretrain", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_rows(tmp_path / "stopped" / "metrics.csv", process, 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-2000:]
    stopped_at = load_checkpoint(CheckpointManager(tmp_path / "stopped" / "checkpoints").latest())["step"]
    assert 2 <= stopped_at < 12
    run_pretraining(load_config(None, args), resume=True)
    run_pretraining(load_config(None, tiny_run(tmp_path, *extra, name="straight")))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find torchrun's workers")
def test_two_gloo_processes_on_shards_resume_after_sigterm_like_the_straight_run(tmp_path):
    from test_distributed import _free_port

    shards = _shard_run(tmp_path)
    steps = [f"data.path={shards}", "data.source=folder", "train.batch_size=8", "train.max_steps=8",
             "train.checkpoint_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "mixmim", "pretrain",
                                 *tiny_run(tmp_path, *steps, name="ddp"), *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    process = torchrun()
    _wait_for_rows(tmp_path / "ddp" / "metrics.csv", process, 2)
    for worker in _children(process.pid):  # a scheduler signals every task, as SLURM does
        os.kill(worker, signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    stopped_at = load_checkpoint(CheckpointManager(tmp_path / "ddp" / "checkpoints").latest())["step"]
    assert 2 <= stopped_at < 8
    resumed = torchrun("--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    # The uninterrupted run: one process accumulating the same global batch (tests/test_distributed.py
    # shows it equals two processes).
    run_pretraining(load_config(None, tiny_run(tmp_path, *steps, "train.accum_steps=2", name="straight")))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "ddp")
    assert sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
