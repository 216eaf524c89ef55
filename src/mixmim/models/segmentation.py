"""UperNet on a pretrained encoder, with the auxiliary FCN head of the ADE20K protocol (MixMIM section 3
and section 8; BEiT's settings, which MixMIM, SimMIM and MixedAE reuse).

UperNet (Xiao et al. 2018, as mmsegmentation implements it): a pyramid pooling module (scales 1, 2, 3,
6) on the last level, lateral 1x1 convolutions and a top-down feature pyramid on the others, 3x3
convolutions per level, every level upsampled to stride 4 and fused by a 3x3 convolution, dropout 0.1
and a 1x1 classifier. The auxiliary head (mmsegmentation's ``FCNHead``: one 3x3 convolution of 256
channels, dropout 0.1, a classifier) reads the third level and adds 0.4 times its loss in training only.
A plain ViT gives its four levels from blocks 4, 6, 8 and 12 through BEiT's pyramid
(:class:`~mixmim.models.dense.MultiLevelPyramid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from mixmim.models.dense import MixMIMBackbone


def _conv(cin: int, cout: int, k: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, k, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, bias=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average pools at several scales, 1x1 conv each, upsampled and
    concatenated with the input, then fused by a 3x3 conv."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(cin, channels, 1)) for s in scales)
        self.bottleneck = _conv(cin + len(scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperHead(nn.Module):
    """UperNet decode head over multi-scale maps (finest first)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        levels = [lat(f) for lat, f in zip(self.lateral, feats)] + [self.ppm(feats[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmsegmentation's auxiliary ``FCNHead`` of the UperNet configs: a 3x3 convolution (BatchNorm, ReLU),
    dropout 0.1, a 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """Encoder + UperNet head (+ the auxiliary FCN head on the third level when ``aux_channels``).

    ``forward`` returns the logits at the input's resolution; in training with the auxiliary head it
    returns ``(logits, aux_logits)``, both at the input's resolution (the auxiliary head exists for its
    loss: evaluation and inference use the main head alone, as mmsegmentation does)."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int = 512, aux_channels: int | None = 256,
                 multi_level: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1")
        self.backbone = MixMIMBackbone(encoder, multi_level=multi_level)
        self.head = UperHead(self.backbone.out_channels, num_classes, channels)
        self.aux_head = FCNHead(self.backbone.out_channels[2], num_classes, aux_channels) if aux_channels else None

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        feats = list(self.backbone(images).values())
        size = images.shape[-2:]
        logits = F.interpolate(self.head(feats), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            return logits, F.interpolate(self.aux_head(feats[2]), size=size, mode="bilinear", align_corners=False)
        return logits

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder
