"""``create_pretrainer``: a named method on a named encoder, with the release's argument names."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from mixmim.methods.mae import MAE, MAEConfig
from mixmim.methods.mixedae import MixedAE, MixedAEConfig
from mixmim.methods.mixmim import MixMIM, MixMIMConfig
from mixmim.methods.simmim import SimMIM, SimMIMConfig
from mixmim.models.registry import MODELS, family_class, family_of, split_overrides

# method name -> (config dataclass, builder(encoder, config)); every method takes any encoder with
# the GroupedEncoder interface (a method that needs more says so when it is built).
METHODS: dict[str, tuple[type, Callable[[nn.Module, Any], nn.Module]]] = {
    "mixmim": (MixMIMConfig, lambda encoder, config: MixMIM(encoder, config)),
    "simmim": (SimMIMConfig, lambda encoder, config: SimMIM(encoder, config)),
    # Plain ViT only (they drop tokens or pick keys per query): any other family is refused in one line.
    "mae": (MAEConfig, lambda encoder, config: MAE(encoder, config)),
    "mixedae": (MixedAEConfig, lambda encoder, config: MixedAE(encoder, config)),
}


def method_names() -> list[str]:
    return list(METHODS)


def _release_aliases(options: dict[str, Any]) -> dict[str, Any]:
    """Accept the release's ``range_mask_ratio`` (ratio + U(0, range)) as a ratio range."""
    options = dict(options)
    if "range_mask_ratio" in options:
        spread = float(options.pop("range_mask_ratio"))
        if spread > 0:
            low = float(options.get("mask_ratio", 0.5))
            options["mask_ratio_range"] = (low, round(low + spread, 6))
    return options


def create_pretrainer(method: str = "mixmim", model: str = "mixmim_base", **overrides: Any) -> nn.Module:
    """Build a pretraining module: ``out = module(images, mask=None)`` returns a
    :class:`~mixmim.methods.base.PretrainOutput` with ``loss``, ``reconstruction`` and ``mask``.

    ``overrides`` take encoder arguments (img_size, patch_size, embed_dim, depths, num_heads,
    window_size, ...) and method options (decoder_dim, decoder_depth, decoder_num_heads,
    norm_pix_loss, mask_ratio, ...), by the release's names.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    config_cls, build = METHODS[method]
    overrides = _release_aliases(overrides)
    encoder_args, options = split_overrides(model, overrides)
    known = {f.name for f in dataclasses.fields(config_cls)}
    # The named model's decoder size applies only to methods that have a decoder (not SimMIM).
    options = {k: v for k, v in options.items() if k in known or k in overrides}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}; "
                        f"method options: {', '.join(sorted(known))}")
    config = config_cls(**options)
    return build(family_class(family_of(model))(**encoder_args), config)
