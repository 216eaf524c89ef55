"""Light ViT decoder with mask tokens and fixed sine-cosine positions (MixMIM section 2.2, after MAE).

The decoder sees one sequence per (image, group): the encoder tokens it may use, with every other
position replaced by the shared mask token, and predicts the pixels of every cell. MAE's decoder
(facebookresearch/mae ``models_mae.py``) also carries the encoder's class token in front of the
patches, at a position of zeros, through every block (``prefix``); MixMIM's release has none.
``norm_eps``: the LayerNorm epsilon of the blocks and the final norm (MixMIM's release: PyTorch's
1e-5; MAE's models: 1e-6).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mixmim.models.pos_embed import sincos_2d


class MaskTokenDecoder(nn.Module):
    def __init__(self, in_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, learnable_pos_embed: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, *grid).unsqueeze(0), requires_grad=learnable_pos_embed)
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList([
            # timm annotates norm_layer as a class but only calls it (its own models pass partials)
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
            for _ in range(depth)
        ])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)  # as the release (timm's, bounds +-2 absolute)

    def forward(self, tokens: Tensor, visible: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """``tokens``: (S, L, C_enc) encoder outputs; ``visible``: (S, L) bool, False where the mask
        token replaces the token; ``prefix``: (S, P, C_enc) tokens put in front of the patches at
        position zero (MAE's class token), seen by every block and dropped from the output. Returns
        (S, L, out_dim) predictions for every position."""
        x = self.embed(tokens)
        if visible is not None:
            x = torch.where(visible.unsqueeze(-1), x, self.mask_token.to(x.dtype))
        x = x + self.pos_embed.to(x.dtype)
        lead = 0
        if prefix is not None:
            lead = prefix.shape[1]
            x = torch.cat([self.embed(prefix), x], dim=1)  # MAE's class-token position is all zeros
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x[:, lead:]))  # norm and prediction are per token: the prefix needs neither

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one."""
        return list(self.blocks)
