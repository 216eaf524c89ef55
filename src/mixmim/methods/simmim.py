"""SimMIM on any encoder: the [MASK]-token baseline (SimMIM paper, section 3; MixMAE supplement
Table 8 compares against it).

1. A random mask on a grid of ``mask_cell``-pixel cells (32 by default, the last-stage patch of
   Swin), ``ceil(L * 0.6)`` cells masked, one mask per image (section 3.1).
2. After patch embedding a learnable mask token replaces every masked stage-1 token; the
   positions are added after, as for any token. The encoder attends over the whole image.
3. A linear prediction head maps each last-stage token to its 32x32x3 pixels (section 3.3).
4. l1 loss on the raw pixels of the masked area only (section 3.4); no per-patch normalisation by
   default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.methods.base import PretrainOutput
from mixmim.methods.masking import as_grid_masks, check_ratio, upsample_groups
from mixmim.methods.patches import normalize_patches, patchify
from mixmim.models.base import resize_groups

LOSSES: tuple[str, ...] = ("l1", "smooth_l1", "l2")


@dataclass
class SimMIMConfig:
    """Options of SimMIM; the defaults are the paper's (section 4.1: random masking, 32x32 cells,
    ratio 0.6, linear head, l1 loss). ``loss`` also offers the smooth-l1 and l2 rows of its Table 4;
    ``mask_cell`` may be any multiple of the encoder's patch size (its Table 1 uses 4 to 64)."""

    mask_ratio: float = 0.6
    mask_cell: int = 32
    mask_per_sample: bool = True
    norm_pix_loss: bool = False
    loss: Literal["l1", "smooth_l1", "l2"] = "l1"

    def validate(self) -> None:
        check_ratio(self.mask_ratio)
        if isinstance(self.mask_cell, bool) or not isinstance(self.mask_cell, int) or self.mask_cell < 1:
            raise ValueError(f"mask_cell={self.mask_cell!r}: expected a positive number of pixels")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")


class SimMIM(nn.Module):
    """images -> l1 loss on the masked pixels, with a learnable mask token at the encoder input."""

    def __init__(self, encoder: nn.Module, config: SimMIMConfig | None = None, in_chans: int = 3):
        super().__init__()
        self.config = config or SimMIMConfig()
        self.config.validate()
        c = self.config
        self.encoder = encoder
        self.cell = encoder.stride  # the head predicts one stride x stride patch per last-stage token
        self.grid = encoder.grids[-1]
        self.in_chans = in_chans
        h, w = encoder.img_size
        if c.mask_cell % encoder.strides[0] or h % c.mask_cell or w % c.mask_cell:
            raise ValueError(f"mask_cell={c.mask_cell} must be a multiple of the encoder's first stride "
                             f"{encoder.strides[0]} and divide the image size {h}x{w}")
        self.mask_grid = (h // c.mask_cell, w // c.mask_cell)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.num_features, self.cell**2 * in_chans)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """SimMIM's own exclusions (its ``SimMIM`` and ``SwinTransformerForSimMIM``): the mask token and
        the absolute positions. Its code also lists the relative position bias tables as a keyword,
        but prefixed with ``encoder.``, which matches no parameter name, so its runs decayed them; we
        follow what it declares (see :meth:`no_weight_decay_keywords`)."""
        return {"mask_token", "encoder.absolute_pos_embed", "encoder.pos_embed", "encoder.cls_token"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def sample_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(G, mh, mw) long, 1 = masked, on the ``mask_cell`` grid; ``ceil(L * ratio)`` cells as in
        SimMIM's mask generator. G is B per image (the paper) or 1 for a batch-shared mask."""
        mh, mw = self.mask_grid
        length = mh * mw
        count = batch if self.config.mask_per_sample else 1
        masked = math.ceil(length * self.config.mask_ratio)
        masks = torch.zeros(count, length, dtype=torch.long)
        for i in range(count):
            masks[i, torch.randperm(length, generator=generator)[:masked]] = 1
        return masks.reshape(count, mh, mw)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> PretrainOutput:
        """``mask``: (mh, mw), (1, mh, mw) or (B, mh, mw) with 1 = masked on the ``mask_cell`` grid."""
        self.encoder.check_input(images)
        b = images.shape[0]
        mask = self.sample_mask(b) if mask is None else self._check_mask(mask, b)
        mask = mask.to(images.device)
        c = self.config
        # Masked and visible cells are embedded apart (a no-op for patch embeddings): with a
        # convolutional stem the masked pixels would otherwise reach visible tokens.
        tokens = self.encoder.embed(images, mask)
        at = resize_groups(mask, self.encoder.grids[0]).reshape(mask.shape[0], -1, 1).bool()
        x = torch.where(at, self.mask_token.to(tokens.dtype), tokens)
        latent = self.encoder.forward_tokens(x)
        prediction = self.head(latent)  # (B, L, stride*stride*C)

        target = patchify(images, self.cell)
        if c.norm_pix_loss:
            target = normalize_patches(target)
        # Per-value weights: masked pixels of every channel, so cells smaller than the stride count
        # exactly their own pixels inside a predicted patch.
        pixels = upsample_groups(mask, c.mask_cell).unsqueeze(1).expand(b, self.in_chans, -1, -1)
        weight = patchify(pixels.to(prediction.dtype), self.cell)
        loss = self.pixel_loss(prediction, target, weight)
        return PretrainOutput(loss=loss, reconstruction=prediction, mask=mask, target=target,
                              hidden=weight.amax(dim=-1) > 0, sources=torch.arange(b, device=images.device))

    def pixel_loss(self, prediction: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        """Mean of the chosen distance over the masked pixel values (SimMIM eq. 1)."""
        pred, tgt = prediction.float(), target.float()
        if self.config.loss == "l1":
            err = (pred - tgt).abs()
        elif self.config.loss == "smooth_l1":
            err = F.smooth_l1_loss(pred, tgt, reduction="none")
        else:
            err = (pred - tgt).pow(2)
        weight = weight.float()
        return (err * weight).sum() / weight.sum().clamp(min=1)

    def _check_mask(self, mask: Tensor, batch: int) -> Tensor:
        mask = as_grid_masks(mask, self.mask_grid, batch, f"on the {self.config.mask_cell}-pixel cell grid")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold 0 (visible) and 1 (masked)")
        return mask.long()
