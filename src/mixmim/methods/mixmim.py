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

Every ablation of MixMIM section 5 (Tables 6-10) and of the MixMAE supplement (Tables 3-6) is a
field of :class:`MixMIMConfig`; the defaults are the paper's choices. With the release's weights
loaded, the default forward pass (loss, reconstructions) equals the release's (the golden test);
initialisation, weight decay and layer decay follow the release's code, not bit for bit (other
random draws).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput, default_in_chans
from mixmim.methods.decoding import build_decoder
from mixmim.methods.masking import as_grid_masks, block_groups, partner_sources, random_groups, token_cells
from mixmim.methods.options import MixMIMConfig
from mixmim.methods.patches import masked_mse, patch_targets
from mixmim.models.base import resize_groups, upload_groups

if TYPE_CHECKING:
    from mixmim.methods.base import Encoder


class MixMIM(PretrainMethod):
    """images -> loss and reconstructions. The encoder is any
    :class:`~mixmim.models.base.GroupedEncoder` (MixMIM's own, ViT, Swin, PVT v2, ResNet-v2)."""

    name = "mixmim"

    def __init__(self, encoder: nn.Module, config: MixMIMConfig | None = None, in_chans: int | None = None):
        super().__init__()
        self.config = (config or MixMIMConfig()).with_decoder_of(None)  # sizes left at None: MAE's decoder
        self.config.validate()
        encoder = cast("Encoder", encoder)  # any GroupedEncoder
        self.encoder = encoder
        self.cell = encoder.stride
        self.grid = cast("tuple[int, int]", tuple(encoder.grids[-1]))
        self.in_chans = default_in_chans(encoder) if in_chans is None else in_chans
        c = self.config
        if c.mask_cell % encoder.stride:
            # Section 3: the mask patch is 32 because the encoder downsamples to 1/32. A smaller cell
            # would put two images into one last-stage token at the final patch merging, where no
            # attention mask can separate them again.
            raise ValueError(f"mask_cell={c.mask_cell} is not a multiple of the encoder stride {encoder.stride}: "
                             "the last stage would hold tokens that see two images")
        self.mask_factor = c.mask_cell // encoder.stride
        if self.grid[0] % self.mask_factor or self.grid[1] % self.mask_factor:
            raise ValueError(f"mask_cell={c.mask_cell} does not divide the image size "
                             f"{self.grid[0] * self.cell}x{self.grid[1] * self.cell}")
        self.mask_grid = (self.grid[0] // self.mask_factor, self.grid[1] // self.mask_factor)
        self.decoder = build_decoder(encoder.num_features, self.grid, self.cell, self.in_chans, c)
        # Parameters of the ablations exist only when used, so default checkpoints keep the
        # release's names exactly.
        if c.filling == "learnable" or c.mask_token_ratio > 0:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        if c.pretext == "mix_embedding":
            # Different random vectors from the start, so the groups differ before any update.
            self.mix_embed = nn.ParameterList(
                [nn.Parameter(nn.init.trunc_normal_(torch.empty(c.num_images, d), std=0.02))
                 for d in encoder.stage_in_dims])

    @property
    def num_groups(self) -> int:
        """Images per mixed sample (k; 2 by default)."""
        return self.config.num_images

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the 1-d parameters, as the release (timm's ``add_weight_decay`` without a
        skip list): the decoder's mask token, the relative position bias tables and the ablations'
        tokens and mix embeddings are decayed."""
        return set()

    # ------------------------------------------------------------------ masks
    def sample_layout(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """(group ids (G, h, w) on the last grid, mask-token cells (G, h, w) bool or None), drawn on
        the CPU so runs replay on any device; cells of ``mask_cell`` pixels."""
        c = self.config
        count = batch if c.mask_per_sample else 1
        if c.mask_type == "block":
            groups = block_groups(self.mask_grid, c.mask_ratio, count=count, ratio_range=c.mask_ratio_range,
                                  generator=generator)
        else:
            groups = random_groups(self.mask_grid, c.mask_ratio, num_groups=self.num_groups, count=count,
                                   ratio_range=c.mask_ratio_range, generator=generator)
        tokens = token_cells(groups, c.mask_token_ratio, self.num_groups, generator) if c.mask_token_ratio else None
        return resize_groups(groups, self.grid), (resize_groups(tokens, self.grid) if tokens is not None else None)

    def sample_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Group ids (G, h, w) on the last grid, drawn on the CPU so runs replay on any device."""
        return self.sample_layout(batch, generator)[0]

    def check_mask(self, mask: Tensor, batch: int) -> Tensor:
        """Accept (h, w), (1, h, w) or (B, h, w) masks of group ids; return (G, h, w) long."""
        mask = as_grid_masks(mask, self.grid, batch, "on the last-stage grid")
        if mask.is_floating_point() and not torch.equal(mask, mask.round()):
            raise ValueError("mask must hold integer group ids (0/1 for two images)")
        mask = mask.long()
        if int(mask.min()) < 0 or int(mask.max()) >= self.num_groups:
            raise ValueError(f"mask values must lie in 0..{self.num_groups - 1}, got "
                             f"{int(mask.min())}..{int(mask.max())}")
        return mask

    def _token_cells_for(self, groups: Tensor, token_mask: Tensor | None) -> Tensor | None:
        """Mask-token cells for a given mask: as given, or drawn on its ``mask_cell`` grid."""
        if token_mask is not None:
            if not self.config.mask_token_ratio:
                raise ValueError("token_mask is given but mask_token_ratio=0.0: the model has no [MASK] token")
            if tuple(token_mask.shape[-2:]) != self.grid:
                raise ValueError(f"token_mask of shape {tuple(token_mask.shape)} does not fit the grid {self.grid}")
            return token_mask.reshape(-1, *self.grid).bool().to(groups.device)
        if not self.config.mask_token_ratio:
            return None
        f = self.mask_factor
        drawn = token_cells(groups[:, ::f, ::f].cpu(), self.config.mask_token_ratio, self.num_groups)
        return resize_groups(drawn, self.grid).to(groups.device)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor | None = None, token_mask: Tensor | None = None, *,
                picture: bool | None = None) -> PretrainOutput:
        """``mask``: group ids on the last grid (drawn when None). ``token_mask``: (G, h, w) bool cells
        that hold the [MASK] token (only with ``mask_token_ratio``; drawn when None)."""
        self.encoder.check_input(images)
        b = images.shape[0]
        if mask is None:
            groups, tokens_at = self.sample_layout(b)
        else:
            groups = self.check_mask(mask, b)
            tokens_at = self._token_cells_for(groups, token_mask)
        groups = upload_groups(groups, images.device)  # the host copy stays for the attention plans
        if self.config.filling != "mix":
            return self._forward_filled(images, groups, self.wants_picture(picture))

        k = self.num_groups
        sources = partner_sources(b, k, images.device)  # (k, B)
        mixed = self.mix(images, groups, sources)
        latent = self.encode(self.make_input(mixed, groups, tokens_at), groups)

        # Unmix: one decoder sequence per (group, sample), rows ordered g * B + i as in the release.
        # Single reconstruction (Table 7) keeps group 0 only: image i from its own cells of sample i.
        decoded = k if self.config.dual_reconstruction else 1
        flat = groups.reshape(groups.shape[0], -1)
        visible = torch.cat([(flat == g).expand(b, -1) for g in range(decoded)])  # (decoded*B, L)
        hidden = ~visible
        if tokens_at is not None:
            # A [MASK] cell of the image's group carries no pixel of it: it is scored too.
            hidden = hidden | tokens_at.reshape(tokens_at.shape[0], -1).expand(b, -1).repeat(decoded, 1)
        shown = None
        if self.wants_picture(picture):
            shown = mixed
            if tokens_at is not None:  # [MASK] cells drawn as the data mean
                shown = mixed * ~resize_groups(tokens_at, images.shape[-2:]).unsqueeze(1)
        return self._reconstruct(images, latent, visible, hidden, sources[:decoded].reshape(-1), groups, shown)

    def make_input(self, mixed: Tensor, groups: Tensor, tokens_at: Tensor | None = None) -> Tensor:
        """Stage-1 tokens the encoder sees for mixed filling: the mixed pixels (eq. 1, :meth:`mix`)
        embedded so that no token sees another image's cells (a patch embedding sees only its patch;
        a convolutional stem is a mixed convolution), then the [MASK] token on ``tokens_at`` cells
        (before positions are added, as in SimMIM). [MASK] cells are embedded apart from the rest
        too, so the pixels they hide reach no neighbour."""
        if tokens_at is None:
            return self.encoder.embed(mixed, groups)
        segments = torch.where(tokens_at.to(groups.device), self.num_groups, groups)
        tokens = self.encoder.embed(mixed, segments)
        at = self.encoder.stage_groups(tokens_at.long(), 0).reshape(tokens_at.shape[0], -1, 1).bool()
        return torch.where(at.to(tokens.device), self.mask_token.to(tokens.dtype), tokens)

    def encode(self, tokens: Tensor, groups: Tensor) -> Tensor:
        """The encoder on mixed stage-1 tokens with the chosen way to tell images apart (Table 10)."""
        pretext = self.config.pretext
        if pretext == "masked_attention":
            return self.encoder.forward_tokens(tokens, groups, num_groups=self.num_groups)
        embeds = list(self.mix_embed) if pretext == "mix_embedding" else None
        return self.encoder.forward_tokens(tokens, groups, restrict_attention=False, stage_embeds=embeds,
                                           num_groups=self.num_groups)

    def _reconstruct(self, images: Tensor, latent: Tensor, visible: Tensor, hidden: Tensor, seq_sources: Tensor,
                     groups: Tensor, shown: Tensor | None) -> PretrainOutput:
        """Decode ``visible.shape[0]`` sequences (latent repeated) and score the hidden cells (eq. 2);
        ``shown``: the pixels the encoder saw, given only when a picture is asked for."""
        repeats = visible.shape[0] // latent.shape[0]
        reconstruction = self.decoder(latent.repeat(repeats, 1, 1) if repeats > 1 else latent, visible)
        seq_target = patch_targets(images, self.cell, self.config.norm_pix_loss)[seq_sources]
        out = PretrainOutput(loss=masked_mse(reconstruction, seq_target, hidden), mask=groups)
        if shown is not None:
            out.picture = Picture(inputs=shown.detach(), reconstruction=reconstruction.detach(), hidden=hidden,
                                  sources=seq_sources, cell=self.cell, norm_pix=self.config.norm_pix_loss,
                                  target=seq_target)
        return out

    def mix(self, images: Tensor, groups: Tensor, sources: Tensor) -> Tensor:
        """Eq. 1 on the pixels (B, C, H, W): each cell of sample i is taken from image
        ``sources[g, i]`` where g is the cell's group. For a patch embedding this equals the
        release's mixing of the stage-1 tokens."""
        ids = resize_groups(groups, images.shape[-2:]).unsqueeze(1)
        mixed = images
        for g in range(1, sources.shape[0]):
            mixed = torch.where(ids == g, images[sources[g]], mixed)
        return mixed

    # ------------------------------------------------------------------ non-mix fillings (Table 6)
    def _forward_filled(self, images: Tensor, groups: Tensor, picture: bool) -> PretrainOutput:
        """One image per sample: group-1 cells are filled, plain attention, single reconstruction."""
        b = images.shape[0]
        x, pixels = self.fill_input(images, groups)
        latent = self.encoder.forward_tokens(x)  # one image: nothing to keep apart
        visible = (groups.reshape(groups.shape[0], -1) == 0).expand(b, -1)
        shown = None
        if picture:  # shuffle and zoom-in fill pixels; zero and learnable tokens, drawn as the data mean
            own = (resize_groups(groups, images.shape[-2:]) == 0).unsqueeze(1)
            shown = pixels if pixels is not None else images * own
        return self._reconstruct(images, latent, visible, ~visible, torch.arange(b, device=images.device), groups,
                                 shown)

    def fill_input(self, images: Tensor, groups: Tensor,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """(stage-1 tokens of each image with its group-1 cells replaced by ``config.filling``, the
        filled pixels or None). Shuffle and zoom-in fill the pixels; zero and learnable fill the
        tokens. The visible and the hidden cells are embedded apart, so the hidden pixels reach no
        visible token."""
        filling = self.config.filling
        if filling not in ("zero", "learnable", "shuffle", "zoomin"):
            raise ValueError(f"filling={filling!r} is not a single-image filling")
        if filling == "shuffle":
            b, c, h, w = images.shape
            rows = self.shuffle_cells(images.permute(0, 2, 3, 1).reshape(b, h * w, c), groups, generator)
            pixels = rows.reshape(b, h, w, c).permute(0, 3, 1, 2)
            return self.encoder.embed(pixels, groups), pixels
        if filling == "zoomin":
            hidden = resize_groups(groups, images.shape[-2:]).unsqueeze(1) == 1
            pixels = torch.where(hidden, self.zoom_in(images, generator), images)
            return self.encoder.embed(pixels, groups), pixels
        tokens = self.encoder.embed(images, groups)
        fill = torch.zeros_like(tokens) if filling == "zero" else self.mask_token.to(tokens.dtype).expand_as(tokens)
        hidden = self.encoder.stage_groups(groups, 0).reshape(groups.shape[0], -1, 1) == 1
        return torch.where(hidden, fill, tokens), None

    def _cells(self, tokens: Tensor) -> Tensor:
        """(B, N, C) positions on a grid of f x f positions per last-grid cell (stage-1 tokens, or
        pixels as channels-last rows) -> (B, L, f*f, C): the positions of each cell."""
        b, n, ch = tokens.shape
        gh, gw = self.grid
        f = math.isqrt(n // (gh * gw))
        return tokens.reshape(b, gh, f, gw, f, ch).transpose(2, 3).reshape(b, gh * gw, f * f, ch)

    def _uncells(self, cells: Tensor) -> Tensor:
        b, _, n, ch = cells.shape
        (gh, gw), f = self.grid, math.isqrt(n)
        return cells.reshape(b, gh, gw, f, f, ch).transpose(2, 3).reshape(b, gh * f * gw * f, ch)

    def shuffle_cells(self, tokens: Tensor, groups: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Shuffle filling (section 5: "randomly shuffles the masked tokens and fills the masked
        locations with them"): every sample's group-1 cells are permuted among themselves, whole
        32x32 cells, by a random permutation with no fixed point, so no hidden cell shows its own
        content while it is scored as hidden (a sample with a single hidden cell keeps it: there is
        nothing to swap with). Other cells stay in place."""
        cells = self._cells(tokens)
        b, length = cells.shape[:2]
        hidden = (groups.reshape(groups.shape[0], -1) == 1).expand(b, -1).cpu()
        source = torch.arange(length).repeat(b, 1)
        for i in range(b):
            where = hidden[i].nonzero().flatten()
            source[i, where] = where[derangement(len(where), generator)]
        picked = cells.gather(1, source.to(tokens.device)[:, :, None, None].expand_as(cells))
        return self._uncells(picked)

    def zoom_boxes(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int, int]:
        """(tops, lefts, crop height, crop width) of one random crop per image, 1/zoomin_factor
        of the image side (the paper does not state the factor)."""
        h, w = self.encoder.img_size
        ch = max(1, round(h / self.config.zoomin_factor))
        cw = max(1, round(w / self.config.zoomin_factor))
        tops = torch.randint(0, h - ch + 1, (batch,), generator=generator)
        lefts = torch.randint(0, w - cw + 1, (batch,), generator=generator)
        return tops, lefts, ch, cw

    def zoom_in(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Zoomin filling (section 5): the image zoomed in and cropped back to its size, i.e. a
        random crop resized (bilinear) to full size."""
        tops, lefts, ch, cw = self.zoom_boxes(images.shape[0], generator)
        crops = torch.stack([img[:, t:t + ch, x:x + cw] for img, t, x in zip(images, tops.tolist(), lefts.tolist())])
        return F.interpolate(crops, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (n >= 2; identity for n < 2).
    Rejection sampling: a random permutation is a derangement with probability about 1/e."""
    if n < 2:
        return torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm
