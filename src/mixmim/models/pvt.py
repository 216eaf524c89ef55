"""PVT v2 (timm's ``PyramidVisionTransformerV2``) that keeps the images of a mixed input apart.

MixMIM Table 3 pretrains PVT-L with mixing and MixMAE (introduction) names PVT among the hierarchical
encoders it is compatible with. What mixing needs beyond timm's model (parameter names unchanged, so
``pvt_v2_b*`` state dicts load with ``strict=True`` and timm's ``forward`` gives timm's logits):

- Convolutions that look across a 32-pixel cell border are *mixed convolutions* (MixMIM supplement
  section 9, :mod:`mixmim.models.mixed_conv`): the 7x7 stride-4 stem, the 3x3 stride-2 overlapping
  patch embeddings of stages 2-4 and the 3x3 depth-wise convolution inside every MLP.
- Spatial-reduction attention restricted to the group (MixMIM section 2.3): a query attends only to
  the reduced keys of its own image. This is exact, not an approximation: the reduction convolution
  ``sr`` has kernel = stride = ``sr_ratio`` (8/4/2/1 at token strides 4/8/16/32), so every reduced key
  summarises one aligned 32x32-pixel square, which lies inside a single mixing cell whenever cells
  are multiples of 32 pixels (the encoder's ``stride``). A reduced key therefore never holds two
  images, and each query keeps at least the key of its own cell (no empty softmax row, no NaN).
  Finer group maps raise a ValueError.
- ``linear=True`` (PVT v2-li) pools keys to 7x7 before a 1x1 ``sr``. That is exact only when every
  pooling window is a whole number of tokens lying inside one cell (e.g. 224 pixels with 32-pixel
  cells: every window is one cell); otherwise groups are refused with a ValueError.

Where a mix embedding (MixMIM section 2.3, Table 10) is added: each stage's tokens *entering its
first block*, i.e. after the stage's overlapping patch embedding (stages 2-4) or :meth:`embed`
(stage 1), so ``stage_in_dims == dims``, as in the MixMIM encoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch.nn.functional as F
from timm.models.pvt_v2 import (
    Attention,
    Block,
    MlpWithDepthwiseConv,
    OverlapPatchEmbed,
    PyramidVisionTransformerStage,
    PyramidVisionTransformerV2,
)
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder, check_groups, resize_groups
from mixmim.models.mixed_conv import mixed_conv2d

__all__ = ["PVTv2Encoder"]


class GroupedSRAttention(Attention):
    """timm's spatial-reduction ``Attention`` that also takes a boolean ``attn_mask`` (True = may
    attend) of shape ``(G, 1, N, N_reduced)`` between queries and reduced keys; None is timm's."""

    def reduce(self, x: Tensor, feat_size: Sequence[int]) -> Tensor:
        """Tokens ``(B, N, C)`` -> the ``(B, N_reduced, C)`` tokens keys and values are read from
        (PVT v2 section 3.1: average pooling for the linear variant, a strided conv otherwise)."""
        b, n, c = x.shape
        if self.sr is None:
            return x
        x = x.transpose(1, 2).reshape(b, c, *feat_size)
        if self.pool is not None:
            x = self.pool(x)
        x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        return x if self.act is None else self.act(x)

    def forward(self, x: Tensor, feat_size: Sequence[int], attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return super().forward(x, list(feat_size))  # timm annotates a list (TorchScript)
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.reduce(x, feat_size)).reshape(b, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1))
            x = attn @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class MixedMlp(MlpWithDepthwiseConv):
    """timm's MLP whose 3x3 depth-wise conv becomes a mixed convolution given ``groups`` (the
    ``(G, H, W)`` map on the token grid): the kernel would otherwise read the neighbouring cell's
    image at every cell border (MixMIM supplement section 9)."""

    def forward(self, x: Tensor, feat_size: Sequence[int], groups: Tensor | None = None,
                num_groups: int | None = None) -> Tensor:
        if groups is None:
            return super().forward(x, list(feat_size))  # timm annotates a list (TorchScript)
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.relu(x.transpose(1, 2).reshape(b, c, *feat_size))
        x = mixed_conv2d(self.dwconv, x, groups, num_groups).flatten(2).transpose(1, 2)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class GroupedBlock(Block):
    """timm's ``Block`` passing the group restriction on to its attention and MLP; with none given
    it computes exactly timm's block."""

    def forward(self, x: Tensor, feat_size: Sequence[int], groups: Tensor | None = None,
                attn_mask: Tensor | None = None, num_groups: int | None = None) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size, attn_mask))
        x = x + self.drop_path2(self.mlp(self.norm2(x), feat_size, groups, num_groups))
        return x


