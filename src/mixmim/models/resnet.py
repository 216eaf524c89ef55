"""ResNet-v2 as in BiT (timm's ``ResNetV2``) with mixed convolution, so that no image of a mix reaches another.

MixMIM supplement section 9 ("Extend to ConvNets", Table 13) pretrains ResNet-50x3 and ResNet-101x3 by
mixing, with the *mixed* convolution of Figure 4 (partial convolution per image group). What mixing needs
beyond timm's model (parameter names unchanged, so ``resnetv2_{50x1,50x3,101x3}_bit`` weights load):

- The stem (7x7 stride-2 weight-standardised conv, BiT's fixed zero pad and 3x3 stride-2 max pool) and
  every 3x3 conv of a bottleneck are mixed: each image group is convolved (or pooled) apart and each
  output position takes its own group's result (:mod:`mixmim.models.mixed_conv`).
- Every GroupNorm computes its statistics per image group: a plain GroupNorm normalises over the whole
  sample and would carry one image's mean and variance into the other's positions.
- 1x1 convs (the bottleneck's first and last, and the stride-2 projection shortcut) read only the input
  position under each output position, whose group is that output's: they are mixed as they stand.
- Group maps are downsampled with the feature maps (the anchor of each strided window, its centre).

The classification path (``forward``, ``forward_features``, ``forward_head``) is timm's and never sees
a group map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, cast

from timm.layers import GroupNormAct, StdConv2d, make_divisible
from timm.models.resnetv2 import PreActBottleneck, ResNetStage, ResNetV2
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder, check_groups, resize_groups
from mixmim.models.mixed_conv import downsample_groups, mixed_conv2d, mixed_group_norm, mixed_max_pool2d

__all__ = ["ResNetV2Encoder", "GroupedPreActBottleneck"]

# The stem's stride-2 conv and stride-2 pool bring stage 1 to stride 4; stages 2-4 each halve the map.
_STAGE_STRIDES = (4, 8, 16, 32)


def _conv(conv: nn.Conv2d, x: Tensor, groups: Tensor | None, num_groups: int | None) -> Tensor:
    """A convolution that keeps image groups apart (MixMIM supplement section 9, Figure 4).

    An unpadded 1x1 convolution reads only the input at its output's anchor, which
    :func:`~mixmim.models.mixed_conv.downsample_groups` gives the output's group: the mixed version would
    be the same values at k times the cost, so it runs as is."""
    if groups is None or (tuple(conv.kernel_size) == (1, 1) and tuple(conv.padding) == (0, 0)):
        return conv(x)
    return mixed_conv2d(conv, x, groups, num_groups)


class GroupedPreActBottleneck(PreActBottleneck):
    """timm's pre-activation bottleneck with an optional group map; no parameter of its own.

    ``ResNetV2`` builds its blocks itself, so :class:`ResNetV2Encoder` switches their class to this one
    after construction: ``block(x)`` is timm's forward, ``block(x, groups, num_groups)`` the mixed one."""

    def forward(self, x: Tensor, groups: Tensor | None = None, num_groups: int | None = None) -> Tensor:
        """``groups``: (1 or B, H, W) image ids on ``x``'s grid; the output is on the (possibly strided)
        grid of ``conv2``, whose map is ``downsample_groups(groups, out.shape[-2:], conv2.stride)``."""
        if groups is None:
            return super().forward(x)
        k = num_groups
        x_preact = mixed_group_norm(self.norm1, x, groups, k)
        shortcut = x
        if self.downsample is not None:
            # BiT is pre-activation: the projection's norm is an Identity
            shortcut = self.downsample.norm(_conv(self.downsample.conv, x_preact, groups, k))
        y = _conv(self.conv1, x_preact, groups, k)
        y = _conv(self.conv2, mixed_group_norm(self.norm2, y, groups, k), groups, k)
        out_groups = downsample_groups(groups, y.shape[-2:], self.conv2.stride)
        y = _conv(self.conv3, mixed_group_norm(self.norm3, y, out_groups, k), out_groups, k)
        return self.drop_path(y) + shortcut


