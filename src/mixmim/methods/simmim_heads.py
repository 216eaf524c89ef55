"""SimMIM's prediction heads (SimMIM section 3.3, section 4.1.3, Table 2): last-stage tokens -> a
dense prediction map ``(B, V, H / d, W / d)``, V values per target pixel (3 colours, or 3 x bins
logits), d the target's downsampling (Table 3).

- ``linear``: one linear layer per token (the 1x1 convolution of section 3.4: 32 x 32 x 3 = 3072
  outputs on a Swin at full resolution), the outputs laid out as the token's pixels.
- ``mlp``: a 2-layer MLP (timm's ``Mlp``, GELU) whose hidden width is the encoder's width. Table 2
  gives 89.9M parameters for Swin-B with the linear head and 90.9M with the MLP: a hidden width of
  1024 (Swin-B's) adds 1.05M, which is what the table says.
- ``inverse_swin_t`` / ``inverse_swin_b``: Swin-T / Swin-B run backwards. The paper gives no
  structure, only that the heads are "heavier" and their sizes (115.2M and 174.8M in all, i.e. about
  a Swin-T and a Swin-B on top of the 86.7M encoder). Our choice, the plainest mirror of Swin: a
  linear projection of the encoder's tokens to the head's widest stage, then the four Swin stages in
  reverse order (depths 2/6/2/2 or 2/18/2/2 with timm's ``SwinTransformerBlock``, shifted windows
  every other block), a patch expanding between stages that doubles the resolution and halves the
  width (a linear layer to 2C, rearranged into 2 x 2 tokens of C/2, LayerNorm: the inverse of
  Swin's patch merging), and a final LayerNorm + linear layer predicting each token's pixels. It
  thus predicts from stride/8 (4 px on a stride-32 encoder) upwards; its window is ``window``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict, cast

from timm.layers import Mlp
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from mixmim.methods.options import HEADS

if TYPE_CHECKING:
    from mixmim.methods.base import Encoder


class SwinShape(TypedDict):
    """The size arguments of :class:`InverseSwinHead` (a plain dict at run time)."""

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]


# The Swin-T / Swin-B of the Swin paper: width of stage 1, blocks and heads per stage (forward order).
INVERSE_SWIN: dict[str, SwinShape] = {
    "inverse_swin_t": SwinShape(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "inverse_swin_b": SwinShape(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def tokens_to_map(values: Tensor, grid: tuple[int, int], per: int, channels: int) -> Tensor:
    """``(B, h*w, per*per*channels)`` rows in (row, column, channel) order -> ``(B, channels,
    h*per, w*per)``: every token's outputs become its ``per x per`` pixels (a pixel shuffle)."""
    b = values.shape[0]
    h, w = grid
    x = values.reshape(b, h, w, per, per, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * per, w * per)


def _pixels_per_token(stride: int, downsample: int, what: str) -> int:
    if stride % downsample:
        raise ValueError(f"target_downsample={downsample}: {what} predicts from tokens of {stride} px, which "
                         f"must be a whole number of target pixels; use a divisor of {stride}")
    return stride // downsample


def _init_linear(module: nn.Module) -> None:
    # Swin's / timm's initialisation for the transformer head (truncated normal, zero bias).
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TokenHead(nn.Module):
    """Linear layer (``hidden=None``) or 2-layer MLP applied to every last-stage token."""

    def __init__(self, width: int, grid: tuple[int, int], stride: int, values: int, downsample: int = 1,
                 hidden: int | None = None):
        super().__init__()
        self.grid, self.values = cast("tuple[int, int]", tuple(grid)), values
        self.per = _pixels_per_token(stride, downsample, "the head")
        out = self.per * self.per * values
        self.proj: nn.Linear | Mlp
        if hidden is None:
            self.proj = nn.Linear(width, out)
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = Mlp(width, hidden, out)
            self.proj.apply(_init_linear)

    def forward(self, latent: Tensor) -> Tensor:
        return tokens_to_map(self.proj(latent), self.grid, self.per, self.values)


class PatchExpand(nn.Module):
    """Swin's patch merging inverted: ``(B, H, W, C)`` -> ``(B, 2H, 2W, C/2)`` through a linear layer
    to 2C whose outputs are the four new tokens, then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = self.expand(x).reshape(b, h, w, 2, 2, c // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 2)
        return self.norm(x)


class InverseSwinHead(nn.Module):
    """Swin stages in reverse order upsampling the last-stage tokens by 8 (see the module docstring)."""

    def __init__(self, width: int, grid: tuple[int, int], stride: int, values: int, downsample: int = 1,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window: int = 6):
        super().__init__()
        stages = len(depths)
        up = 2 ** (stages - 1)
        if stride % up:
            raise ValueError(f"an inverse Swin upsamples by {up}: the encoder stride {stride} must be a multiple")
        self.grid, self.values = tuple(grid), values
        self.per = _pixels_per_token(stride // up, downsample, f"an inverse Swin (stride {stride // up})")
        dims = [embed_dim * 2**i for i in reversed(range(stages))]
        self.proj = nn.Linear(width, dims[0])
        self.expands = nn.ModuleList()
        self.stages = nn.ModuleList()
        h, w = grid
        for i, (dim, depth, heads) in enumerate(zip(dims, reversed(tuple(depths)), reversed(tuple(num_heads)))):
            if i:
                self.expands.append(PatchExpand(dims[i - 1]))
                h, w = 2 * h, 2 * w
            self.stages.append(nn.Sequential(*[
                SwinTransformerBlock(dim, (h, w), num_heads=heads, window_size=window,
                                     shift_size=0 if b % 2 == 0 else window // 2)
                for b in range(depth)]))
        self.out_grid = (h, w)
        self.norm = nn.LayerNorm(dims[-1])
        self.pred = nn.Linear(dims[-1], self.per * self.per * values)
        self.apply(_init_linear)

    def forward(self, latent: Tensor) -> Tensor:
        b = latent.shape[0]
        x = self.proj(latent).reshape(b, *self.grid, -1)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.expands[i - 1](x)
            x = stage(x)
        x = self.pred(self.norm(x)).reshape(b, -1, self.per * self.per * self.values)
        return tokens_to_map(x, self.out_grid, self.per, self.values)


def build_head(kind: str, encoder: Encoder, values: int, downsample: int = 1, window: int = 6) -> nn.Module:
    """The head ``kind`` (one of :data:`HEADS`) for ``encoder``'s last stage: ``values`` outputs per
    target pixel, targets downsampled by ``downsample``."""
    width, grid, stride = encoder.num_features, encoder.grids[-1], encoder.stride
    if kind == "linear":
        return TokenHead(width, grid, stride, values, downsample)
    if kind == "mlp":
        return TokenHead(width, grid, stride, values, downsample, hidden=width)
    if kind in INVERSE_SWIN:
        return InverseSwinHead(width, grid, stride, values, downsample, window=window, **INVERSE_SWIN[kind])
    raise ValueError(f"head={kind!r}: expected one of {', '.join(HEADS)}")

