"""Sequential shard streaming (data.source=stream): readers own disjoint shards, an epoch sees every image
about once, a sample's augmentation does not depend on the world size, resume on the same world size and
worker count continues exactly; GPU decoding falls back to the CPU with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from mixmim.data import DataConfig, build_pretrain_dataset, build_stream
from mixmim.data.datasets import collate
from mixmim.data.shards import write_shards
from mixmim.data.stream import ShardStream
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform
from test_shards import labelled_folder


@pytest.fixture
def shards(tmp_path):
    labelled_folder(tmp_path / "data", per_class=8, bad=False)  # 24 images
    write_shards(tmp_path / "data", tmp_path / "shards", "25kB")
    found = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(found) >= 4
    return found


def _indices(stream, workers: int = 0) -> list[int]:
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=collate)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_ranks_read_their_own_shards_and_cover_the_epoch(shards):
    t = pretrain_transform(16)
    ranks = [ShardStream(shards, t, batch_size=4, batches_per_epoch=3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    seen = [_indices(s) for s in ranks]
    assert all(len(s) == 12 for s in seen)  # every rank the same number of batches
    shard_of = [{i >> 24 for i in s} for s in seen]
    assert not shard_of[0] & shard_of[1]
    assert len(set(seen[0]) | set(seen[1])) >= 20  # about once: a reader short of images starts again
    # The same image gets the same augmentation whatever the world size.
    alone = ShardStream(shards, t, batch_size=4, batches_per_epoch=6, seed=1)
    images = {item["index"]: item["image"] for item in alone}
    for item in ranks[1]:
        if item["index"] in images:
            assert torch.equal(item["image"], images[item["index"]])


def test_resume_on_the_same_workers_continues_exactly(shards):
    t = pretrain_transform(16)
    stream = ShardStream(shards, t, batch_size=2, batches_per_epoch=8, seed=3)
    stream.set_epoch(1)
    whole = _indices(stream, workers=2)
    stream.set_epoch(1, start_batch=5)
    assert _indices(stream, workers=2) == whole[5 * 2:]


def test_too_few_shards_for_the_readers_is_one_line(shards):
    stream = ShardStream(shards[:2], pretrain_transform(16), batch_size=2, batches_per_epoch=2, world_size=3)
    with pytest.raises(ValueError, match="2 shard.* 3 process.*write at least 3 shards"):
        next(iter(stream))


def test_build_stream_counts_an_epoch_from_the_manifest(shards):
    cfg = DataConfig(path=str(shards[0].parent), crop_scale=(0.2, 1.0), hflip=True, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)
    stream = build_stream(cfg, 16, batch_size=2, global_batch=4, rank=1, world_size=2)
    assert len(stream) == 24 // 4 * 2 and stream.counts == [c for c in stream.counts if c > 0]


def test_gpu_decoding_without_cuda_warns_once_and_decodes_on_the_cpu(tmp_path, monkeypatch):
    import mixmim.data.gpu as gpu

    labelled_folder(tmp_path / "data", per_class=2, bad=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "_warned", False)
    cfg = DataConfig(source="folder", path=str(tmp_path / "data"), crop_scale=(0.2, 1.0), hflip=True,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, decode="gpu")
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        ds = build_pretrain_dataset(cfg, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build_pretrain_dataset(cfg, 16)  # once per process, not per data set
    item = ds[(1, 5)]
    assert item["image"].shape == (3, 16, 16) and torch.equal(item["image"], again[(1, 5)]["image"])
    assert ds.finish_batch(collate([item]), "cpu")["image"].shape == (1, 3, 16, 16)


def test_the_gpu_path_on_the_cpu_gives_the_cpu_crops(tmp_path):
    # What runs on the GPU (decode_jpeg, crop, resize, flip, normalise) run on the CPU device: same boxes and
    # flips as the CPU path; pixels equal up to the decoder (libjpeg-turbo on both here).
    from mixmim.data.datasets import SourceDataset
    from mixmim.data.gpu import EncodedDataset
    from mixmim.data.sources import FolderSource

    labelled_folder(tmp_path / "data", per_class=3, bad=False)
    (tmp_path / "data" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    cpu = SourceDataset(FolderSource(tmp_path / "data"), pretrain_transform(24, draft=False))
    encoded = EncodedDataset(cpu, device="cpu")
    keys = [(i, 40 + i) for i in range(len(cpu))]
    batch = encoded.collate_fn([encoded[k] for k in keys])
    assert any(j is not None for j in batch["jpeg"]) and any(p is not None for p in batch["pixels"])
    out = encoded.finish_batch(batch)
    reference = collate([cpu[k] for k in keys])
    assert out["image"].shape == reference["image"].shape
    assert [n for n, _ in out["skipped"]] == [n for n, _ in reference["skipped"]]
    same = reference["index"] == out["index"]
    assert same.all() and (out["image"] - reference["image"]).abs().max() < 1e-4


def test_exif_orientations_on_tensors_match_pil():
    from PIL import Image, ImageOps
    from torchvision.transforms.v2.functional import pil_to_tensor

    from mixmim.data.gpu import _orient

    image = Image.fromarray(torch.randint(0, 255, (5, 7, 3), dtype=torch.uint8).numpy())
    for value in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = value
        tagged = image.copy()
        tagged.info["exif"] = exif.tobytes()
        assert torch.equal(_orient(pil_to_tensor(image), value), pil_to_tensor(ImageOps.exif_transpose(tagged))), value


def test_pretraining_on_a_stream_resumes_where_a_crash_stopped_it(shards, tmp_path):
    """data.source=stream through the training loop: an epoch is this rank's share of the shards, and a
    run resumed after a crash replays the straight run's losses (same world size and workers)."""
    import csv

    from conftest import crashing_step, tiny_run
    from mixmim.config import load_config
    from mixmim.training.pretrain import run_pretraining

    def run(name):
        return load_config(None, tiny_run(tmp_path, "data.source=stream", f"data.path={shards[0].parent}",
                                          "model.img_size=128", name=name))

    def losses(name):
        with open(tmp_path / name / "metrics.csv", newline="") as handle:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle) if r["loss"]}

    summary = run_pretraining(run("straight"))
    assert summary["step"] == 6  # 24 images, batch 4: one epoch is 6 steps
    with crashing_step(5), pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(run("crashed"))
    assert run_pretraining(run("crashed"), resume=True)["step"] == 6
    straight, resumed = losses("straight"), losses("crashed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
