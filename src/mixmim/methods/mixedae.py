"""MixedAE: MAE with image mixing and homologous recognition (Chen et al., CVPR 2023, section 3 and
appendix B), on the plain ViT.

1. Mixing (section 3.1, eq. 1-2): the batch is split into groups of ``1/r`` consecutive images; a
   random mixing mask ``M`` gives every position of a mixed sample to one member of its group, each
   member supplying the same number of positions (``rL`` patches). The mask is drawn on cells of
   ``mask_cell`` pixels (appendix B: "the mask patch size is set to be 32x32"), each cell 2x2
   patches of 16. **compose** mode: one mixed sample per group (encoder batch ``B r``); **full**
   mode: ``1/r`` mixed samples per group, ``M`` drawn ``1/r`` times independently (encoder batch
   ``B``).
2. Segment embeddings (section 3.2; appendix B): one vector per member position of the group,
   shared by its patches; by default the fixed sine-cosine encoding of the member index, "added to
   the input of each Transformer layer".
3. Homologous attention (eq. 6): every query attends to its TopK keys only, K = rL, in every block
   but the first (global). The encoder is never told which image a patch is from.
4. Unmixing and reconstruction (eq. 3-4): for every member a decoder sequence keeps the encoder
   features of its own patches and puts the [MASK] token everywhere else; MSE to per-patch
   normalised pixels on the positions the member did not supply.
5. Homologous contrastive loss (eq. 7) on the encoder's output (after its final LayerNorm) through a
   linear projector to 128 dims, cosine similarity, temperature 0.25; the total loss is eq. 8,
   reconstruction + 0.1 x contrastive.

The decoder is MAE's (LayerNorm eps 1e-6), but by default without the class token: eq. 3 unmixes
the patch features only, and the class token, which attends over every image of the mixed sample,
would hand each image's decoder a summary of the other images, the heterologous shortcut section
3.2 removes (``decoder_cls_token`` switches MAE's class-token path on; docs/mae_mixedae.md).

Every ablation of Table 3 and appendix Table 7 that is a switch is a field of :class:`MixedAEConfig`
(see docs/mae_mixedae.md); the defaults are the paper's choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput, VersionedState, default_in_chans
from mixmim.methods.decoding import build_decoder
from mixmim.methods.homologous import TopK
from mixmim.methods.mae import MAE_NORM_EPS, mae_init_, require_token_dropping
from mixmim.methods.masking import balanced_assignment
from mixmim.methods.options import MixedAEConfig, group_size
from mixmim.methods.patches import masked_mse, patch_targets, patchify, unpatchify
from mixmim.models.base import resize_groups

if TYPE_CHECKING:
    from mixmim.methods.base import TokenDroppingModule


def segment_sincos(count: int, dim: int) -> Tensor:
    """(count, dim) fixed segment embeddings: the 1-D sine-cosine encoding (Vaswani et al.) of the
    member index 0..count-1, first half sines, second half cosines (MixedAE appendix B: "we utilize
    the sine-cosine encodings [52] for segment embeddings")."""
    if dim % 2:
        raise ValueError(f"sine-cosine segment embeddings need an even width, got {dim}")
    half = dim // 2
    freq = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(count, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def homologous_contrastive_loss(features: Tensor, sources: Tensor, temperature: float = 0.25,
                                positives: Literal["separate", "mean"] = "separate") -> Tensor:
    """Eq. 7 of MixedAE on the patch features of each mixed sample: for a query patch l, every patch
    l+ of the same image is a positive, the softmax runs over all other patches l' != l of the same
    mixed sample (so over every image of the group), cosine similarity over ``temperature``.

    ``features``: (S, L, D) (projected) features; ``sources``: (S, L) image of each patch.
    ``positives="separate"`` (eq. 7): one term per (l, l+); ``"mean"`` (Table 3c): one term per
    query whose single positive is the mean of the query's and all its homologous patches' features
    ("the average of both the query and all its homologous patches"), contrasted with the
    heterologous patches.

    Eq. 7 is written as a sum; here each query's terms are averaged over its positives, then over
    the queries (supervised contrastive learning's L_out, which MixedAE cites), so the loss does
    not grow with L and the weight 0.1 of eq. 8 keeps its meaning at any size. Queries with no
    homologous patch are skipped."""
    z = F.normalize(features.float(), dim=-1)
    sim = z @ z.transpose(1, 2) / temperature  # (S, L, L)
    length = sim.shape[-1]
    self_pair = torch.eye(length, dtype=torch.bool, device=sim.device)
    log_denominator = sim.masked_fill(self_pair, float("-inf")).logsumexp(dim=-1)  # over l' != l
    same = sources[:, :, None] == sources[:, None, :]
    if positives == "separate":
        pos = (same & ~self_pair).float()
        count = pos.sum(dim=-1)
        per_query = ((log_denominator[..., None] - sim) * pos).sum(dim=-1) / count.clamp(min=1)
    elif positives == "mean":
        members = same.float()
        count = members.sum(dim=-1) - 1  # homologous patches besides the query
        centre = F.normalize(members @ z, dim=-1)  # the mean's direction is all a cosine needs
        positive = (z * centre).sum(dim=-1, keepdim=True) / temperature
        # One positive, so an ordinary softmax over it and the heterologous patches: keeping the
        # homologous patches in the denominator would reward pushing them away from the query.
        others = sim.masked_fill(same, float("-inf"))
        per_query = torch.cat([positive, others], dim=-1).logsumexp(dim=-1) - positive[..., 0]
    else:
        raise ValueError(f"positives={positives!r}: expected 'separate' or 'mean'")
    valid = (count > 0).float()
    return (per_query * valid).sum() / valid.sum().clamp(min=1)


class MixedAE(VersionedState, PretrainMethod):
    """images -> eq. 8 loss, reconstructions and the TopK sampling accuracy per block."""

    name = "mixedae"
    encoder: TokenDroppingModule
    # A buffer (sine-cosine), a parameter (learnable) or None, as ``segment_embed`` says.
    segment_embed: Tensor | None
    state_version: ClassVar[int] = 2
    state_changes: ClassVar[str] = "version 2 uses LayerNorm eps 1e-6 in the decoder, as MAE's code"
    encoder_defaults: ClassVar[dict[str, dict[str, Any]]] = {"vit": {"fixed_pos_embed": True}}  # MAE's positions

    def __init__(self, encoder: nn.Module, config: MixedAEConfig | None = None, in_chans: int | None = None):
        super().__init__()
        self.config = (config or MixedAEConfig()).with_decoder_of(None)  # sizes left at None: MAE's decoder
        self.config.validate()
        require_token_dropping(encoder, "MixedAE")
        encoder = cast("TokenDroppingModule", encoder)  # a GroupedEncoder that drops tokens, as just checked
        c = self.config
        self.encoder = encoder
        self.k = group_size(c.mixing_ratio)
        self.cell = encoder.strides[0]  # one predicted patch per token: 16x16 pixels
        self.grid = cast("tuple[int, int]", tuple(encoder.grids[0]))
        self.length = self.grid[0] * self.grid[1]
        self.in_chans = default_in_chans(encoder) if in_chans is None else in_chans
        h, w = encoder.img_size
        if c.mask_cell % self.cell or h % c.mask_cell or w % c.mask_cell:
            raise ValueError(f"mask_cell={c.mask_cell} must be a multiple of the patch size {self.cell} and divide "
                             f"the image size {h}x{w}")
        self.mask_factor = c.mask_cell // self.cell
        self.mask_grid = (h // c.mask_cell, w // c.mask_cell)
        if self.mask_grid[0] * self.mask_grid[1] < self.k:
            raise ValueError(f"{self.mask_grid[0] * self.mask_grid[1]} mixing cells of {c.mask_cell} px cannot be "
                             f"shared by 1/r = {self.k} images")
        depth = encoder.num_blocks
        if c.attention == "homologous" and c.global_layers > depth:
            raise ValueError(f"global_layers={c.global_layers} exceeds the encoder's {depth} blocks")
        ratio = c.mixing_ratio if c.topk_ratio is None else c.topk_ratio
        self.topk = max(1, round(float(ratio) * self.length))  # K = rL (section 4.1)

        dim = encoder.embed_dim
        # MAE's decoder (section 4.1: "8 Transformer layers with the hidden dimension as 512").
        self.decoder = build_decoder(encoder.num_features, self.grid, self.cell, self.in_chans, c, MAE_NORM_EPS)
        if c.segment_embed == "sincos":
            self.register_buffer("segment_embed", segment_sincos(self.k, dim), persistent=False)
        elif c.segment_embed == "learnable":
            # Different random vectors from the start, so the images differ before any update.
            self.segment_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(self.k, dim), std=0.02))
        else:
            self.segment_embed = None
        self.projector: nn.Linear | None = None
        if c.contrastive_weight > 0:
            self.projector = nn.Linear(encoder.num_features, c.contrastive_dim)
            nn.init.xavier_uniform_(self.projector.weight)
            nn.init.zeros_(self.projector.bias)
        self.init_state_version()
        if c.xavier_init:
            mae_init_(encoder)

    @property
    def batch_multiple(self) -> int:
        """Every (micro-)batch must split into whole groups of 1/r images."""
        return self.k

    @property
    def num_groups(self) -> int:
        """Images per group (1/r); the pictures and ``mixmim reconstruct`` take a multiple of it."""
        return self.k

    def lr_batch(self, global_batch: int) -> int:
        """The batch the lr scaling rule counts: the images of the step, or (``lr_batch="samples"``)
        the mixed samples the encoder sees (B r in compose mode, B in full mode)."""
        if self.config.lr_batch == "samples":
            return int(global_batch) // self.k * self.samples_per_group()
        return int(global_batch)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the 1-d parameters: MixedAE builds on MAE's code, which decays every other
        parameter (class token, mask token, a learnable segment table and the projector included)."""
        return set()

    # ------------------------------------------------------------------ mixing (section 3.1)
    def check_batch(self, batch: int) -> int:
        """The number of groups; a batch that 1/r does not divide is refused."""
        if batch % self.k:
            raise ValueError(f"MixedAE mixes groups of 1/r = {self.k} images (mixing_ratio="
                             f"{self.config.mixing_ratio}); a batch of {batch} images is not divisible by {self.k}")
        return batch // self.k

    def samples_per_group(self) -> int:
        return 1 if self.config.mode == "compose" else self.k

    def sample_masks(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(S, h, w) long on the patch grid: for each mixed sample, which member of its group each
        patch comes from; S = B r (compose) or B (full: 1/r independent draws per group)."""
        count = self.check_batch(batch) * self.samples_per_group()
        cells = balanced_assignment(self.mask_grid, self.k, count, generator)
        return resize_groups(cells, self.grid)

    def check_masks(self, masks: Tensor, batch: int) -> Tensor:
        """Accept (S, h, w) member ids on the patch grid (S = B r or B as the mode says)."""
        count = self.check_batch(batch) * self.samples_per_group()
        if masks.ndim != 3 or masks.shape[0] != count or tuple(masks.shape[1:]) != self.grid:
            raise ValueError(f"mask of shape {tuple(masks.shape)} does not fit: expected ({count}, {self.grid[0]}, "
                             f"{self.grid[1]}) member ids on the patch grid ({self.config.mode} mode)")
        masks = masks.long()
        if int(masks.min()) < 0 or int(masks.max()) >= self.k:
            raise ValueError(f"mask values must lie in 0..{self.k - 1}")
        return masks

    def first_images(self, samples: int, device: torch.device | None = None) -> Tensor:
        """(S,) batch index of the first image of each mixed sample's group."""
        return torch.arange(samples, device=device) // self.samples_per_group() * self.k

    def sample_sources(self, masks: Tensor) -> Tensor:
        """(S, L) batch index of the image each patch of each mixed sample comes from."""
        s = masks.shape[0]
        return self.first_images(s, masks.device)[:, None] + masks.reshape(s, -1)

    def mix(self, images: Tensor, masks: Tensor) -> Tensor:
        """Eq. 1 in pixels: (S, C, H, W) mixed samples, each patch taken from its member image at the
        same place. A patch embedding of these equals the mixing of the embedded patches."""
        sources = self.sample_sources(masks)
        patches = patchify(images, self.cell)
        positions = torch.arange(self.length, device=images.device)
        return unpatchify(patches[sources, positions], self.cell, self.grid, images.shape[1])

    # ------------------------------------------------------------------ encoder (section 3.2)
    def segment_table(self) -> Tensor | None:
        """(1/r, C) segment embeddings, one per member of a group, or None."""
        return self.segment_embed

    def attention_plans(self, members: Tensor | None = None) -> list[TopK | None]:
        """One plan per encoder block: None (global attention) for the first ``global_layers``
        blocks, homologous attention with K = rL after (eq. 6). ``members`` (S, L) is handed to
        the plans only to measure the TopK sampling accuracy; the attention never reads it."""
        depth = self.encoder.num_blocks
        c = self.config
        if c.attention != "homologous" or self.topk >= self.length:  # K = L: "no sampling" (Table 3d)
            return [None] * depth
        first = min(c.global_layers, depth)
        sources = members if c.measure_topk else None
        return [None] * first + [TopK(self.topk, sources=sources) for _ in range(depth - first)]

    def encode(self, mixed: Tensor, masks: Tensor) -> tuple[Tensor, list[TopK | None]]:
        """(S, P + L, C) features of the mixed samples before the final norm (P prefix tokens: the
        class token; none with masked attention, which keeps one copy per image inside the
        encoder), and the plans used."""
        tokens = self.encoder.embed(mixed)
        members = masks.reshape(masks.shape[0], -1)
        if self.config.attention == "masked":
            features = self.encoder.forward_stages(tokens, masks, num_groups=self.k)[-1]
            return features, []
        table = self.segment_table()
        layer_embed = None
        if table is not None:
            segments = table.to(tokens.dtype)[members]
            if self.config.segment_embed_every_layer:
                layer_embed = segments
            else:
                tokens = tokens + segments  # beside the positions, once (section 3.2)
        plans = self.attention_plans(members)
        features = self.encoder.forward_plans(tokens, plans, layer_embed,
                                              accumulate=self.config.segment_embed_accumulate)
        return features, plans

    def prefix_count(self) -> int:
        """Tokens in front of the patches in :meth:`encode`'s output."""
        return 0 if self.config.attention == "masked" else self.encoder.num_prefix_tokens

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor | None = None, *, picture: bool | None = None) -> PretrainOutput:
        """``mask``: (S, h, w) member ids per mixed sample on the patch grid (drawn when None)."""
        self.encoder.check_input(images)
        b = images.shape[0]
        masks = self.sample_masks(b) if mask is None else self.check_masks(mask, b)
        masks = masks.to(images.device)
        c = self.config
        mixed = self.mix(images, masks)
        encoded, plans = self.encode(mixed, masks)
        lead = self.prefix_count()
        normed = self.encoder.final_norm(encoded)
        prefix, latent, pre_norm = normed[:, :lead], normed[:, lead:], encoded[:, lead:]

        # Unmixing (eq. 3): sequence s * k + t keeps the patches of member t of mixed sample s.
        s = masks.shape[0]
        members = masks.reshape(s, -1)
        index = torch.arange(self.k, device=images.device)
        visible = (members[:, None, :] == index[None, :, None]).reshape(s * self.k, -1)
        seq_sources = (self.first_images(s, images.device)[:, None] + index[None, :]).reshape(-1)
        cls = prefix.repeat_interleave(self.k, dim=0) if c.decoder_cls_token and lead else None
        reconstruction = self.decoder(latent.repeat_interleave(self.k, dim=0), visible, prefix=cls)
        seq_target = patch_targets(images, self.cell, c.norm_pix_loss)[seq_sources]
        hidden = ~visible
        recon_loss = masked_mse(reconstruction, seq_target, hidden)  # eq. 4

        loss = c.reconstruction_weight * recon_loss
        metrics: dict[str, Tensor] = {"recon_loss": recon_loss.detach()}
        if self.projector is not None:
            features = latent if c.contrastive_features == "post_norm" else pre_norm
            contrastive = homologous_contrastive_loss(self.projector(features), members,
                                                      c.contrastive_temperature, c.contrastive_positives)
            loss = loss + c.contrastive_weight * contrastive  # eq. 8
            metrics["contrastive_loss"] = contrastive.detach()
        for i, plan in enumerate(plans):
            if isinstance(plan, TopK) and plan.accuracy is not None:
                metrics[f"topk_acc_layer{i + 1}"] = plan.accuracy
        # One host synchronisation for all values.
        values = torch.stack([v.float() for v in metrics.values()]).tolist()
        out = PretrainOutput(loss=loss, mask=masks, metrics=dict(zip(metrics, values)))
        if self.wants_picture(picture):
            # What the encoder saw, one picture per image: the mixed sample whose reconstruction of
            # that image the pictures show (the group's first one).
            first = torch.arange(0, s, self.samples_per_group(), device=images.device)
            out.picture = Picture(inputs=mixed[first].repeat_interleave(self.k, dim=0).detach(),
                                  reconstruction=reconstruction.detach(), hidden=hidden, sources=seq_sources,
                                  cell=self.cell, norm_pix=c.norm_pix_loss, target=seq_target)
        return out
