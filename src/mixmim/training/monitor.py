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

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from mixmim.data.labelled import eval_transform, load_splits
from mixmim.evaluation.knn import knn_scores
from mixmim.evaluation.linprobe import fit_probe
from mixmim.evaluation.metrics import topk_correct
from mixmim.training.logs import log
from mixmim.config import MonitorConfig


class RepresentationMonitor:
    """Evaluate an encoder's features; ``__call__(encoder, step)`` returns ``{"knn": acc, ...}``
    (accuracies in percent) and keeps the history."""

    def __init__(self, cfg: MonitorConfig, img_size: int, device: torch.device, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        tf = eval_transform(img_size, cfg.crop_pct)
        splits = load_splits(cfg.data, tf, tf, cfg.train_size, cfg.test_size, seed=seed, balanced=True)
        self.train, self.test, self.classes = splits.train, splits.test, splits.classes
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self.baseline: float | None = None
        self.warned = False

    def _shard(self, dataset) -> tuple[Subset, int]:
        """This process's share, padded so that every process runs the same number of batches."""
        per_rank = math.ceil(len(dataset) / self.world_size)
        idx = [min(self.rank + i * self.world_size, len(dataset) - 1) for i in range(per_rank)]
        return Subset(dataset, idx), per_rank

    @torch.no_grad()
    def _features(self, encoder: nn.Module, dataset) -> tuple[Tensor, Tensor]:
        shard, per_rank = self._shard(dataset)
        feats, labels = [], []
        for images, targets in DataLoader(shard, batch_size=self.cfg.batch_size, shuffle=False, num_workers=0):
            images = images.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                feats.append(encoder.pooled_features(images).float())
            labels.append(targets.to(self.device))
        x, y = torch.cat(feats), torch.cat(labels)
        if self.world_size > 1:
            xs = [torch.empty_like(x) for _ in range(self.world_size)]
            ys = [torch.empty_like(y) for _ in range(self.world_size)]
            dist.all_gather(xs, x)
            dist.all_gather(ys, y)
            # Sample j of rank r is dataset item r + j * world: interleave back, drop the padding.
            x = torch.stack(xs, 1).reshape(-1, x.shape[1])[: len(dataset)]
            y = torch.stack(ys, 1).reshape(-1)[: len(dataset)]
        return x, y

    def __call__(self, encoder: nn.Module, step: int) -> dict[str, float]:
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            train_x, train_y = self._features(encoder, self.train)
            test_x, test_y = self._features(encoder, self.test)
        finally:
            encoder.train(was_training)
        n = len(self.classes)
        scores = knn_scores(train_x, train_y, test_x, n, self.cfg.k, self.cfg.temperature)
        values = {"knn": 100.0 * topk_correct(scores, test_y, (1,))[0] / len(test_y)}
        if self.cfg.linprobe:
            with torch.enable_grad():
                probe = fit_probe(train_x, train_y, test_x, test_y, n, epochs=self.cfg.linprobe_epochs,
                                  warmup_epochs=1.0, seed=step)
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
