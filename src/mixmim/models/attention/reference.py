"""The public release's group-restricted window attention, kept as the ground truth.

MixMIM section 2.3 as the release computes it: the full (N, N) attention matrix of every window
and image is built, and ``1e30`` is subtracted from every logit whose query and key hold different
groups, with the mask rebuilt for every image and window in every block. Slow, and the function
the ``fast`` and ``flex`` paths are tested against.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mixmim.models.attention.layout import GroupLayout


def reference_window_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, layout: GroupLayout | None,
                               scale: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """softmax(q k^T * scale + bias - 1e30 * [groups differ]) v. ``q, k, v``: (B, nW, heads, N, d);
    ``bias``: (heads, N, N) relative position bias; ``layout``: the groups, or None (windows only);
    ``dropout`` on the attention weights when ``training`` (as ``F.dropout``). Returns (B, nW, heads, N, d)."""
    b, nw, h, n, d = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    if layout is not None:
        # As the release does in every block: repeat the mask for each image, compare every pair of
        # tokens, and push cross-group logits down by 1e30.
        ids = layout.ids.expand(b, -1, -1).reshape(b * nw, 1, 1, n).to(attn.dtype)
        different = (ids != ids.transpose(2, 3)).to(attn.dtype)
        attn = (attn.reshape(b * nw, h, n, n) - 1e30 * different).reshape(b, nw, h, n, n)
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, dropout, training)
    return attn @ v
