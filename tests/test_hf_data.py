"""A local Hugging Face dataset (save_to_disk or Parquet files) as a map-style source, with the guarantees
of a folder: the same images give the same batches, labels from a ClassLabel column, bad rows skipped."""

from __future__ import annotations

import io

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package (pip install mixmim[hf]) is "
                                                  "not installed")

from mixmim.data import open_source  # noqa: E402
from mixmim.data.datasets import SourceDataset  # noqa: E402
from mixmim.data.hf import HFSource  # noqa: E402
from mixmim.data.labelled import eval_transform, load_splits  # noqa: E402
from mixmim.data.sources import FolderSource  # noqa: E402
from mixmim.data.transforms import pretrain_transform  # noqa: E402
from test_shards import CLASSES, labelled_folder, picture  # noqa: E402


def _as_hf(folder: FolderSource):
    """The folder's images (their encoded bytes) and classes as a datasets.Dataset."""
    rows = {"image": [{"bytes": open(f, "rb").read(), "path": None} for f in folder.files],
            "label": folder.labels.tolist(), "note": ["x"] * len(folder)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_saved_dataset_gives_the_batches_of_its_folder(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    folder = FolderSource(tmp_path / "data")
    _as_hf(folder).save_to_disk(str(tmp_path / "hf"))
    source = open_source(tmp_path / "hf")  # auto-detected, as --data passes it
    assert isinstance(source, HFSource) and len(source) == len(folder) and source.classes == list(CLASSES)
    transform = pretrain_transform(32)
    a, b = SourceDataset(folder, transform), SourceDataset(source, transform)
    for key in [(0, 1), (5, 99), (17, 3)]:
        assert torch.equal(a[key]["image"], b[key]["image"])


def test_parquet_splits_are_labelled_splits_and_bad_rows_are_skipped(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    ds = _as_hf(FolderSource(tmp_path / "data"))
    broken = ds.select(range(3)).map(lambda row: {"image": {"bytes": b"not a picture", "path": None}},
                                     features=ds.features)
    (tmp_path / "pq").mkdir()
    datasets.concatenate_datasets([broken, ds]).to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    ds.select(range(0, 18, 3)).to_parquet(str(tmp_path / "pq" / "test-00000-of-00001.parquet"))
    tf = eval_transform(32)
    splits = load_splits(tmp_path / "pq", tf, tf)
    assert splits.classes == list(CLASSES) and len(splits.train) == 21 and len(splits.test) == 6
    item = splits.train[(0, 0)]
    assert item["index"] == 3 and [name.rsplit(":", 1)[1] for name, _ in item["skipped"]] == \
        ["train[0]", "train[1]", "train[2]"]
    assert "not an image" in item["skipped"][0][1]


def test_wrong_image_column_is_named(tmp_path):
    buffer = io.BytesIO()
    picture(0).save(buffer, "PNG")
    datasets.Dataset.from_dict({"picture": [buffer.getvalue()]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"no image column 'image'; columns are \['picture'\]"):
        open_source(tmp_path / "hf")
    source = open_source(tmp_path / "hf", hf_image_column="picture", hf_label_column=None)
    assert source.load(0).size == picture(0).size and source.classes is None
