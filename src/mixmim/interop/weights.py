"""Opening whatever weights a user holds: :func:`open_weights` tells once which kind of file a path is and
returns everything any reader needs of it, the encoder's weights in this project's names, its
constructor arguments and the facts a model card reports.

Accepted: a run folder (its newest good checkpoint), this project's training checkpoint (``.pt``), a
fine-tuned classifier (a transfer run's ``model.pt``), an export (a Hub folder, this project's or
timm's, or the pair ``.safetensors`` + ``.json``) or a release checkpoint (its model named by the
caller). Every ``.pt``/``.pth`` is read without running code from it (:mod:`mixmim.interop.torch_files`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from mixmim.interop.checkpoint import open_weights_file
from mixmim.interop.meta import (
    CHECKPOINT_FORMAT,
    CLASSIFIER_FORMAT,
    CONFIG,
    TIMM_BIT,
    WEIGHTS,
    is_hub_folder,
    our_hub_block,
    read_hub_config,
    read_pair_meta,
)
from mixmim.interop.official import convert_official
from mixmim.interop.torch_files import CheckpointError, load_torch_file
from mixmim.models.registry import MODELS, encoder_args, family_of, name_for_config, split_overrides

log = logging.getLogger("mixmim")


@dataclass
class Pretrained:
    """Encoder weights plus the constructor arguments they were trained with."""

    state: dict[str, Tensor]
    config: dict[str, Any]  # full constructor arguments of the family's encoder class
    model_name: str | None  # registry name when known (drop path defaults follow it)
    source: str  # "checkpoint", "classifier", "export", "release" or "random"
    family: str = "mixmim"
    path: Path | None = None  # the file read (a run folder's newest checkpoint, not the folder)
    facts: dict[str, Any] = field(default_factory=dict)  # what the file says of its training, for model cards


def open_weights(path: str | Path | None, model: str | None = None) -> Pretrained:
    """Weights and configuration from ``path``; ``model`` (a registry name) is needed for a release
    checkpoint and, with ``path=None``, gives a randomly initialised encoder. A ``model`` of another
    family than the file holds is an error; another size of the same family is said and the file wins."""
    if path is None:
        if model is None:
            raise ValueError("no checkpoint given: name a --model for a randomly initialised encoder")
        return Pretrained({}, _full_config(model, {}), model, "random", family_of(model))
    if is_hub_folder(path):
        return _hub_export(Path(path), model)
    if Path(path).suffix == ".safetensors":
        return _pair_export(Path(path), model)
    reported = Path(path) / "model.pt"
    if Path(path).is_dir() and reported.is_file():
        # A finished fine-tuning run: the weights it reports (eval.select's best or last), not its newest
        # training checkpoint. Other tasks' model.pt (a detector, a segmenter) are not an encoder's.
        classifier = load_torch_file(reported)
        if classifier.get("format") == CLASSIFIER_FORMAT:
            return _our_checkpoint(reported, classifier, model)
    path, checkpoint = open_weights_file(path)  # a run folder: its newest good checkpoint; no code run from it
    kind = checkpoint.get("format")
    if kind in (CHECKPOINT_FORMAT, CLASSIFIER_FORMAT):
        return _our_checkpoint(path, checkpoint, model)
    return _release(path, checkpoint, model)


# --------------------------------------------------------------------------------------------- each kind
def _hub_export(folder: Path, model: str | None) -> Pretrained:
    config = read_hub_config(folder)
    ours = our_hub_block(config)
    if ours is not None:
        family, args = str(ours["family"]), dict(ours["config"])
        name = ours.get("model") or name_for_config(family, args)
    else:
        family, args, name = _timm_encoder(folder, config)
    _check_named_model(folder, name, family, model)
    card = dict(ours.get("card") or {}) if ours else {}
    return Pretrained(_safetensors(folder / WEIGHTS), args, name, "export", family, folder, card)


def _timm_encoder(folder: Path, config: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(family, constructor arguments, registry name) of a Hub folder timm wrote, from ``architecture``
    and ``model_args``."""
    architecture = str(config["architecture"]).split(".")[0]  # a pretrained tag is not architecture
    model_args = dict(config.get("model_args") or {})
    bit = {timm_name: shape for shape, timm_name in TIMM_BIT.items()}
    if architecture in bit:  # timm's BiT names carry depth and width; model_args does not
        model_args = {"layers": list(bit[architecture][0]), "width_factor": bit[architecture][1], **model_args}
    name: str | None
    if architecture in bit or architecture == "mixmim_resnetv2_bit":
        name = "resnetv2_50"
    elif MODELS.get(architecture, {}).get("family") == "mixmim":
        name = architecture
    else:
        name = next((n for n, spec in MODELS.items() if spec.get("timm") == architecture), None)
    if name is None:
        known = sorted(s["timm"] for s in MODELS.values() if s.get("timm"))
        raise ValueError(f"{folder / CONFIG}: architecture {config['architecture']!r} is not an encoder "
                         f"mixmim builds (timm models: {', '.join(known)}; or mixmim_*)")
    family = family_of(name)
    args, _ = split_overrides(name, {})
    accepted = encoder_args(family)
    args.update({k: v for k, v in model_args.items() if k in accepted})
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    if "img_size" in accepted and "img_size" not in model_args and size:
        args["img_size"] = list(size[1:])
    return family, args, name_for_config(family, args) or name


