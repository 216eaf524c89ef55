"""What every pretraining method returns, so the training loop and the pictures need not know which
method they run."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class PretrainOutput:
    """``loss``: scalar to minimise. ``reconstruction``: (S, L, P) predicted patches of the S decoded
    sequences, in :func:`mixmim.methods.patches.patchify` order. ``mask``: (G, h, w) group ids on the
    last-stage grid (for two images: 1 = cell taken from the partner). ``target``: (S, L, P) what
    each sequence was asked to predict; ``hidden``: (S, L) bool, the cells that count in the loss;
    ``sources``: (S,) the image each sequence reconstructs. ``inputs``: (B, C, H, W) what the encoder
    saw, in pixels, for pictures (None when the method cannot show it in pixel space)."""

    loss: Tensor
    reconstruction: Tensor
    mask: Tensor
    target: Tensor | None = None
    hidden: Tensor | None = None
    sources: Tensor | None = None
    inputs: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
