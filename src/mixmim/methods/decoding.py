"""The light pixel decoder MixMIM, MAE and MixedAE share (MixMIM section 2.2, after MAE): how a method
builds it from its options (:class:`mixmim.methods.options.DecoderOptions`, sizes already resolved)."""

from __future__ import annotations

from typing import cast

from mixmim.methods.options import DecoderOptions
from mixmim.models.decoder import MaskTokenDecoder


def build_decoder(width: int, grid: tuple[int, int], cell: int, in_chans: int, options: DecoderOptions,
                  norm_eps: float = 1e-5) -> MaskTokenDecoder:
    """The decoder for encoder features of ``width`` on ``grid``, predicting ``cell x cell x in_chans``
    values per position."""
    # Sizes are ints here: every method resolves the ones left at None first (``with_decoder_of``).
    dim = cast(int, options.decoder_dim)
    depth = cast(int, options.decoder_depth)
    heads = cast(int, options.decoder_num_heads)
    return MaskTokenDecoder(width, cast("tuple[int, int]", tuple(grid)), cell * cell * in_chans, dim, depth, heads,
                            norm_eps=norm_eps)
