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

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from mixmim.models.resize import state_mismatch
from mixmim.utils.files import public_mode

HUB_FORMAT = "mixmim-hub/1"
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
# Training-time choices, not architecture: a loader picks its own (timm's exporter omits drop rates too).
_NOT_ARCHITECTURE = ("num_classes", "drop_rate", "attn_drop_rate", "drop_path_rate", "attention_impl")
# Crop and interpolation this project's evaluation uses (ClassificationConfig.crop_pct, bicubic resize).
_EVAL_CROP_PCT, _INTERPOLATION = 0.875, "bicubic"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_PAPERS = {  # method -> (paper, BibTeX) for the card's citation
    "mixmim": "@article{liu2022mixmim,\n  title={MixMIM: Mixed and Masked Image Modeling for Efficient Visual "
              "Representation Learning},\n  author={Liu, Jihao and Huang, Xin and Liu, Yu and Li, Hongsheng},\n"
              "  journal={arXiv preprint arXiv:2205.13137},\n  year={2022}\n}",
    "simmim": "@inproceedings{xie2022simmim,\n  title={SimMIM: a Simple Framework for Masked Image Modeling},\n"
              "  author={Xie, Zhenda and Zhang, Zheng and Cao, Yue and Lin, Yutong and Bao, Jianmin and Yao, Zhuliang"
              " and Dai, Qi and Hu, Han},\n  booktitle={CVPR},\n  year={2022}\n}",
    "mae": "@inproceedings{he2022mae,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n  author={He, "
           "Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr and Girshick, Ross},\n"
           "  booktitle={CVPR},\n  year={2022}\n}",
    "mixedae": "@inproceedings{chen2023mixedae,\n  title={Mixed Autoencoder for Self-supervised Visual Representation "
               "Learning},\n  author={Chen, Kai and Liu, Zhili and Hong, Lanqing and Xu, Hang and Li, Zhenguo and "
               "Yeung, Dit-Yan},\n  booktitle={CVPR},\n  year={2023}\n}",
}


# ---------------------------------------------------------------------------------------------------
# writing

