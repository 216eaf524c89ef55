"""Twins (timm's ``Twins``: PCPVT and SVT) that keeps the images of a mixed input apart.

MixMAE's introduction names Twins among the hierarchical encoders mixing applies to. What it needs
beyond timm's model (parameter names unchanged, so ``twins_*`` state dicts load with ``strict=True``
and timm's ``forward`` gives timm's logits):

- The patch embeddings (4x4 stride 4, then 2x2 stride 2) never straddle a 32-pixel cell.
- The position encoding generator (PEG, a 3x3 depth-wise convolution after each stage's first block)
  looks across cell borders: a mixed convolution (MixMIM supplement section 9).
- Global sub-sampled attention (GSA, both variants) reads keys from a convolution of kernel = stride =
  ``sr_ratio`` (8/4/2/1 at token strides 4/8/16/32): as PVT's spatial reduction, every key summarises
  one aligned 32x32-pixel square inside one mixing cell, and a query attends only to the keys of its
  own image (MixMIM section 2.3; exact whenever cells are multiples of 32 pixels).
- Locally-grouped attention (LSA, SVT's every other block): windows of ``ws`` tokens, the pair of a
  query and a key allowed only when both hold the same image (pad positions, zeros as in timm, stay
  visible to all, so one image alone gives timm's function).

A stage's input (what a mix embedding is added to) is the stage's patch embedding, so
``stage_in_dims == dims``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch.nn.functional as F
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, PosConv, Twins
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder, check_groups, resize_groups
from mixmim.models.mixed_conv import mixed_conv2d
from mixmim.models.swin import PAD_GROUP, window_groups

__all__ = ["TwinsEncoder"]


class GroupedGSA(GlobalSubSampleAttn):
    """timm's GSA taking a boolean ``attn_mask`` ``(G, 1, N, N_reduced)`` (True = may attend)."""

    def forward(self, x: Tensor, size: Sequence[int], attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return super().forward(x, (int(size[0]), int(size[1])))
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        if self.sr is not None:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, *size)).reshape(b, c, -1).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class GroupedLSA(LocallyGroupedAttn):
    """timm's LSA taking a boolean ``attn_mask`` ``(G, nW, 1, ws^2, ws^2)`` (True = may attend)."""

    def forward(self, x: Tensor, size: Sequence[int], attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return super().forward(x, (int(size[0]), int(size[1])))
        b, n, c = x.shape
        h, w = size
        ws = self.ws
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3)
        qkv = self.qkv(x).reshape(b, -1, ws * ws, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(2, 3).reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return self.proj_drop(self.proj(x[:, :h, :w].reshape(b, n, c)))


class GroupedTwinsBlock(Block):
    """timm's Twins ``Block`` passing a mask to its attention; with none it computes timm's block."""

    def forward(self, x: Tensor, size: Sequence[int], attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size, attn_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TwinsEncoder(GroupedEncoder, Twins):
    """timm's Twins (PCPVT without ``wss``, SVT with) with the :class:`~mixmim.models.base.GroupedEncoder`
    interface: four stages at strides 4/8/16/32, the last one's tokens after the final norm."""

    family = "twins"

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 0, embed_dims: Sequence[int] = (64, 128, 256, 512),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 depths: Sequence[int] = (3, 4, 6, 3), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 wss: Sequence[int] | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        self._config = dict(img_size=list(size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            embed_dims=list(embed_dims), num_heads=list(num_heads), mlp_ratios=list(mlp_ratios),
                            depths=list(depths), sr_ratios=list(sr_ratios),
                            wss=list(wss) if wss is not None else None, drop_rate=drop_rate,
                            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        stages = len(depths)
        if not len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == stages:
            raise ValueError(f"embed_dims, num_heads, mlp_ratios and sr_ratios need one value per stage ({stages})")
        stride = patch_size * 2 ** (stages - 1)
        for side in size:
            if side % stride:
                raise ValueError(f"img_size={side} is not divisible by the encoder stride {stride}")
        Twins.__init__(self, img_size=size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                       embed_dims=tuple(embed_dims), num_heads=tuple(num_heads), mlp_ratios=tuple(mlp_ratios),
                       depths=tuple(depths), sr_ratios=tuple(sr_ratios),
                       wss=tuple(wss) if wss is not None else None, drop_rate=drop_rate,
                       attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        for stage in cast("Iterable[nn.ModuleList]", self.blocks):
            for blk in stage:
                blk.__class__ = GroupedTwinsBlock  # adds a mask argument only: parameters and init kept
                attn = cast(nn.Module, blk.attn)
                attn.__class__ = GroupedLSA if isinstance(attn, LocallyGroupedAttn) else GroupedGSA
        self.img_size = size
        self.patch_size = patch_size
        self.sr_ratios = [int(r) for r in sr_ratios]
        self.strides = [patch_size * 2**i for i in range(stages)]
        self.grids = [(size[0] // s, size[1] // s) for s in self.strides]
        self.dims = [int(d) for d in embed_dims]
        self.stage_in_dims = list(self.dims)
        self.embed_dim = self.dims[0]  # the width a SimMIM mask token takes

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # ------------------------------------------------------------------ geometry of the restriction
    def _check_cells(self, groups: Tensor) -> None:
        """Every GSA key (and every last-stage token) must lie inside one cell: cells of whole multiples
        of the encoder stride (32 pixels)."""
        gh, gw = groups.shape[-2:]
        last_h, last_w = self.grids[-1]
        if last_h % gh or last_w % gw:
            raise ValueError(f"group map of {gh}x{gw} cells on {self.img_size[0]}x{self.img_size[1]} pixels: Twins "
                             f"keeps images apart only for cells that are whole multiples of {self.stride} pixels "
                             "(its sub-sampled keys cover that much)")

    def _masks(self, groups: Tensor, stage: int, blk: nn.Module) -> Tensor:
        """The boolean mask of ``blk``'s attention at ``stage`` (GSA: queries x reduced keys; LSA: per
        window), True where a query and a key hold the same image."""
        ids = resize_groups(groups, self.grids[stage])
        attn = blk.attn
        if isinstance(attn, GroupedLSA):
            windowed = window_groups(ids, (attn.ws, attn.ws), (0, 0))  # (G, nW, N), pads -> PAD_GROUP
            pad = windowed == PAD_GROUP
            same = (windowed[..., :, None] == windowed[..., None, :]) | pad[..., :, None] | pad[..., None, :]
            return same.unsqueeze(2)  # (G, nW, 1, N, N)
        r = self.sr_ratios[stage]
        h, w = self.grids[stage]
        keys = resize_groups(groups, (h // r, w // r)).flatten(1)
        return ids.flatten(1)[:, None, :, None] == keys[:, None, None, :]

    # ------------------------------------------------------------------ method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """The 4x4 stride-4 patch embedding and its norm as ``(B, L0, C0)`` tokens; each patch lies in
        one cell, so ``groups`` change nothing."""
        return self.patch_embeds[0](images)[0]

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """:meth:`embed`'s tokens -> every stage's output ``(B, L_s, C_s)`` (before the final norm).
        With ``groups`` and ``restrict_attention`` the PEGs are mixed convolutions and every attention
        keeps to the token's image."""
        b, n, _ = tokens.shape
        h0, w0 = self.grids[0]
        if n != h0 * w0:
            raise ValueError(f"expected {h0 * w0} tokens ({h0}x{w0}), got {n}")
        self.check_stage_embeds(stage_embeds, groups)
        restrict = groups is not None and restrict_attention and num_groups != 1
        if groups is not None:
            check_groups(groups, b)
            groups = groups.to(tokens.device)
            if restrict:
                self._check_cells(groups)
        x, outs = tokens, []
        for i, blocks in enumerate(cast("Iterable[nn.ModuleList]", self.blocks)):
            size = self.grids[i]
            if i > 0:
                x, _ = self.patch_embeds[i](x.transpose(1, 2).reshape(b, -1, *self.grids[i - 1]))
            here = resize_groups(groups, size) if groups is not None else None
            if stage_embeds is not None:
                assert here is not None  # check_stage_embeds: stage embeddings come with a group map
                x = x + stage_embeds[i][here.flatten(1)].to(x.dtype)
            x = self.pos_drops[i](x)
            masks: dict[type, Tensor] = {}  # one per kind of attention: shared by the stage's blocks
            for j, blk in enumerate(blocks):
                mask = None
                if restrict:
                    assert groups is not None
                    kind = type(blk.attn)
                    if kind not in masks:
                        masks[kind] = self._masks(groups, i, blk)
                    mask = masks[kind]
                x = self.run_block(blk, x, size, mask)
                if j == 0:
                    x = self._peg(i, x, size, here if restrict else None, num_groups)
            outs.append(x)
        return outs

    def _peg(self, stage: int, x: Tensor, size: Sequence[int], groups: Tensor | None, num_groups: int | None) -> Tensor:
        """The position encoding generator (3x3 depth-wise conv plus the input), mixed with groups."""
        peg = cast(PosConv, self.pos_block[stage])
        if groups is None:
            return peg(x, tuple(size))
        b, n, c = x.shape
        feat = x.transpose(1, 2).reshape(b, c, *size)
        y = mixed_conv2d(peg.proj[0], feat, groups, num_groups)
        if peg.stride == 1:
            y = y + feat
        return y.flatten(2).transpose(1, 2)

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.norm(self.forward_stages(tokens, groups, **kwargs)[-1])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the method-facing path (:meth:`run_block`); timm's Twins has none
        for its own classification forward (its switch refuses)."""
        self.block_checkpointing = enable

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``GroupedTwinsBlock`` of every stage, in order."""
        return [blk for stage in cast("Iterable[nn.ModuleList]", self.blocks) for blk in stage]

