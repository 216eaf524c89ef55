"""The sections of a run config that every verb shares (``model``, ``optim``, ``train`` with its
``monitor``) and the ones a verb adds (``finetune``, ``eval``, ``probe``, ``knn``, ``segment``); the
``data`` section is :class:`mixmim.data.config.DataConfig`, the ``method`` section one of
:mod:`mixmim.methods.options`, each beside the code that reads it. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# ---------------------------------------------------------------------------------------------------
# sections shared by every verb

@dataclass
class _EncoderSection:
    """The fields of ``model`` that every verb shares; :class:`ModelConfig` (pretraining) and
    :class:`TransferModelConfig` (the transfer verbs) set the types and defaults of ``name``,
    ``img_size`` and ``drop_path_rate``."""

    name: str | None = "mixmim_tiny"
    img_size: int | None = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | int | None = None
    window_size: list[int | list[int]] | int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = 0.0
    attention_impl: Literal["auto", "reference", "fast", "flex"] | None = None
    learnable_pos_embed: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    compile: bool = False

    def encoder_overrides(self) -> dict[str, Any]:
        keys = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
                "drop_path_rate", "attention_impl", "learnable_pos_embed")
        return {**{k: getattr(self, k) for k in keys if getattr(self, k) is not None}, **self.options}


@dataclass
class ModelConfig(_EncoderSection):
    """The encoder: a named configuration plus optional overrides (None keeps the named value; for the
    transfer verbs ``name``/``img_size``/``window_size`` None mean the checkpoint's, and
    ``drop_path_rate`` None the model's fine-tuning default, MixMIM section 3). ``options`` passes any
    other constructor argument of the model's family (e.g. ``depth`` of a ViT, ``window_size`` of a
    Swin, ``width_factor`` of a ResNet)."""

    name: str = "mixmim_tiny"
    img_size: int = 224
    drop_path_rate: float = 0.0


@dataclass
class TransferModelConfig(_EncoderSection):
    """``model`` of the transfer verbs: None (the default of ``name``, ``img_size``) takes the
    checkpoint's value, and None ``drop_path_rate`` the model's fine-tuning default."""

    name: str | None = None
    img_size: int | None = None
    drop_path_rate: float | None = None


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule, set every iteration.

    ``lr`` (absolute) or ``base_lr`` x global batch / ``lr_batch_divisor`` (256: MAE, MixMIM Table 11;
    512: SimMIM's code, which scales ``min_lr`` and ``warmup_lr`` the same way when
    ``scale_lr_bounds``). Linear warm-up from ``warmup_lr`` over ``warmup_steps`` (or
    ``warmup_epochs``), then ``schedule``: ``cosine`` to ``min_lr`` (``cosine_after_warmup``: the
    half-cosine starts after the warm-up, as MAE's code; False: it spans the whole run with the
    warm-up inside it, as SimMIM's code through timm), ``step`` (the peak times ``step_gamma`` at each
    of ``step_fractions`` of the run: SimMIM section 4.3, appendix B) or ``poly`` (linear decay to
    ``min_lr``: BEiT's segmentation schedule). The warm-up starts at ``warmup_lr``: 0 in MAE's
    ``lr_sched`` and the MixMIM release (which keeps it); SimMIM's code has its own ``WARMUP_LR``.

    ``name``: ``adamw`` (``betas``), ``sgd`` or ``lars`` (``momentum``; MAE's linear probe).
    ``layer_decay``: layer-wise lr decay for fine-tuning (None: off), by the encoder's own layer ids
    (``layer_decay_rule: auto``: the MixMIM release's for MixMIM encoders, timm's elsewhere) or by
    SimMIM's code (``simmim``: Swin's patch merging counted with the stage before it, the final norm
    and head at full rate)."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    base_lr: float = 1.5e-4
    lr: float | None = None
    lr_batch_divisor: int = 256
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    scale_lr_bounds: bool = False
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    clip_grad: float | None = None
    fused: bool | None = None
    schedule: Literal["cosine", "step", "poly"] = "cosine"
    cosine_after_warmup: bool = True
    step_fractions: list[float] = field(default_factory=lambda: [0.875])
    step_gamma: float = 0.1
    layer_decay: float | None = None
    layer_decay_rule: Literal["auto", "simmim"] = "auto"


@dataclass
class MonitorConfig:
    """``train.monitor``: what the representation monitor (:mod:`mixmim.training.monitor`) evaluates
    during pretraining and how often (``data`` None: off)."""

    data: str | None = None  # "fashion_mnist" or a folder with one sub-folder per class
    every: int = 0  # steps between evaluations; 0: ten evaluations over the run
    train_size: int = 5000  # labelled images of the k-NN bank and the probe's training set
    test_size: int = 1000  # held-out images scored
    k: int = 20
    temperature: float = 0.07
    linprobe: bool = False
    linprobe_epochs: int = 20
    batch_size: int = 256
    at_start: bool = True  # evaluate the initial (random) encoder as the baseline
    crop_pct: float = 1.0  # Fashion-MNIST and small images: no centre crop


@dataclass
class TrainConfig:
    """The loop: ``batch_size`` is the global batch (split over the processes of torchrun, then into
    ``accum_steps`` micro-batches); ``epochs`` and ``max_steps`` bound the run; the rest is
    run-time (precision, workers, checkpoints, logs, trackers)."""

    epochs: int = 600
    max_steps: int | None = None
    batch_size: int = 1024
    accum_steps: int = 1
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 8
    pin_memory: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    picture_every: int = 0
    distributed: Literal["ddp", "fsdp"] = "ddp"
    progress: bool = True
    nan_patience: int = 3
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ---------------------------------------------------------------------------------------------------
# sections of one verb

@dataclass
class FinetuneConfig:
    """``finetune``: supervised fine-tuning (MixMIM Table 12: RandAug(9, 0.5), Mixup 0.8, CutMix 1.0,
    label smoothing 0.1, random erasing 0.25). ``rule: small_data`` fills every key the user did not
    set from the size of the labelled set (:mod:`mixmim.transfer.small_data`, docs/transfer.md).
    ``head_init``: ``trunc_normal`` with ``head_init_std`` (MAE's 2e-5: the pretrained features lead at
    the start) or ``probe`` (the head starts as a linear probe fitted on frozen features for
    ``probe_epochs`` and at least ``probe_steps`` optimiser steps, LP-FT: on a few hundred images 20 epochs
    are 40 steps, and a head that far from the probe's optimum starts fine-tuning below the probe)."""

    rule: Literal["small_data", "none"] = "none"
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    color_jitter: float | None = None  # None: off, as in MAE's fine-tuning code (timm's 0.4 is not theirs)
    head_init: Literal["trunc_normal", "probe"] = "trunc_normal"
    head_init_std: float = 2e-5
    probe_epochs: int = 20
    probe_steps: int = 1000


@dataclass
class EvalConfig:
    """``eval``: evaluation on the held-out split every ``every_epochs`` epochs (0: after the last one)
    and which weights the run reports and keeps: ``last`` (default; no choice made on the evaluation
    split) or ``best`` (the epoch with the highest top-1 / mIoU on the evaluation split, as the
    MAE, MixMIM and SimMIM fine-tuning codes print as "Max accuracy": that is a choice on the split
    the number is reported on)."""

    every_epochs: int = 1
    every_steps: int = 0  # also every this many steps (0: no): iteration schedules (ADE20K's 16k / 160k)
    select: Literal["last", "best"] = "last"
    batch_size: int | None = None  # None: the training micro-batch


@dataclass
class ProbeConfig:
    """``probe``: MAE's linear probe (BatchNorm without affine + linear on the frozen pooled features).
    ``features: augmented`` runs the frozen encoder on every augmented training image (MAE's recipe);
    ``cached`` extracts the features of both splits once with the evaluation transform (minutes
    instead of hours on a CPU; what the study and quick checks use). ``layers``: probe intermediate
    outputs instead, one probe per entry, all trained in one feature pass, one accuracy each (SimMIM
    Table 6 / BEiT: the best layer of a ViT-B): 1-based indices into the encoder's
    ``forward_intermediates`` (a ViT's blocks, a hierarchical encoder's stages), each averaged over its
    positions (the patch tokens)."""

    features: Literal["augmented", "cached"] = "augmented"
    layers: list[int] | None = None


@dataclass
class KNNConfig:
    """``knn``: weighted k-NN of the frozen pooled features (cosine, votes exp(cos / T))."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class DetectConfig:
    """``detect``: Mask R-CNN or Cascade Mask R-CNN on the encoder (MixMIM section 3 and section 8; MixedAE
    Table 1). ``augment``: ``lsj`` (large-scale jitter: a ``size x size`` crop of the image scaled by
    ``scale_range``, the protocol of MixMIM, SimMIM and ViTDet) or ``multiscale`` (shorter side 480-800,
    longer at most ``max_size``: MixedAE, iBOT). ``mixmim_windows``: MixMIM's detection windows (16, and 32
    on blocks 6, 12 and 18 of stage 3; section 3) on a MixMIM encoder. ``fpn_channels``: the pyramid's
