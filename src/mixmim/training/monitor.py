"""Representation quality watched during pretraining: k-NN (and optionally a quick linear probe) of the
encoder's pooled features on a labelled held-out set, every N steps.

The pretraining loss says how well the decoder rebuilds pixels, not whether the encoder learns
anything a user can measure; a run whose learning rate is too high can lower its loss while its
features become worse than a randomly initialised encoder's. The monitor measures the features the
way a user would after the run (weighted k-NN of Wu et al. 2018, k = 20, T = 0.07; MAE's probe) on a
fixed, class-balanced subset, once before the first step (the random-initialisation baseline) and
then every ``every`` steps, and warns when the accuracy falls below that baseline.

Under torchrun every process extracts the features of its share of the images (FSDP needs every
process in each forward) and the shares are gathered, so every process computes the same accuracy.
"""

from __future__ import annotations

import time
from typing import cast

import torch
from torch import nn

from mixmim.config import ConfigError, MonitorConfig
from mixmim.data.labelled import cached, eval_transform, load_splits
from mixmim.evaluation.knn import knn_scores
from mixmim.evaluation.metrics import topk_correct
from mixmim.evaluation.probe import fit_probe
from mixmim.evaluation.sharded import extract_features
from mixmim.training.logs import log


class RepresentationMonitor:
    """Evaluate an encoder's features; ``__call__(encoder, step)`` returns ``{"knn": acc, ...}``
    (accuracies in percent) and keeps the history."""

    def __init__(self, cfg: MonitorConfig, img_size: int, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        tf = eval_transform(img_size, cfg.crop_pct)
        # The monitor runs only when train.monitor.data names its data.
        splits = load_splits(cast(str, cfg.data), tf, tf, cfg.train_size, cfg.test_size, seed=seed, balanced=True)
        # Decoded once and kept (uint8, bit-identical items): every evaluation reads the same images.
        if len(splits.classes) < 2:  # every neighbour would vote for the one class: 100% of nothing
            raise ConfigError(f"config key 'train.monitor.data': {cfg.data} has one class "
                              f"({', '.join(splits.classes)}); "
                              "the k-NN monitor needs two or more")
        self.train, self.test, self.classes = cached(splits.train), cached(splits.test), splits.classes
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self.baseline: float | None = None
        self.warned = False

    def __call__(self, encoder: nn.Module, step: int) -> dict[str, float]:
        start = time.perf_counter()
        train_x, train_y = extract_features(encoder, self.train, self.device, self.cfg.batch_size)
        test_x, test_y = extract_features(encoder, self.test, self.device, self.cfg.batch_size)
        n = len(self.classes)
        scores = knn_scores(train_x, train_y, test_x, n, self.cfg.k, self.cfg.temperature)
        values = {"knn": 100.0 * topk_correct(scores, test_y, (1,))[0] / len(test_y)}
        if self.cfg.linprobe:
            with torch.enable_grad():
                probe = fit_probe(train_x, train_y, test_x, test_y, n, epochs=self.cfg.linprobe_epochs,
                                  warmup_epochs=1.0, seed=step, select="last")
            values["linprobe"] = probe.acc1
        self.seconds += time.perf_counter() - start
        self.history.append({"step": step, **values})
        self._check(step, values["knn"])
        return values

    def _check(self, step: int, knn: float) -> None:
        """The first evaluation is the baseline; falling below it means the run is unlearning."""
        if self.baseline is None:
            self.baseline = knn
            return
        if not self.warned and knn < self.baseline - 2.0:
            self.warned = True
            log.warning("step %d: k-NN accuracy %.1f%% is below the starting encoder's %.1f%%: the representation "
                        "is getting worse (a learning rate too high for this batch? see docs/study)", step, knn,
                        self.baseline)
