"""Encoders in the folder layout of the Hugging Face Hub and timm: ``config.json``, ``model.safetensors``
and a ``README.md`` model card.

timm 1.0 reads such a folder with ``timm.create_model("local-dir:<folder>", pretrained=True)``
(``timm/models/_hub.py``: ``load_model_config_from_path`` takes ``architecture``, ``model_args`` and
``pretrained_cfg`` from ``config.json``; ``load_state_dict_from_path`` prefers ``model.safetensors``),
and the same folder uploaded to the Hub loads with ``"hf-hub:<user>/<repo>"``. ``architecture`` is a
timm model name: the timm families (ViT, Swin, PVT v2, ResNet-v2) are named by timm's own models
(``vit_tiny_patch16_224``) with ``model_args`` carrying every architecture argument, so a
non-default size builds too; the MixMIM encoders by their ``mixmim_*`` names, which ``import mixmim``
registers with timm. ``config.json`` is written by timm's own ``save_config_for_hf`` (so it is what
timm's exporter writes), plus a ``"mixmim"`` block that timm ignores: this project's family and exact
constructor arguments, and the card, so this project reads its exports back unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from mixmim.interop.card import render_card
from mixmim.interop.meta import CARD, CONFIG, HUB_FORMAT, IMAGENET_MEAN, IMAGENET_STD, TIMM_BIT, WEIGHTS, our_hub_block
from mixmim.models.resize import state_mismatch
from mixmim.utils.files import public_mode

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder

# Training-time choices, not architecture: a loader picks its own (timm's exporter omits drop rates too).
_NOT_ARCHITECTURE = ("num_classes", "drop_rate", "attn_drop_rate", "drop_path_rate", "attention_impl")
# Crop and interpolation this project's evaluation uses (ClassificationConfig.crop_pct, bicubic resize).
_EVAL_CROP_PCT, _INTERPOLATION = 0.875, "bicubic"

# ---------------------------------------------------------------------------------------------------
# writing

def timm_architecture(encoder: nn.Module, model_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(timm model name, ``model_args``) with which ``timm.create_model`` builds ``encoder``'s architecture.

    ``model_args`` holds every architecture argument the timm class accepts, so the base name only
    has to be of the right family: a size that no named model has (a test's tiny ViT) builds as well."""
    import inspect

    from mixmim.models.registry import MODELS, family_of, model_names, name_for_config

    family = getattr(encoder, "family", "mixmim")
    config = cast("GroupedEncoder", encoder).config()
    name = model_name if model_name in MODELS and family_of(model_name) == family else None
    name = name or name_for_config(family, config) or model_names(family)[0]
    architecture = name if family == "mixmim" else MODELS[name]["timm"]
    # The timm class the encoder subclasses (the MixMIM encoder is its own timm model).
    base: type[Any] = next((c for c in type(encoder).__mro__ if c.__module__.split(".")[0] == "timm"), type(encoder))
    accepted = inspect.signature(base.__init__).parameters
    args = {k: v for k, v in config.items() if k in accepted and k not in _NOT_ARCHITECTURE and v is not None}
    if "global_pool" in args:
        args["global_pool"] = encoder.global_pool  # what the encoder really does (ViT: "avg" without a class token)
    if family == "resnetv2":  # timm's BiT entry points fix depth and width: name the one that has them
        named = TIMM_BIT.get((tuple(args["layers"]), int(args["width_factor"])))
        if named is None:
            return "mixmim_resnetv2_bit", args  # registered by mixmim.interop.timm_models
        return named, {k: v for k, v in args.items() if k not in ("layers", "width_factor")}
    return architecture, args


def save_hub_folder(encoder: nn.Module, folder: str | Path, card: Mapping[str, Any] | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``encoder`` (no head) into ``folder`` as ``config.json`` + ``model.safetensors`` + ``README.md``.

    ``card``: what the model card reports, as :func:`run_card` builds it (method, model, data, step,
    images_seen, metrics, command, commit, ...); every key is optional. ``mean``/``std``: the
    normalisation the encoder was trained with (ImageNet's by default), recorded in ``pretrained_cfg``
    so timm's ``resolve_data_config`` gives the right transforms. The three files are written beside
    their destination and renamed into place, so a crash leaves whole files. An existing export of this
    project is replaced only with ``overwrite`` (its three files; anything else the user keeps in the
    folder stays); a folder holding other files, or another tool's export, is never written into.
    Returns the folder."""
    import timm
    from timm.models._hub import save_config_for_hf

    import mixmim.interop.timm_models  # noqa: F401  (the mixmim_* architectures, for create_model below)

    folder = Path(folder)
    check_export_target(folder, overwrite)
    card = dict(card or {})
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    architecture, model_args = timm_architecture(encoder, card.get("model"))
    with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
        # Any: torch's typing of a module's attributes does not know timm's pretrained_cfg (a dict).
        reference: Any = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    problem = state_mismatch(state, reference.state_dict())
    if problem:  # timm could not load the export with strict=True
        raise ValueError(f"the encoder's weights do not fit timm's {architecture}: {problem}")

    config = cast("GroupedEncoder", encoder).config()
    config["num_classes"] = 0
    img = config.get("img_size", 224)
    height, width = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    card.setdefault("img_size", [height, width])
    card.setdefault("parameters", sum(v.numel() for v in state.values()))
    card.setdefault("architecture", architecture)
    info = {"format": HUB_FORMAT, "family": getattr(encoder, "family", "mixmim"), "config": config,
            "model": card.get("model"), "card": card}
    data_config = {"input_size": (int(config.get("in_chans", 3)), height, width),
                   "mean": tuple(mean or IMAGENET_MEAN), "std": tuple(std or IMAGENET_STD),
                   "crop_pct": _EVAL_CROP_PCT, "interpolation": _INTERPOLATION}
    # The defaults of a named timm model describe its released weights (tag, hub id, licence): not these.
    reference.pretrained_cfg = {k: v for k, v in reference.pretrained_cfg.items()
                                if k not in ("tag", "hf_hub_id", "url", "file", "license", "notes", "paper_ids",
                                             "origin_url", "paper_name", "test_input_size", "test_crop_pct")}
    reference.pretrained_cfg["license"] = card.get("license", "apache-2.0")

    folder.mkdir(parents=True, exist_ok=True)
    public_mode(folder, executable=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".export", dir=folder.parent))
    try:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt", "mixmim": HUB_FORMAT})
        save_config_for_hf(reference, str(staging / CONFIG), model_args=model_args, data_config=data_config,
                           model_config={"mixmim": info})
        (staging / CARD).write_text(render_card(folder.name, architecture, card))
        for name in (WEIGHTS, CARD, CONFIG):  # config.json last: a folder with it is a whole export
            public_mode(staging / name)  # safetensors writes its file 0600
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_export_target(folder: Path, overwrite: bool) -> None:
    """Refuse to write an export where it could replace what this project did not write (a file in the
    way, a folder that holds anything but an export of ours), or an earlier export without ``overwrite``."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"export folder {folder} is a file; choose another --output")
    ours = _is_our_export(folder)
    if not ours and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not an export folder of mixmim; choose another --output "
                         "(nothing in it is replaced)")
    if ours and not overwrite:
        raise ValueError(f"{folder} already holds an export; pass --overwrite to replace its {CONFIG}, {WEIGHTS} "
                         f"and {CARD} (other files in the folder are kept)")


def _is_our_export(folder: Path) -> bool:
    try:
        return our_hub_block(json.loads((folder / CONFIG).read_text())) is not None
    except (OSError, ValueError, AttributeError):
        return False