width and the heads' convolutions'. The COCO files: ``data.path`` as COCO
    2017 is on disk, or each named here (a user's own export in the COCO format)."""

    detector: Literal["mask_rcnn", "cascade_mask_rcnn"] = "mask_rcnn"
    augment: Literal["lsj", "multiscale"] = "lsj"
    size: int = 1024
    scale_range: tuple[float, float] = (0.1, 2.0)
    max_size: int = 1333
    fpn_channels: int = 256
    mixmim_windows: bool = True
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    detections_per_image: int = 100
    rois_per_image: int = 512  # proposals sampled per image to train the RoI heads (detectron2's 512)
    vit_levels: bool = False  # a plain ViT's FPN inputs from blocks 4/6/8/12 (iBOT, MixedAE), not ViTDet's pyramid
    anchor_sizes: list[int] | None = None  # one per pyramid level (5); None: torchvision's 32, 64, ..., 512


@dataclass
class SegmentConfig:
    """``segment``: UperNet on the encoder with the ADE20K protocol (MixMIM section 3 and section 8; BEiT's
    settings): random resize to ``ratio_range`` of ``scale``, ``crop_size`` crops under the
    ``cat_max_ratio`` rule, flip, ``photometric`` distortion; sliding-window evaluation (``crop_size``
    windows at ``stride``) and mIoU at each image's original resolution. The auxiliary FCN head adds
    ``aux_weight`` times its loss (0: no auxiliary head). ``reduce_zero_label``: label 0 ignored and the
    others shifted down by one (ADE20K's "other"); None: on for the ADE20K layout, off for images/ +
    masks/. ``num_classes`` None: 1 + the largest label in the masks (after the shift); 255 is ignored.
    ``mixmim_windows``: MixMIM's detection windows on a MixMIM encoder (section 3: "we also change the
    window size"); ``vit_levels``: a plain ViT's four levels from blocks 4/6/8/12 (BEiT) rather than
    ViTDet's pyramid from the last block."""

    num_classes: int | None = None
    channels: int = 512
    aux_channels: int = 256
    aux_weight: float = 0.4
    crop_size: int = 512
    stride: int | None = None  # None: two thirds of the crop (341 for 512, as BEiT's)
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    reduce_zero_label: bool | None = None
    mixmim_windows: bool = True
    vit_levels: bool = True