def timm_architecture(encoder: nn.Module, model_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(timm model name, ``model_args``) with which ``timm.create_model`` builds ``encoder``'s architecture.

    ``model_args`` holds every architecture argument the timm class accepts, so the base name only
    has to be of the right family: a size that no named model has (a test's tiny ViT) builds as well."""
    import inspect

    from mixmim.models.registry import MODELS, family_of, model_names, name_for_config

    family = getattr(encoder, "family", "mixmim")
    config = encoder.config()
    name = model_name if model_name in MODELS and family_of(model_name) == family else None
    name = name or name_for_config(family, config) or model_names(family)[0]
    architecture = name if family == "mixmim" else MODELS[name]["timm"]
    # The timm class the encoder subclasses (the MixMIM encoder is its own timm model).
    base = next((c for c in type(encoder).__mro__ if c.__module__.split(".")[0] == "timm"), type(encoder))
    accepted = inspect.signature(base.__init__).parameters
    args = {k: v for k, v in config.items() if k in accepted and k not in _NOT_ARCHITECTURE and v is not None}
    if "global_pool" in args:
        args["global_pool"] = encoder.global_pool  # what the encoder really does (ViT: "avg" without a class token)
    if family == "resnetv2":  # timm's BiT entry points fix depth and width: name the one that has them
        named = _BIT.get((tuple(args["layers"]), int(args["width_factor"])))
        if named is None:
            return "mixmim_resnetv2_bit", args  # registered by mixmim.interop.timm_models
        return named, {k: v for k, v in args.items() if k not in ("layers", "width_factor")}
    return architecture, args


# timm's ResNet-v2 BiT models by (blocks per stage, width factor).
_BIT = {((3, 4, 6, 3), 1): "resnetv2_50x1_bit", ((3, 4, 6, 3), 3): "resnetv2_50x3_bit",
        ((3, 4, 23, 3), 1): "resnetv2_101x1_bit", ((3, 4, 23, 3), 3): "resnetv2_101x3_bit",
        ((3, 8, 36, 3), 2): "resnetv2_152x2_bit", ((3, 8, 36, 3), 4): "resnetv2_152x4_bit"}


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
        reference = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    problem = state_mismatch(state, reference.state_dict())
    if problem:  # timm could not load the export with strict=True
        raise ValueError(f"the encoder's weights do not fit timm's {architecture}: {problem}")

    config = encoder.config()
    config["num_classes"] = 0
    img = config.get("img_size", 224)
    height, width = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    card.setdefault("img_size", [height, width])
    card.setdefault("parameters", sum(v.numel() for v in state.values()))
    card.setdefault("architecture", architecture)
    info = {"format": HUB_FORMAT, "family": getattr(encoder, "family", "mixmim"), "config": config,
            "model": card.get("model"), "card": card}
    data_config = {"input_size": (int(config.get("in_chans", 3)), height, width),
                   "mean": tuple(mean or _IMAGENET_MEAN), "std": tuple(std or _IMAGENET_STD),
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
        ours = json.loads((folder / CONFIG).read_text()).get("mixmim")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(ours, Mapping) and ours.get("format") == HUB_FORMAT



# ---------------------------------------------------------------------------------------------------
# the model card

def run_card(config: Mapping[str, Any], step: int, method: str | None = None, run_dir: str | Path | None = None,
             command: str | None = None, commit: str | None = None) -> dict[str, Any]:
    """What a pretraining run's card reports: ``config`` is the run's resolved config as a dict (a
    checkpoint's ``"config"``, ``RunConfig.to_dict()``), ``step`` the steps trained, ``run_dir`` the run
    folder (its ``metrics.csv`` gives the monitor's last k-NN / linear-probe accuracies)."""
    data = dict(config.get("data") or {})
    train = dict(config.get("train") or {})
    model = dict(config.get("model") or {})
    method = method or str((config.get("method") or {}).get("name", "mixmim"))
    source = data.get("source", "?")
    where = f"{source} ({data['path']})" if source == "folder" and data.get("path") else str(source)
    batch = int(train.get("batch_size") or 0)
    card: dict[str, Any] = {"method": method, "model": model.get("name"), "data": where, "step": int(step),
                            "batch_size": batch, "images_seen": int(step) * batch,
                            "mean": data.get("mean"), "std": data.get("std")}
    if train.get("monitor", {}).get("data"):
        card["monitor_data"] = train["monitor"]["data"]
    if run_dir is not None:
        card["run"] = str(run_dir)
        card["metrics"] = last_metrics(Path(run_dir) / "metrics.csv", ("knn", "linprobe"))
    if command:
        card["command"] = command
    if commit:
        card["commit"] = commit
    return card


def last_metrics(path: Path, columns: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{column: {"value": v, "step": s}}``: each column's last non-empty value in a ``metrics.csv``."""
    found: dict[str, dict[str, float]] = {}
    if not path.is_file():
        return found
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for column in columns:
                try:
                    value = float(row.get(column) or "nan")
                except ValueError:
                    continue
                if not math.isnan(value):
                    found[column] = {"value": value, "step": int(float(row.get("step") or 0))}
    return found


_METRIC_NAMES = {"knn": "k-NN top-1 (%)", "linprobe": "linear probe top-1 (%)"}
_METHOD_NAMES = {"mixmim": "MixMIM", "simmim": "SimMIM", "mae": "MAE", "mixedae": "MixedAE"}


def render_card(title: str, architecture: str, card: Mapping[str, Any]) -> str:
    """``README.md`` in the Hub's model-card layout (timm's ``generate_readme``: YAML metadata, details,
    usage, citation) from the facts in ``card``."""
    from timm.models._hub import generate_readme

    method = card.get("method")
    shown = _METHOD_NAMES.get(str(method), method)
    size = card.get("img_size") or []
    details: dict[str, Any] = {"Model Type": "Image feature backbone (pooled features, no classification head)",
                               "Architecture": architecture + (f" (mixmim model {card['model']})"
                                                               if card.get("model") not in (None, architecture) else "")}
    if card.get("parameters"):
        details["Params (M)"] = f"{card['parameters'] / 1e6:.2f}"
    if size:
        details["Image size"] = f"{size[0]} x {size[1]}"
    if method:
        details["Pretraining method"] = shown
    if card.get("data"):
        details["Pretraining data"] = card["data"]
    if card.get("step") is not None:
        seen = f", {card['images_seen']:,} images seen (batch {card['batch_size']})" if card.get("images_seen") else ""
        details["Pretraining steps"] = f"{card['step']:,}{seen}"
    metrics = card.get("metrics") or {}
    if metrics:
        on = f" on {card['monitor_data']}" if card.get("monitor_data") else ""
        details[f"Monitor{on}, last values"] = {_METRIC_NAMES.get(k, k): f"{v['value']:.2f} at step {v['step']}"
                                                 for k, v in metrics.items()}
    if card.get("config_file") and not card.get("command"):
        card = {**card, "command": f"mixmim pretrain -c {card['config_file']}  # the run's resolved config"}
    for key, label in (("command", "Pretraining command"), ("commit", "Code commit (pretraining)"),
                       ("source", "Exported from"), ("resized", "Resized"), ("export_command", "Export command"),
                       ("export_commit", "Code commit (export)")):
        if card.get(key):
            details[label] = f"`{card[key]}`"
        elif key == "commit" and card.get("step") is not None:
            details[label] = "not recorded with the weights"
    needs_import = architecture.startswith("mixmim_")
    usage = ("```python\nimport timm\n" + ("import mixmim  # registers the mixmim_* architectures with timm\n"
                                            if needs_import else "")
             + "from timm.data import create_transform, resolve_data_config\n\n"
             f"model = timm.create_model(\"local-dir:{title}\", pretrained=True).eval()  # or \"hf-hub:<user>/<repo>\"\n"
             "transform = create_transform(**resolve_data_config({}, model=model))\n"
             "features = model(transform(image).unsqueeze(0))  # (1, num_features)\n```\n\n"
             "With mixmim: `mixmim finetune --checkpoint <folder>` (and `linprobe`, `knn`, `segment`, `export`).")
    model_card = {"description": f"{'A ' + shown + '-pretrained' if method else 'An'} {architecture} encoder "
                                  "exported by mixmim.",
                  "details": details, "usage": usage,
                  "tags": list(dict.fromkeys(["image-feature-extraction", "timm", "mixmim", *([str(method)] if method else [])])),
                  "license": card.get("license", "apache-2.0")}
    if str(method) in _PAPERS:
        model_card["citation"] = _PAPERS[str(method)]
    return generate_readme(model_card, title, task_name="image-feature-extraction")


# ---------------------------------------------------------------------------------------------------
# reading

def is_hub_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` and weights timm can load (ours or any timm export)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_hub_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{path} has no 'architecture': not a timm/Hub model config")
    return config


def read_hub_meta(folder: str | Path) -> tuple[str, dict[str, Any], str | None]:
    """(family, constructor arguments, registry name) of the encoder in a Hub folder: exactly as saved
    for this project's exports, from ``architecture`` + ``model_args`` for a folder timm wrote."""
    from mixmim.models.registry import MODELS, encoder_args, family_of, name_for_config, split_overrides

    config = read_hub_config(folder)
    ours = config.get("mixmim")
    if isinstance(ours, Mapping) and ours.get("format") == HUB_FORMAT:
        family, args = str(ours["family"]), dict(ours["config"])
        return family, args, ours.get("model") or name_for_config(family, args)
    architecture = str(config["architecture"]).split(".")[0]  # a pretrained tag is not architecture
    model_args = dict(config.get("model_args") or {})
    bit = {timm_name: shape for shape, timm_name in _BIT.items()}
    if architecture in bit:  # timm's BiT names carry depth and width; model_args does not
        model_args = {"layers": list(bit[architecture][0]), "width_factor": bit[architecture][1], **model_args}
    if architecture in bit or architecture == "mixmim_resnetv2_bit":
        name = "resnetv2_50"
    elif MODELS.get(architecture, {}).get("family") == "mixmim":
        name = architecture
    else:
        name = next((n for n, spec in MODELS.items() if spec.get("timm") == architecture), None)
    if name is None:
        known = sorted(s["timm"] for s in MODELS.values() if s.get("timm"))
        raise ValueError(f"{Path(folder) / CONFIG}: architecture {config['architecture']!r} is not an encoder "
                         f"mixmim builds (timm models: {', '.join(known)}; or mixmim_*)")
    family = family_of(name)
    args, _ = split_overrides(name, {})
    accepted = encoder_args(family)
    args.update({k: v for k, v in model_args.items() if k in accepted})
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    if "img_size" in accepted and "img_size" not in model_args and size:
        args["img_size"] = list(size[1:])
    return family, args, name_for_config(family, args) or name


def hub_card(folder: str | Path) -> dict[str, Any]:
    """The card facts saved with one of this project's exports (empty for a foreign folder)."""
    ours = read_hub_config(folder).get("mixmim")
    return dict(ours.get("card") or {}) if isinstance(ours, Mapping) else {}
