"""The light pixel decoder MixMIM, MAE and MixedAE share (MixMIM section 2.2, after MAE): its options,
inherited by each method's options dataclass, and how a method builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixmim.models.decoder import MaskTokenDecoder


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """One line naming the first of ``names`` that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")


@dataclass
class DecoderOptions:
    """``decoder_dim``, ``decoder_depth``, ``decoder_num_heads``: the decoder's width, blocks and heads
    (MAE's 512 / 8 / 16); ``norm_pix_loss``: predict each patch normalised to zero mean and unit
    variance (MAE's target, the default of all three methods)."""

    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True

    def validate_decoder(self) -> None:
        check_positive_ints(self, ("decoder_dim", "decoder_depth", "decoder_num_heads"))
        if self.decoder_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} is not divisible by decoder_num_heads="
                             f"{self.decoder_num_heads}")


def build_decoder(width: int, grid: tuple[int, int], cell: int, in_chans: int, options: DecoderOptions,
                  norm_eps: float = 1e-5) -> MaskTokenDecoder:
    """The decoder for encoder features of ``width`` on ``grid``, predicting ``cell x cell x in_chans``
    values per position."""
    return MaskTokenDecoder(width, tuple(grid), cell * cell * in_chans, options.decoder_dim, options.decoder_depth,
                            options.decoder_num_heads, norm_eps=norm_eps)
