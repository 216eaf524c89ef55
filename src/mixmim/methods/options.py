"""The options of every pretraining method, without torch: what a run config's ``method:`` section holds.

One dataclass per method, tagged by its ``name`` (``method.name=simmim`` picks :class:`SimMIMConfig`);
the config system builds the section from YAML (:mod:`mixmim.config`), the method reads it
(:mod:`mixmim.methods.mixmim`, ``simmim``, ``mae``, ``mixedae``). Each docstring says which table of
which paper each field is. A decoder size left at None is the encoder's default decoder
(:func:`decoder_defaults`): MAE's 512 wide, 8 blocks, 16 heads, except the small CPU models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD

Filling = Literal["mix", "zero", "learnable", "shuffle", "zoomin"]
Pretext = Literal["masked_attention", "mix_embedding", "none"]
FILLINGS: tuple[str, ...] = ("mix", "zero", "learnable", "shuffle", "zoomin")
PRETEXTS: tuple[str, ...] = ("masked_attention", "mix_embedding", "none")
MASK_TYPES: tuple[str, ...] = ("random", "square", "block")  # SimMIM Table 1
HEADS: tuple[str, ...] = ("linear", "mlp", "inverse_swin_t", "inverse_swin_b")  # SimMIM Table 2
LOSS_AREAS: tuple[str, ...] = ("masked", "full")  # SimMIM Table 4
LOSSES: tuple[str, ...] = ("l1", "smooth_l1", "l2", "bins")  # SimMIM Table 5
Mode = Literal["compose", "full"]
AttentionKind = Literal["homologous", "global", "masked"]
SegmentKind = Literal["sincos", "learnable", "none"]

# The decoder every method builds on an encoder unless its options say otherwise (MAE's, which MixMIM
# section 2.2 takes); the CPU demo model has a smaller one.
MAE_DECODER = {"decoder_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
DECODER_DEFAULTS: dict[str, dict[str, int]] = {"mixmim_tiny": {"decoder_dim": 256, "decoder_depth": 4,
                                                               "decoder_num_heads": 8}}


def decoder_defaults(model: str | None) -> dict[str, int]:
    """The decoder size a method takes on encoder ``model`` when its options leave it at None."""
    return dict(DECODER_DEFAULTS.get(model or "", MAE_DECODER))


def check_ratio(ratio: float, name: str = "mask_ratio") -> None:
    if not (0.0 < float(ratio) < 1.0):
        raise ValueError(f"{name}={ratio} is outside (0, 1)")


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """One line naming the first of ``names`` that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")


def group_size(mixing_ratio: float) -> int:
    """1/r, the number of images mixed together; r must lie in (0, 0.5] with 1/r an integer
    (MixedAE section 3.1: "r in (0, 0.5] is the mixing ratio")."""
    r = float(mixing_ratio)
    if not 0.0 < r <= 0.5:
        raise ValueError(f"mixing_ratio={mixing_ratio} is outside (0, 0.5] (MixedAE section 3.1)")
    k = round(1.0 / r)
    if abs(k * r - 1.0) > 1e-6:
        raise ValueError(f"mixing_ratio={mixing_ratio}: 1/r must be an integer (each image supplies r of the "
                         "patches of a mixed sample of 1/r images)")
    return k


@dataclass
class DecoderOptions:
    """``decoder_dim``, ``decoder_depth``, ``decoder_num_heads``: the decoder's width, blocks and heads
    (None: the encoder's default, :func:`decoder_defaults`); ``norm_pix_loss``: predict each patch
    normalised to zero mean and unit variance (MAE's target, the default of all three methods)."""

    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    norm_pix_loss: bool = True

    def with_decoder_of(self, model: str | None) -> Any:
        """A copy with every decoder size left at None set to ``model``'s default."""
        import dataclasses

        given: dict[str, Any] = {k: v for k, v in decoder_defaults(model).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **given)

    def validate_decoder(self) -> None:
        names = tuple(k for k in ("decoder_dim", "decoder_depth", "decoder_num_heads") if getattr(self, k) is not None)
        check_positive_ints(self, names)
        dim, heads = self.decoder_dim, self.decoder_num_heads
        if dim is not None and heads is not None and dim % heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} is not divisible by decoder_num_heads="
                             f"{self.decoder_num_heads}")