class PVTv2Encoder(GroupedEncoder, PyramidVisionTransformerV2):
    """timm's PyramidVisionTransformerV2 with the :class:`~mixmim.models.base.GroupedEncoder`
    interface: four stages at strides 4/8/16/32, each output after the stage's own LayerNorm.
    ``forward``/``forward_features``/``forward_head`` are timm's."""

    family = "pvt_v2"

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, num_classes: int = 0,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), qkv_bias: bool = True, linear: bool = False,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        self._config = dict(img_size=img_size if isinstance(img_size, int) else list(img_size), in_chans=in_chans,
                            num_classes=num_classes, embed_dims=list(embed_dims), depths=list(depths),
                            num_heads=list(num_heads), sr_ratios=list(sr_ratios), mlp_ratios=list(mlp_ratios),
                            qkv_bias=qkv_bias, linear=linear, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate)
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == len(sr_ratios) == len(mlp_ratios) == num_stages:
            raise ValueError(f"embed_dims, num_heads, sr_ratios and mlp_ratios need one value per stage ({num_stages})")
        for side in size:
            if side % (4 * 2 ** (num_stages - 1)):
                raise ValueError(f"img_size={side} is not divisible by the encoder stride {4 * 2 ** (num_stages - 1)}")
        PyramidVisionTransformerV2.__init__(
            self, in_chans=in_chans, num_classes=num_classes, depths=tuple(depths), embed_dims=tuple(embed_dims),
            num_heads=tuple(num_heads), sr_ratios=tuple(sr_ratios), mlp_ratios=tuple(mlp_ratios), qkv_bias=qkv_bias,
            linear=linear, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        # timm's stages build their blocks with no layer hook; swapping in subclasses that add only a
        # forward keeps timm's construction, initialisation and parameter names untouched.
        for stage in cast("Iterable[PyramidVisionTransformerStage]", self.stages):
            for blk in cast("Iterable[Block]", stage.blocks):
                blk.__class__, blk.attn.__class__, blk.mlp.__class__ = GroupedBlock, GroupedSRAttention, MixedMlp
        self.img_size = size
        self.linear = linear
        self.sr_ratios = [int(r) for r in sr_ratios]
        self.strides = [4 * 2 ** i for i in range(num_stages)]
        self.grids = [(size[0] // s, size[1] // s) for s in self.strides]
        self.dims = [int(d) for d in embed_dims]
        self.stage_in_dims = list(self.dims)
        self.embed_dim = self.dims[0]

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # ------------------------------------------------------------------ geometry of the restriction
    def reduced_grid(self, stage: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of the keys of ``stage``'s spatial-reduction attention."""
        h, w = self.grids[stage]
        if self.linear:
            return (7, 7)
        r = self.sr_ratios[stage]
        return (h // r, w // r)

    def _check_cells(self, groups: Tensor) -> None:
        """Raise a ValueError unless every reduced key (and every last-stage token) lies inside one
        cell of ``groups``: only then is restricting attention exact (module docstring)."""
        gh, gw = groups.shape[-2:]
        last_h, last_w = self.grids[-1]
        if last_h % gh or last_w % gw:
            raise ValueError(
                f"group map of {gh}x{gw} cells on {self.img_size[0]}x{self.img_size[1]} pixels: PVT v2 keeps images "
                f"apart only for cells that are whole multiples of {self.stride} pixels (the last stage's tokens and "
                f"the spatial-reduction keys cover {self.stride}x{self.stride} pixels)")
        for i, (h, w) in enumerate(self.grids):
            rh, rw = self.reduced_grid(i)
            if self.linear:
                whole = h % rh == 0 and w % rw == 0
                if not (whole and rh % gh == 0 and rw % gw == 0):
                    raise ValueError(
                        f"linear=True pools stage {i + 1}'s {h}x{w} tokens to 7x7 keys, which do not each lie inside "
                        f"one of the {gh}x{gw} mixing cells at {self.img_size[0]}x{self.img_size[1]} pixels: "
                        "restricted attention would not be exact (use img_size=224 with 32-pixel cells, or "
                        "linear=False)")
            elif h % self.sr_ratios[i] or w % self.sr_ratios[i] or rh % gh or rw % gw:
                raise ValueError(
                    f"stage {i + 1}'s spatial reduction (sr_ratio={self.sr_ratios[i]} on {h}x{w} tokens) makes keys "
                    f"that straddle the {gh}x{gw} mixing cells: restricted attention would not be exact")

    def _attention_mask(self, groups: Tensor, stage: int) -> Tensor:
        """``(G, 1, N, N_reduced)``: True where a query and a reduced key hold the same image. Each
        reduced key lies in one cell (checked by :meth:`_check_cells`), so its group is the map
        resampled to the reduced grid."""
        q = resize_groups(groups, self.grids[stage]).flatten(1)
        k = resize_groups(groups, self.reduced_grid(stage)).flatten(1)
        return (q[:, None, :, None] == k[:, None, None, :])

    # ------------------------------------------------------------------ method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """The stem (7x7 stride-4 conv, LayerNorm) as ``(B, L0, C0)`` tokens. The kernel reaches 3
        pixels beyond its stride window, across cell borders, so with ``groups`` (any grid aligned
        with the pixels, e.g. SimMIM's 4-pixel mask cells) it is a mixed convolution."""
        if groups is None:
            return self.patch_embed(images).flatten(1, 2)
        check_groups(groups, images.shape[0])
        pixels = resize_groups(groups.to(images.device), images.shape[-2:])
        x = mixed_conv2d(self.patch_embed.proj, images, pixels)
        return self.patch_embed.norm(x.permute(0, 2, 3, 1)).flatten(1, 2)

    @staticmethod
    def _downsample(embed: OverlapPatchEmbed, x: Tensor, groups: Tensor | None, num_groups: int | None) -> Tensor:
        """A stage's 3x3 stride-2 overlapping patch embedding on ``(B, C, H, W)``, mixed with groups."""
        return embed.norm(mixed_conv2d(embed.proj, x, groups, num_groups).permute(0, 2, 3, 1)).flatten(1, 2)

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """:meth:`embed`'s tokens -> every stage's output ``(B, L_s, C_s)`` after the stage's norm.

        With ``groups`` and ``restrict_attention`` the stage embeddings and depth-wise convs are
        mixed convolutions and each query attends to the reduced keys of its own group only;
        ``groups`` must then have cells of whole multiples of 32 pixels."""
        b, n, _ = tokens.shape
        h0, w0 = self.grids[0]
        if n != h0 * w0:
            raise ValueError(f"expected {h0 * w0} tokens ({h0}x{w0}), got {n}")
        self.check_stage_embeds(stage_embeds, groups)
        restrict = groups is not None and restrict_attention
        if groups is not None:
            check_groups(groups, b)
            groups = groups.to(tokens.device)
            if restrict:
                self._check_cells(groups)
                if num_groups is None:
                    num_groups = int(groups.max()) + 1
        x, outs, before = tokens, [], None
        for i, stage in enumerate(cast("Iterable[PyramidVisionTransformerStage]", self.stages)):
            here = resize_groups(groups, self.grids[i]) if groups is not None else None
            if stage.downsample is not None:
                # contiguous NCHW as timm's stage hands over: a channels-last view would pick
                # another conv kernel and round differently from timm's forward
                x = x.transpose(1, 2).reshape(b, -1, *self.grids[i - 1]).contiguous()
                x = self._downsample(stage.downsample, x, before if restrict else None, num_groups)
            if stage_embeds is not None:
                assert here is not None  # check_stage_embeds: stage embeddings come with a group map
                x = x + stage_embeds[i][here.flatten(1)].to(x.dtype)
            mask = self._attention_mask(groups, i) if restrict and groups is not None else None
            block_groups = here if restrict else None
            for blk in stage.blocks:
                x = self.run_block(blk, x, self.grids[i], block_groups, mask, num_groups)
            x = stage.norm(x)
            outs.append(x)
            before = here
        return outs

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The last stage's output: timm's PVT v2 already ends each stage with its own LayerNorm."""
        return self.forward_stages(tokens, groups, **kwargs)[-1]

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``GroupedBlock`` (timm's PVT v2 ``Block``) of every stage, in order."""
        return [blk for stage in cast("Iterable[PyramidVisionTransformerStage]", self.stages) for blk in stage.blocks]
