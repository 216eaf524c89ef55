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

from mixmim.config import ConfigError, ProbeRunConfig
from mixmim.data.labelled import eval_transform, train_transform
from mixmim.evaluation.probe import probe_head
from mixmim.evaluation.sharded import Scores, extract_features
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

    def __init__(self, encoder: nn.Module, num_classes: int, head: nn.Module | None = None):
        super().__init__()
        self.encoder = cast("Encoder", encoder).requires_grad_(False)  # every encoder family is one
        self.head = head if head is not None else probe_head(self.encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> FrozenProbe:
        super().train(mode)
        self.encoder.eval()  # the encoder's dropout, drop path and norms stay as frozen features need
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.encoder.pooled_features(images)
        return self.head(features.float())


class LayerFeatures(nn.Module):
    """The frozen encoder's intermediate outputs ``layers`` (1-based indices into its
    ``forward_intermediates``: a ViT's blocks, a hierarchical encoder's stages), each averaged over its
    positions and laid side by side: (B, sum of widths). What a per-layer probe reads (SimMIM Table 6,
    BEiT's linear probe of an intermediate layer: the mean of the patch tokens)."""

    def __init__(self, encoder: nn.Module, layers: list[int], side: int):
        super().__init__()
        self.encoder = encoder
        self.indices = [layer - 1 for layer in layers]
        with torch.no_grad():
            maps = self._maps(torch.zeros(1, int(getattr(encoder, "in_chans", 3) or 3), side, side,
                                          device=next(encoder.parameters()).device))
        self.widths = [int(m.shape[1]) for m in maps]
        self.num_features = sum(self.widths)

    def _maps(self, images: Tensor) -> list[Tensor]:
        encoder = cast("Encoder", self.encoder)
        return encoder.forward_intermediates(images, indices=self.indices, norm=False, stop_early=True,
                                             output_fmt="NCHW", intermediates_only=True)

    def pooled_features(self, images: Tensor) -> Tensor:
        return torch.cat([m.float().mean((2, 3)) for m in self._maps(images)], dim=1)


class LayerHeads(nn.Module):
    """One MAE probe head per layer on features laid side by side. Training: the logits of every head,
    (L, B, K), so one step trains them all (each its own loss); evaluation: the ``active`` head's."""

    def __init__(self, widths: list[int], num_classes: int):
        super().__init__()
        self.widths = widths
        self.heads = nn.ModuleList(probe_head(w, num_classes) for w in widths)
        self.active = 0

    def forward(self, features: Tensor) -> Tensor:
        parts = features.float().split(self.widths, dim=1)
        if self.training:
            return torch.stack([head(x) for head, x in zip(self.heads, parts)])
        return self.heads[self.active](parts[self.active])


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
        self.layers = list(config.probe.layers) if config.probe.layers else None
        if self.layers is not None and (any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                                            for v in self.layers) or len(set(self.layers)) != len(self.layers)):
            raise ConfigError(f"config key 'probe.layers': {config.probe.layers}; expected distinct layer numbers "
                              "from 1 (a ViT's blocks, a hierarchical encoder's stages)")
        self.layer_scores: list[Scores] = []

    def build_model(self) -> nn.Module:
        m = self.config.model
        encoder: nn.Module = build_encoder(self.pretrained, img_size=m.img_size, window_size=m.window_size,
                                           num_classes=0, **m.options)
        head = None
        if self.layers is not None:
            count = len(getattr(encoder, "feature_info", [])) or None
            if count is not None and max(self.layers) > count:
                raise ConfigError(f"config key 'probe.layers': {self.layers}; the {m.name} encoder has {count} "
                                  "intermediate outputs (a ViT's blocks, a hierarchical encoder's stages)")
            encoder = LayerFeatures(encoder, self.layers, cast(int, m.img_size))
            head = LayerHeads(encoder.widths, len(self.classes))
        probe = FrozenProbe(encoder, len(self.classes), head)
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
        logits = model(batch["image"]).float()
        if self.layers is None:
            return StepOutput(F.cross_entropy(logits, batch["label"]))
        # One head per layer, each with its own loss (their sum: the heads share nothing).
        return StepOutput(torch.stack([F.cross_entropy(head, batch["label"]) for head in logits]).sum())

    @property
    def columns(self) -> list[str]:
        return super().columns + [f"acc1_layer{layer}" for layer in self.layers or []]

    def score(self, run: RunContext) -> Scores:
        """Per-layer probes: every head scored, the best layer's scores returned (what SimMIM Table 6
        reports; ``acc1_layer<n>`` columns keep each)."""
        if self.layers is None:
            return super().score(run)
        heads = cast(LayerHeads, self.model.head if isinstance(self.model, FrozenProbe) else self.model)
        self.layer_scores = []
        for index in range(len(self.layers)):
            heads.active = index
            self.layer_scores.append(super().score(run))
        heads.active = 0
        return max(self.layer_scores, key=lambda scores: scores.acc1)

    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        row = super().evaluate(run, step)
        if self.layers is not None:
            per_layer = {f"acc1_layer{layer}": s.acc1 for layer, s in zip(self.layers, self.layer_scores)}
            self.history[-1].update(per_layer)
            if self.best.get("step") == step:
                self.best.update(per_layer)
            row.update(per_layer)
        return row

    def _save_model(self, run: RunContext, name: str, extra: dict[str, Any]) -> None:
        if not run.is_main:
            return
        from mixmim.utils.files import atomic_write

        head = self.model.head if isinstance(self.model, FrozenProbe) else self.model
        payload = {"format": PROBE_FORMAT, "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                   "classes": self.classes, "checkpoint": self.config.checkpoint,
                   "img_size": self.config.model.img_size,
                   "features": self.config.probe.features, "layers": self.layers, **extra}
        atomic_write(run.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def load_kept(self, run: RunContext, payload: dict[str, Any]) -> None:
        head = self.model.head if isinstance(self.model, FrozenProbe) else self.model
        head.load_state_dict(payload["head"])

    def describe(self, run: RunContext) -> str:
        c = self.config
        what = f"layers {', '.join(map(str, self.layers))}, " if self.layers else ""
        return (f"{c.name}: linear probe ({what}{c.probe.features} features, {c.optim.name}) of {self.weights} "
                f"weights of "
                f"{c.model.name} on {c.data.path or c.data.source}: {len(self.data.train)} training / "
                f"{len(self.data.test)} evaluation images, {len(self.classes)} classes")

    def report_extras(self) -> dict[str, Any]:
        extras = {"optimizer": self.config.optim.name, "features": self.config.probe.features,
                  "lr": probe_lr(self.config)}
        if self.layers is not None:
            # The kept weights' accuracy per layer (the best epoch's with eval.select=best) and the best layer.
            kept = self.best if self.config.eval.select == "best" and self.best else (self.history or [{}])[-1]
            per_layer = {layer: kept.get(f"acc1_layer{layer}") for layer in self.layers}
            extras["layers"] = per_layer
            extras["best_layer"] = max(self.layers, key=lambda layer: per_layer[layer] or -1.0)
        return extras


def probe_lr(config: ProbeRunConfig) -> float:
    o = config.optim
    return o.lr if o.lr is not None else o.base_lr * config.train.batch_size / o.lr_batch_divisor
