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

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mixmim.interop.hub import is_hub_folder, read_hub_meta
from mixmim.interop.official import convert_official
from mixmim.interop.torch_files import CheckpointError, load_torch_file
from mixmim.utils.files import atomic_write, atomic_write_text

FORMAT = "mixmim-encoder/1"
CLASSIFIER_FORMAT = "mixmim-classifier/1"  # a fine-tuned encoder with its head (transfer's model.pt)


def save_encoder(encoder: nn.Module, stem: str | Path, metadata: Mapping[str, Any] | None = None,
                 include_head: bool = False, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the encoder as safetensors + JSON config; both atomically. Returns the two paths. The
    weights of timm families keep timm's names, so ``timm.create_model(<timm_model>, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))`` loads them as they are (the JSON names the model). An
    existing pair is replaced only with ``overwrite``, and never files this project did not write."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    _check_pair_target(stem, overwrite)
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


def _check_pair_target(stem: Path, overwrite: bool) -> None:
    taken = [p for p in (stem.with_suffix(".safetensors"), stem.with_suffix(".json")) if p.exists()]
    if not taken:
        return
    if any(p.is_dir() for p in taken) or not _is_our_pair(stem):
        raise ValueError(f"{taken[0]} exists and is not an export of mixmim; choose another --output (nothing is "
                         "replaced)")
    if not overwrite:
        raise ValueError(f"{taken[0]} already exists; pass --overwrite to replace the pair "
                         f"{stem.name}.safetensors + {stem.name}.json")


def _is_our_pair(stem: Path) -> bool:
    meta = stem.with_suffix(".json")
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    try:  # the weights alone (their JSON lost): our safetensors carry the format in their metadata
        from safetensors import safe_open

        with safe_open(str(stem.with_suffix(".safetensors")), "pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


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
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {meta}: {exc}") from None
    if not isinstance(info, Mapping) or not isinstance(info.get("config"), Mapping):
        raise ValueError(f"{meta} has no 'config' (the encoder's constructor arguments): not a mixmim export")
    return str(info.get("architecture", "mixmim")), dict(info["config"])


def read_encoder_config(path: str | Path) -> dict[str, Any] | None:
    """The constructor arguments saved next to exported weights, or None when there is no JSON."""
    meta = read_encoder_meta(path)
    return None if meta is None else meta[1]


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file's tensors (a damaged or foreign file is a one-line error naming it)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        reason = " ".join(str(exc).split())[:160] or exc.__class__.__name__
        raise CheckpointError(f"cannot read weights file {path}: not a safetensors file or truncated ({reason})") from None


def encoder_state_of(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The encoder's weights (this project's names, no decoder) in a file's dict: a training checkpoint
    of this project, a fine-tuned classifier (``model.pt``), or a release checkpoint."""
    kind = checkpoint.get("format")
    if kind == "mixmim-checkpoint/1":
        model = checkpoint.get("model")
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{path}: training checkpoint without a 'model' state dict")
        state = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    elif kind == CLASSIFIER_FORMAT:
        state = dict(checkpoint.get("model") or {})
    else:
        state = convert_official(checkpoint)
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no encoder weights (expected a state dict of tensors, a release "
                              "checkpoint or a mixmim checkpoint)")
    return dict(state)


def load_encoder_state(path: str | Path) -> dict[str, Tensor]:
    """Encoder weights (this project's names, no decoder) from an export (Hub folder or pair), a
    training checkpoint of this project, a fine-tuned classifier, or a release checkpoint
    (pretraining or fine-tuning); read without running code from the file."""
    path = Path(path)
    if is_hub_folder(path):
        return load_safetensors(path / "model.safetensors")
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        return load_safetensors(path)
    return encoder_state_of(load_torch_file(path, "weights file"), path)


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
