"""What every encoder offers every method: which image each position belongs to.

A *group map* is an integer tensor ``(G, h, w)``: ``G == 1`` when the whole batch shares one map
(the release's choice), ``G == B`` when each sample has its own; the value ``g`` at a position means
"this position holds image g of the sample's mix" (0 = the sample's own image, MixMIM eq. 1). The
map lives on a grid of square cells that evenly divides the image (32-pixel cells for MixMIM, the
last stage's grid of a stride-32 encoder); :func:`resize_groups` brings it to any grid whose cells
are whole multiples or divisions of its cells (nearest neighbour, MixMIM section 2.3).

An encoder turns pixels into tokens and tokens into features such that, given a group map, no
output position receives anything from a position of another group: attention restricted to the
group (section 2.3), mixed convolution and per-image normalisation for ConvNets (supplement
section 9). Methods use nothing else, so a method never knows which backbone it drives::

    tokens = encoder.embed(pixels, groups)           # (B, L0, C0) on encoder.grids[0]
    feats = encoder.forward_tokens(tokens, groups)   # (B, L, C) on encoder.grids[-1], normalised

and a backbone never knows which loss it feeds. The classification path (``forward``,
``forward_features``, ``forward_head``) is the backbone's own (timm's, for timm families), so timm
weights give timm's logits.

Every family also lists its repeated blocks (:meth:`GroupedEncoder.repeated_blocks`, what FSDP
shards and ``torch.compile`` compiles one by one) and runs each through
:meth:`GroupedEncoder.run_block`, which applies activation checkpointing when it is enabled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

if TYPE_CHECKING:
    from mixmim.models.attention import AttentionImpl


def use_matmul_attention(model: nn.Module) -> int:
    """Turn off the fused SDPA kernel of every timm-style attention layer of ``model`` (``fused_attn``),
    so that they compute softmax(q k^T) v with matmuls; returns how many. For bf16 on a CPU: PyTorch's
    CPU flash kernel runs bf16 slower than float32, 1.4-4.7x slower than the matmul path at ViT and
    decoder shapes (forward and backward; benchmarks/README.md), while bf16 matmuls run at twice
    float32's rate. The matmul path keeps the (L, L) probabilities, which a CPU's memory holds."""
    count = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            setattr(module, "fused_attn", False)  # noqa: B010  (a plain attribute of timm's layers)
            count += 1
    return count


def upload(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``: through pinned memory without waiting, on CUDA (the caching host
    allocator keeps the pinned block alive until the copy is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def upload_groups(groups: Tensor, device: torch.device) -> Tensor:
    """A group map drawn on the host, on ``device``, remembering its host copy (:func:`host_groups`):
    layers that plan on the host (MixMIM's gathered attention) read the copy instead of copying the
    map back from the device, which would wait for all queued work."""
    if groups.device == torch.device(device):
        return groups
    moved = upload(groups, torch.device(device))
    if groups.device.type == "cpu":
        moved._host_groups = groups  # type: ignore[attr-defined]
    return moved


def host_groups(groups: Tensor) -> Tensor | None:
    """The host copy of a group map (itself when it is on the host), or None when there is none."""
    if groups.device.type == "cpu":
        return groups
    return getattr(groups, "_host_groups", None)


def resize_groups(groups: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resampling of a ``(G, h, w)`` group map to ``size = (H, W)``, where each
    side is a whole multiple or a whole division of the map's side (cells stay aligned)."""
    h, w = groups.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return groups
    for old, new in ((h, out_h), (w, out_w)):
        if (new % old) and (old % new):
            raise ValueError(f"group map of {h}x{w} cells cannot be resampled to {out_h}x{out_w}: the cells of one "
                             "must be whole multiples of the other's")
    if out_h >= h:
        groups = groups.repeat_interleave(out_h // h, dim=-2)
    else:
        groups = groups[..., :: h // out_h, :]
    if out_w >= w:
        groups = groups.repeat_interleave(out_w // w, dim=-1)
    else:
        groups = groups[..., :: w // out_w]
    return groups


class GroupedEncoder:
    """The interface (a mixin) every encoder family implements; see the module docstring.

    Attributes a family sets in its constructor:

    - ``img_size``: (H, W) the encoder is built for; ``grids``: per stage, the (h, w) token grid;
      ``strides``: per stage, pixels per token; ``dims``: per stage, the output width;
      ``stage_in_dims``: per stage, the width of the tokens entering it (where a mix embedding is
      added); ``embed_dim``: width of :meth:`embed`'s tokens; ``num_features``: final width.
    - ``family``: registry family name (class attribute).

    Methods a family implements: :meth:`embed`, :meth:`forward_stages`, :meth:`forward_tokens`,
    :meth:`config`, :meth:`repeated_blocks`; its stages run every block through :meth:`run_block`.
    """

    family: str = ""
    img_size: tuple[int, int]
    grids: list[tuple[int, int]]
    strides: list[int]
    dims: list[int]
    stage_in_dims: list[int]
    embed_dim: int
    num_features: int
    # Activation checkpointing of every block run through run_block (set_grad_checkpointing).
    block_checkpointing: bool = False
    # The classification path and timm's feature API, which every family has (timm's, or its own).
    feature_info: list[dict[str, Any]]
    forward_features: Callable[..., Tensor]
    forward_head: Callable[..., Tensor]
    forward_intermediates: Callable[..., Any]

    # ------------------------------------------------------------------ geometry
    @property
    def num_stages(self) -> int:
        return len(self.grids)

    @property
    def stride(self) -> int:
        """Pixels per token of the last stage: the smallest mixing cell that keeps images apart."""
        return self.strides[-1]

    def stage_groups(self, groups: Tensor, stage: int) -> Tensor:
        """A group map on the grid of ``stage``."""
        return resize_groups(groups, self.grids[stage])

    def check_input(self, images: Tensor) -> None:
        """Raise a ValueError naming the size when the images do not fit this encoder."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        for side in (h, w):
            if side % self.stride:
                raise ValueError(f"input size {h}x{w} is not divisible by the encoder stride {self.stride}")
        if (h, w) != tuple(self.img_size):
            raise ValueError(f"input size {h}x{w} differs from the model's img_size {self.img_size[0]}x"
                             f"{self.img_size[1]}; build the model with img_size={h} (weights load through "
                             "mixmim.models.resize.resize_state_dict)")

    # ------------------------------------------------------------------ the method-facing path
    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """Pixels -> ``(B, L0, C0)`` tokens on ``grids[0]``. With ``groups`` (any aligned grid) no
        token is computed from pixels of another group (a mixed convolution where the embedding
        looks beyond a cell); positions are not added here."""
        raise NotImplementedError

    def forward_stages(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> list[Tensor]:
        """Every stage's output ``(B, L_s, C_s)`` from :meth:`embed`'s tokens. ``groups``: which image
        each position holds (on a grid no finer than the last stage's); ``restrict_attention``
        keeps the groups apart (masked self-attention, or mixed convolution); ``stage_embeds``: one
        ``(num_groups, stage_in_dims[s])`` table per stage added to each token by group at the start
        of the stage (the mix embedding of MixMIM section 2.3, Table 10)."""
        raise NotImplementedError

    def forward_tokens(self, tokens: Tensor, groups: Tensor | None = None, *, restrict_attention: bool = True,
                       stage_embeds: Sequence[Tensor] | None = None, num_groups: int | None = None) -> Tensor:
        """Normalised last-stage tokens ``(B, L, C)``: what a decoder or a prediction head reads."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this encoder (stored beside exported weights)."""
        raise NotImplementedError

    def repeated_blocks(self) -> list[nn.Module]:
        """The repeated blocks in the order they run (transformer blocks, bottlenecks): the units FSDP
        shards one by one and :meth:`compile_blocks` compiles. They do not nest; everything else
        (embeddings, merging and downsampling layers, norms, heads) is outside them."""
        raise NotImplementedError(f"{type(self).__name__} does not list its repeated blocks")

    # ------------------------------------------------------------------ the frame every family shares
    def run_block(self, blk: nn.Module, *args: Any) -> Any:
        """``blk(*args)``, with activation checkpointing when it is enabled and gradients are on: the
        block's activations are recomputed in the backward instead of kept."""
        if self.block_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (:meth:`run_block`); for timm families also timm's own
        switch, so that timm's classification forward checkpoints as well."""
        self.block_checkpointing = enable
        timm_switch = getattr(super(), "set_grad_checkpointing", None)
        if timm_switch is not None:
            timm_switch(enable)

    def check_stage_embeds(self, stage_embeds: Sequence[Tensor] | None, groups: Tensor | None) -> None:
        """Raise a ValueError unless ``stage_embeds`` is None or one table per stage with a group map."""
        if stage_embeds is None:
            return
        if groups is None:
            raise ValueError("stage_embeds (mix embeddings) need groups: which image each token is from")
        if len(stage_embeds) != self.num_stages:
            raise ValueError(f"stage_embeds has {len(stage_embeds)} tables, the encoder {self.num_stages} stages")

    # ------------------------------------------------------------------ evaluation helpers
    def pooled_features(self, images: Tensor) -> Tensor:
        """``(B, C)`` pre-logits features of the classification path (k-NN, linear probe)."""
        return self.forward_head(self.forward_features(images), pre_logits=True)

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch attention implementations where a family has several (no-op otherwise)."""

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every block of :meth:`repeated_blocks` in place (the group plans and masks
        are built outside the blocks, so they stay out of the graphs). Static shapes unless
        ``dynamic`` is given: the blocks of each stage see one shape, and after the second stage's
        recompilation Dynamo's automatic dynamic shapes made a symbolic graph that Inductor (torch
        2.14) failed to generate under a bf16 autocast ("expected [s20] to have been codegen-ed")."""
        compile_kwargs.setdefault("dynamic", False)
        for blk in self.repeated_blocks():
            blk.compile(**compile_kwargs)


def check_groups(groups: Tensor, batch: int) -> None:
    """A group map must be (1 or B, h, w) integers."""
    if groups.ndim != 3 or groups.shape[0] not in (1, batch) or groups.is_floating_point():
        raise ValueError(f"group map of shape {tuple(groups.shape)} and dtype {groups.dtype}: expected integer ids "
                         f"of shape (1, h, w) or ({batch}, h, w)")
