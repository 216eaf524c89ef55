"""The encoder as a backbone for dense prediction (MixMIM section 3: Mask R-CNN on COCO, UperNet on
ADE20K).

:class:`MixMIMBackbone` returns the four stage outputs (strides 4, 8, 16, 32) as NCHW maps, each
through its own LayerNorm as Swin detection backbones do. The maps come from the encoder's
``forward_intermediates`` (timm's feature API, the path of ``timm.create_model(...,
features_only=True)``), for the MixMIM encoder and timm's families alike. :class:`MixMIMFPN` adds
torchvision's feature pyramid so that ``torchvision.models.detection.MaskRCNN`` takes it as is
(:func:`mixmim.models.detection.build_detector`).

The encoder's absolute position table fixes its input size: smaller inputs (torchvision pads
batches to multiples of 32) are zero-padded at the bottom and right to ``img_size`` and the maps
are cropped back, as ViTDet pads to 1024. Build the encoder at the size of the largest input, with
the detection windows of :func:`mixmim.models.resize.detection_windows` if wanted.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mixmim.models.base import GroupedEncoder

LEVEL_STRIDES = (4, 8, 16, 32)  # what FPN, UperNet and the RPN's anchors expect of four levels


def _rescale(dim: int, factor: float, norm: Callable[[int], nn.Module], halve: bool) -> tuple[nn.Module, int]:
    """A map at stride s to stride s / factor: transposed 2x2 convolutions with ``norm`` and GELU
    between them for factor 2, 4, ...; the map itself for 1; a max pool for 1/2, 1/4, ...; with its
    channels after (halved at each upsampling with ``halve``, as ViTDet's pyramid)."""
    if factor == 1:
        return nn.Identity(), dim
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(k, k), dim
    layers: list[nn.Module] = []
    cin = dim
    for i in range(int(math.log2(factor))):
        cout = cin // 2 if halve else cin
        if i:
            layers += [norm(cin), nn.GELU()]
        layers.append(nn.ConvTranspose2d(cin, cout, 2, 2))
        cin = cout
    return nn.Sequential(*layers), cin


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one map of a plain ViT: strides 4, 8, 16, 32 by transposed
    convolutions (channels halved at each) and a max pool; from the stride-16 map of a ViT-B/16: two
    deconvolutions, one, the map itself, a 2x2 pool. A ViT of another patch size gets the same four
    strides (a 4-px patch: the map, then pools of 2, 4 and 8)."""

    def __init__(self, dim: int, stride: int = 16):
        super().__init__()
        made = [_rescale(dim, stride / t, lambda c: nn.GroupNorm(1, c), halve=True) for t in LEVEL_STRIDES]
        self.levels = nn.ModuleList(m for m, _ in made)
        self.channels = [c for _, c in made]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [level(x) for level in self.levels]


class MultiLevelPyramid(nn.Module):
    """BEiT's pyramid for segmentation from four blocks of a plain ViT (blocks 4, 6, 8 and 12 of 12; BEiT,
    MAE and MixedAE's UperNet): from a ViT-B/16, two transposed convolutions with BatchNorm and GELU
    between them (stride 4), one (stride 8), the map as it is (16), a 2x2 max pool (32); another patch
    size gets the same four strides."""

    def __init__(self, dim: int, stride: int = 16):
        super().__init__()
        made = [_rescale(dim, stride / t, nn.BatchNorm2d, halve=False) for t in LEVEL_STRIDES]
        self.levels = nn.ModuleList(m for m, _ in made)
        self.channels = [c for _, c in made]

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [level(x) for level, x in zip(self.levels, maps)]


# BEiT's blocks for the four levels of a plain ViT, as fractions of its depth (4, 6, 8, 12 of 12).
VIT_LEVELS = (1 / 3, 1 / 2, 2 / 3, 1.0)


def stage_taps(encoder: nn.Module) -> list[int]:
    """Which of the encoder's ``feature_info`` entries (timm's feature API) are its stage outputs:
    for each stage stride the last entry at that reduction (a ViT lists every block at stride 16,
    timm's ResNet-v2 its stride-2 stem before the four stages)."""
    grouped = cast(GroupedEncoder, encoder)
    reductions = [info["reduction"] for info in grouped.feature_info]
    taps = []
    for stride in grouped.strides:
        if stride not in reductions:
            raise ValueError(f"{type(encoder).__name__} has no feature map at stride {stride} (feature_info "
                             f"reductions {reductions})")
        taps.append(len(reductions) - 1 - reductions[::-1].index(stride))
    return taps


class MixMIMBackbone(nn.Module):
    """Multi-scale features of an encoder: ``{"0": stride 4, ..., "3": stride 32}``.

    The encoder's final norm and head are not used (one norm per output instead); for the MixMIM
    encoder the last output's norm starts from the final norm's weights.
    """

    def __init__(self, encoder: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3), multi_level: bool = False):
        super().__init__()
        self.encoder = encoder
        grouped = cast(GroupedEncoder, encoder)
        self.pyramid: SimplePyramid | MultiLevelPyramid | None = None
        if grouped.num_stages == 1:  # a plain ViT: ViTDet's pyramid from its last block, or BEiT's from four
            self.pyramid = (MultiLevelPyramid(grouped.num_features, grouped.stride) if multi_level else
                            SimplePyramid(grouped.num_features, grouped.stride))
        levels = 4 if self.pyramid is not None else grouped.num_stages
        if not out_indices or any(not 0 <= i < levels for i in out_indices):
            raise ValueError(f"out_indices={tuple(out_indices)}: expected stage indices in 0..{levels - 1}")
        self.out_indices = tuple(out_indices)
        self.taps = stage_taps(encoder)
        if isinstance(self.pyramid, MultiLevelPyramid):
            blocks = len(grouped.feature_info)  # a ViT lists each block
            self.taps = [max(0, round(blocks * f) - 1) for f in VIT_LEVELS]
        if self.pyramid is not None:
            self.out_channels = [self.pyramid.channels[i] for i in self.out_indices]
            self.strides = [LEVEL_STRIDES[i] for i in self.out_indices]
        else:
            self.out_channels = [grouped.dims[i] for i in self.out_indices]
            self.strides = [grouped.strides[i] for i in self.out_indices]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)
        last = grouped.num_stages - 1
        norm = getattr(encoder, "norm", None)
        if self.pyramid is None and last in self.out_indices and isinstance(norm, nn.LayerNorm) \
                and norm.normalized_shape == (self.out_channels[self.out_indices.index(last)],):
            self.norms[self.out_indices.index(last)].load_state_dict(norm.state_dict())
        # Unused parameters would break DDP's gradient bookkeeping.
        for name in ("norm", "head", "fc_norm"):
            if isinstance(getattr(encoder, name, None), nn.Module):
                setattr(encoder, name, nn.Identity())

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        h, w = images.shape[-2:]
        encoder = cast(GroupedEncoder, self.encoder)
        full_h, full_w = encoder.img_size
        if h > full_h or w > full_w:
            raise ValueError(f"input {h}x{w} is larger than the backbone's img_size {full_h}x{full_w}")
        if (h, w) != (full_h, full_w):
            images = F.pad(images, (0, full_w - w, 0, full_h - h))
        unique = sorted(set(self.taps))  # a shallow ViT's levels may share a block
        taken = encoder.forward_intermediates(images, indices=unique, intermediates_only=True)
        maps = [taken[unique.index(t)] for t in self.taps]
        if isinstance(self.pyramid, MultiLevelPyramid):
            maps = self.pyramid(maps)
        elif self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, (i, norm) in enumerate(zip(self.out_indices, self.norms)):
            x = norm(maps[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            s = self.strides[name]
            out[str(name)] = x[:, :, : -(-h // s), : -(-w // s)].contiguous()
        return out


class MixMIMFPN(nn.Module):
    """Backbone + torchvision's FPN (+ max-pooled extra level), the interface of torchvision's
    ``BackboneWithFPN``: ``forward`` returns ordered maps, ``out_channels`` is one int."""

    def __init__(self, backbone: MixMIMBackbone, out_channels: int = 256, extra_pool: bool = True):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))
