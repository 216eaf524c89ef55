"""MAE on the plain ViT (He et al. 2022; summarised as the starting point of MixedAE, section 3.1).

1. Random masking per image: ``L - int(L * (1 - mask_ratio))`` of the L patches are hidden (75% by
   default), a fresh draw for every image.
2. The encoder sees only the kept patches: they are dropped, not replaced by a token, which only a
   plain ViT can do (a hierarchical encoder needs the full 2-D grid: the reason MixMIM mixes instead).
3. A light decoder (8 blocks, 512 wide, fixed 2-D sine-cosine positions) gets the encoded patches
   back at their places and the shared [MASK] token at every hidden place, and predicts the
   16x16x3 pixels of every patch.
4. Mean squared error on per-patch normalised pixels (``norm_pix_loss``) of the hidden patches only.

The decoder is this project's :class:`~mixmim.models.decoder.MaskTokenDecoder` (MixMIM's, which
follows MAE's) and so carries no class token: MAE's decoder passes the encoder's class token along,
but no loss reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixmim.methods.base import PretrainOutput
from mixmim.methods.masking import as_grid_masks, check_ratio
from mixmim.methods.patches import normalize_patches, patchify
from mixmim.models.base import resize_groups
from mixmim.models.decoder import MaskTokenDecoder


def require_token_dropping(encoder: nn.Module, method: str) -> None:
    """Refuse, in one line, an encoder that cannot run on a subset of its tokens (MixedAE section 3.1,
    MixMIM section 1: hierarchical encoders need every position of their grid)."""
    if not (hasattr(encoder, "forward_visible") and hasattr(encoder, "forward_plans")):
        family = getattr(encoder, "family", "") or type(encoder).__name__
        raise ValueError(f"{method} needs a plain ViT that can drop tokens (vit_*); the {family} encoder needs "
                         "every position of its grid and cannot process a subset of its tokens (that limitation "
                         "is why MixMIM mixes images instead)")


def mae_init_(encoder: nn.Module) -> None:
    """MAE's initialisation of the encoder, which MixedAE keeps (appendix B: "xavier_uniform to
    initialize all Transformer layers, following the official code of ViT"): xavier-uniform linear
    layers with zero biases, the patch projection initialised like a linear layer, and the class
    token drawn from N(0, 0.02^2). Norm layers and positions are left as they are."""
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        # A 16x16 convolution of stride 16 is a linear map of each flattened patch.
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if getattr(encoder, "cls_token", None) is not None:
        nn.init.normal_(encoder.cls_token, std=0.02)


def masked_patch_mse(prediction: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Mean squared error over every value of the hidden patches (MAE's loss; MixedAE eq. 4)."""
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    weight = hidden.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)


def kept_count(length: int, mask_ratio: float) -> int:
    """Patches MAE keeps of ``length``: ``int(L * (1 - ratio))`` (49 of 196 at 0.75), at least one."""
    return max(1, int(length * (1.0 - mask_ratio)))


def random_patch_masks(batch: int, grid: tuple[int, int], mask_ratio: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """(B, h, w) long, 1 = hidden: per image a uniformly random set of ``L - kept_count`` patches,
    drawn on the CPU so runs replay on any device."""
    h, w = grid
    length = h * w
    keep = kept_count(length, mask_ratio)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    masks = torch.ones(batch, length, dtype=torch.long)
    masks.scatter_(1, order[:, :keep], 0)
    return masks.reshape(batch, h, w)


@dataclass
class MAEConfig:
    """Options of MAE; the defaults are the paper's (75% masking, 8 x 512 decoder, normalised pixels).
    ``xavier_init``: re-initialise the encoder as MAE does (:func:`mae_init_`); turn it off to continue
    from weights already in the encoder."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    xavier_init: bool = True

    def validate(self) -> None:
        check_ratio(self.mask_ratio)
        for name in ("decoder_dim", "decoder_depth", "decoder_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")


class MAE(nn.Module):
    """images -> MSE on the hidden patches; the encoder runs on the kept patches only."""

    num_groups = 1  # one image per sample (the pictures and `mixmim reconstruct` ask)

    def __init__(self, encoder: nn.Module, config: MAEConfig | None = None, in_chans: int = 3):
        super().__init__()
        self.config = config or MAEConfig()
        self.config.validate()
        require_token_dropping(encoder, "MAE")
        c = self.config
        self.encoder = encoder
        self.cell = encoder.strides[0]  # one predicted patch per token: 16x16 pixels
        self.grid = tuple(encoder.grids[0])
        self.in_chans = in_chans
        self.decoder = MaskTokenDecoder(encoder.num_features, self.grid, self.cell**2 * in_chans, c.decoder_dim,
                                        c.decoder_depth, c.decoder_num_heads)
        if c.xavier_init:
            mae_init_(encoder)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the 1-d parameters, as MAE's code (timm's ``add_weight_decay`` with no skip
        list: the class token and the decoder's mask token are decayed)."""
        return set()

    def sample_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, h, w) long on the patch grid, 1 = hidden, one draw per image."""
        return random_patch_masks(batch, self.grid, self.config.mask_ratio, generator)

    def check_mask(self, mask: Tensor, batch: int) -> Tensor:
        """Accept (h, w), (1, h, w) or (B, h, w) masks of 0 (kept) / 1 (hidden) on the patch grid with the
        same number of hidden patches in every image (the encoder batch is one rectangle)."""
        mask = as_grid_masks(mask, self.grid, batch, "on the patch grid")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold 0 (kept) and 1 (hidden)")
        mask = mask.long().expand(batch, -1, -1)
        hidden = mask.reshape(batch, -1).sum(dim=1)
        length = mask[0].numel()
        if not bool((hidden == hidden[0]).all()):
            raise ValueError(f"every image must hide the same number of patches, got {sorted(set(hidden.tolist()))}")
        if int(hidden[0]) >= length:
            raise ValueError("the mask hides every patch: the encoder would see nothing")
        return mask

    def forward(self, images: Tensor, mask: Tensor | None = None) -> PretrainOutput:
        """``mask``: 1 = hidden on the patch grid (drawn per image when None)."""
        self.encoder.check_input(images)
        b = images.shape[0]
        length = self.grid[0] * self.grid[1]
        if mask is None:
            mask, keep = self.sample_mask(b), kept_count(length, self.config.mask_ratio)
        else:
            mask = self.check_mask(mask, b)
            keep = length - int(mask[0].sum())
        mask = mask.to(images.device)
        hidden = mask.reshape(b, -1).bool()
        # Kept positions in increasing order: a stable sort puts the zeros (kept) first.
        keep_index = hidden.long().argsort(dim=1, stable=True)[:, :keep]

        latent = self.encoder.forward_visible(self.encoder.embed(images), keep_index)  # (B, n, C)
        # Back to the full grid for the decoder; the hidden places get the [MASK] token there.
        full = latent.new_zeros(b, length, latent.shape[-1])
        full = full.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, latent.shape[-1]), latent)
        reconstruction = self.decoder(full, ~hidden)

        target = patchify(images, self.cell)
        if self.config.norm_pix_loss:
            target = normalize_patches(target)
        loss = masked_patch_mse(reconstruction, target, hidden)
        # What the encoder saw: the kept patches, the hidden ones at 0 (the data mean: grey).
        seen = images * (1 - resize_groups(mask, images.shape[-2:]).unsqueeze(1).to(images.dtype))
        return PretrainOutput(loss=loss, reconstruction=reconstruction, mask=mask, target=target, hidden=hidden,
                              sources=torch.arange(b, device=images.device), inputs=seen)
