"""The model card of an export: what the weights are and where they came from (method, encoder, data,
images seen, the monitor's last accuracies, the command and the commit), gathered from what
:func:`mixmim.interop.weights.open_weights` read and rendered in the Hub's ``README.md`` layout."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixmim.utils.metrics_csv import read_metrics

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
    if not path.is_file():
        return {}
    rows = read_metrics(path)
    found: dict[str, dict[str, float]] = {}
    for column in columns:
        for step, value in zip(rows.get("step", []), rows.get(column, [])):
            if not math.isnan(value):
                found[column] = {"value": value, "step": int(step)}
    return found


_METRIC_NAMES = {"knn": "k-NN top-1 (%)", "linprobe": "linear probe top-1 (%)"}
_METHOD_NAMES = {"mixmim": "MixMIM", "simmim": "SimMIM", "mae": "MAE", "mixedae": "MixedAE"}


def render_card(title: str, architecture: str, card: Mapping[str, Any]) -> str:
    """``README.md`` in the Hub's model-card layout (timm's ``generate_readme``: YAML metadata, details,
    usage, citation) from the facts in ``card``."""
    from timm.models._hub import generate_readme

    method: Any = card.get("method")  # a method's name, or whatever the card holds
    shown = _METHOD_NAMES.get(str(method), method)
    size = card.get("img_size") or []
    details: dict[str, Any] = {"Model Type": "Image feature backbone (pooled features, no classification head)",
                               "Architecture": architecture + (f" (mixmim model {card['model']})"
                                                               if card.get("model") not in (None,
                                                                                            architecture) else "")}
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
             f"model = timm.create_model(\"local-dir:{title}\", pretrained=True).eval()  # or "
             f"\"hf-hub:<user>/<repo>\"\n"
             "transform = create_transform(**resolve_data_config({}, model=model))\n"
             "features = model(transform(image).unsqueeze(0))  # (1, num_features)\n```\n\n"
             "With mixmim: `mixmim finetune --checkpoint <folder>` (and `linprobe`, `knn`, `segment`, `export`).")
    model_card = {"description": f"{'A ' + shown + '-pretrained' if method else 'An'} {architecture} encoder "
                                  "exported by mixmim.",
                  "details": details, "usage": usage,
                  "tags": list(dict.fromkeys(["image-feature-extraction", "timm", "mixmim",
                                              *([str(method)] if method else [])])),
                  "license": card.get("license", "apache-2.0")}
    if str(method) in _PAPERS:
        model_card["citation"] = _PAPERS[str(method)]
    return generate_readme(model_card, title, task_name="image-feature-extraction")




def source_card(pretrained: Any, export_commit: str | None = None) -> dict[str, Any]:
    """The card's facts for the weights :func:`~mixmim.interop.weights.open_weights` read: a training
    checkpoint gives its run's method, data, steps, metrics, command and commit; an export passes its own
    card on; a release file only its name."""
    path = pretrained.path
    base = {"source": str(path) if path is not None else None, "model": pretrained.model_name,
            "export_commit": export_commit}
    facts = dict(pretrained.facts or {})
    if pretrained.source in ("checkpoint", "classifier") and "config" in facts:
        run_dir = path.parent.parent if path is not None and path.parent.name == "checkpoints" else None
        card = run_card(facts.get("config") or {}, int(facts.get("step") or 0), facts.get("method"), run_dir,
                        command=facts.get("command"), commit=facts.get("commit"))
        if run_dir is not None and (run_dir / "config.yaml").is_file() and not card.get("command"):
            card["config_file"] = str(run_dir / "config.yaml")
        return {**base, **card, "source": str(path)}
    return {**facts, **base}