def _pair_export(path: Path, model: str | None) -> Pretrained:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    info = read_pair_meta(path)
    if info is None:
        raise FileNotFoundError(f"{path.with_suffix('.json')} is missing: it holds the model's configuration")
    family, config = str(info.get("architecture", "mixmim")), dict(info["config"])
    name = name_for_config(family, config)
    _check_named_model(path, name, family, model)
    facts = {k: info[k] for k in ("method", "step") if info.get(k) is not None}
    return Pretrained(_safetensors(path), config, name, "export", family, path, facts)


def _our_checkpoint(path: Path, checkpoint: Mapping[str, Any], model: str | None) -> Pretrained:
    """A training checkpoint (pretraining or transfer) or a fine-tuned classifier of this project."""
    classifier = checkpoint.get("format") == CLASSIFIER_FORMAT
    weights = checkpoint.get("model")
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: {'classifier' if classifier else 'training checkpoint'} without a 'model' "
                              "state dict")
    state = dict(weights) if classifier else {k[len("encoder."):]: v for k, v in weights.items()
                                              if k.startswith("encoder.")}
    _check_tensors(state, path)
    config_tree = tree if isinstance(tree := checkpoint.get("config"), Mapping) else {}
    facts = {"config": config_tree, "step": int(checkpoint.get("step") or 0), "method": checkpoint.get("method"),
             "command": checkpoint.get("command"), "commit": checkpoint.get("commit")}
    built = checkpoint.get("encoder_config")  # a transfer run or a classifier: the encoder as it was built
    if isinstance(built, Mapping):
        family = str(checkpoint.get("family" if classifier else "encoder_family", "mixmim"))
        config = {k: v for k, v in built.items() if k != "num_classes"}
        name = name_for_config(family, config)
        _check_named_model(path, name, family, model)
        return Pretrained(state, config, name, "classifier" if classifier else "checkpoint", family, path, facts)
    section = config_tree.get("model")
    if not isinstance(section, Mapping) or not section.get("name"):
        raise CheckpointError(f"{path}: training checkpoint without config['model']['name']")
    name = str(section["name"])
    _check_named_model(path, name, family_of(name), model)
    overrides = {k: v for k, v in {**section, **dict(section.get("options") or {})}.items() if v is not None}
    channels = (config_tree.get("data") or {}).get("channels", 3)
    if channels != 3 and "in_chans" not in overrides:
        overrides["in_chans"] = channels  # pretraining built the encoder for data.channels
    return Pretrained(state, _full_config(name, overrides), name, "checkpoint", family_of(name), path, facts)


def _release(path: Path, checkpoint: Mapping[str, Any], model: str | None) -> Pretrained:
    state = convert_official(checkpoint)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    _check_tensors(state, path)
    if model is None:
        raise ValueError(f"{path} is a release checkpoint: name its model with --model (e.g. mixmim_base)")
    if family_of(model) != "mixmim":
        raise ValueError(f"{path} is not a mixmim checkpoint or export; release checkpoints exist for the "
                         f"mixmim_* models only, not {model}")
    config = _full_config(model, {})
    if "absolute_pos_embed" in state:
        # Release tables are (1, L, C); a 224 checkpoint of stride-4 patches has a 56 x 56 grid.
        side = int(state["absolute_pos_embed"].shape[1] ** 0.5)
        config["img_size"] = side * config.get("patch_size", 4)
    return Pretrained(state, config, model, "release", "mixmim", path)


# --------------------------------------------------------------------------------------------- helpers
def _safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors (a damaged or foreign file is a one-line error naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        reason = " ".join(str(exc).split())[:160] or exc.__class__.__name__
        raise CheckpointError(f"cannot read weights file {path}: not a safetensors file or truncated "
                              f"({reason})") from None


def _check_tensors(state: Mapping[str, Any], path: Path) -> None:
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no encoder weights (expected a state dict of tensors, a release "
                              "checkpoint or a mixmim checkpoint)")


def _check_named_model(path: Path, held: str | None, family: str, asked: str | None) -> None:
    """``--model`` (or a recipe's ``model.name``) naming another family than the file holds is an
    error; another size of the same family is said and the file's architecture wins."""
    if asked is None or held is None or asked == held:
        return
    if asked not in MODELS:
        raise ValueError(f"--model {asked}: unknown model; `mixmim info` lists them")
    if family_of(asked) != family:
        raise ValueError(f"--model {asked}: {path} holds a {held} encoder ({family}), not a {family_of(asked)} one; "
                         f"drop --model (the file names its model) or pass --model {held}")
    log.warning("%s holds %s; model.name %s is ignored (the file's architecture is used)", path, held, asked)


def _full_config(model_name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    accepted = encoder_args(model_name)
    encoder, _ = split_overrides(model_name, {k: v for k, v in overrides.items() if k in accepted})
    return encoder

