"""A local Hugging Face dataset as an image source (optional: ``pip install mixmim[hf]``).

Two layouts on disk: what ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` wrote
(read with ``datasets.load_from_disk``), or a folder of Parquet files (``*.parquet``, or split
sub-folders / ``<split>-*.parquet`` names as the Hub writes them). Reading is map-style: row ``i``'s
image column holds the encoded bytes (the column is cast to ``Image(decode=False)``, so our decoder,
draft mode included, does the decoding), and the optional label column gives the class (a
``ClassLabel`` feature's names, or the sorted distinct values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixmim.data.images import BadImage, Source
from mixmim.data.sources import ImageSource, MissingExtra

INSTALL = "pip install 'mixmim[hf]' (or: pip install datasets)"
SPLIT_NAMES = {"train": ("train",), "test": ("validation", "val", "test", "valid")}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise MissingExtra(f"reading a Hugging Face dataset needs the 'datasets' package: {INSTALL}") from None
    return datasets


def is_hf_dataset(path: str | Path) -> bool:
    """A folder written by ``save_to_disk`` (``dataset_info.json``/``state.json``/``dataset_dict.json``) or holding
    Parquet files (directly, or in split sub-folders such as ``data/``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if any((path / n).is_file() for n in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return True
    return bool(_parquet_files(path))


def _parquet_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.parquet"))
    if not files and (path / "data").is_dir():
        files = sorted((path / "data").glob("*.parquet"))
    if not files:
        files = sorted(path.glob("*/*.parquet"))
    return files


def _split_of(file: Path, root: Path) -> str:
    rel = file.relative_to(root)
    candidates = [rel.parts[0]] if len(rel.parts) > 1 and rel.parts[0] != "data" else []
    candidates.append(file.stem.split("-")[0].split("_")[0])
    for name in candidates:
        for split, aliases in SPLIT_NAMES.items():
            if name.lower() in aliases:
                return split
    return "train"


def load_hf_splits(path: str | Path) -> dict[str, object]:
    """{split name: datasets.Dataset} of a local dataset; a single dataset is ``{"train": ...}``."""
    datasets = _datasets()
    path = Path(path).expanduser()
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    parquet = [] if saved else _parquet_files(path)
    if parquet:
        groups: dict[str, list[str]] = {}
        for file in parquet:
            groups.setdefault(_split_of(file, path), []).append(str(file))
        return {split: datasets.Dataset.from_parquet(files) for split, files in groups.items()}
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        out: dict[str, object] = {}
        for name, ds in loaded.items():
            split = next((s for s, aliases in SPLIT_NAMES.items() if name.lower() in aliases), name)
            out.setdefault(split, ds)
        return out
    return {"train": loaded}


class HFSource(ImageSource):
    """Images (and labels) of one split of a Hugging Face dataset, by row."""

    def __init__(self, dataset, image_column: str = "image", label_column: str | None = "label",
                 where: str = "dataset"):
        datasets = _datasets()
        columns = dataset.column_names
        if image_column not in columns:
            raise ValueError(f"{where}: no image column {image_column!r}; columns are {columns} "
                             "(set data.hf_image_column)")
        keep = [image_column] + ([label_column] if label_column and label_column in columns else [])
        dataset = dataset.select_columns(keep)
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.where = dataset, image_column, where
        self.label_column = label_column if label_column in keep else None
        if self.label_column is not None:
            feature = dataset.features[self.label_column]
            values = np.asarray(dataset[self.label_column])
            if isinstance(feature, datasets.ClassLabel):
                self.classes = list(feature.names)
                self.labels = values.astype(np.int64)
            else:
                names = sorted({str(v) for v in values.tolist()})
                lookup = {n: i for i, n in enumerate(names)}
                self.classes = names
                self.labels = np.array([lookup[str(v)] for v in values.tolist()], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> Source:
        value = self.dataset[int(index)][self.image_column]
        if isinstance(value, dict):  # the Image feature, undecoded: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return value["path"]
            raise BadImage("image cell holds neither bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return value
        if value is None:
            raise BadImage("image cell is empty")
        return _encode_array(value)

    def name(self, index: int) -> str:
        return f"{self.where}[{index}]"

    def describe(self) -> str:
        return f"Hugging Face dataset {self.where} ({len(self)} rows)"


def _encode_array(value) -> bytes:
    """A PIL image or an array cell (e.g. MNIST stored as pixels) -> PNG bytes our decoder reads."""
    import io

    from PIL import Image

    image = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
