"""One root per verb: the sections a verb's run config holds, its own defaults (:data:`VERB_DEFAULTS`)
and the demo preset of ``mixmim pretrain`` with no ``--config``. No torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mixmim.config.sections import (
    DetectConfig,
    EvalConfig,
    FinetuneConfig,
    KNNConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    SegmentConfig,
    TrainConfig,
    TransferModelConfig,
)
from mixmim.data.config import DataConfig
from mixmim.methods.options import MethodOptions, MixMIMConfig
from mixmim.utils.typed import plain

# ---------------------------------------------------------------------------------------------------
# one root per verb

@dataclass
class _Run:
    verb: ClassVar[str] = ""
    name: str  # each verb's root sets both, with its defaults
    output_dir: str

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


@dataclass
class RunConfig(_Run):
    """``mixmim pretrain``."""

    verb: ClassVar[str] = "pretrain"
    name: str = "mixmim"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=MixMIMConfig)  # `name` picks the method (methods/options.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def method_name(self) -> str:
        return self.method.name

    def method_options(self) -> dict[str, Any]:
        """The method's options as set (decoder sizes and SimMIM's pixel statistics left at None are
        resolved when the method is built)."""
        return {k: v for k, v in dataclasses.asdict(self.method).items() if k != "name"}


@dataclass
class FinetuneRunConfig(_Run):
    """``mixmim finetune``: ``checkpoint`` is a run folder, a training checkpoint, an export or a release
    checkpoint (None with ``model.name``: a randomly initialised encoder, the baseline)."""

    verb: ClassVar[str] = "finetune"
    name: str = "finetune"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ProbeRunConfig(_Run):
    """``mixmim linprobe``."""

    verb: ClassVar[str] = "linprobe"
    name: str = "linprobe"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class KNNRunConfig(_Run):
    """``mixmim knn`` (``train`` gives the batch for feature extraction, the device and the workers)."""

    verb: ClassVar[str] = "knn"
    name: str = "knn"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)


@dataclass
class SegmentRunConfig(_Run):
    """``mixmim segment``: ``data.path`` holds ``images/`` and ``masks/`` (PNG label maps)."""

    verb: ClassVar[str] = "segment"
    name: str = "segment"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class DetectRunConfig(_Run):
    """``mixmim detect``: ``data.path`` is a COCO-format folder (or ``detect.*_json``/``*_images`` name the
    files)."""

    verb: ClassVar[str] = "detect"
    name: str = "detect"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


VERB_CONFIGS: dict[str, type] = {c.verb: c for c in (RunConfig, FinetuneRunConfig, ProbeRunConfig, KNNRunConfig,
                                                     SegmentRunConfig, DetectRunConfig)}

# What each verb starts from before its recipe: the papers' settings where the verb has one recipe
# (fine-tuning: MixMIM Table 12; linear probing: a quick probe on cached features, MAE's recipe is
# configs/linprobe/), the run-time settings a transfer run on one machine needs.
VERB_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "finetune": {
        "data": {"source": "folder", "crop_scale": [0.08, 1.0]},
        "optim": {"base_lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.05, "layer_decay": 0.7,
                  "warmup_epochs": 5, "min_lr": 1e-6, "warmup_lr": 0.0},
        "train": {"epochs": 100, "batch_size": 1024, "num_workers": 4, "log_every": 10},
    },
    "linprobe": {
        "model": {"drop_path_rate": 0.0},
        "data": {"source": "folder", "crop_scale": [0.08, 1.0]},
        "optim": {"name": "sgd", "base_lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "warmup_epochs": 10,
                  "min_lr": 0.0, "warmup_lr": 0.0},
        "train": {"epochs": 90, "batch_size": 256, "num_workers": 4, "log_every": 10},
        "probe": {"features": "cached"},
    },
    "knn": {
        "model": {"drop_path_rate": 0.0},
        "data": {"source": "folder"},
        "train": {"batch_size": 128, "num_workers": 4},
    },
    # MixMIM Table 4's ADE20K row (section 8: UperNet, 16k iterations at batch 16, layer decay 0.85 for B)
    # with BEiT's other settings: AdamW lr 1e-4 (0.9, 0.999), weight decay 0.05, 1500 warm-up iterations,
    # linear (poly, power 1) decay to 0.
    "segment": {
        "model": {"drop_path_rate": 0.1},
        "data": {"source": "folder"},
        "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.05, "layer_decay": 0.85, "schedule": "poly",
                  "warmup_steps": 1500, "warmup_lr": 0.0, "min_lr": 0.0},
        "train": {"epochs": 100000, "max_steps": 16000, "batch_size": 16, "num_workers": 4, "log_every": 10},
        "eval": {"every_epochs": 0, "every_steps": 4000},
    },
    # The ViTDet / MAE setting MixMIM section 8 names (Li et al. 2021): AdamW (0.9, 0.999), weight decay
    # 0.1, lr 1e-4 at batch 64, steps of 0.1 at 88.9% and 96.3% of the run, a quarter-epoch warm-up.
    "detect": {
        "model": {"drop_path_rate": 0.1},
        "data": {"source": "folder"},
        "optim": {"base_lr": 1e-4, "lr_batch_divisor": 64, "betas": [0.9, 0.999], "weight_decay": 0.1,
                  "layer_decay": 0.85, "schedule": "step", "step_fractions": [0.889, 0.963], "warmup_epochs": 0.25,
                  "warmup_lr": 0.0},
        "train": {"epochs": 55, "batch_size": 64, "num_workers": 4, "log_every": 10},
        "eval": {"every_epochs": 5},
    },
}

# What ``mixmim pretrain`` runs with no --config: mixmim_tiny on the bundled photos, a few minutes on a
# laptop CPU. At 128 px the stage maps are 32/16/8/4, so windows 16/16 then global attention. The
# learning rate follows the small-run rule (docs/study: peak 1e-3 whatever the batch up to 64, 10%
# warm-up, cosine): the papers' 1.5e-4 x batch / 256 is 9e-6 at batch 16, far too small for a run of
# minutes, and rates a few times higher than 1e-3 make the representation worse (the monitor shows it).
DEMO: dict[str, Any] = {
    "name": "demo",
    "model": {"name": "mixmim_tiny", "img_size": 128, "window_size": [16, 16, 8, 4]},
    "method": {"name": "mixmim"},
    "data": {"source": "bundled", "bundled_epoch_size": 512},
    "optim": {"lr": 1e-3, "warmup_steps": 20},
    "train": {"epochs": 7, "max_steps": 200, "batch_size": 16, "num_workers": 2, "checkpoint_every": 50,
              "log_every": 5, "keep_checkpoints": 2},
}
