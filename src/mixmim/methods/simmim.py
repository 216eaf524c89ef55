"""SimMIM on any encoder: the [MASK]-token baseline (SimMIM paper, section 3; MixMAE supplement
Table 8 compares against it).

1. A mask on a grid of ``mask_cell``-pixel cells (32 by default, the last-stage patch of Swin), one
   per image: random ``ceil(L * 0.6)`` cells by default, or a square or BEiT's blocks (section 3.2,
   Table 1; :mod:`mixmim.methods.simmim_masks`).
2. After patch embedding a learnable mask token replaces every masked stage-1 token; the
   positions are added after, as for any token. The encoder attends over the whole image.
3. A prediction head maps the last-stage tokens to a map of predictions at the target resolution
   (section 3.3, Table 2; :mod:`mixmim.methods.simmim_heads`): a linear layer by default, 32x32x3
   values per Swin token.
4. The target (section 3.4): the image itself, or the image downsampled by ``target_downsample``
   (Table 3: area averages of d x d pixels, see :func:`downsample`), as raw pixels (l1 by default;
   l2, smooth-l1: Table 5) or as channel-wise colour bins classified with cross-entropy (Table 5 and
   13). The loss covers the masked pixels (eq. 1) or the whole image (Table 4).

With the default options the loss, the predictions and the gradients equal the authors' code
(microsoft/SimMIM ``models/simmim.py``, on its Swin and on its ViT without relative position bias or
layer scale) at float64 rounding (``tests/test_golden_authors.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput, default_in_chans
from mixmim.methods.masking import as_grid_masks
from mixmim.methods.options import SimMIMConfig
from mixmim.methods.patches import at_least_float32, normalize_patches, patchify, unpatchify
from mixmim.methods.simmim_heads import build_head
from mixmim.methods.simmim_masks import sample_cells
from mixmim.models.base import resize_groups

if TYPE_CHECKING:
    from mixmim.methods.base import Encoder

# ---------------------------------------------------------------------------------------------------
# targets and losses (section 3.4)

def downsample(images: Tensor, factor: int) -> Tensor:
    """The image downsampled ``factor`` times by averaging every factor x factor block of pixels: the
    paper says only "downsampling the original images"; the area average is the antialiased resize."""
    return images if factor == 1 else F.avg_pool2d(images, factor)


def colour_bins(images: Tensor, bins: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalised images ``(B, C, h, w)`` (``mean``/``std``: C values) -> bin of every channel's
    8-bit value, ``bins`` equal bins
    (256 bins: the 8-bit value itself). Channel-wise bin colour discretisation, section 3.4."""
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    levels = ((at_least_float32(images) * s + m).clamp(0, 1) * 255).round().long()
    return levels * bins // 256


def bin_colours(bins_or_logits: Tensor, bins: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Bin ids ``(B, C, h, w)`` (or logits ``(B, C * bins, h, w)``, decoded by argmax) -> the
    normalised colour of each bin's centre, for pictures."""
    ids = bins_or_logits
    if ids.is_floating_point():
        b, _, h, w = ids.shape
        ids = ids.reshape(b, -1, bins, h, w).argmax(2)
    centre = ((ids.float() + 0.5) * 256 / bins - 0.5) / 255
    m = centre.new_tensor(mean).view(1, -1, 1, 1)
    s = centre.new_tensor(std).view(1, -1, 1, 1)
    return (centre - m) / s


def value_errors(prediction: Tensor, target: Tensor, loss: str, bins: int = 8) -> Tensor:
    """Per-value loss ``(B, C, h, w)``: a distance between predicted and true pixels, or the
    cross-entropy of every channel's bin (``prediction`` then holds C x bins logits per pixel)."""
    pred = at_least_float32(prediction)
    if loss == "bins":
        b, _, h, w = pred.shape
        logits = pred.reshape(b, -1, bins, h, w)
        channels = logits.shape[1]
        ce = F.cross_entropy(logits.reshape(b * channels, bins, h, w), target.reshape(b * channels, h, w),
                             reduction="none")
        return ce.reshape(b, channels, h, w)
    tgt = at_least_float32(target)
    if loss == "l1":
        return (pred - tgt).abs()
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, tgt, reduction="none")
    return (pred - tgt).pow(2)


def weighted_mean(errors: Tensor, weight: Tensor) -> Tensor:
    """Mean of ``errors`` ``(B, C, h, w)`` over the weighted pixels, every channel counted (eq. 1:
    divided by the number of masked values). ``weight`` ``(B or 1, 1, h, w)`` in [0, 1]: the masked
    share of each target pixel, or 1 everywhere for the full-image loss.

    SimMIM's code writes ``sum / (mask.sum() + 1e-5) / C``, but its mask is an integer tensor, so
    ``mask.sum() + 1e-5`` is a float32 number in which the 1e-5 vanishes for any count above ~170
    pixels (every real batch): its loss is ``sum / count / C``, which is what this computes (the
    golden test against its code tells the two apart)."""
    weight = weight.to(errors.dtype).expand(errors.shape[0], 1, *errors.shape[-2:])
    total = weight.sum() * errors.shape[1]
    return (errors * weight).sum() / total.clamp(min=1e-6)


