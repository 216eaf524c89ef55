"""The MixMIM hierarchical encoder (MixMIM paper section 2.2).

A Swin Transformer made simpler: patch 4 with LayerNorm, fixed 2D sine-cosine absolute positions,
four stages of pre-norm blocks with relative position bias inside large windows (14/14/14/7, which
makes stages 3 and 4 global at 224), no shifted windows, patch merging between stages, a final
LayerNorm. Every block can restrict attention to tokens of the same image (group), the groups given
on the last stage's grid and upsampled by nearest neighbour to each stage.

Parameter and module names follow the public release, so its checkpoints load with few renames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from mixmim.models.attention import AttentionImpl, GroupLayout, WindowAttention, window_partition, window_reverse
from mixmim.models.base import GroupedEncoder, host_groups
from mixmim.models.pos_embed import sincos_2d


class MixMIMBlock(nn.Module):
    """Pre-norm transformer block: window attention (group-restricted) then MLP, with drop path."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, attn_impl: AttentionImpl = "auto"):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, hw: tuple[int, int], layout: GroupLayout | None) -> Tensor:
        h, w = hw
        b, _, c = x.shape
        ws = self.window_size
        windows = window_partition(self.norm1(x).reshape(b, h, w, c), ws)
        attended = window_reverse(self.attn(windows, layout), ws, h, w).reshape(b, h * w, c)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation (Swin v1 order), LayerNorm, linear 4C -> 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = hw
        b, _, c = x.shape
        x = x.reshape(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, (h // 2) * (w // 2), 4 * c)))


class MixMIMStage(nn.Module):
    """Blocks at one resolution, then (except for the last stage) patch merging, which the encoder
    applies after taking the stage's output."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_sizes: Sequence[int], mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float], downsample: bool,
                 attn_impl: AttentionImpl):
        super().__init__()
        self.blocks = nn.ModuleList([
            MixMIMBlock(dim, num_heads, window_sizes[i], mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i], attn_impl)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, hw: tuple[int, int], groups: Tensor | None, num_groups: int,
                run_block: Callable[..., Tensor] | None = None, host: Tensor | None = None) -> Tensor:
        """The blocks on ``x`` (B, h*w, C); ``groups`` (G, h, w) restrict attention (``host``: the
        same map in host memory, which the attention plans are built from). ``run_block(blk, *args)``
        runs each block (the encoder's :meth:`~mixmim.models.base.GroupedEncoder.run_block`, which
        checkpoints); by default the block is called."""
        layouts: dict[int, GroupLayout] = {}  # one per window size: the plan is built once per stage
        for blk in self.blocks:
            layout = None
            if groups is not None:
                ws = cast(MixMIMBlock, blk).window_size
                if ws not in layouts:
                    layouts[ws] = GroupLayout.from_grid(groups, ws, num_groups, host)
                layout = layouts[ws]
            x = blk(x, hw, layout) if run_block is None else run_block(blk, x, hw, layout)
        return x


def _per_block(value: int | Sequence[int], depth: int, stage: int) -> list[int]:
    if isinstance(value, int):
        return [value] * depth
    value = list(value)
    if len(value) != depth:
        raise ValueError(f"window_size for stage {stage + 1} lists {len(value)} blocks, the stage has {depth}")
    return value


def _take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``, which annotates a list (for TorchScript) but reads any sequence."""
    return feature_take_indices(count, indices if indices is None or isinstance(indices, int) else list(indices))


class MixMIMTransformer(GroupedEncoder, nn.Module):
    """The MixMIM encoder; with ``num_classes > 0`` it is the fine-tuning classifier (average pooling
    of the last stage after the final norm, then a linear head), as in the release."""

    family = "mixmim"
    norm: nn.Module  # LayerNorm; an Identity once pruned (prune_intermediate_layers)

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int | Sequence[int | Sequence[int]] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        learnable_pos_embed: bool = False,
        attention_impl: AttentionImpl = "auto",
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else cast("tuple[int, int]", tuple(img_size))
        num_stages = len(depths)
        if isinstance(window_size, int):  # one window for every stage
            window_size = [window_size] * num_stages
        if not (len(num_heads) == len(window_size) == num_stages):
            raise ValueError(f"depths, num_heads and window_size must have one entry per stage, got "
                             f"{len(depths)}, {len(num_heads)}, {len(window_size)}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        stride = patch_size * 2 ** (num_stages - 1)
        for side in img_size:
            if side % stride:
                raise ValueError(f"img_size={side} is not divisible by the encoder stride {stride}")
        self.depths, self.num_heads = list(depths), list(num_heads)
        self.num_classes = num_classes
        self.dims = [embed_dim * 2**i for i in range(num_stages)]
        self.stage_in_dims = list(self.dims)
        self.num_features = self.dims[-1]
        self.strides = [patch_size * 2**i for i in range(num_stages)]
        self.grids = [(img_size[0] // s, img_size[1] // s) for s in self.strides]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      strict_img_size=False)
        table = sincos_2d(embed_dim, *self.grids[0]).unsqueeze(0)
        self.absolute_pos_embed = nn.Parameter(table, requires_grad=learnable_pos_embed)

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.window_sizes: list[list[int]] = []
        self.layers = nn.ModuleList()
        for i in range(self.num_stages):
            gh, gw = self.grids[i]
            # A window at least as large as the feature map is global attention (release behaviour).
            windows = [min(ws, gh, gw) if ws >= min(gh, gw) else ws for ws in _per_block(window_size[i], depths[i], i)]
            for ws in windows:
                if gh % ws or gw % ws:
                    raise ValueError(f"window_size={ws} does not divide the stage-{i + 1} feature map {gh}x{gw}")
            self.window_sizes.append(windows)
            start = sum(depths[:i])
            self.layers.append(MixMIMStage(self.dims[i], depths[i], num_heads[i], windows, mlp_ratio, qkv_bias,
                                           drop_rate, attn_drop_rate, rates[start:start + depths[i]],
                                           downsample=i < self.num_stages - 1, attn_impl=attention_impl))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # timm's feature API: each stage's output before its patch merging (forward_intermediates).
        self.feature_info = [dict(num_chs=d, reduction=s, module=f"layers.{i}")
                             for i, (d, s) in enumerate(zip(self.dims, self.strides))]
        # The release initialises linear layers and norms only; the patch-embedding convolution keeps
        # PyTorch's default (MAE's xavier on the flattened kernel is not applied there).
        self.apply(_init_weights)

    # ------------------------------------------------------------------ configuration helpers
    @property
    def attention_impl(self) -> str:
        return cast(MixMIMBlock, cast(MixMIMStage, self.layers[0]).blocks[0]).attn.impl

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch every block between the reference, fast and flex attention paths."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.impl = impl

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ``MixMIMBlock`` of every stage, in order."""
        return [blk for stage in cast("Iterable[MixMIMStage]", self.layers) for blk in stage.blocks]

    # Layer-wise lr decay as the release's ``get_layer_id_for_mixmim``: the final norm and the head share
    # the last block's layer id, while the number of layers counts one more, so their scale is decay^1
    # (never 1.0). timm's factory gives the top id scale 1.0; this offset adds the missing factor.
    layer_decay_offset = 1

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the 1-d parameters: the release's fine-tuning model declares an empty set, so
        its relative position bias tables are decayed (the fixed positions are not trained at all)."""
        return set()

    def group_matcher(self, coarse: bool = False):
        """timm's parameter grouping (used by ``timm.optim`` for layer-wise lr decay, MixMIM section 8):
        a function from parameter name to an ordinal; equal ordinals share a layer.

        As the release's ``get_layer_id_for_mixmim``: embeddings (``patch_embed``, ``absolute_pos_embed``)
        come first, then every block of every stage is one layer (``coarse``: one layer per stage), the
        patch merging at the end of stage i counted with the first block of stage i + 1 (it produces
        that stage's input), and the final norm and the head with the last block.
        """
        starts = [sum(self.depths[:i]) for i in range(self.num_stages)]
        last = (1, self.num_stages - 1) if coarse else (1, sum(self.depths) - 1)

        def ordinal(name: str) -> tuple[int, ...]:
            parts = name.split(".")
            if parts[0] in ("patch_embed", "absolute_pos_embed"):
                return (0,)
            if parts[0] == "layers":
                stage = int(parts[1])
                block = int(parts[3]) if parts[2] == "blocks" else None
                if block is None:  # layers.<i>.downsample.*
                    stage, block = stage + 1, 0
                return (1, stage) if coarse else (1, starts[stage] + block)
            return last

        return ordinal

    # ------------------------------------------------------------------ forward passes
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """Patch embedding (4x4 patches, LayerNorm): each token sees only its own patch, which lies
        inside one mixing cell, so ``groups`` change nothing."""
        return self.patch_embed(images)

    def config(self) -> dict:
        return dict(img_size=list(self.img_size), patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depths=list(self.depths), num_heads=list(self.num_heads),
                    window_size=[list(w) if len(set(w)) > 1 else w[0] for w in self.window_sizes],
                    in_chans=self.patch_embed.proj.in_channels, num_classes=self.num_classes,
                    learnable_pos_embed=self.absolute_pos_embed.requires_grad)

    def forward_stages(self, x: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """Run the four stages on patch embeddings ``x`` (B, L1, C) and return each stage's output
        (before its patch merging).

        ``groups``: (G, h, w) integer ids on the last stage's grid or a coarser aligned one (G is 1 for
        a mask shared by the batch, else B): which image each token came from. With ``restrict_attention`` a token
        attends only
        to its own group (masked self-attention, section 2.3). ``stage_embeds``: one (num_groups, C_s)
        table per stage whose rows are added to each token by group at the start of the stage (the
        "mix embedding" of section 2.3).
        """
        return self._run_stages(x, groups, restrict_attention, stage_embeds, num_groups, len(self.layers))

    def _run_stages(self, x: Tensor, groups: Tensor | None, restrict_attention: bool,
                    stage_embeds: Sequence[Tensor] | None, num_groups: int | None, count: int) -> list[Tensor]:
        """:meth:`forward_stages` for the first ``count`` stages."""
        host = host_groups(groups) if groups is not None else None  # plans are built from it, not from `groups`
        if groups is not None and num_groups is None:
            num_groups = int((host if host is not None else groups).max()) + 1
        if groups is not None:
            groups = self.stage_groups(groups, self.num_stages - 1)
            host = self.stage_groups(host, self.num_stages - 1) if host is not None else None
        self.check_stage_embeds(stage_embeds, groups)
        x = x + self.absolute_pos_embed
        outs = []
        for i, stage in enumerate(cast("Iterable[MixMIMStage]", self.layers[:count])):
            gh, gw = self.grids[i]
            ids = self.stage_groups(groups, i) if groups is not None else None
            if stage_embeds is not None:
                assert ids is not None  # check_stage_embeds: stage embeddings come with a group map
                x = x + stage_embeds[i][ids.reshape(ids.shape[0], -1)].to(x.dtype)
            host_ids = self.stage_groups(host, i) if host is not None and restrict_attention else None
            x = stage(x, (gh, gw), ids if restrict_attention else None, num_groups or 1, self.run_block, host_ids)
            outs.append(x)
            if stage.downsample is not None and i + 1 < count:
                x = stage.downsample(x, (gh, gw))
        return outs

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, **kwargs) -> Tensor:
        """Patch embeddings -> normalised last-stage tokens (B, L4, C4)."""
        return self.norm(self.forward_stages(tokens, groups, **kwargs)[-1])

    def forward_features(self, images: Tensor, groups: Tensor | None = None, **kwargs) -> Tensor:
        self.check_input(images)
        return self.forward_tokens(self.embed(images, groups), groups, **kwargs)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = tokens.mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    # ------------------------------------------------------------------ timm's feature API
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API (as timm's Swin Transformer): the outputs of the stages ``indices`` (None:
        all; an int n: the last n; a sequence: those, negative from the end), each taken before the
        stage's patch merging, as ``(B, C_s, h_s, w_s)`` maps (``output_fmt="NLC"``: ``(B, L_s, C_s)``
        tokens); ``norm`` applies the final norm to the last stage's. ``stop_early`` runs no stage
        beyond the last one asked for. Returns the maps, or (the final normalised tokens of the last
        stage run, the maps)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        take, max_index = _take_indices(len(self.layers), indices)
        self.check_input(x)
        last = len(self.layers) - 1
        outs = self._run_stages(self.embed(x), None, True, None, None, max_index + 1 if stop_early else last + 1)
        maps = []
        for i in take:
            y = self.norm(outs[i]) if norm and i == last else outs[i]
            if output_fmt == "NCHW":
                y = y.reshape(y.shape[0], *self.grids[i], -1).permute(0, 3, 1, 2).contiguous()
            maps.append(y)
        if intermediates_only:
            return maps
        return (self.norm(outs[-1]) if len(outs) == last + 1 else outs[-1]), maps

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the stages ``indices`` (as :meth:`forward_intermediates`) do not need, as timm's
        models do: the later stages, the patch merging after the last kept stage, the final norm
        (sized for the last stage; also with ``prune_norm``) and the head (with ``prune_head``). The
        per-stage geometry is cut to match, so the encoder stays consistent. Returns the indices."""
        take, max_index = _take_indices(len(self.layers), indices)
        keep = max_index + 1
        prune_end = keep < len(self.layers)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[:keep]
        if prune_end:
            cast(MixMIMStage, self.layers[-1]).downsample = None
            for name in ("grids", "strides", "dims", "stage_in_dims", "depths", "num_heads", "window_sizes",
                         "feature_info"):
                setattr(self, name, getattr(self, name)[:keep])
            self.num_features = self.dims[-1]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new linear head for ``num_classes`` (0: none; pooled features) on the average pooling
        (timm's interface; ``global_pool`` must stay average pooling)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: the MixMIM encoder pools by averaging ('avg')")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    # xavier_uniform for every linear layer, as in ViT and the release (paper section 8).
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
