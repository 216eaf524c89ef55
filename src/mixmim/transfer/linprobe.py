"""Linear probing as a task of the training loop, as MAE does it (appendix A.3, ``main_linprobe.py``):
the encoder is frozen, its pooled features go through BatchNorm without affine parameters and a
linear layer, and only that layer learns (LARS, base lr 0.1, batch 16384, 90 epochs, warm-up 10,
RandomResizedCrop + flip: ``configs/linprobe/mae_vit_base.yaml``).

``probe.features: cached`` extracts both splits' features once with the evaluation transform (every
process its share) and trains the head on them: minutes instead of hours on a CPU, no augmentation
(the quick probe of ``mixmim linprobe`` without a recipe, and the study's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mixmim.config import ProbeRunConfig
from mixmim.data.labelled import eval_transform, train_transform
from mixmim.evaluation.probe import probe_head
from mixmim.evaluation.sharded import extract_features
from mixmim.interop.pretrained import build_encoder
from mixmim.training.optim import decay_groups
from mixmim.training.task import RunContext, StepOutput
from mixmim.transfer.classifier import resolve_model
from mixmim.transfer.data import data_stats, load_labelled
from mixmim.transfer.finetune import ClassificationTask

if TYPE_CHECKING:
    from mixmim.transfer.classifier import Encoder

PROBE_FORMAT = "mixmim-linprobe/2"


class FrozenProbe(nn.Module):
    """The frozen encoder (always in eval mode, no gradient) and MAE's trainable head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = cast("Encoder", encoder).requires_grad_(False)  # every encoder family is one
        self.head = probe_head(self.encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> FrozenProbe:
        super().train(mode)
        self.encoder.eval()  # the encoder's dropout, drop path and norms stay as frozen features need
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.encoder.pooled_features(images)
        return self.head(features.float())


class FeatureSet(Dataset):
    """Cached features as a labelled data set: ``[(index, seed)]`` or ``[index]`` -> the feature."""

    def __init__(self, features: Tensor, labels: Tensor):
        self.features, self.labels = features.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        return {"image": self.features[index], "label": int(self.labels[index]), "index": index, "skipped": []}


class ProbeTask(ClassificationTask):
    """``mixmim linprobe``."""

    name = "linprobe"

    def __init__(self, config: ProbeRunConfig):
        super().__init__(config)
        self.cached = config.probe.features == "cached"
        self.pretrained = resolve_model(config)
        config.model.drop_path_rate = 0.0  # a frozen encoder runs in eval mode
        side = cast(int, config.model.img_size)  # resolve_model set it
        stats = data_stats(config.data)
        evaluation = eval_transform(side, config.data.crop_pct, *stats)
        training = evaluation if self.cached else train_transform(side, None, 0.0, config.data.crop_scale, *stats,
                                                                        hflip=config.data.hflip)
        self.data = load_labelled(config.data, training, evaluation, config.train.seed)
        self.classes = self.data.classes
        self.weights = self.pretrained.source

    def build_model(self) -> nn.Module:
        m = self.config.model
        encoder = build_encoder(self.pretrained, img_size=m.img_size, window_size=m.window_size, num_classes=0,
                                **m.options)
        probe = FrozenProbe(encoder, len(self.classes))
        if not self.cached:
            self.model = probe
            return probe
        # Features of both splits once (every process its share, gathered), then only the head trains.
        x, y = extract_features(encoder, self.data.train, next(encoder.parameters()).device,
                                self.config.train.batch_size, self.config.train.num_workers)
        tx, ty = extract_features(encoder, self.data.test, next(encoder.parameters()).device,
                                  self.config.train.batch_size, self.config.train.num_workers)
        self.train_features, self.test_features = FeatureSet(x, y), FeatureSet(tx, ty)
        self.data.test = self.test_features
        self.model = probe.head
        return probe.head

    def dataset(self) -> Dataset:
        return self.train_features if self.cached else self.data.train

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        head = model.head if isinstance(model, FrozenProbe) else model
        return decay_groups(head, self.config.optim.weight_decay)

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        return []  # nothing to shard: the encoder is frozen, only the head learns

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        return StepOutput(F.cross_entropy(model(batch["image"]).float(), batch["label"]))

    def _save_model(self, run: RunContext, name: str, extra: dict[str, Any]) -> None:
        if not run.is_main:
            return
        from mixmim.utils.files import atomic_write

        head = self.model.head if isinstance(self.model, FrozenProbe) else self.model
        payload = {"format": PROBE_FORMAT, "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                   "classes": self.classes, "checkpoint": self.config.checkpoint,
                   "img_size": self.config.model.img_size,
                   "features": self.config.probe.features, **extra}
        atomic_write(run.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def load_kept(self, run: RunContext, payload: dict[str, Any]) -> None:
        head = self.model.head if isinstance(self.model, FrozenProbe) else self.model
        head.load_state_dict(payload["head"])

    def describe(self, run: RunContext) -> str:
        c = self.config
        return (f"{c.name}: linear probe ({c.probe.features} features, {c.optim.name}) of {self.weights} weights of "
                f"{c.model.name} on {c.data.path or c.data.source}: {len(self.data.train)} training / "
                f"{len(self.data.test)} evaluation images, {len(self.classes)} classes")

    def report_extras(self) -> dict[str, Any]:
        return {"optimizer": self.config.optim.name, "features": self.config.probe.features,
                "lr": probe_lr(self.config)}


def probe_lr(config: ProbeRunConfig) -> float:
    o = config.optim
    return o.lr if o.lr is not None else o.base_lr * config.train.batch_size / o.lr_batch_divisor
