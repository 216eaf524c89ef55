"""Light ViT decoder with mask tokens and fixed sine-cosine positions (MixMIM section 2.2, after MAE).

The decoder sees one sequence per (image, group): the encoder tokens it may use, with every other
position replaced by the shared mask token, and predicts the pixels of every cell.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mixmim.models.pos_embed import sincos_2d


class MaskTokenDecoder(nn.Module):
    def __init__(self, in_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, learnable_pos_embed: bool = False):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, *grid).unsqueeze(0), requires_grad=learnable_pos_embed)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)  # as the release (timm's, bounds +-2 absolute)

    def forward(self, tokens: Tensor, visible: Tensor | None = None) -> Tensor:
        """``tokens``: (S, L, C_enc) encoder outputs; ``visible``: (S, L) bool, False where the mask
        token replaces the token. Returns (S, L, out_dim) predictions for every position."""
        x = self.embed(tokens)
        if visible is not None:
            x = torch.where(visible.unsqueeze(-1), x, self.mask_token.to(x.dtype))
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))
