"""Plain ViT (timm's ``VisionTransformer``) with attention restricted to each token's own image.

MixMIM Table 3 pretrains ViT-B/L with mixing; MAE and MixedAE build on the same encoder. What
mixing needs beyond timm's model (parameter names unchanged, so ``vit_*_patch16_224`` weights load):

- 32x32 mixing cells are 2x2 patches of 16 pixels; a patch never straddles a cell.
- Global attention restricted to the group (MixMIM section 2.3). With one map for the batch the
  tokens are reordered once so that each group is a contiguous segment, and every block runs one
  dense attention call per segment: no query-key pair across images is computed. With one map per
  sample a boolean mask keeps the groups apart inside one call.
- The class token would carry information from one image to the other, so each group gets its own
  copy (same weights, same position) that attends within the group only.
- ``fixed_pos_embed``: MAE's fixed 2D sine-cosine positions (the class position all zeros) instead
  of timm's learnable table. ``global_pool="avg", fc_norm=False``: the final norm on every token, then
  the average of the patches (MixMIM's pooling) instead of the class token.

What MAE and MixedAE need beyond that (same parameters, so the same weights serve every method) is
the :class:`~mixmim.models.token_dropping.TokenDroppingEncoder` interface:

- :meth:`ViTEncoder.forward_kept`: the encoder on a subset of the patches (and the class token), the
  others dropped (MAE, MixedAE section 3.1), which only a plain ViT can do.
- :meth:`ViTEncoder.forward_plans`: one attention plan per block (None for global attention, or any
  :class:`~mixmim.models.token_dropping.AttentionPlan`, such as MixedAE's TopK) and an optional
  embedding added to the input of every block (MixedAE's segment embeddings, appendix B). The ViT
  computes each block's queries, keys and values and lets the plan attend; it knows no plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder, resize_groups
from mixmim.models.pos_embed import sincos_2d
from mixmim.models.token_dropping import AttentionPlan

# timm's VisionTransformer poolings.
GlobalPool = Literal["", "avg", "avgmax", "max", "token", "map", "prr"]


@dataclass
class Segments:
    """Attention within contiguous segments of the sequence (lengths ``sizes``), one dense call each:
    an :class:`~mixmim.models.token_dropping.AttentionPlan`."""

    sizes: list[int]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        outs = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)
                for qs, ks, vs in zip(*(t.split(self.sizes, dim=2) for t in (q, k, v)))]
        return torch.cat(outs, dim=2)


class GroupAttention(Attention):
    """timm's ``Attention``, whose ``attn_mask`` may also be an attention plan (anything with
    ``attend(q, k, v, dropout_p)``, e.g. :class:`Segments`); a boolean tensor mask (True = may
    attend) or None behaves as in timm."""

    def forward(self, x: Tensor, attn_mask: Any = None, is_causal: bool = False) -> Tensor:
        if not isinstance(attn_mask, AttentionPlan):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attn_mask.attend(q, k, v, self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class ViTEncoder(GroupedEncoder, VisionTransformer):
    """timm's VisionTransformer with the :class:`~mixmim.models.base.GroupedEncoder` interface: one
    stage at stride ``patch_size``. ``forward``/``forward_features``/``forward_head`` are timm's."""

    family = "vit"
    pos_embed: nn.Parameter  # timm's is None only with pos_embed="none", which this encoder never builds

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: GlobalPool = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 fixed_pos_embed: bool = False, fc_norm: bool | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        self._config = dict(img_size=list(img_size) if not isinstance(img_size, int) else img_size,
                            patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
                            fixed_pos_embed=fixed_pos_embed, fc_norm=fc_norm, drop_rate=drop_rate,
                            attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate)
        size = (img_size, img_size) if isinstance(img_size, int) else cast("tuple[int, int]", tuple(img_size))
        for side in size:
            if side % patch_size:
                raise ValueError(f"img_size={side} is not divisible by the encoder stride {patch_size}")
        VisionTransformer.__init__(
            self, img_size=size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool if class_token or global_pool != "token" else "avg", embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
            fc_norm=fc_norm, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            attn_layer=GroupAttention)
        self.img_size = size
        self.patch_size = patch_size
        grid = tuple(self.patch_embed.grid_size)
        self.grids, self.strides = [grid], [patch_size]
        self.dims, self.stage_in_dims = [embed_dim], [embed_dim]
        if fixed_pos_embed:
            table = sincos_2d(embed_dim, *grid)
            prefix = torch.zeros(self.num_prefix_tokens, embed_dim)
            self.pos_embed = nn.Parameter(torch.cat([prefix, table]).unsqueeze(0), requires_grad=False)

    def config(self) -> dict[str, Any]:
        return dict(self._config, img_size=list(self.img_size))

    # ------------------------------------------------------------------ method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """16x16 patches, each inside one mixing cell: ``groups`` change nothing."""
        return self.patch_embed(images)

    def _prefix(self, batch: int) -> Tensor | None:
        if self.cls_token is None:
            return None
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def _patches_with_positions(self, tokens: Tensor) -> Tensor:
        return tokens + self.pos_embed[:, self.num_prefix_tokens:]

    def _run_blocks(self, x: Tensor, plan: Any, layer_embed: Tensor | None = None, accumulate: bool = True) -> Tensor:
        """All blocks; ``plan`` is one attention plan for every block or a list of one per block;
        ``layer_embed`` (broadcastable to ``x``) is added to the input of every block, into the
        residual stream (``accumulate``) or only into what the block reads."""
        plans = plan if isinstance(plan, (list, tuple)) else [plan] * len(self.blocks)
        if len(plans) != len(self.blocks):
            raise ValueError(f"{len(plans)} attention plans for {len(self.blocks)} blocks")
        for blk, blk_plan in zip(self.blocks, plans):
            if layer_embed is not None:
                x = x + layer_embed
            x = self.run_block(blk, x, blk_plan)
            if layer_embed is not None and not accumulate:
                x = x - layer_embed  # the block's update stays, the embedding leaves the stream
        return x

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one."""
        return list(self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """Patch tokens ``(B, L, C)`` -> ``[(B, L, C)]`` before the final norm (the class tokens are
        dropped: the methods read the patches)."""
        b, n, c = tokens.shape
        x = self.pos_drop(self._patches_with_positions(tokens))
        ids = None
        if groups is not None:
            ids = resize_groups(groups, self.grids[0]).reshape(groups.shape[0], n)
            if num_groups is None:
                num_groups = int(ids.max()) + 1
        if stage_embeds is not None:
            if ids is None:
                raise ValueError("stage_embeds (mix embeddings) need groups: which image each token is from")
            x = x + stage_embeds[0][ids].to(x.dtype)
        cls = self._prefix(b)
        if ids is None or not restrict_attention:
            x = x if cls is None else torch.cat([cls, x], dim=1)
            return [self._run_blocks(x, None)[:, self.num_prefix_tokens:]]
        assert num_groups is not None  # set with ids
        if ids.shape[0] == 1:
            return [self._segment_forward(x, cls, ids[0], num_groups)]
        return [self._masked_forward(x, cls, ids, num_groups)]

    def _segment_forward(self, x: Tensor, cls: Tensor | None, ids: Tensor, k: int) -> Tensor:
        """One map for the batch: each group a contiguous segment (its class token copy first)."""
        order = torch.sort(ids, stable=True).indices
        counts = torch.bincount(ids, minlength=k).tolist()
        lead = 0 if cls is None else 1
        parts, patch_positions, start, offset = [], [], 0, 0
        for count in counts:
            if cls is not None:
                parts.append(cls)
            parts.append(x[:, order[start:start + count]])
            patch_positions.append(torch.arange(offset + lead, offset + lead + count))
            start, offset = start + count, offset + lead + count
        y = self._run_blocks(torch.cat(parts, dim=1), Segments([c + lead for c in counts]))
        out = torch.empty_like(x)
        out[:, order] = y[:, torch.cat(patch_positions).to(x.device)]
        return out

    def _masked_forward(self, x: Tensor, cls: Tensor | None, ids: Tensor, k: int) -> Tensor:
        """One map per sample: ``k`` class token copies in front, a same-group mask in every block."""
        b = x.shape[0]
        if cls is not None:
            x = torch.cat([cls.expand(b, k, -1) if cls.shape[1] == 1 else cls, x], dim=1)
            ids = torch.cat([torch.arange(k, device=ids.device).expand(b, -1), ids], dim=1)
        mask = (ids[:, None, :, None] == ids[:, None, None, :])
        y = self._run_blocks(x, mask)
        return y[:, k:] if cls is not None else y

    def final_norm(self, x: Tensor) -> Tensor:
        """The final LayerNorm on tokens: ``norm``, or, where timm moved it after the pooling
        (``global_pool="avg"`` with ``fc_norm``), that same layer applied to every token."""
        return self.norm(x) if not isinstance(self.norm, nn.Identity) else self.fc_norm(x)

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.final_norm(self.forward_stages(tokens, groups, **kwargs)[-1])

    # ------------------------------------------------------------------ MAE and MixedAE
    def forward_kept(self, tokens: Tensor, keep_index: Tensor) -> Tensor:
        """MAE's encoder (He et al. 2022 section 3; MixedAE section 3.1): only the kept patches are
        processed, the others are dropped, not masked. ``tokens``: (B, L, C) from :meth:`embed`;
        ``keep_index``: (B, n) positions to keep. Positions are added before gathering, so each
        kept patch keeps its own. Returns (B, P + n, C) after the final norm: the class token, then
        the kept patches in ``keep_index`` order."""
        b, _, c = tokens.shape
        x = self._patches_with_positions(tokens)
        x = x.gather(1, keep_index.to(x.device).unsqueeze(-1).expand(-1, -1, c))
        cls = self._prefix(b)
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
        return self.final_norm(self._run_blocks(self.pos_drop(x), None))

    def forward_plans(self, tokens: Tensor, plans: Sequence[Any], layer_embed: Tensor | None = None, *,
                      accumulate: bool = True) -> Tensor:
        """Patch tokens (B, L, C) -> (B, P + L, C) (the class token, then the patches) *before* the
        final norm, block i attending by ``plans[i]`` (None: global; an attention plan, e.g.
        MixedAE's TopK; a boolean (B, 1, N, N) mask over the class token and the patches).
        ``layer_embed``: (B, L, C) added to the patches at the input of every block (MixedAE's
        segment embeddings, appendix B: "added to the input of each Transformer layer"); the class
        token gets none. ``accumulate=False``: every block reads it, none keeps it in the stream."""
        b = tokens.shape[0]
        x = self._patches_with_positions(tokens)
        cls = self._prefix(b)
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
            if layer_embed is not None:
                layer_embed = torch.cat([layer_embed.new_zeros(b, self.num_prefix_tokens, layer_embed.shape[-1]),
                                         layer_embed.expand(b, -1, -1)], dim=1)
        return self._run_blocks(self.pos_drop(x), list(plans), layer_embed, accumulate)
