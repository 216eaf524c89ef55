"""Window self-attention that never lets tokens of different images (groups) see each other.

MixMIM section 2.3, "masked self-attention": each token aggregates only from tokens of its own image,
with the mixing mask upsampled to every stage. Three implementations compute the same function:

- ``reference``: the public release's maths. The full attention matrix is built and ``1e30`` is
  subtracted across groups, with a mask rebuilt for every image and window. Kept as the ground
  truth the faster paths are tested against.
- ``fast``: PyTorch's ``scaled_dot_product_attention`` (fused kernels where the device has them).
  When the whole batch shares one mask (the release's default) the group structure is the same for
  every image: in a global window the tokens of each group are gathered into their own dense
  sequence, so no work is spent on pairs that the mask would discard; in smaller windows one additive
  mask per window (not per image) is built once per stage and broadcast over the batch.
- ``flex``: FlexAttention block masks (CUDA only), see :mod:`mixmim.models.flex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["reference", "fast", "flex"]
ATTENTION_IMPLS: tuple[str, ...] = ("reference", "fast", "flex")


def relative_position_index(window: int) -> Tensor:
    """(N, N) index into a ((2w - 1)^2, heads) table of the relative offset between two tokens of a
    w x w window, row-major; the Swin Transformer layout used by the release."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, ...) -> (B, nW, window*window, ...), windows and tokens in row-major order."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // window, window, w // window, window, *rest)
    x = x.transpose(2, 3)
    return x.reshape(b, (h // window) * (w // window), window * window, *rest)


def window_reverse(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nW, window*window, C) -> (B, H, W, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(b, h, w, c)


@dataclass(eq=False)
class GroupLayout:
    """Which group (source image) each token of one stage belongs to, windowed for attention.

    ``ids`` is (G, nW, N) with G == 1 when the whole batch shares one mask and G == B otherwise.
    The derived tensors are computed once per stage and reused by all of its blocks.
    """

    ids: Tensor
    num_groups: int
    _same: Tensor | None = field(default=None, repr=False)
    _members: list[Tensor] | None = field(default=None, repr=False)
    _additive: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_grid(cls, ids: Tensor, window: int, num_groups: int) -> "GroupLayout":
        """``ids``: (G, H, W) group ids on this stage's grid."""
        return cls(window_partition(ids, window), num_groups)

    @property
    def shared(self) -> bool:
        return self.ids.shape[0] == 1

    def same_group(self) -> Tensor:
        """(G, nW, N, N) bool: True where query and key belong to the same group."""
        if self._same is None:
            self._same = self.ids[..., :, None] == self.ids[..., None, :]
        return self._same

    def members(self) -> list[Tensor]:
        """Token indices of each group, for a shared layout with a single (global) window."""
        if self._members is None:
            ids = self.ids[0, 0]
            self._members = [torch.nonzero(ids == g).flatten() for g in range(self.num_groups)]
        return self._members

    def additive(self, dtype: torch.dtype) -> Tensor:
        """(G, nW, 1, N, N): 0 within a group, -inf across groups."""
        if self._additive is None or self._additive.dtype != dtype:
            zero = torch.zeros((), dtype=dtype, device=self.ids.device)
            ninf = torch.full((), float("-inf"), dtype=dtype, device=self.ids.device)
            self._additive = torch.where(self.same_group(), zero, ninf).unsqueeze(2)
        return self._additive


class WindowAttention(nn.Module):
    """Multi-head self-attention in square windows with a learned relative position bias
    (Swin Transformer), optionally restricted to tokens of the same group (MixMIM section 2.3)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: AttentionImpl = "fast",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        self.dim, self.num_heads, self.window_size, self.impl = dim, num_heads, window_size, impl
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Rebuilt from the window size, so checkpoints need not carry it and windows can change.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, layout: GroupLayout | None = None) -> Tensor:
        """``x``: (B, nW, N, C) windows of B images; returns the same shape."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # each (B, nW, heads, N, d)
        bias = self.relative_bias().to(q.dtype)
        impl = self.impl
        if impl == "flex":
            from mixmim.models.flex import flex_window_attention

            out = flex_window_attention(q, k, v, self.relative_position_bias_table, self.relative_position_index,
                                        layout, self.scale, self.attn_drop if self.training else 0.0)
        elif impl == "reference":
            out = self._reference(q, k, v, bias, layout)
        else:
            out = self._fast(q, k, v, bias, layout)
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))

    def _reference(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, layout: GroupLayout | None) -> Tensor:
        b, nw, h, n, d = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias
        if layout is not None:
            # As the release does in every block: repeat the mask for each image, compare every
            # pair of tokens, and push cross-group logits down by 1e30.
            ids = layout.ids.expand(b, -1, -1).reshape(b * nw, 1, 1, n).to(attn.dtype)
            different = (ids != ids.transpose(2, 3)).to(attn.dtype)
            attn = (attn.reshape(b * nw, h, n, n) - 1e30 * different).reshape(b, nw, h, n, n)
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        return attn @ v

    def _fast(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, layout: GroupLayout | None) -> Tensor:
        b, nw, h, n, d = q.shape
        drop = self.attn_drop if self.training else 0.0
        if layout is None:
            out = F.scaled_dot_product_attention(q.reshape(b * nw, h, n, d), k.reshape(b * nw, h, n, d),
                                                 v.reshape(b * nw, h, n, d), attn_mask=bias, dropout_p=drop,
                                                 scale=self.scale)
            return out.reshape(b, nw, h, n, d)
        if layout.shared and nw == 1:
            # Global window, one mask for the batch: each group is its own dense sequence.
            out = torch.empty_like(q)
            for idx in layout.members():
                if idx.numel() == 0:
                    continue
                sub_bias = bias[:, idx][:, :, idx]
                out[:, :, :, idx] = F.scaled_dot_product_attention(
                    q[:, :, :, idx], k[:, :, :, idx], v[:, :, :, idx], attn_mask=sub_bias, dropout_p=drop,
                    scale=self.scale)
            return out
        mask = layout.additive(q.dtype) + bias  # (G, nW, heads, N, N)
        if layout.shared:
            # Fold windows into the head axis so one (nW * heads) mask broadcasts over the batch.
            out = F.scaled_dot_product_attention(q.reshape(b, nw * h, n, d), k.reshape(b, nw * h, n, d),
                                                 v.reshape(b, nw * h, n, d), attn_mask=mask.reshape(1, nw * h, n, n),
                                                 dropout_p=drop, scale=self.scale)
            return out.reshape(b, nw, h, n, d)
        out = F.scaled_dot_product_attention(q.reshape(b * nw, h, n, d), k.reshape(b * nw, h, n, d),
                                             v.reshape(b * nw, h, n, d), attn_mask=mask.reshape(b * nw, h, n, n),
                                             dropout_p=drop, scale=self.scale)
        return out.reshape(b, nw, h, n, d)