class SimMIM(PretrainMethod):
    """images -> loss on the masked pixels, with a learnable mask token at the encoder input."""

    name = "simmim"

    def __init__(self, encoder: nn.Module, config: SimMIMConfig | None = None, in_chans: int | None = None):
        super().__init__()
        self.config = (config or SimMIMConfig()).with_pixel_stats()  # None: ImageNet's normalisation
        self.config.validate()
        c = self.config
        encoder = cast("Encoder", encoder)  # any GroupedEncoder
        self.encoder = encoder
        self.cell = encoder.stride  # pixels per last-stage token: the patches of the reconstruction
        self.grid = cast("tuple[int, int]", tuple(encoder.grids[-1]))
        self.in_chans = default_in_chans(encoder) if in_chans is None else in_chans
        if c.loss == "bins" and len(c.pixel_mean) != self.in_chans:
            raise ValueError(f"pixel_mean={list(c.pixel_mean)} has {len(c.pixel_mean)} value(s) but the encoder takes "
                             f"{self.in_chans}-channel images; set method.pixel_mean/pixel_std to data.mean/data.std")
        h, w = encoder.img_size
        if c.mask_cell % encoder.strides[0] or h % c.mask_cell or w % c.mask_cell:
            raise ValueError(f"mask_cell={c.mask_cell} must be a multiple of the encoder's first stride "
                             f"{encoder.strides[0]} and divide the image size {h}x{w}")
        if h % c.target_downsample or w % c.target_downsample:
            raise ValueError(f"target_downsample={c.target_downsample} must divide the image size {h}x{w}")
        self.mask_grid = (h // c.mask_cell, w // c.mask_cell)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        values = self.in_chans * (c.num_bins if c.loss == "bins" else 1)
        self.head = build_head(c.head, encoder, values, c.target_downsample, c.head_window)

    def no_weight_decay(self) -> set[str]:
        """SimMIM's own exclusions (its ``SimMIM`` and ``SwinTransformerForSimMIM``): the mask token and
        the absolute positions. Its code also lists the relative position bias tables as a keyword,
        but prefixed with ``encoder.``, which matches no parameter name, so its runs decayed them; we
        follow what it declares (see :meth:`no_weight_decay_keywords`)."""
        return {"mask_token", "encoder.absolute_pos_embed", "encoder.pos_embed", "encoder.cls_token"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    def head_blocks(self) -> list[nn.Module]:
        """The inverse Swin heads' blocks (a linear or MLP head has none)."""
        return [blk for stage in getattr(self.head, "stages", []) for blk in stage]

    def sample_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(G, mh, mw) long, 1 = masked, on the ``mask_cell`` grid, drawn on the CPU so runs replay on
        any device. G is B per image (the paper) or 1 for a batch-shared mask."""
        c = self.config
        count = batch if c.mask_per_sample else 1
        return sample_cells(c.mask_type, self.mask_grid, c.mask_ratio, count, c.mask_cell, generator)

    def forward(self, images: Tensor, mask: Tensor | None = None, *, picture: bool | None = None) -> PretrainOutput:
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
        prediction = self.head(self.encoder.forward_tokens(x))  # (B, V, H/d, W/d)

        pixels = resize_groups(mask, images.shape[-2:]).unsqueeze(1).to(images.dtype)  # (G, 1, H, W)
        # A target pixel covering d x d image pixels counts by its masked share (cells smaller
        # than d straddle it); the full-image loss of Table 4 counts every pixel.
        weight = downsample(pixels, c.target_downsample)
        if c.loss_area == "full":
            weight = torch.ones_like(weight)
        target = self.make_target(images)
        loss = weighted_mean(value_errors(prediction, target, c.loss, c.num_bins), weight)
        out = PretrainOutput(loss=loss, mask=mask)
        if self.wants_picture(picture):
            out.picture = self._picture(prediction, target, weight, pixels, images)
        return out

    def make_target(self, images: Tensor) -> Tensor:
        """``(B, C, H/d, W/d)``: normalised pixels (per patch with ``norm_pix_loss``) or colour bins."""
        c = self.config
        small = downsample(images, c.target_downsample)
        if c.loss == "bins":
            return colour_bins(small, c.num_bins, c.pixel_mean, c.pixel_std)
        if c.norm_pix_loss:
            # Normalise per last-stage token, the patch each token predicts.
            per = self.cell // c.target_downsample
            grid = (small.shape[-2] // per, small.shape[-1] // per)
            small = unpatchify(normalize_patches(patchify(small, per)), per, grid, small.shape[1])
        return small

    @torch.no_grad()
    def _picture(self, prediction: Tensor, target: Tensor, weight: Tensor, pixels: Tensor, images: Tensor) -> Picture:
        """Reconstruction and target as (B, L, stride^2 x C) patches of normalised pixels at the input
        resolution (a coarse target repeated over its d x d pixels; bins as their centre colours)."""
        c = self.config
        pred, truth = at_least_float32(prediction.detach()), target
        if c.loss == "bins":
            pred = bin_colours(pred, c.num_bins, c.pixel_mean, c.pixel_std)
            truth = bin_colours(target, c.num_bins, c.pixel_mean, c.pixel_std)
        size = images.shape[-2:]
        pred, truth, scored = (resize_groups(t, size) for t in (pred, at_least_float32(truth), weight))
        hidden = patchify(scored.expand(images.shape[0], 1, -1, -1), self.cell).amax(dim=-1) > 0
        shown = torch.where(pixels.bool(), torch.zeros_like(images), images)  # [MASK] drawn as the mean colour
        return Picture(inputs=shown, reconstruction=patchify(pred, self.cell), hidden=hidden,
                       sources=torch.arange(images.shape[0], device=images.device), cell=self.cell,
                       norm_pix=c.norm_pix_loss, target=patchify(truth, self.cell))

    def _check_mask(self, mask: Tensor, batch: int) -> Tensor:
        mask = as_grid_masks(mask, self.mask_grid, batch, f"on the {self.config.mask_cell}-pixel cell grid")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must hold 0 (visible) and 1 (masked)")
        return mask.long()