@dataclass
class MixMIMConfig(DecoderOptions):
    """Options of the MixMIM method; the defaults are the paper's choices (the decoder's and the
    target's: :class:`~mixmim.methods.decoding.DecoderOptions`).

    - ``filling`` (Table 6 / supplement Table 3): what fills the cells hidden from an image. ``mix``:
      the other image's tokens (the method). ``zero``: zero tokens; ``learnable``: one shared
      learnable token; ``shuffle``: the image's own hidden tokens, cell by cell in random order;
      ``zoomin``: tokens of a random crop of the same image zoomed to full size (``zoomin_factor``).
      The non-mix fillings hold one image, so attention is plain and one sequence per image is
      reconstructed, scored on the filled cells.
    - ``dual_reconstruction`` (Table 7 / supplement Table 6): False decodes only group 0, i.e.
      image i from its own cells of sample i, although the sample still holds two images.
    - ``pretext`` (section 2.3, Table 10): ``masked_attention`` restricts attention to the token's
      own image; ``mix_embedding`` adds one learnable vector per image and stage at the start of
      each stage and lets attention cross; ``none`` is plain attention over the mixed image
      ("w/o unmixing" in the encoder; the decoder still unmixes).
    - masking (Table 8): ``mask_type`` random or block (BEiT-style blocks on the cell grid),
      ``mask_ratio`` with an optional uniform ``mask_ratio_range``, ``mask_per_sample`` (False: one
      mask for the batch, as the release), ``mask_cell`` the cell side in pixels (a multiple of the
      encoder stride, 32 by default: section 3).
    - ``num_images`` (supplement Table 4): k images per sample, each cell from exactly one of them,
      1/k each (counts differ by at most one cell); k-way group attention and k-way unmixing.
      ``mask_ratio`` has no meaning then and must stay at its default. ``mask_token_ratio`` ("2 images with
      [MASK]", supplement Table 4): this fraction of every image's cells is replaced by the learnable
      [MASK] token at the encoder input (0.5 with two images: 25% / 25% / 50%).
    """

    name: Literal["mixmim"] = "mixmim"
    mask_ratio: float = 0.5
    mask_ratio_range: tuple[float, float] | None = None
    mask_type: Literal["random", "block"] = "random"
    mask_per_sample: bool = False
    num_images: int = 2
    mask_cell: int = 32
    filling: Filling = "mix"
    dual_reconstruction: bool = True
    pretext: Pretext = "masked_attention"
    mask_token_ratio: float = 0.0
    zoomin_factor: float = 2.0

    def __post_init__(self) -> None:
        # YAML and the run config's method section give lists; keep the declared tuple.
        if isinstance(self.mask_ratio_range, list):
            self.mask_ratio_range = tuple(self.mask_ratio_range)

    def validate(self) -> None:
        self.validate_decoder()
        check_ratio(self.mask_ratio)
        if self.mask_ratio_range is not None:
            if len(self.mask_ratio_range) != 2:
                raise ValueError(f"mask_ratio_range={list(self.mask_ratio_range)} must be [low, high]")
            low, high = self.mask_ratio_range
            check_ratio(low, "mask_ratio_range[0]")
            check_ratio(high, "mask_ratio_range[1]")
            if low > high:
                raise ValueError(f"mask_ratio_range={list(self.mask_ratio_range)} must be [low, high]")
            if self.num_images != 2:
                raise ValueError(f"mask_ratio_range={list(self.mask_ratio_range)} needs num_images=2; with "
                                 f"num_images={self.num_images} every image supplies 1/k of the cells")
        if self.mask_type not in ("random", "block"):
            raise ValueError(f"mask_type={self.mask_type!r}: expected 'random' or 'block'")
        if not 2 <= self.num_images <= 8:
            raise ValueError(f"num_images={self.num_images}: expected 2 to 8")
        if self.num_images != 2 and self.mask_ratio != 0.5:
            raise ValueError(f"mask_ratio={self.mask_ratio} has no meaning with num_images={self.num_images}: every "
                             f"image supplies 1/{self.num_images} of the cells (MixMAE supplement Table 4)")
        if self.mask_type == "block" and self.num_images != 2:
            raise ValueError(f"mask_type='block' draws two groups; num_images={self.num_images} needs 'random'")
        if self.filling not in FILLINGS:
            raise ValueError(f"filling={self.filling!r}: expected one of {', '.join(FILLINGS)}")
        if self.pretext not in PRETEXTS:
            raise ValueError(f"pretext={self.pretext!r}: expected one of {', '.join(PRETEXTS)}")
        if isinstance(self.mask_cell, bool) or not isinstance(self.mask_cell, int) or self.mask_cell < 1:
            raise ValueError(f"mask_cell={self.mask_cell!r}: expected a positive number of pixels")
        if not 0.0 <= float(self.mask_token_ratio) < 1.0:
            raise ValueError(f"mask_token_ratio={self.mask_token_ratio} is outside [0, 1)")
        if not float(self.zoomin_factor) >= 1.0:
            raise ValueError(f"zoomin_factor={self.zoomin_factor} must be at least 1 (a zoom in)")
        if self.filling != "mix":
            # One image per sample: nothing to mix k ways, fill with [MASK] or tell apart.
            if self.num_images != 2:
                raise ValueError(f"filling={self.filling!r} holds one image; num_images={self.num_images} needs 'mix'")
            if self.mask_token_ratio:
                raise ValueError(f"filling={self.filling!r} already fills the hidden cells; "
                                 f"mask_token_ratio={self.mask_token_ratio} needs 'mix'")
            if self.pretext == "mix_embedding":
                raise ValueError(f"pretext='mix_embedding' tells mixed images apart; filling={self.filling!r} "
                                 "holds one image")


