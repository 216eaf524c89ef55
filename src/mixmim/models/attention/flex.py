"""Group-restricted window attention through FlexAttention block masks (CUDA only).

MixMIM section 2.3 with PyTorch's ``torch.nn.attention.flex_attention``: the windows of one image are
laid end to end as one sequence; the mask lets a query see a key only when both lie in the same
window and belong to the same group (source image), and the relative position bias is a score
modification that reads the learned table, so its gradient comes out of the fused kernel as well.
The block mask is built once per layout (stage) and shared by the stage's blocks; with one mask per
batch it has no batch axis.

This module runs FlexAttention and nothing else: on a tensor that is not on a CUDA device it raises.
Which implementation serves a call (``fast`` in place of ``flex`` on a CPU, with a warning) is the
dispatcher's choice, in :mod:`mixmim.models.attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixmim.models.attention.layout import GroupLayout

_compiled = None


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Compiled once: eager flex_attention materialises the scores and is only meant for debugging.
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _block_mask(layout: GroupLayout | None, num_windows: int, window_tokens: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (num_windows, window_tokens, device)
    if layout is not None and layout._flex_mask is not None and layout._flex_mask[0] == key:
        return layout._flex_mask[1]
    n = window_tokens
    ids = layout.ids.reshape(layout.ids.shape[0], -1).to(device) if layout is not None else None
    shared = ids is None or ids.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        same = (q_idx // n) == (kv_idx // n)
        if ids is None:
            return same
        row = 0 if shared else b
        return same & (ids[row, q_idx] == ids[row, kv_idx])

    length = num_windows * n
    batch = None if ids is None or shared else ids.shape[0]
    mask = create_block_mask(mask_mod, batch, None, length, length, device=device)
    if layout is not None:
        layout._flex_mask = (key, mask)
    return mask


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, rel_index: Tensor,
                          layout: GroupLayout | None, scale: float, dropout: float = 0.0) -> Tensor:
    """Group-restricted window attention. ``q, k, v``: (B, nW, heads, N, d) on a CUDA device;
    ``table``: ((2w-1)^2, heads) relative position bias; ``rel_index``: (N, N) rows of ``table``;
    ``layout``: the groups, or None (windows only). Returns (B, nW, heads, N, d)."""
    if q.device.type != "cuda":
        raise ValueError(f"FlexAttention (attention_impl='flex') runs on CUDA only, got a tensor on {q.device}; "
                         "use attention_impl='fast' or 'auto'")
    if dropout > 0:
        raise ValueError("attention_impl='flex' does not support attention dropout; use 'fast' or 'reference'")
    b, nw, h, n, d = q.shape
    block_mask = _block_mask(layout, nw, n, q.device)
    flat_index = rel_index.reshape(-1)

    def score_mod(score, bi, hi, q_idx, kv_idx):
        return score + table[flat_index[(q_idx % n) * n + kv_idx % n], hi].to(score.dtype)

    def seq(t: Tensor) -> Tensor:  # (B, nW, h, N, d) -> (B, h, nW*N, d)
        return t.permute(0, 2, 1, 3, 4).reshape(b, h, nw * n, d)

    out = _flex()(seq(q), seq(k), seq(v), score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.reshape(b, h, nw, n, d).permute(0, 2, 1, 3, 4)
