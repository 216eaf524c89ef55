"""Building an encoder from whatever weights a user holds, at the size the task needs.

Accepted files: this project's training checkpoint (``.pt``, format ``mixmim-checkpoint/1``, whose
``config["model"]`` names the model), an export (a Hub folder with ``config.json`` +
``model.safetensors``, this project's or timm's, or the pair ``.safetensors`` + ``.json``), or a release
checkpoint (through :func:`mixmim.interop.convert_official`; its model is named by the caller).
Weights go through :func:`mixmim.models.resize.resize_state_dict`, so the image size and the window
sizes may differ from pretraining (MixMIM section 3).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mixmim.interop.checkpoint import resolve_checkpoint
from mixmim.interop.export import CLASSIFIER_FORMAT, encoder_state_of, load_encoder_state, read_encoder_meta
from mixmim.interop.hub import is_hub_folder, read_hub_meta
from mixmim.interop.torch_files import CheckpointError, load_torch_file
from mixmim.models.registry import (MODELS, encoder_args, family_class, family_of, name_for_config,
                                    split_overrides)
from mixmim.models.resize import load_resized

log = logging.getLogger("mixmim")

# What a pretraining run chose that a transfer task must not inherit.
_NOT_INHERITED = ("num_classes", "drop_rate", "attn_drop_rate", "drop_path_rate")


@dataclass
class Pretrained:
    """Encoder weights plus the constructor arguments they were trained with."""

    state: dict[str, Tensor]
    config: dict[str, Any]  # full constructor arguments of the family's encoder class
    model_name: str | None  # registry name when known (drop path defaults follow it)
    source: str  # "checkpoint", "classifier", "export", "release" or "random"
    family: str = "mixmim"


def _checkpoint_model_section(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    """What names the encoder in a file of this project: a transfer run's or classifier's
    ``{"family", "config"}`` (the encoder as built), a pretraining run's ``config["model"]`` section;
    None for a release file."""
    kind = checkpoint.get("format")
    if kind == CLASSIFIER_FORMAT and isinstance(checkpoint.get("encoder_config"), Mapping):
        return {"family": checkpoint.get("family", "mixmim"), "config": dict(checkpoint["encoder_config"])}
    if kind != "mixmim-checkpoint/1":
        return None
    if isinstance(checkpoint.get("encoder_config"), Mapping):  # a transfer run: the encoder as built
        return {"family": checkpoint.get("encoder_family", "mixmim"), "config": dict(checkpoint["encoder_config"])}
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else {}
    section = config.get("model")
    if not isinstance(section, Mapping) or not section.get("name"):
        raise CheckpointError(f"{path}: training checkpoint without config['model']['name']")
    section = dict(section)
    channels = (config.get("data") or {}).get("channels", 3)
    if channels != 3 and "in_chans" not in (section.get("options") or {}):
        section["in_chans"] = channels  # pretraining built the encoder for data.channels
    return section


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


def read_pretrained(path: str | Path | None, model: str | None = None) -> Pretrained:
    """Weights and configuration from ``path``; ``model`` (a registry name) is needed for a release
    checkpoint and, with ``path=None``, gives a randomly initialised encoder."""
    if path is None:
        if model is None:
            raise ValueError("no checkpoint given: name a --model for a randomly initialised encoder")
        return Pretrained({}, _full_config(model, {}), model, "random", family_of(model))
    if is_hub_folder(path):
        family, config, name = read_hub_meta(path)
        _check_named_model(Path(path), name, family, model)
        return Pretrained(load_encoder_state(path), dict(config), name, "export", family)
    path = resolve_checkpoint(path)  # a run folder means its newest good checkpoint
    if path.suffix == ".safetensors":
        meta = read_encoder_meta(path)
        if meta is None:
            raise FileNotFoundError(f"{path.with_suffix('.json')} is missing: it holds the model's configuration")
        family, config = meta
        name = name_for_config(family, config)
        _check_named_model(path, name, family, model)
        return Pretrained(load_encoder_state(path), dict(config), name, "export", family)
    checkpoint = load_torch_file(path)  # read once, with no code run from it
    state = encoder_state_of(checkpoint, path)
    section = _checkpoint_model_section(checkpoint, path)
    if section is not None and "config" in section:
        family, config = section["family"], {k: v for k, v in section["config"].items() if k != "num_classes"}
        name = name_for_config(family, config)
        _check_named_model(path, name, family, model)
        source = "classifier" if checkpoint.get("format") == CLASSIFIER_FORMAT else "checkpoint"
        return Pretrained(state, config, name, source, family)
    if section is not None:
        name = str(section["name"])
        _check_named_model(path, name, family_of(name), model)
        options = dict(section.get("options") or {})
        overrides = {k: v for k, v in {**section, **options}.items() if v is not None}
        return Pretrained(state, _full_config(name, overrides), name, "checkpoint", family_of(name))
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
    return Pretrained(state, config, model, "release", "mixmim")


def build_encoder(pretrained: Pretrained, **overrides: Any) -> nn.Module:
    """An encoder of ``pretrained``'s family and architecture, ``overrides`` (img_size, window_size,
    num_classes, drop_path_rate, ...) applied, and the weights loaded (resized where the grid or a
    window changed; a new head stays freshly initialised)."""
    cls = family_class(pretrained.family)
    accepted = set(encoder_args(pretrained.family))
    config = {k: v for k, v in pretrained.config.items() if k not in _NOT_INHERITED}
    config.update({k: v for k, v in overrides.items() if v is not None})
    if "drop_path_rate" in config and "drop_path_rate" not in accepted:
        config.pop("drop_path_rate")
    unknown = [k for k in config if k not in accepted]
    if unknown:
        raise ValueError(f"unknown {pretrained.family} encoder option(s) {', '.join(unknown)}")
    _check_sizes(cls, config, pretrained.family)
    model = cls(**config)
    if pretrained.state:
        with torch.device("meta"):  # the checkpoint's own grid, for resizing position tables
            source = cls(**{k: v for k, v in pretrained.config.items() if k in accepted and k != "num_classes"})
        target = model.state_dict()
        # A head of another class count (a release fine-tuning checkpoint) is replaced by a new one.
        state = {k: v for k, v in pretrained.state.items()
                 if not (k.startswith("head.") and (k not in target or target[k].shape != v.shape))}
        load_resized(model, state, source_grid=source.grids[0])
    return model


def _check_sizes(cls: type, config: Mapping[str, Any], family: str) -> None:
    """An image size that is a positive whole number (or two), and an encoder that fits in this machine's
    memory: a config read from a file must not make the process allocate hundreds of gigabytes."""
    size = config.get("img_size")
    sides = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and not (1 <= len(sides) <= 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                              for v in sides)):
        raise ValueError(f"img_size {size!r}: expected a positive whole number of pixels (or [height, width])")
    try:
        with torch.device("meta"):  # the architecture only: no memory
            probe = cls(**config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"the {family} encoder cannot be built with {dict(config)}: {exc}") from None
    need = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    have = _physical_memory()
    if have and need > have / 2:
        raise ValueError(f"the {family} encoder at img_size {size} needs {need / 2**30:.1f} GiB for its weights alone "
                         f"(this machine has {have / 2**30:.1f} GiB): is the image size right?")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def input_size(pretrained: Pretrained, requested: int | None) -> tuple[int | list[int], int]:
    """(img_size for the model, side length for the transforms): ``requested`` or the checkpoint's."""
    img_size = requested or pretrained.config.get("img_size", 224)
    return img_size, img_size if isinstance(img_size, int) else int(img_size[0])


def parse_windows(text: str | None) -> int | list[int | list[int]] | None:
    """``"8,8,4,2"`` -> [8, 8, 4, 2]; a stage may list one window per block: ``"16,16,16+16+32,16"``."""
    if text is None or text == "":
        return None
    try:
        stages = [[int(v) for v in part.split("+")] for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--window-size {text!r}: expected comma-separated integers per stage, "
                         "'+' between the windows of one stage's blocks") from None
    if len(stages) == 1 and len(stages[0]) == 1:
        return stages[0][0]  # one window for every stage (a Swin's window_size=7)
    return [s[0] if len(s) == 1 else s for s in stages]
