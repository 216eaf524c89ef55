"""Named encoder configurations and the factories that build them.

MixMIM-B/L/H follow the paper (section 2.2): C = channels, H = heads, B = blocks per stage, windows
14/14/14/7, decoder 512 wide with 8 blocks and 16 heads. ``mixmim_tiny`` and ``mixmim_small`` are
this project's small models for CPU demos and tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mixmim.models.mixmim_vit import MixMIMTransformer

MODELS: dict[str, dict[str, Any]] = {
    "mixmim_tiny": dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                        decoder=dict(decoder_dim=256, decoder_depth=4, decoder_num_heads=8)),
    "mixmim_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                         decoder=dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)),
    "mixmim_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                        decoder=dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)),
    "mixmim_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                         decoder=dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)),
    "mixmim_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88),
                        decoder=dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)),
}

# Drop path used when fine-tuning (MixMIM section 3 / Table 12).
FINETUNE_DROP_PATH = {"mixmim_tiny": 0.1, "mixmim_small": 0.1, "mixmim_base": 0.1, "mixmim_large": 0.2,
                      "mixmim_huge": 0.3}

ENCODER_ARGS = ("img_size", "num_classes", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size",
                "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "learnable_pos_embed",
                "attention_impl")


def model_names() -> list[str]:
    return list(MODELS)


def _spec(model: str) -> dict[str, Any]:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    return MODELS[model]


def split_overrides(model: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(encoder kwargs, everything else) for ``model`` with ``overrides`` applied."""
    spec = _spec(model)
    encoder = {k: v for k, v in spec.items() if k != "decoder"}
    rest = dict(spec["decoder"])
    for key, value in overrides.items():
        (encoder if key in ENCODER_ARGS else rest)[key] = value
    return encoder, rest


def create_encoder(model: str = "mixmim_base", **overrides: Any) -> MixMIMTransformer:
    """The encoder alone (no head)."""
    encoder_args, rest = split_overrides(model, overrides)
    extra = [k for k in rest if k not in _spec(model)["decoder"]]
    if extra:
        raise TypeError(f"unknown encoder option(s) {', '.join(map(repr, extra))}; known: {', '.join(ENCODER_ARGS)}")
    return MixMIMTransformer(**encoder_args)


def create_classifier(model: str = "mixmim_base", num_classes: int = 1000, **overrides: Any) -> MixMIMTransformer:
    """The encoder with average pooling of the last stage after the final norm and a linear head."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    return create_encoder(model, num_classes=num_classes, **overrides)


def encoder_config(encoder: MixMIMTransformer) -> dict[str, Any]:
    """Constructor arguments that rebuild ``encoder`` (stored beside exported weights)."""
    return dict(img_size=list(encoder.img_size), patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
                depths=list(encoder.depths), num_heads=list(encoder.num_heads),
                window_size=[list(w) if len(set(w)) > 1 else w[0] for w in encoder.window_sizes],
                in_chans=encoder.patch_embed.proj.in_channels, num_classes=encoder.num_classes,
                learnable_pos_embed=encoder.absolute_pos_embed.requires_grad)


def fields_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
