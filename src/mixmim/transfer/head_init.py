"""The fine-tuning head initialised as a linear probe (``finetune.head_init: probe``; LP-FT, Kumar et
al. 2022: on small labelled sets, fine-tuning from a trained head distorts the pretrained features
less than from a zero head, whose large early gradients flow into the encoder).

MAE's probe (BatchNorm without affine + linear) is fitted on the frozen encoder's pooled features of
the training split (evaluation transform), then folded into the classifier's plain linear head: with
BatchNorm's running statistics (mean m, variance v, eps), ``W (x - m) / sqrt(v + eps) + b`` is the
linear map ``W' x + b'`` with ``W' = W / sqrt(v + eps)`` and ``b' = b - W' m``. Every process extracts
its share of the features and fits the same probe (same seed), so every process starts from the
same head.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mixmim.data.labelled import eval_transform
from mixmim.evaluation.probe import fit_probe
from mixmim.evaluation.sharded import extract_features

if TYPE_CHECKING:
    from mixmim.transfer.classifier import Encoder

PROBE_BATCH = 256  # MAE's probe batch per 256 of base lr (fit_probe scales lr 0.1 x batch / 256)


def fold_probe(probe: nn.Sequential, head: nn.Module) -> None:
    """Copy a fitted BatchNorm(affine=False) + Linear probe into ``head`` as one linear map (a Linear,
    or the 1x1 convolution timm's ResNets classify with)."""
    bn, linear = cast(nn.BatchNorm1d, probe[0]), cast(nn.Linear, probe[1])
    # torch types the running statistics as optional, and the bias and the head's weights as Tensor | Module.
    running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
    head_weight, head_bias = cast(Tensor, head.weight), cast(Tensor, head.bias)
    weight = linear.weight * (running_var + bn.eps).rsqrt()[None, :]
    bias = cast(Tensor, linear.bias) - weight @ running_mean
    with torch.no_grad():
        head_weight.copy_(weight.reshape(head_weight.shape))
        head_bias.copy_(bias)


def probe_head_init(encoder: Encoder, data: Any, config: Any) -> dict[str, float]:
    """Fit the probe on the training split's features and fold it into ``encoder``'s head."""
    from mixmim.transfer.data import data_stats

    train = data.train
    transform = train.transform
    # No augmentation for the probe.
    train.transform = eval_transform(config.model.img_size, config.data.crop_pct, *data_stats(config.data))
    device = next(encoder.parameters()).device
    try:
        x, y = extract_features(encoder, data.train, device, batch_size=256, num_workers=config.train.num_workers)
    finally:
        train.transform = transform
    f = config.finetune
    steps_per_epoch = max(1, len(x) // min(PROBE_BATCH, len(x)))
    epochs = max(f.probe_epochs, math.ceil(f.probe_steps / steps_per_epoch))
    probe = fit_probe(x, y, x[:1], y[:1], len(data.classes), epochs=epochs, batch_size=PROBE_BATCH,
                      warmup_epochs=min(5.0, epochs / 10), seed=config.train.seed, select="last")
    fold_probe(cast(nn.Sequential, probe.head), encoder.get_classifier())  # fit_probe's probe_head
    return {"probe_train_acc1": probe.rows[-1].get("train_acc1", float("nan"))}
