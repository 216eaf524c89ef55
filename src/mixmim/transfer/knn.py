"""``mixmim knn``: weighted k-NN accuracy of a frozen encoder (cosine, k = 20, votes exp(cos / 0.07); Wu et
al. 2018), under torchrun as on one process: every process extracts its share of both splits, the bank
is gathered once, and the scores are the same on every process."""

from __future__ import annotations

import logging
from typing import Any, cast

from mixmim.config import KNNRunConfig
from mixmim.data.labelled import eval_transform
from mixmim.evaluation.knn import knn_scores
from mixmim.evaluation.metrics import confusion_matrix, topk_correct, write_classification_report, write_json
from mixmim.evaluation.sharded import extract_features
from mixmim.interop.pretrained import build_encoder
from mixmim.training.logs import setup_logging
from mixmim.training.loop import processes, resolve_amp
from mixmim.transfer.classifier import resolve_model
from mixmim.transfer.data import data_stats, load_labelled
from mixmim.utils.files import atomic_write_text

log = logging.getLogger("mixmim")


def run_knn(config: KNNRunConfig) -> dict[str, Any]:
    """Extract, score, write ``results.json`` and the confusion matrix into the run folder."""
    with processes(config.train.device) as (info, device):
        return _knn(config, info, device)


def _knn(config: KNNRunConfig, info: Any, device) -> dict[str, Any]:
    import contextlib

    import torch

    run_dir = config.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir if info.is_main else None, info.is_main)
    pretrained = resolve_model(config)
    side = cast(int, config.model.img_size)  # resolve_model set it
    tf = eval_transform(side, config.data.crop_pct, *data_stats(config.data))
    data = load_labelled(config.data, tf, tf, config.train.seed)
    m = config.model
    encoder = build_encoder(pretrained, img_size=m.img_size, window_size=m.window_size, num_classes=0,
                            **m.options).to(device)
    amp = resolve_amp(config.train.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    t = config.train
    train_x, train_y = extract_features(encoder, data.train, device, t.batch_size, t.num_workers, autocast,
                                        t.progress and info.is_main, "train features")
    test_x, test_y = extract_features(encoder, data.test, device, t.batch_size, t.num_workers, autocast,
                                      t.progress and info.is_main, "test features")
    n = len(data.classes)
    scores = knn_scores(train_x, train_y, test_x, n, config.knn.k, config.knn.temperature).cpu()
    c1, c5 = topk_correct(scores, test_y.cpu(), (1, 5))
    results = {"acc1": 100.0 * c1 / len(test_y), "acc5": 100.0 * c5 / len(test_y), "k": config.knn.k,
               "temperature": config.knn.temperature, "train_samples": len(train_y), "test_samples": len(test_y),
               "classes": data.classes, "weights": pretrained.source, "checkpoint": config.checkpoint,
               "img_size": m.img_size, "processes": info.world_size}
    if info.is_main:
        from mixmim.config import dump_config

        atomic_write_text(run_dir / "config.yaml", dump_config(config))
        files = write_classification_report(run_dir, confusion_matrix(scores.argmax(1), test_y.cpu(), n), data.classes)
        results["files"] = {k: str(v) for k, v in files.items()}
        write_json(run_dir / "results.json", results)
        log.info("k-NN (k=%d): top-1 %.2f%%, top-5 %.2f%% (%d bank / %d test images)", config.knn.k,
                 results["acc1"], results["acc5"], len(train_y), len(test_y))
    return results
