"""Swin Transformer (timm's ``SwinTransformer``) with attention restricted to each token's own image.

MixMIM Table 3 pretrains Swin-B/L with mixing, "the window size ... following its original design"
(section 3): window 7 at 224 px and shifted windows in every other block. What mixing needs beyond
timm's model (parameter names unchanged, so ``swin_*_patch4_window7_224`` weights load):

- 32x32 mixing cells hold 8x8 patches of 4 pixels; a patch never straddles a cell.
- Masked self-attention (MixMIM section 2.3): in every block a token attends only to tokens of its
  window *and* of its group, the group map upsampled to each stage's grid by nearest neighbour.
  A shifted block rolls its tokens before cutting windows, so the group map is rolled with the same
  shift; the group restriction is then combined with Swin's own shift mask (a pair of tokens is
  allowed only when both masks allow it; pairs the shift alone separates keep timm's -100, pairs of
  two groups get exactly zero weight). Both become one additive mask in timm's layout, built once
  per stage and kind of block (plain or shifted), and handed to timm's ``WindowAttention``.
- Where the patch merging sits: timm (>= 0.9) merges at the *start* of stages 2-4, the original
  Swin and MixMIM at the end of stages 1-3. A "stage input" here is the merged tokens, i.e. what
  the stage's blocks receive: they lie on ``grids[i]`` with width ``dims[i]``, so
  ``stage_in_dims == dims`` and a mix embedding is added at the same place as in MixMIM's encoder
  (after the previous stage's merging, before the first block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder, check_groups

# Group id of the positions timm pads to whole windows: they hold no image (zeros after the norm),
# and every token may attend to them, as in timm, so one group alone gives timm's function.
PAD_GROUP = -1


def window_groups(ids: Tensor, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """``(G, H, W)`` group ids -> ``(G, nW, N)``: the group of every token of every window of a block
    with this window and shift, in the order timm's block attends them (cyclic shift by ``-shift``,
    padding to whole windows at the bottom and right, row-major windows), so that the mask follows
    the tokens the shift moved (MixMIM section 2.3 on Swin's shifted windows)."""
    if any(shift):
        ids = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    g, h, w = ids.shape
    wh, ww = window
    pad_h, pad_w = (-h) % wh, (-w) % ww
    if pad_h or pad_w:
        ids = F.pad(ids, (0, pad_w, 0, pad_h), value=PAD_GROUP)
    hp, wp = h + pad_h, w + pad_w
    return ids.reshape(g, hp // wh, wh, wp // ww, ww).transpose(2, 3).reshape(g, -1, wh * ww)


def group_window_mask(ids: Tensor, shift_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``(G * nW, N, N)`` for timm's ``WindowAttention`` from windowed group
    ids ``(G, nW, N)`` (see :func:`window_groups`) and the block's shift mask ``(nW, N, N)`` (0 / -100,
    None for a plain block). A pair keeps the shift mask's value when both tokens hold the same group
    (section 2.3) and gets the most negative value of ``dtype`` otherwise: finite, so no NaN can
    arise, and its softmax weight is exactly zero. Every token keeps itself, so no row is empty.

    With ``G == 1`` timm broadcasts the mask over the batch; with ``G == B`` its ``B * nW`` rows
    are the per-image windows in the order timm partitions the batch."""
    g, nw, n = ids.shape
    pad = ids == PAD_GROUP
    allowed = (ids[..., :, None] == ids[..., None, :]) | pad[..., :, None] | pad[..., None, :]
    base = ids.new_zeros((nw, n, n), dtype=dtype) if shift_mask is None else shift_mask.to(dtype)
    mask = base.expand(g, nw, n, n).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.reshape(g * nw, n, n)


class GroupSwinBlock(SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` whose forward also takes the attention mask: ``None`` runs
    timm's own forward (its shift mask buffer), a tensor from :func:`group_window_mask` replaces it.
    Adds no parameters or buffers."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            return super().forward(x)
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._masked_attn(self.norm1(x), attn_mask))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)

    def _masked_attn(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        return masked_window_attention(self, x, attn_mask,
                                       lambda windows, h, w: window_reverse(windows, self.window_size, h, w))


def masked_window_attention(blk: nn.Module, x: Tensor, attn_mask: Tensor,
                            reverse: Callable[[Tensor, int, int], Tensor]) -> Tensor:
    """Window attention of a (shifted) Swin block (v1 or v2: ``window_size``, ``shift_size``,
    ``window_area``, ``attn``) with a given mask; the token routing is timm's ``_attn`` (cyclic shift,
    padding to whole windows), which :func:`window_groups` mirrors. ``reverse(windows, H, W)``: the
    timm version's ``window_reverse``."""
    b, h, w, c = x.shape
    wh, ww = cast("tuple[int, int]", blk.window_size)
    sh, sw = cast("tuple[int, int]", blk.shift_size)
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    pad_h, pad_w = (-h) % wh, (-w) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    windows = window_partition(x, (wh, ww)).reshape(-1, wh * ww, c)
    windows = cast(nn.Module, blk.attn)(windows, mask=attn_mask)
    x = reverse(windows.reshape(-1, wh, ww, c), h + pad_h, w + pad_w)[:, :h, :w]
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x


def swin_shape(img_size: int | Sequence[int], patch_size: int, depths: Sequence[int], num_heads: Sequence[int],
               window_size: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, ...], tuple[int, ...], Any]:
    """(size, depths, num_heads, window) of a Swin (v1 or v2) as timm takes them; a ValueError names a
    stage count or an image size that does not fit."""
    size = (img_size, img_size) if isinstance(img_size, int) else cast("tuple[int, int]", tuple(img_size))
    depths, num_heads = tuple(depths), tuple(num_heads)
    window = window_size if isinstance(window_size, int) else cast("tuple[int, int]", tuple(window_size))
    if len(num_heads) != len(depths):
        raise ValueError(f"depths and num_heads need one entry per stage, got {len(depths)} and {len(num_heads)}")
    stride = patch_size * 2 ** (len(depths) - 1)
    for side in size:
        if side % stride:
            raise ValueError(f"img_size={side} is not divisible by the encoder stride {stride}")
    return size, depths, num_heads, window


