"""Where an encoder looks: attention maps of its last block (MixedAE Figures 5 and 7, DINO's pictures).

- A ViT with a class token: the class token's attention over the patches (the row of the class query,
  the class position itself left out and the rest renormalised), per head.
- A ViT without one, or MixMIM's windowed encoder: the attention each position receives, averaged over
  the queries that can see it (the queries of its window; MixMIM's relative position bias included),
  each window weighted by its share of the image.

Every map is (B, heads, h, w) on the block's token grid and sums to one over the grid. The maps are
computed from the block's own weights on the input its attention received (captured by a hook), so they
are what the classification forward computes; no group restriction applies (one image per sample).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FAMILIES = ("vit", "mixmim")


def attention_probabilities(attn: Any, x: Tensor) -> Tensor:
    """softmax(q k^T * scale [+ relative position bias]) of an attention layer (timm's ``Attention`` or
    MixMIM's ``WindowAttention``) on its input ``x`` (P, N, C): (P, heads, N, N), rows summing to one."""
    p, n, _ = x.shape
    heads = int(attn.num_heads)  # timm's Attention and WindowAttention both hold qkv, num_heads, scale
    qkv = attn.qkv(x).reshape(p, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if hasattr(attn, "relative_bias"):
        logits = logits + attn.relative_bias()
    return logits.float().softmax(-1)


@torch.no_grad()
def attention_maps(encoder: Any, images: Tensor) -> Tensor:
    """(B, heads, h, w) maps of the last block (see the module's docstring), each summing to one."""
    family = getattr(encoder, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"attention maps are drawn for the {' and '.join(FAMILIES)} encoders, not {family!r}")
    block = encoder.repeated_blocks()[-1]
    seen: list[Tensor] = []
    handle = block.attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        encoder.eval()
        encoder.forward_features(images)
    finally:
        handle.remove()
    x = seen[-1]
    b = images.shape[0]
    if family == "vit":
        probs = attention_probabilities(block.attn, x)  # (B, heads, T, T)
        prefix = int(encoder.num_prefix_tokens)
        gh, gw = encoder.patch_embed.grid_size
        if getattr(encoder, "cls_token", None) is not None:
            maps = probs[:, :, 0, prefix:]
            maps = maps / maps.sum(-1, keepdim=True)
        else:
            maps = probs[:, :, prefix:, prefix:].mean(-2)
        return maps.reshape(b, -1, gh, gw)
    # MixMIM: x is (B, nW, N, C) windows of the last stage.
    from mixmim.models.attention import window_reverse

    _, nw, n, c = x.shape
    probs = attention_probabilities(block.attn, x.reshape(b * nw, n, c))  # (B*nW, heads, N, N)
    received = probs.mean(-2).reshape(b, nw, -1, n) / nw  # each window's map sums to 1/nW
    gh, gw = encoder.grids[-1]
    grid = window_reverse(received.transpose(2, 3).contiguous(), block.window_size, gh, gw)  # (B, gh, gw, heads)
    return grid.permute(0, 3, 1, 2)
