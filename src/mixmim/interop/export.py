"""Encoder weights in and out of this project: safetensors plus a JSON file that rebuilds the model.

``save_encoder`` writes the "pair" export, ``<stem>.safetensors`` (the encoder's state dict, no decoder,
no head unless asked) and ``<stem>.json`` (constructor arguments and where the weights came from); the
Hub/timm folder layout is :mod:`mixmim.interop.hub`. ``load_encoder_state`` reads any of the weight
files a user holds — either export, our training checkpoint, a release checkpoint — and returns the
encoder's state dict in this project's names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from torch import nn

from mixmim.interop.hub import is_hub_folder, load_hub_state, read_hub_meta
from mixmim.interop.official import convert_official
from mixmim.utils.files import atomic_write, atomic_write_text

FORMAT = "mixmim-encoder/1"


def save_encoder(encoder: nn.Module, stem: str | Path, metadata: Mapping[str, Any] | None = None,
                 include_head: bool = False) -> tuple[Path, Path]:
    """Write the encoder as safetensors + JSON config; both atomically. Returns the two paths. The
    weights of timm families keep timm's names, so ``timm.create_model(<timm_model>, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))`` loads them as they are (the JSON names the model)."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()
             if include_head or not k.startswith("head.")}
    config = encoder.config()
    if not include_head:
        config["num_classes"] = 0
    weights = atomic_write(stem.with_suffix(".safetensors"),
                           lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    family = getattr(encoder, "family", "mixmim")
    info = {"format": FORMAT, "architecture": family, "config": config}
    timm_model = _timm_model_for(family, config)
    if timm_model:
        info["timm_model"] = timm_model
    info.update(dict(metadata or {}))
    meta = atomic_write_text(stem.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return weights, meta


def _timm_model_for(family: str, config: Mapping[str, Any]) -> str | None:
    """The timm model of the same architecture (whose ``create_model`` loads this export), if any."""
    from mixmim.models.registry import MODELS, name_for_config

    if family == "mixmim":
        return name_for_config(family, dict(config))  # registered with timm by mixmim.interop.timm_models
    name = name_for_config(family, dict(config))
    return MODELS[name].get("timm") if name else None


def read_encoder_meta(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(family, constructor arguments) of an export (a Hub folder, or the JSON next to a pair's weights),
    or None when there is no JSON."""
    if is_hub_folder(path):
        return read_hub_meta(path)[:2]
    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return str(info.get("architecture", "mixmim")), info["config"]


def read_encoder_config(path: str | Path) -> dict[str, Any] | None:
    """The constructor arguments saved next to exported weights, or None when there is no JSON."""
    meta = read_encoder_meta(path)
    return None if meta is None else meta[1]


def load_encoder_state(path: str | Path) -> dict[str, Tensor]:
    """Encoder weights (this project's names, no decoder) from an export (Hub folder or pair), a
    training checkpoint of this project, or a release checkpoint (pretraining or fine-tuning)."""
    path = Path(path)
    if is_hub_folder(path):
        return load_hub_state(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}") from None
    if isinstance(checkpoint, Mapping) and checkpoint.get("format") == "mixmim-checkpoint/1":
        return {k[len("encoder."):]: v for k, v in checkpoint["model"].items() if k.startswith("encoder.")}
    state = convert_official(checkpoint)
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return dict(state)


def load_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild an exported encoder from a Hub folder or from ``<stem>.safetensors`` + ``<stem>.json``."""
    from mixmim.models.registry import family_class

    meta = read_encoder_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{Path(path).with_suffix('.json')} is missing: it holds the model's configuration")
    family, config = meta
    model = family_class(family)(**{**config, **overrides})
    missing, unexpected = model.load_state_dict(load_encoder_state(path), strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the saved configuration: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