def set_stage_geometry(encoder: Any, size: tuple[int, int], patch_size: int, stages: int, embed_dim: int) -> None:
    """A Swin's grids, strides and widths (v1 and v2 alike). Stage inputs are the merged tokens (timm
    merges at the start of stages 2-4): ``stage_in_dims == dims``, see the module docstring."""
    encoder.img_size, encoder.patch_size = size, patch_size
    encoder.strides = [patch_size * 2**i for i in range(stages)]
    encoder.grids = [(size[0] // s, size[1] // s) for s in encoder.strides]
    encoder.dims = [int(embed_dim * 2**i) for i in range(stages)]
    encoder.stage_in_dims = list(encoder.dims)


class SwinEncoder(GroupedEncoder, SwinTransformer):
    """timm's SwinTransformer with the :class:`~mixmim.models.base.GroupedEncoder` interface: four
    stages at strides 4, 8, 16, 32. ``forward``/``forward_features``/``forward_head`` are timm's.

    Windows larger than a stage's map shrink to the map and lose their shift, as in timm (stage 4
    at 224 px with window 7 and at 128 px with window 4 is one global window)."""

    family = "swin"

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | Sequence[int] = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        size, depths, num_heads, window = swin_shape(img_size, patch_size, depths, num_heads, window_size)
        self._config = dict(img_size=list(size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                            window_size=window if isinstance(window, int) else list(window), mlp_ratio=mlp_ratio,
                            qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate)
        SwinTransformer.__init__(
            self, img_size=size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        # timm's stages build SwinTransformerBlock by name (no block argument); the subclass only adds
        # a mask argument to forward, so swapping the class keeps every parameter and buffer.
        for stage in cast("Iterable[SwinTransformerStage]", self.layers):
            for blk in stage.blocks:
                blk.__class__ = GroupSwinBlock
        set_stage_geometry(self, size, patch_size, len(depths), embed_dim)

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # ------------------------------------------------------------------ method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """4x4 patches and LayerNorm (timm's, NHWC) as flat ``(B, L0, C)`` tokens; each patch lies
        inside one mixing cell, so ``groups`` change nothing."""
        return self.patch_embed(images).flatten(1, 2)

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """Patch tokens ``(B, L0, C)`` -> every stage's output ``(B, L_s, C_s)`` before the final norm.

        ``groups`` ``(1 or B, h, w)`` on any aligned grid; with ``restrict_attention`` every block
        masks pairs of different groups (MixMIM section 2.3); ``stage_embeds[i]`` rows are added by
        group to the merged tokens entering the blocks of stage i. ``num_groups == 1`` skips the
        masks; otherwise it is not needed (no value of the map is read on the host)."""
        b, n, c = tokens.shape
        h, w = self.grids[0]
        if n != h * w:
            raise ValueError(f"expected {h * w} tokens on the {h}x{w} patch grid, got {n}")
        if groups is not None:
            check_groups(groups, b)
        self.check_stage_embeds(stage_embeds, groups)
        restrict = groups is not None and restrict_attention and num_groups != 1
        x = tokens.reshape(b, h, w, c)
        outs = []
        for i, stage in enumerate(cast("Iterable[SwinTransformerStage]", self.layers)):
            x = stage.downsample(x)
            ids = self.stage_groups(groups, i) if groups is not None else None
            if stage_embeds is not None:
                x = x + stage_embeds[i][ids].to(x.dtype)
            masks: dict[tuple, Tensor] = {}  # one per kind of block: shared by the stage's blocks
            for blk in cast("Iterable[GroupSwinBlock]", stage.blocks):
                mask = None
                if restrict:
                    key = (blk.window_size, blk.shift_size)
                    if key not in masks:
                        assert ids is not None  # restrict: there is a group map
                        masks[key] = group_window_mask(window_groups(ids, blk.window_size, blk.shift_size),
                                                       _shift_mask(blk, x), x.dtype)
                    mask = masks[key]
                x = self.run_block(blk, x, mask)
            outs.append(x.reshape(b, -1, x.shape[-1]))
        return outs

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Normalised last-stage tokens ``(B, L, C)`` (timm's final norm)."""
        return self.norm(self.forward_stages(tokens, groups, **kwargs)[-1])

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``GroupSwinBlock`` (timm's ``SwinTransformerBlock``) of every stage, in order."""
        return [blk for stage in cast("Iterable[SwinTransformerStage]", self.layers) for blk in stage.blocks]


def _shift_mask(blk: SwinTransformerBlock, x: Tensor) -> Tensor | None:
    """The block's own shift mask ``(nW, N, N)`` (None for a plain block). timm keeps it as a buffer
    unless the model was built for dynamic sizes; then it is built here for the stage's map."""
    attn_mask = cast("Tensor | None", blk.attn_mask)  # a buffer
    if attn_mask is not None or not any(blk.shift_size):
        return attn_mask
    return blk.get_attn_mask(device=x.device, dtype=x.dtype)
