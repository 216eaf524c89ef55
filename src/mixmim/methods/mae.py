"""MAE on the plain ViT (He et al. 2022; summarised as the starting point of MixedAE, section 3.1), as
the authors' code has it (facebookresearch/mae ``models_mae.py``; ``tests/test_golden_authors.py``
compares loss, predictions and gradients with it at float64 rounding).

1. Random masking per image: ``L - int(L * (1 - mask_ratio))`` of the L patches are hidden (75% by
   default), a fresh draw for every image.
2. The encoder sees only the kept patches and its class token: the hidden patches are dropped, not
   replaced by a token, which only a plain ViT can do (a hierarchical encoder needs the full 2-D
   grid: the reason MixMIM mixes instead).
3. A light decoder (8 blocks, 512 wide, LayerNorm eps 1e-6, fixed 2-D sine-cosine positions) gets
   the encoder's class token (at a position of zeros) and the encoded patches back at their places,
   the shared [MASK] token at every hidden place, and predicts the p x p x C pixels of every patch.
   The class token runs through every decoder block (every patch attends to it), so the encoder's
   final class-token feature is trained too; the decoder's output for it is dropped.
4. Mean squared error on per-patch normalised pixels (``norm_pix_loss``, MAE's recommended recipe)
   of the hidden patches only.

With a ``vit_*`` model the factory builds MAE's encoder: fixed 2-D sine-cosine positions
(``fixed_pos_embed=True`` unless overridden) and LayerNorm eps 1e-6 (timm's ViT default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput, VersionedState, default_in_chans
from mixmim.methods.decoding import build_decoder
from mixmim.methods.masking import as_grid_masks, kept_count, random_patch_masks
from mixmim.methods.options import MAEConfig
from mixmim.methods.patches import masked_mse, patch_targets
from mixmim.models.base import resize_groups
from mixmim.models.token_dropping import TokenDroppingEncoder

if TYPE_CHECKING:
    from mixmim.methods.base import TokenDroppingModule

# The decoder's LayerNorm epsilon in MAE's models (``partial(nn.LayerNorm, eps=1e-6)``).
MAE_NORM_EPS = 1e-6


def require_token_dropping(encoder: nn.Module, method: str) -> None:
    """Refuse, in one line, an encoder that cannot run on a subset of its tokens (MixedAE section 3.1,
    MixMIM section 1: hierarchical encoders need every position of their grid)."""
    if not isinstance(encoder, TokenDroppingEncoder):
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
    cls_token = getattr(encoder, "cls_token", None)
    if cls_token is not None:
        nn.init.normal_(cls_token, std=0.02)


class MAE(VersionedState, PretrainMethod):
    """images -> MSE on the hidden patches; the encoder runs on the kept patches only."""

    name = "mae"
    encoder: TokenDroppingModule
    state_version: ClassVar[int] = 2
    state_changes: ClassVar[str] = ("version 2 carries the class token through the decoder and uses LayerNorm eps "
                                    "1e-6 there, as MAE's code")
    # With a plain ViT: MAE's fixed 2-D sine-cosine positions.
    encoder_defaults: ClassVar[dict[str, dict[str, Any]]] = {"vit": {"fixed_pos_embed": True}}

    def __init__(self, encoder: nn.Module, config: MAEConfig | None = None, in_chans: int | None = None):
        super().__init__()
        self.config = (config or MAEConfig()).with_decoder_of(None)  # sizes left at None: MAE's decoder
        self.config.validate()
        require_token_dropping(encoder, "MAE")
        encoder = cast("TokenDroppingModule", encoder)  # a GroupedEncoder that drops tokens, as just checked
        c = self.config
        self.encoder = encoder
        self.cell = encoder.strides[0]  # one predicted patch per token: 16x16 pixels
        self.grid = cast("tuple[int, int]", tuple(encoder.grids[0]))
        self.in_chans = default_in_chans(encoder) if in_chans is None else in_chans
        self.decoder = build_decoder(encoder.num_features, self.grid, self.cell, self.in_chans, c, MAE_NORM_EPS)
        self.init_state_version()
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

    def forward(self, images: Tensor, mask: Tensor | None = None, *, picture: bool | None = None) -> PretrainOutput:
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

        encoded = self.encoder.forward_kept(self.encoder.embed(images), keep_index)  # (B, P + n, C)
        lead = self.encoder.num_prefix_tokens
        prefix, latent = encoded[:, :lead], encoded[:, lead:]
        # Back to the full grid for the decoder; the hidden places get the [MASK] token there.
        full = latent.new_zeros(b, length, latent.shape[-1])
        full = full.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, latent.shape[-1]), latent)
        reconstruction = self.decoder(full, ~hidden, prefix=prefix if lead else None)
        target = patch_targets(images, self.cell, self.config.norm_pix_loss)
        out = PretrainOutput(loss=masked_mse(reconstruction, target, hidden), mask=mask)
        if self.wants_picture(picture):
            # What the encoder saw: the kept patches, the hidden ones at 0 (the data mean: grey).
            seen = images * (1 - resize_groups(mask, images.shape[-2:]).unsqueeze(1).to(images.dtype))
            out.picture = Picture(inputs=seen.detach(), reconstruction=reconstruction.detach(), hidden=hidden,
                                  sources=torch.arange(b, device=images.device), cell=self.cell,
                                  norm_pix=self.config.norm_pix_loss, target=target)
        return out
