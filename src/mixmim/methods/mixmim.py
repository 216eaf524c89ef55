"""MixMIM / MixMAE: mix two images, encode with group-restricted attention, unmix, reconstruct both.

MixMIM paper section 2.2 and 2.3. In tensors (one mask per batch, two images):

1. ``M`` on the last grid (h x w), ``floor(L * 0.5)`` cells set; partner of image i is image B-1-i.
2. After patch embedding, sample i takes the cells where ``M_1 == 1`` from its partner (eq. 1),
   ``M_s`` being ``M`` upsampled by nearest neighbour to stage s. A 32x32 cell stays whole at every
   stage, so patch merging never mixes two images.
3. The encoder attends within groups (``M_s``), section 2.3.
4. Unmix: for each group g a decoder sequence keeps the encoder tokens of group g and puts the mask
   token everywhere else; 2B sequences are decoded (dual reconstruction).
5. Loss (eq. 2): MSE to per-patch normalised pixels on the cells hidden from each reconstructed image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mixmim.methods.base import PretrainOutput
from mixmim.methods.masking import block_groups, check_ratio, partner_sources, random_groups
from mixmim.methods.patches import normalize_patches, patchify
from mixmim.models.decoder import MaskTokenDecoder
from mixmim.models.mixmim_vit import MixMIMTransformer


@dataclass
class MixMIMConfig:
    """Options of the MixMIM method; the defaults are the paper's choices."""

    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    mask_ratio: float = 0.5
    mask_ratio_range: tuple[float, float] | None = None
    mask_type: Literal["random", "block"] = "random"
    mask_per_sample: bool = False
    num_images: int = 2

    def validate(self) -> None:
        check_ratio(self.mask_ratio)
        if self.mask_ratio_range is not None:
            low, high = self.mask_ratio_range
            check_ratio(low, "mask_ratio_range[0]")
            check_ratio(high, "mask_ratio_range[1]")
            if low > high:
                raise ValueError(f"mask_ratio_range={list(self.mask_ratio_range)} must be [low, high]")
        if self.mask_type not in ("random", "block"):
            raise ValueError(f"mask_type={self.mask_type!r}: expected 'random' or 'block'")
        if not 2 <= self.num_images <= 8:
            raise ValueError(f"num_images={self.num_images}: expected 2 to 8")


class MixMIM(nn.Module):
    """images -> loss and reconstructions. The encoder is any :class:`MixMIMTransformer`."""

    def __init__(self, encoder: MixMIMTransformer, config: MixMIMConfig | None = None, in_chans: int = 3):
        super().__init__()
        self.config = config or MixMIMConfig()
        self.config.validate()
        self.encoder = encoder
        self.cell = encoder.stride
        self.grid = encoder.grids[-1]
        self.in_chans = in_chans
        c = self.config
        self.decoder = MaskTokenDecoder(encoder.num_features, self.grid, self.cell**2 * in_chans, c.decoder_dim,
                                        c.decoder_depth, c.decoder_num_heads)

    @property
    def num_groups(self) -> int:
        return self.config.num_images

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    # ------------------------------------------------------------------ masks
    def sample_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Group ids (G, h, w) on the last grid, drawn on the CPU so runs replay on any device."""
        c = self.config
        count = batch if c.mask_per_sample else 1
        if c.mask_type == "block":
            return block_groups(self.grid, c.mask_ratio, count=count, generator=generator)
        return random_groups(self.grid, c.mask_ratio, num_groups=self.num_groups, count=count,
                             ratio_range=c.mask_ratio_range, generator=generator)

    def check_mask(self, mask: Tensor, batch: int) -> Tensor:
        """Accept (h, w), (1, h, w) or (B, h, w) masks of group ids; return (G, h, w) long."""
        h, w = self.grid
        given = tuple(mask.shape)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3 or tuple(mask.shape[1:]) != (h, w) or mask.shape[0] not in (1, batch):
            raise ValueError(f"mask of shape {given} does not fit: expected ({h}, {w}), (1, {h}, {w}) "
                             f"or ({batch}, {h}, {w}) on the last-stage grid")
        if mask.is_floating_point() and not torch.equal(mask, mask.round()):
            raise ValueError("mask must hold integer group ids (0/1 for two images)")
        mask = mask.long()
        if int(mask.min()) < 0 or int(mask.max()) >= self.num_groups:
            raise ValueError(f"mask values must lie in 0..{self.num_groups - 1}, got {int(mask.min())}..{int(mask.max())}")
        return mask

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor | None = None) -> PretrainOutput:
        self.encoder.check_input(images)
        b = images.shape[0]
        k = self.num_groups
        groups = self.sample_mask(b) if mask is None else self.check_mask(mask, b)
        groups = groups.to(images.device)
        sources = partner_sources(b, k, images.device)  # (k, B)

        tokens = self.encoder.patch_embed(images)
        mixed = self.mix(tokens, groups, sources)
        latent = self.encoder.forward_tokens(mixed, groups, num_groups=k)

        # Unmix: one decoder sequence per (group, sample), rows ordered g * B + i as in the release.
        flat = groups.reshape(groups.shape[0], -1)
        visible = torch.cat([(flat == g).expand(b, -1) for g in range(k)])  # (k*B, L)
        reconstruction = self.decoder(latent.repeat(k, 1, 1), visible)

        target = patchify(images, self.cell)
        if self.config.norm_pix_loss:
            target = normalize_patches(target)
        seq_sources = sources.reshape(-1)
        seq_target = target[seq_sources]
        hidden = ~visible
        loss = self.reconstruction_loss(reconstruction, seq_target, hidden)
        return PretrainOutput(loss=loss, reconstruction=reconstruction, mask=groups, target=seq_target,
                              hidden=hidden, sources=seq_sources)

    def mix(self, tokens: Tensor, groups: Tensor, sources: Tensor) -> Tensor:
        """Eq. 1 on the stage-1 tokens (B, L1, C): each cell of sample i is taken from image
        ``sources[g, i]`` where g is the cell's group."""
        ids = self.encoder.stage_groups(groups, 0).reshape(groups.shape[0], -1, 1)
        mixed = tokens
        for g in range(1, sources.shape[0]):
            mixed = torch.where(ids == g, tokens[sources[g]], mixed)
        return mixed

    @staticmethod
    def reconstruction_loss(prediction: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
        """Mean squared error over every value of the hidden cells (eq. 2)."""
        per_cell = (prediction.float() - target.float()).pow(2).mean(dim=-1)
        weight = hidden.to(per_cell.dtype)
        return (per_cell * weight).sum() / weight.sum().clamp(min=1)
