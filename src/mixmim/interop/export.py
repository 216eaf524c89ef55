"""The "pair" export: ``<stem>.safetensors`` (the encoder's state dict, no decoder, no head unless asked)
and ``<stem>.json`` (constructor arguments and where the weights came from), and rebuilding an encoder
from an export. The Hub/timm folder layout is :mod:`mixmim.interop.hub`; reading any weights a user
holds is :func:`mixmim.interop.weights.open_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from safetensors.torch import save_file
from torch import nn

from mixmim.interop.meta import ENCODER_FORMAT as FORMAT
from mixmim.utils.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder


def save_encoder(encoder: nn.Module, stem: str | Path, metadata: Mapping[str, Any] | None = None,
                 include_head: bool = False, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the encoder as safetensors + JSON config; both atomically. Returns the two paths. The
    weights of timm families keep timm's names, so ``timm.create_model(<timm_model>, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))`` loads them as they are (the JSON names the model). An
    existing pair is replaced only with ``overwrite``, and never files this project did not write."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    check_pair_target(stem, overwrite)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()
             if include_head or not k.startswith("head.")}
    config = cast("GroupedEncoder", encoder).config()
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


def check_pair_target(stem: Path, overwrite: bool) -> None:
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


def load_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild an exported encoder (a Hub folder, or ``<stem>.safetensors`` + ``<stem>.json``) at the
    size it was saved, ``overrides`` (img_size, window_size, ...) applied, its weights loaded."""
    from mixmim.interop.pretrained import build_encoder
    from mixmim.interop.weights import open_weights

    pretrained = open_weights(path)
    return build_encoder(pretrained, **{"num_classes": pretrained.config.get("num_classes", 0), **overrides})
