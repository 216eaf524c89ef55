"""Building a method and its encoder: :func:`build_method` from a run config (what the loop, the config
check, ``mixmim reconstruct`` and the study use: one way from a config to a method), ``build_pretrainer``
from a method's options and the encoder's arguments apart, and ``create_pretrainer`` (the public API:
one flat set of keyword arguments, by the release's names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mixmim.methods.base import PretrainMethod
from mixmim.methods.mae import MAE
from mixmim.methods.mixedae import MixedAE
from mixmim.methods.mixmim import MixMIM
from mixmim.methods.options import METHOD_OPTIONS
from mixmim.methods.simmim import SimMIM
from mixmim.models.registry import MODELS, encoder_args, family_class, family_of, split_overrides

# method name -> (options dataclass, method class). Every method takes any encoder with the
# GroupedEncoder interface; MAE and MixedAE also need the token-dropping one (plain ViT only) and
# refuse any other family in one line.
_CLASSES: dict[str, type[PretrainMethod]] = {"mixmim": MixMIM, "simmim": SimMIM, "mae": MAE, "mixedae": MixedAE}
METHODS: dict[str, tuple[type, type[PretrainMethod]]] = {n: (METHOD_OPTIONS[n], c) for n, c in _CLASSES.items()}


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


def method_options(method: str, model: str, options: Mapping[str, Any] | Any) -> Any:
    """The options dataclass of ``method`` for ``model`` (a dataclass as it is, or a mapping of its
    fields), decoder sizes left at None set to the model's default decoder. Unknown options are a
    TypeError naming them."""
    config_cls = method_config_class(method)
    if not dataclasses.is_dataclass(options):
        known = {f.name for f in dataclasses.fields(config_cls)} - {"name"}
        options = _release_aliases(options)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}; "
                            f"method options: {', '.join(sorted(known))}")
        options = config_cls(**options)
    elif not isinstance(options, config_cls):
        raise TypeError(f"options of {type(options).__name__} given for method {method!r}")
    resolve = getattr(options, "with_decoder_of", None)
    return resolve(_known_model(model)) if resolve is not None else options


def build_pretrainer(method: str, options: Mapping[str, Any] | Any, model: str,
                     encoder_overrides: Mapping[str, Any]) -> PretrainMethod:
    """Method ``method`` on encoder ``model``: ``options`` are the method's options (its dataclass, or a
    mapping of its fields), ``encoder_overrides`` arguments of the encoder's constructor. The encoder is
    built once, from the registry's arguments, the method's own defaults for that family (e.g. MAE's
    fixed sine-cosine positions on a ViT) and then ``encoder_overrides``."""
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


def build_method(config: Any) -> PretrainMethod:
    """The method of a pretraining run config (``model``, ``method``, ``data`` sections) on its encoder,
    activation checkpointing as asked. The encoder takes ``data.channels`` image channels unless
    ``model.options.in_chans`` says otherwise; SimMIM, which undoes the input normalisation for its
    colour targets, gets the data's statistics unless ``method.pixel_mean``/``pixel_std`` are set.
    The one way from a run config to a method: the loop, the config check (on the meta device),
    ``mixmim reconstruct`` and the study all build through it."""
    m, d, options = config.model, config.data, config.method
    overrides = m.encoder_overrides()
    overrides.setdefault("in_chans", d.channels)
    if getattr(options, "pixel_mean", "absent") is None and d.normalize != "dataset":
        from mixmim.data import normalization

        options = options.with_pixel_stats(*normalization(d, d.channels))
    method = build_pretrainer(options.name, options, m.name, overrides)
    if m.grad_checkpointing:
        method.encoder.set_grad_checkpointing(True)
    return method


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
