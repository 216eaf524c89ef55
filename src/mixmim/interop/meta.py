"""What this project's files are called and how their metadata reads, without torch: the format tags
written into every file, the names of a Hub folder's files, and the JSON beside exported weights.

Every other module of :mod:`mixmim.interop` takes its names from here, so a reader and a writer never
disagree, and telling which kind of file a path holds costs no import of torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CARD", "CHECKPOINT_FORMAT", "CLASSIFIER_FORMAT", "CONFIG", "ENCODER_FORMAT", "HUB_FORMAT", "IMAGENET_MEAN",
           "IMAGENET_STD", "TIMM_BIT", "WEIGHTS", "is_hub_folder", "our_hub_block", "read_hub_config", "read_pair_meta"]

CHECKPOINT_FORMAT = "mixmim-checkpoint/1"  # a training checkpoint (interop/checkpoint.py)
ENCODER_FORMAT = "mixmim-encoder/1"  # the pair export: <stem>.safetensors + <stem>.json
CLASSIFIER_FORMAT = "mixmim-classifier/1"  # a fine-tuned encoder with its head (a transfer run's model.pt)
HUB_FORMAT = "mixmim-hub/1"  # the "mixmim" block of a Hub folder's config.json
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"  # a Hub / timm folder


def is_hub_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` and weights timm can load (ours or any timm export)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_hub_config(folder: str | Path) -> dict[str, Any]:
    """A Hub folder's ``config.json`` (timm's keys, plus this project's ``"mixmim"`` block when it wrote it)."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{path} has no 'architecture': not a timm/Hub model config")
    return config


def our_hub_block(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``"mixmim"`` block of a Hub ``config.json`` this project wrote (family, exact constructor
    arguments, the card), or None for another tool's folder."""
    ours = config.get("mixmim")
    return dict(ours) if isinstance(ours, Mapping) and ours.get("format") == HUB_FORMAT else None


def read_pair_meta(weights: str | Path) -> dict[str, Any] | None:
    """The JSON beside a pair export's ``<stem>.safetensors`` (``architecture``: the family, ``config``: the
    constructor arguments, and what trained it), or None when there is none."""
    meta = Path(weights).with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {meta}: {exc}") from None
    if not isinstance(info, Mapping) or not isinstance(info.get("config"), Mapping):
        raise ValueError(f"{meta} has no 'config' (the encoder's constructor arguments): not a mixmim export")
    return dict(info)


# timm's ResNet-v2 BiT models by (blocks per stage, width factor): their names carry depth and width,
# which their config.json's model_args then leave out (written by hub.py, read by weights.py).
TIMM_BIT = {((3, 4, 6, 3), 1): "resnetv2_50x1_bit", ((3, 4, 6, 3), 3): "resnetv2_50x3_bit",
            ((3, 4, 23, 3), 1): "resnetv2_101x1_bit", ((3, 4, 23, 3), 3): "resnetv2_101x3_bit",
            ((3, 8, 36, 3), 2): "resnetv2_152x2_bit", ((3, 8, 36, 3), 4): "resnetv2_152x4_bit"}
