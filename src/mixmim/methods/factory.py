"""Building a method and its encoder by name: ``build_pretrainer`` (what the training loop and the
config loader use: the method's options and the encoder's arguments apart) and ``create_pretrainer``
(the public API: one flat set of keyword arguments, by the release's names)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mixmim.methods.base import PretrainMethod
from mixmim.methods.mae import MAE, MAEConfig
from mixmim.methods.mixedae import MixedAE, MixedAEConfig
from mixmim.methods.mixmim import MixMIM, MixMIMConfig
from mixmim.methods.simmim import SimMIM, SimMIMConfig
from mixmim.models.registry import MODELS, encoder_args, family_class, family_of, split_overrides

# method name -> (options dataclass, method class). Every method takes any encoder with the
# GroupedEncoder interface; MAE and MixedAE also need the token-dropping one (plain ViT only) and
# refuse any other family in one line.
METHODS: dict[str, tuple[type, type[PretrainMethod]]] = {
    "mixmim": (MixMIMConfig, MixMIM),
    "simmim": (SimMIMConfig, SimMIM),
    "mae": (MAEConfig, MAE),
    "mixedae": (MixedAEConfig, MixedAE),
}


def method_names() -> list[str]:
    return list(METHODS)


def method_config_class(name: str) -> type:
    """The options dataclass of method ``name`` (what a config's ``method:`` section holds)."""
    return METHODS[_known_method(name)][0]


def _known_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name


def _known_model(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return name


def _release_aliases(options: Mapping[str, Any]) -> dict[str, Any]:
    """Accept the release's ``range_mask_ratio`` (ratio + U(0, range)) as a ratio range."""
    options = dict(options)
    if "range_mask_ratio" in options:
        spread = float(options.pop("range_mask_ratio"))
        if spread > 0:
            low = float(options.get("mask_ratio", 0.5))
            options["mask_ratio_range"] = (low, round(low + spread, 6))
    return options


def method_options(method: str, model: str, options: Mapping[str, Any]) -> Any:
    """The options dataclass of ``method`` for ``model``: the model's decoder size (registry) for
    the fields the method has, under ``options``. Unknown options are a TypeError naming them."""
    config_cls = method_config_class(method)
    known = {f.name for f in dataclasses.fields(config_cls)}
    options = _release_aliases(options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}; "
                        f"method options: {', '.join(sorted(known))}")
    decoder = {k: v for k, v in MODELS[_known_model(model)]["decoder"].items() if k in known}
    return config_cls(**{**decoder, **options})


def build_pretrainer(method: str, options: Mapping[str, Any], model: str,
                     encoder_overrides: Mapping[str, Any]) -> PretrainMethod:
    """Method ``method`` on encoder ``model``: ``options`` are fields of the method's options
    dataclass, ``encoder_overrides`` arguments of the encoder's constructor. The encoder is built
    once, from the registry's arguments, the method's own defaults for that family (e.g. MAE's fixed
    sine-cosine positions on a ViT) and then ``encoder_overrides``."""
    method_cls = METHODS[_known_method(method)][1]
    config = method_options(method, model, options)
    family = family_of(_known_model(model))
    accepted = set(encoder_args(model))
    unknown = sorted(set(encoder_overrides) - accepted)
    if unknown:
        raise TypeError(f"unknown encoder option(s) for {model}: {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(accepted))}")
    registry_args, _ = split_overrides(model, {})
    kwargs = {**registry_args, **method_cls.encoder_defaults.get(family, {}), **encoder_overrides}
    return method_cls(family_class(family)(**kwargs), config)


def create_pretrainer(method: str = "mixmim", model: str = "mixmim_base", **overrides: Any) -> PretrainMethod:
    """Build a pretraining method: ``out = method(images, mask=None, picture=False)`` returns a
    :class:`~mixmim.methods.base.PretrainOutput` (``loss``, ``metrics``, ``mask``, ``picture``).

    ``overrides`` take encoder arguments (img_size, patch_size, embed_dim, depths, num_heads,
    window_size, in_chans, ...) and method options (decoder_dim, decoder_depth, decoder_num_heads,
    norm_pix_loss, mask_ratio, ...), by the release's names; the encoder's constructor decides which
    is which."""
    _known_method(method)
    accepted = set(encoder_args(_known_model(model)))
    encoder_overrides = {k: v for k, v in overrides.items() if k in accepted}
    options = {k: v for k, v in overrides.items() if k not in accepted}
    return build_pretrainer(method, options, model, encoder_overrides)
