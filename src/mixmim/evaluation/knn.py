"""k-nearest-neighbour classification on frozen features: cosine similarity, k = 20, votes weighted by
exp(similarity / 0.07) (the weighted k-NN of Wu et al. 2018, used by DINO and others to compare
self-supervised encoders without training).

Features are the encoder's pooled final-norm output, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmim.data.labelled import eval_transform, load_splits, make_loader
from mixmim.evaluation.metrics import confusion_matrix, topk_correct, write_classification_report, write_json
from mixmim.interop.pretrained import ClassificationConfig, build_encoder, input_size, read_pretrained
from mixmim.evaluation.runtime import extract_features, pick_device, seed_everything


@dataclass
class KNNConfig(ClassificationConfig):
    """Options of ``mixmim knn``."""

    output: str = "runs/knn"
    batch_size: int = 128
    k: int = 20
    temperature: float = 0.07


def knn_scores(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(N_test, num_classes) class scores: the sum of exp(cos / T) over the k most similar training
    samples of each class. Features need not be normalised (they are here)."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(query), num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[idx].to(weights.device), weights)
        out.append(votes)
    return torch.cat(out)


@dataclass
class FrozenFeatures:
    """Pooled features of both splits under a frozen encoder."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    weights: str  # where the encoder's weights came from
    img_size: Any


def frozen_features(cfg: Any, device: torch.device) -> FrozenFeatures:
    """Features of ``cfg.data``'s train and test splits (evaluation transform, no augmentation) from
    the encoder of ``cfg.checkpoint``; ``cfg`` is a :class:`KNNConfig` or a linear-probe config."""
    seed_everything(cfg.seed)
    pretrained = read_pretrained(cfg.checkpoint, cfg.model)
    img_size, side = input_size(pretrained, cfg.img_size)
    tf = eval_transform(side, cfg.crop_pct)
    splits = load_splits(cfg.data, tf, tf, cfg.limit_train, cfg.limit_test, cfg.val_fraction, cfg.seed, cfg.balanced)
    encoder = build_encoder(pretrained, img_size=img_size, window_size=cfg.window_size, num_classes=0).to(device)
    train_x, train_y = extract_features(encoder, make_loader(splits.train, cfg.batch_size, False, cfg.num_workers),
                                        device, cfg.amp, "train features", cfg.progress)
    test_x, test_y = extract_features(encoder, make_loader(splits.test, cfg.batch_size, False, cfg.num_workers),
                                      device, cfg.amp, "test features", cfg.progress)
    return FrozenFeatures(train_x, train_y, test_x, test_y, splits.classes, pretrained.source, img_size)


def knn(cfg: KNNConfig) -> dict[str, Any]:
    """Extract features of both splits, classify the test split by k-NN; results.json in ``output``."""
    device = pick_device(cfg.device)
    f = frozen_features(cfg, device)
    num_classes = len(f.classes)
    scores = knn_scores(f.train_x.to(device), f.train_y.to(device), f.test_x.to(device), num_classes, cfg.k,
                        cfg.temperature).cpu()
    c1, c5 = topk_correct(scores, f.test_y, (1, 5))
    out = Path(cfg.output)
    files = write_classification_report(out, confusion_matrix(scores.argmax(1), f.test_y, num_classes), f.classes)
    results = {"acc1": 100.0 * c1 / len(f.test_y), "acc5": 100.0 * c5 / len(f.test_y), "k": cfg.k,
               "temperature": cfg.temperature, "train_samples": len(f.train_y), "test_samples": len(f.test_y),
               "weights": f.weights, "checkpoint": cfg.checkpoint, "img_size": f.img_size,
               "files": {k: str(v) for k, v in files.items()}}
    write_json(out / "results.json", results)
    return results