@dataclass
class SimMIMConfig:
    """Options of SimMIM; the defaults are the paper's (section 4.1.1: random masking of 32x32 cells
    at ratio 0.6, linear head, target at the input resolution, l1 loss on the masked pixels). Each
    ablation of section 4.1 is one field:

    - ``mask_type`` (Table 1): ``random``, ``square`` (one k x k square of cells at a random place,
      k nearest to ``sqrt(mask_ratio * L)``) or ``block`` (BEiT's block-wise masking);
      ``mask_cell`` is the masked patch size in pixels (4 to 64 in Table 1; a multiple of the
      encoder's first stride that divides the image); ``mask_ratio`` the masked fraction.
    - ``head`` (Table 2): ``linear``, ``mlp`` (2 layers), ``inverse_swin_t``, ``inverse_swin_b``;
      ``head_window``: the window of the inverse Swin heads (6, as the encoder at 192 px).
    - ``target_downsample`` (Table 3): the target is the image downsampled d times (1, 2, 4, 8,
      16, 32: 192^2 to 6^2 at 192 px).
    - ``loss_area`` (Table 4): ``masked`` (prediction) or ``full`` (prediction + reconstruction).
    - ``loss`` (Table 5): ``l1``, ``l2``, ``smooth_l1`` (PyTorch's, beta 1, on normalised pixels) or
      ``bins``: every channel's 8-bit value in one of ``num_bins`` equal bins (2 to 256, Table 13),
      predicted by cross-entropy. ``pixel_mean``/``pixel_std`` undo the input normalisation for
      it (one value per image channel; None: the run's ``data.mean``/``data.std``, ImageNet's through
      the API).
    - ``norm_pix_loss``: MAE's per-patch normalised target (not in the SimMIM paper; regression only).
    """

    name: Literal["simmim"] = "simmim"
    mask_type: Literal["random", "square", "block"] = "random"
    mask_ratio: float = 0.6
    mask_cell: int = 32
    mask_per_sample: bool = True
    head: Literal["linear", "mlp", "inverse_swin_t", "inverse_swin_b"] = "linear"
    head_window: int = 6
    target_downsample: int = 1
    loss_area: Literal["masked", "full"] = "masked"
    loss: Literal["l1", "smooth_l1", "l2", "bins"] = "l1"
    num_bins: int = 8
    norm_pix_loss: bool = False
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # YAML and the run config's method section give lists; keep the declared tuples.
        if self.pixel_mean is not None:
            self.pixel_mean = tuple(self.pixel_mean)
        if self.pixel_std is not None:
            self.pixel_std = tuple(self.pixel_std)

    def with_pixel_stats(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Any:
        """A copy with ``pixel_mean``/``pixel_std`` left at None set to ``mean``/``std``."""
        import dataclasses

        return dataclasses.replace(self, pixel_mean=tuple(self.pixel_mean or mean),
                                   pixel_std=tuple(self.pixel_std or std))

    def validate(self) -> None:
        check_ratio(self.mask_ratio)
        for name, value, choices in (("mask_type", self.mask_type, MASK_TYPES), ("head", self.head, HEADS),
                                     ("loss_area", self.loss_area, LOSS_AREAS), ("loss", self.loss, LOSSES)):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        for name, number in (("mask_cell", self.mask_cell), ("head_window", self.head_window),
                             ("target_downsample", self.target_downsample)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{name}={number!r}: expected a positive whole number")
        if self.loss == "bins":
            if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or not 2 <= self.num_bins <= 256:
                raise ValueError(f"num_bins={self.num_bins!r}: expected 2 to 256 bins of 8-bit colour values")
            if self.norm_pix_loss:
                raise ValueError("norm_pix_loss normalises a regression target; loss='bins' classifies colours")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("pixel_mean and pixel_std go together: set both or neither")
        mean, std = self.pixel_mean, self.pixel_std
        if mean is not None and std is not None and (len(mean) not in (1, 3) or len(std) != len(mean) or min(std) <= 0):
            raise ValueError(f"pixel_mean={list(mean)} / pixel_std={list(std)}: expected one value per image channel "
                             "each (1 or 3), positive deviations")


@dataclass
class MAEConfig(DecoderOptions):
    """Options of MAE; the defaults are the paper's (75% masking, 8 x 512 decoder, normalised pixels:
    :class:`~mixmim.methods.decoding.DecoderOptions`). ``xavier_init``: re-initialise the encoder as
    MAE does (:func:`mae_init_`); turn it off to continue from weights already in the encoder."""

    name: Literal["mae"] = "mae"
    mask_ratio: float = 0.75
    xavier_init: bool = True

    def validate(self) -> None:
        check_ratio(self.mask_ratio)
        self.validate_decoder()


@dataclass
class MixedAEConfig(DecoderOptions):
    """Options of MixedAE; the defaults are the paper's choices (section 4.1, appendix B).

    - ``mixing_ratio`` r (Table 3a): 1/r images per group, r in (0, 0.5]. ``mode``: ``compose``
      (one mixed sample per group) or ``full`` (1/r independently mixed samples per group).
      ``mask_cell``: side of a mixing cell in pixels (32, appendix B; 16 mixes single patches).
    - ``attention``: ``homologous`` (eq. 6, TopK), ``global`` (plain ViT attention: the naive
      baseline of section 3.1), ``masked`` (attention only within each image, told the mixing mask:
      the "Naive + Masked SA" baseline of appendix Table 7a). ``topk_ratio``: K / L (Table 3d; None:
      K = rL; 1.0 means no sampling). ``global_layers``: how many first blocks keep global attention
      (Table 3e: 0, 1, 2, 3).
    - ``segment_embed`` (Table 7c): ``sincos`` (fixed, appendix B), ``learnable`` (one trained
      vector per member, as BERT's segment embeddings), ``none``. ``segment_embed_every_layer``:
      added to the input of every block (appendix B) or once, beside the positions (section 3.2).
      ``segment_embed_accumulate``: every block's input gets it added into the residual stream, so
      block i reads i copies (True, the literal reading of "added to the input of each Transformer
      layer"), or every block reads ``x + e`` and none keeps it (False: one copy at every block, as
      Swin's per-block relative position bias that appendix B cites).
    - Homologous contrastive loss: ``contrastive_weight`` lambda (eq. 8; 0 turns it off, Table 3f),
      ``contrastive_dim`` (projector output), ``contrastive_temperature`` tau,
      ``contrastive_features`` (Table 3b: after or before the final LayerNorm),
      ``contrastive_positives`` (Table 3c: each positive separately, or their mean).
    - ``reconstruction_weight``: 0 trains with the contrastive loss only (appendix Table 7b).
    - ``measure_topk``: report the TopK sampling accuracy of every homologous block (Figure 6) in
      the metrics as ``topk_acc_layer<i>`` (blocks counted from 1).
    - ``xavier_init``: initialise the encoder as MAE's code (appendix B).
    - ``decoder_cls_token``: give every decoder sequence of a mixed sample the sample's encoded class
      token, as MAE's decoder does (off by default: see the module docstring).
    - ``lr_batch``: what the learning-rate rule ``lr = base_lr x batch / 256`` counts (section 4.1):
      ``images`` per step (the paper's "batch size 4096 for compose", default) or encoder
      ``samples`` (B r in compose mode, B in full mode); :meth:`MixedAE.lr_batch` tells the loop.
    """

    name: Literal["mixedae"] = "mixedae"
    mixing_ratio: float = 0.25
    mode: Mode = "compose"
    mask_cell: int = 32
    attention: AttentionKind = "homologous"
    topk_ratio: float | None = None
    global_layers: int = 1
    segment_embed: SegmentKind = "sincos"
    segment_embed_every_layer: bool = True
    contrastive_weight: float = 0.1
    contrastive_dim: int = 128
    contrastive_temperature: float = 0.25
    contrastive_features: Literal["post_norm", "pre_norm"] = "post_norm"
    contrastive_positives: Literal["separate", "mean"] = "separate"
    reconstruction_weight: float = 1.0
    measure_topk: bool = True
    xavier_init: bool = True
    decoder_cls_token: bool = False
    segment_embed_accumulate: bool = True
    lr_batch: Literal["images", "samples"] = "images"

    def validate(self) -> None:
        group_size(self.mixing_ratio)
        choices = {"mode": ("compose", "full"), "attention": ("homologous", "global", "masked"),
                   "segment_embed": ("sincos", "learnable", "none"), "lr_batch": ("images", "samples"),
                   "contrastive_features": ("post_norm", "pre_norm"), "contrastive_positives": ("separate", "mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        check_positive_ints(self, ("mask_cell", "contrastive_dim"))
        self.validate_decoder()
        if isinstance(self.global_layers, bool) or not isinstance(self.global_layers, int) or self.global_layers < 0:
            raise ValueError(f"global_layers={self.global_layers!r}: expected a count of blocks (0 or more)")
        if self.topk_ratio is not None and not 0.0 < float(self.topk_ratio) <= 1.0:
            raise ValueError(f"topk_ratio={self.topk_ratio} is outside (0, 1] (K = topk_ratio x L)")
        if float(self.contrastive_temperature) <= 0:
            raise ValueError(f"contrastive_temperature={self.contrastive_temperature} must be positive")
        if float(self.contrastive_weight) < 0 or float(self.reconstruction_weight) < 0:
            raise ValueError("contrastive_weight and reconstruction_weight must not be negative")
        if float(self.contrastive_weight) == 0 and float(self.reconstruction_weight) == 0:
            raise ValueError("contrastive_weight=0 and reconstruction_weight=0 leave nothing to train")
        if self.attention == "masked" and self.segment_embed != "none":
            raise ValueError(f"attention='masked' is told which image each patch is from (appendix Table 7a); "
                             f"segment_embed={self.segment_embed!r} needs segment_embed='none'")
        if self.attention == "masked" and self.decoder_cls_token:
            raise ValueError("attention='masked' keeps one class token copy per image inside the encoder and returns "
                             "none; decoder_cls_token=True needs attention='homologous' or 'global'")


MethodOptions = MixMIMConfig | SimMIMConfig | MAEConfig | MixedAEConfig
# method name -> its options (the loop's method classes: mixmim.methods.factory.METHODS)
METHOD_OPTIONS: dict[str, type] = {"mixmim": MixMIMConfig, "simmim": SimMIMConfig, "mae": MAEConfig,
                                   "mixedae": MixedAEConfig}
