"""Issue 23, data side: per-channel statistics of a data set (``mixmim stats``, ``data.normalize=dataset``)
and one-channel data (Fashion-MNIST, grey folders)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mixmim.cli import main as cli
from mixmim.data import DataConfig, build_pretrain_dataset
from mixmim.data.fashion_mnist import default_root
from mixmim.data.stats import dataset_stats
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def two_images(root):
    """100 pixels of (51, 102, 0) and 200 of (204, 102, 255): statistics known in closed form."""
    root.mkdir()
    Image.new("RGB", (10, 10), (51, 102, 0)).save(root / "a.png")
    Image.new("RGB", (20, 10), (204, 102, 255)).save(root / "b.png")


def test_statistics_are_pixel_weighted_per_channel(tmp_path):
    two_images(tmp_path / "d")
    stats = dataset_stats(str(tmp_path / "d"))
    assert stats.images == 2 and stats.pixels == 300
    expected_mean = (0.6, 0.4, 2 / 3)
    expected_std = (math.sqrt(0.08), 0.0, math.sqrt(2 / 9))
    assert np.allclose(stats.mean, expected_mean, atol=1e-9) and np.allclose(stats.std, expected_std, atol=1e-7)
    grey = dataset_stats(str(tmp_path / "d"), channels=1)
    la, lb = (np.asarray(Image.new("RGB", (1, 1), c).convert("L"))[0, 0] / 255 for c in ((51, 102, 0), (204, 102, 255)))
    m = (100 * la + 200 * lb) / 300
    assert len(grey.mean) == 1 and abs(grey.mean[0] - m) < 1e-9
    assert abs(grey.std[0] - math.sqrt((100 * la**2 + 200 * lb**2) / 300 - m * m)) < 1e-7
    one = dataset_stats(str(tmp_path / "d"), limit=1, seed=0)
    assert one.images == 1 and any(np.allclose(one.mean, m) for m in ((0.2, 0.4, 0.0), (0.8, 0.4, 1.0)))


def test_stats_verb_prints_values_to_paste_and_counts_unreadable_files(tmp_path, capsys):
    two_images(tmp_path / "d")
    (tmp_path / "d" / "bad.png").write_bytes(b"nope")
    assert cli(["stats", "--data", str(tmp_path / "d"), "--channels", "3", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 images, 300 pixels per channel, 1 unreadable" in out
    assert "data.mean=[0.6000,0.4000,0.6667] data.std=[0.2828,0.0000,0.4714]" in out
    assert cli(["stats", "--data", str(tmp_path / "nowhere")]) == 2


@pytest.mark.skipif(not (default_root() / "t10k-images-idx3-ubyte.gz").exists() and
                    not (default_root() / "t10k-images-idx3-ubyte").exists(), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_in_one_channel(capsys):
    cfg = DataConfig(source="fashion_mnist", path=None, crop_scale=(0.2, 1.0), hflip=True, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, channels=1, normalize="imagenet")
    ds = build_pretrain_dataset(cfg, 32)
    assert ds[(0, 0)]["image"].shape == (1, 32, 32) and len(ds.mean) == 1
    assert cli(["stats", "--data", "fashion_mnist", "--channels", "1", "--limit", "300", "--num-workers", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    mean = float(line.split("data.mean=[")[1].split("]")[0])
    assert 0.25 < mean < 0.32  # Fashion-MNIST's grey mean is 0.286
