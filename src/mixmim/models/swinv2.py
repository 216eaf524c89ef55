"""Swin Transformer V2 (timm's ``SwinTransformerV2``) with attention restricted to each token's own image.

SimMIM's scaling rows pretrain SwinV2 (Liu et al. 2022: scaled cosine attention, a log-spaced
continuous position bias from a small MLP, post-norm blocks); MixMIM section 2.3 applies to it as to
Swin v1. Parameter names are timm's, so ``swinv2_*`` weights load unchanged. What mixing needs is
Swin v1's (:mod:`mixmim.models.swin`): the group map rolled with each shifted block's tokens and
combined with its shift mask into one additive mask per stage and kind of block, which timm's V2
``WindowAttention`` adds to its cosine logits the same way; pairs of two images get the most negative
value of the dtype, so their softmax weight is exactly zero. The only change of the block is where the
norms sit: V2 normalises the output of the attention and of the MLP (``x + norm1(attn(x))``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from timm.models.swin_transformer_v2 import (
    SwinTransformerV2,
    SwinTransformerV2Block,
    SwinTransformerV2Stage,
    window_reverse,
)
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder
from mixmim.models.swin import SwinEncoder, masked_window_attention, set_stage_geometry, swin_shape


class GroupSwinV2Block(SwinTransformerV2Block):
    """timm's ``SwinTransformerV2Block`` whose forward also takes the attention mask: ``None`` runs
    timm's own forward, a tensor from :func:`~mixmim.models.swin.group_window_mask` replaces the shift
    mask. Adds no parameters or buffers."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return super().forward(x)
        b, h, w, c = x.shape
        x = x + self.drop_path1(self.norm1(self._masked_attn(x, attn_mask)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(b, h, w, c)

    def _masked_attn(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        return masked_window_attention(self, x, attn_mask,
                                       lambda windows, h, w: window_reverse(windows, self.window_size, (h, w)))


class SwinV2Encoder(GroupedEncoder, SwinTransformerV2):
    """timm's SwinTransformerV2 with the :class:`~mixmim.models.base.GroupedEncoder` interface: four
    stages at strides 4, 8, 16, 32, timm's names and forward. Windows larger than a stage's map shrink
    to the map and lose their shift, as in timm."""

    family = "swinv2"

    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | Sequence[int] = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0)):
        size, depths, num_heads, window = swin_shape(img_size, patch_size, depths, num_heads, window_size)
        self._config = dict(img_size=list(size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                            window_size=window if isinstance(window, int) else list(window), mlp_ratio=mlp_ratio,
                            qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate, pretrained_window_sizes=list(pretrained_window_sizes))
        SwinTransformerV2.__init__(
            self, img_size=size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            pretrained_window_sizes=tuple(pretrained_window_sizes))
        for stage in cast("Iterable[SwinTransformerV2Stage]", self.layers):
            for blk in stage.blocks:
                blk.__class__ = GroupSwinV2Block  # adds a mask argument only: every parameter and buffer kept
        set_stage_geometry(self, size, patch_size, len(depths), embed_dim)

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # The method-facing path is Swin v1's: the same stages, windows, shifts and masks (timm's V2 blocks
    # hold window_size, shift_size and the attn_mask buffer under the same names).
    embed = SwinEncoder.embed
    forward_stages = SwinEncoder.forward_stages
    forward_tokens = SwinEncoder.forward_tokens

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``GroupSwinV2Block`` of every stage, in order."""
        return [blk for stage in cast("Iterable[SwinTransformerV2Stage]", self.layers) for blk in stage.blocks]