class ResNetV2Encoder(GroupedEncoder, ResNetV2):
    """BiT ResNet-v2 (timm's ``ResNetV2`` with ``stem_type='fixed'``, weight-standardised convs with eps
    1e-8 and GroupNorm of 32 groups, as timm's ``_create_resnetv2_bit``) with the
    :class:`~mixmim.models.base.GroupedEncoder` interface: four stages at strides 4/8/16/32.

    ``layers``: bottlenecks per stage; ``channels``: stage output widths before ``width_factor``;
    ``stem_chs``: stem width before ``width_factor``. Every width (and a quarter of each stage width,
    the bottleneck's) must be divisible by 32, the GroupNorm's number of groups."""

    family = "resnetv2"

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, num_classes: int = 0,
                 layers: Sequence[int] = (3, 4, 6, 3), channels: Sequence[int] = (256, 512, 1024, 2048),
                 width_factor: int = 1, stem_chs: int = 64, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        self._config = dict(img_size=img_size if isinstance(img_size, int) else list(img_size), in_chans=in_chans,
                            num_classes=num_classes, layers=list(layers), channels=list(channels),
                            width_factor=width_factor, stem_chs=stem_chs, drop_rate=drop_rate,
                            drop_path_rate=drop_path_rate)
        size = (img_size, img_size) if isinstance(img_size, int) else cast("tuple[int, int]", tuple(img_size))
        for side in size:
            if side % _STAGE_STRIDES[-1]:
                raise ValueError(f"img_size={side} is not divisible by the encoder stride {_STAGE_STRIDES[-1]}")
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError(f"ResNet-v2 has 4 stages: got layers={tuple(layers)}, channels={tuple(channels)}")
        ResNetV2.__init__(
            self, layers=list(layers), channels=tuple(channels), num_classes=num_classes, in_chans=in_chans,
            width_factor=width_factor, stem_chs=stem_chs, stem_type="fixed",
            conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=32),
            drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        for stage in cast("Iterable[ResNetStage]", self.stages):
            for block in stage.blocks:
                block.__class__ = GroupedPreActBottleneck

        self.img_size = size
        self.strides = list(_STAGE_STRIDES)
        self.grids = [(size[0] // s, size[1] // s) for s in self.strides]
        self.embed_dim = make_divisible(stem_chs * width_factor)
        self.dims = [make_divisible(c * width_factor) for c in channels]
        self.stage_in_dims = [self.embed_dim, *self.dims[:-1]]

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # ------------------------------------------------------------------ method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """The stem as ``(B, L0, C)`` tokens on ``grids[0]`` (rows of the NCHW map). With ``groups`` on
        any aligned grid (down to SimMIM's 4-pixel mask cells) the conv and the padded max pool are
        mixed (MixMIM supplement section 9): no token sees a pixel of another group."""
        stem = self.stem
        if groups is None:
            x = stem(images)
        else:
            check_groups(groups, images.shape[0])
            groups = resize_groups(groups.to(images.device), images.shape[-2:])
            k = int(groups.max()) + 1
            conv = cast(nn.Conv2d, stem.conv)  # the fixed stem: conv (timm's StdConv2d), pad, pool
            x = mixed_conv2d(conv, images, groups, k)
            groups = downsample_groups(groups, x.shape[-2:], conv.stride)
            x = mixed_max_pool2d(cast(nn.Module, stem.pool), x, groups, pad=cast(nn.Module, stem.pad), num_groups=k)
        return x.flatten(2).transpose(1, 2)

    def _stage_maps(self, tokens: Tensor, groups: Tensor | None, restrict: bool, stage_embeds: Sequence[Tensor] | None,
                    num_groups: int | None) -> tuple[list[Tensor], Tensor | None, int | None]:
        """NCHW outputs of the four stages, the group map of the last one and the number of groups."""
        b, n, c = tokens.shape
        h, w = self.grids[0]
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill the first stage's {h}x{w} grid (img_size={self.img_size})")
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        self.check_stage_embeds(stage_embeds, groups)
        if groups is not None:
            check_groups(groups, b)
            groups = resize_groups(groups.to(x.device), (h, w))
            if restrict and num_groups is None:
                num_groups = int(groups.max()) + 1
        mixed = groups is not None and restrict
        outs = []
        for i, stage in enumerate(cast("Iterable[ResNetStage]", self.stages)):
            if stage_embeds is not None:
                assert groups is not None  # check_stage_embeds: stage embeddings come with a group map
                x = x + stage_embeds[i][groups.long()].permute(0, 3, 1, 2).to(x.dtype)
            if not mixed:
                x = stage(x)
                if groups is not None:  # the mix embeddings of the next stage need the map
                    first = cast(PreActBottleneck, stage.blocks[0])
                    groups = downsample_groups(groups, x.shape[-2:], first.conv2.stride)
            else:
                assert groups is not None  # mixed: there is a group map
                for block in cast("Iterable[PreActBottleneck]", stage.blocks):
                    x = self.run_block(block, x, groups, num_groups)
                    groups = downsample_groups(groups, x.shape[-2:], block.conv2.stride)
            outs.append(x)
        return outs, groups, num_groups

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """The four stage outputs ``(B, L_s, C_s)`` (rows of NCHW maps, before the final norm). With
        ``groups`` (on a grid no finer than the last stage's) and ``restrict_attention``, every conv and
        GroupNorm is mixed (supplement section 9); ``stage_embeds[i]`` ``(k, stage_in_dims[i])`` is added
        to each position by group at the start of stage i (MixMIM section 2.3)."""
        outs, _, _ = self._stage_maps(tokens, groups, restrict_attention, stage_embeds, num_groups)
        return [x.flatten(2).transpose(1, 2) for x in outs]

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> Tensor:
        """The last stage after timm's final pre-activation (GroupNorm + ReLU, statistics per image
        group when restricted), as ``(B, L, C)`` rows."""
        outs, groups, num_groups = self._stage_maps(tokens, groups, restrict_attention, stage_embeds, num_groups)
        x = outs[-1]
        if groups is not None and restrict_attention:
            x = mixed_group_norm(cast(nn.GroupNorm, self.norm), x, groups, num_groups)  # pre-activation: GroupNormAct
        else:
            x = self.norm(x)
        return x.flatten(2).transpose(1, 2)

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``GroupedPreActBottleneck`` (timm's ``PreActBottleneck``) of every stage, in order;
        compiled, each serves both its plain and its grouped forward."""
        return [block for stage in cast("Iterable[ResNetStage]", self.stages) for block in stage.blocks]
