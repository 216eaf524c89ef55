"""Named encoder configurations and the factories that build them.

Families (one module each, all with the :class:`~mixmim.models.base.GroupedEncoder` interface):

- ``mixmim``: the MixMIM hierarchical encoder (MixMIM paper section 2.2: C = channels, H = heads,
  B = blocks per stage, windows 14/14/14/7).
  ``mixmim_tiny`` and ``mixmim_small`` are this project's small models for CPU demos and tests.
- ``vit``, ``swin``, ``pvt_v2``, ``resnetv2``: timm's models with the group restriction added
  (MixMIM Table 3 and Table 13); each names the timm model whose state dict it loads unchanged.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, cast

from torch import nn

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder

# family -> "module:Class"; imported on first use so that `mixmim info` stays light.
FAMILIES: dict[str, str] = {
    "mixmim": "mixmim.models.mixmim_vit:MixMIMTransformer",
    "vit": "mixmim.models.vit:ViTEncoder",
    "swin": "mixmim.models.swin:SwinEncoder",
    "swinv2": "mixmim.models.swinv2:SwinV2Encoder",
    "pvt_v2": "mixmim.models.pvt:PVTv2Encoder",
    "twins": "mixmim.models.twins:TwinsEncoder",
    "resnetv2": "mixmim.models.resnet:ResNetV2Encoder",
}

# name -> family, the timm model of the same architecture (None: not in timm) and the constructor
# arguments: architecture only (a method's decoder sizes: mixmim.methods.options; the drop path of
# fine-tuning: mixmim.transfer.classifier).
MODELS: dict[str, dict[str, Any]] = {
    "mixmim_tiny": dict(family="mixmim", embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
    "mixmim_small": dict(family="mixmim", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "mixmim_base": dict(family="mixmim", embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "mixmim_large": dict(family="mixmim", embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "mixmim_huge": dict(family="mixmim", embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    # Plain ViT, patch 16 (MixMIM Table 3 "ViT-B"; MAE, MixedAE and SimMIM section 4.2).
    "vit_tiny": dict(family="vit", timm="vit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(family="vit", timm="vit_small_patch16_224", embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(family="vit", timm="vit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(family="vit", timm="vit_large_patch16_224", embed_dim=1024, depth=24, num_heads=16),
    # Swin Transformer as published: window 7, shifted windows every other block (MixMIM Table 3).
    "swin_tiny": dict(family="swin", timm="swin_tiny_patch4_window7_224", embed_dim=96, depths=(2, 2, 6, 2),
                      num_heads=(3, 6, 12, 24), window_size=7),
    "swin_base": dict(family="swin", timm="swin_base_patch4_window7_224", embed_dim=128, depths=(2, 2, 18, 2),
                      num_heads=(4, 8, 16, 32), window_size=7),
    "swin_large": dict(family="swin", timm="swin_large_patch4_window7_224", embed_dim=192, depths=(2, 2, 18, 2),
                       num_heads=(6, 12, 24, 48), window_size=7),
    # Swin Transformer V2 (SimMIM's scaling rows): cosine attention, continuous position bias, post-norm.
    "swinv2_tiny": dict(family="swinv2", timm="swinv2_tiny_window8_256", img_size=256, embed_dim=96,
                        depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8),
    "swinv2_small": dict(family="swinv2", timm="swinv2_small_window8_256", img_size=256, embed_dim=96,
                         depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=8),
    "swinv2_base": dict(family="swinv2", timm="swinv2_base_window8_256", img_size=256, embed_dim=128,
                        depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=8),
    "swinv2_large": dict(family="swinv2", timm="swinv2_large_window12_192", img_size=192, embed_dim=192,
                         depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
    # PVT v2 with spatial-reduction attention (MixMIM Table 3 "PVT-L", MixMAE introduction).
    "pvt_v2_b2": dict(family="pvt_v2", timm="pvt_v2_b2", embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3),
                      num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b5": dict(family="pvt_v2", timm="pvt_v2_b5", embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3),
                      num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4)),
    # Twins (MixMAE's introduction): PCPVT (global sub-sampled attention, PEG) and SVT (+ local windows).
    "twins_pcpvt_small": dict(family="twins", timm="twins_pcpvt_small", embed_dims=(64, 128, 320, 512),
                              num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3)),
    "twins_pcpvt_base": dict(family="twins", timm="twins_pcpvt_base", embed_dims=(64, 128, 320, 512),
                             num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 18, 3)),
    "twins_svt_small": dict(family="twins", timm="twins_svt_small", embed_dims=(64, 128, 256, 512),
                            num_heads=(2, 4, 8, 16), mlp_ratios=(4, 4, 4, 4), depths=(2, 2, 10, 4), wss=(7, 7, 7, 7)),
    "twins_svt_base": dict(family="twins", timm="twins_svt_base", embed_dims=(96, 192, 384, 768),
                           num_heads=(3, 6, 12, 24), mlp_ratios=(4, 4, 4, 4), depths=(2, 2, 18, 2), wss=(7, 7, 7, 7)),
    # ResNet-v2 as in BiT with mixed convolution (MixMIM supplement section 9, Table 13).
    "resnetv2_50": dict(family="resnetv2", timm="resnetv2_50x1_bit", layers=(3, 4, 6, 3), width_factor=1),
    "resnetv2_50x3": dict(family="resnetv2", timm="resnetv2_50x3_bit", layers=(3, 4, 6, 3), width_factor=3),
    "resnetv2_101x3": dict(family="resnetv2", timm="resnetv2_101x3_bit", layers=(3, 4, 23, 3), width_factor=3),
    # ResNet-50x4 (SimMIM appendix: SimMIM on a ConvNet, 81.6% after 300 epochs); BiT released no 50x4.
    "resnetv2_50x4": dict(family="resnetv2", timm=None, layers=(3, 4, 6, 3), width_factor=4),
}

_META = ("family", "timm")


def model_names(family: str | None = None) -> list[str]:
    return [n for n, spec in MODELS.items() if family is None or spec["family"] == family]


def family_class(family: str) -> type[nn.Module]:
    """The encoder class of a family (imported on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; known: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def _spec(model: str) -> dict[str, Any]:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    return MODELS[model]


def family_of(model: str) -> str:
    return _spec(model)["family"]


def encoder_args(model_or_family: str) -> tuple[str, ...]:
    """Constructor arguments the encoder class of a model name (or a family) accepts."""
    family = model_or_family if model_or_family in FAMILIES else family_of(model_or_family)
    params = inspect.signature(family_class(family).__init__).parameters
    return tuple(p for p in params if p != "self")


def split_overrides(model: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(encoder kwargs, everything else) for ``model`` with ``overrides`` applied."""
    spec = _spec(model)
    accepted = encoder_args(model)
    encoder = {k: v for k, v in spec.items() if k not in _META}
    encoder.setdefault("num_classes", 0)
    rest: dict[str, Any] = {}
    for key, value in overrides.items():
        (encoder if key in accepted else rest)[key] = value
    return encoder, rest


def create_encoder(model: str = "mixmim_base", **overrides: Any) -> nn.Module:
    """The encoder alone (no head)."""
    encoder_kwargs, extra = split_overrides(model, overrides)
    if extra:
        raise TypeError(f"unknown encoder option(s) {', '.join(map(repr, extra))} for {model}; known: "
                        f"{', '.join(encoder_args(model))}")
    return family_class(family_of(model))(**encoder_kwargs)


def create_classifier(model: str = "mixmim_base", num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """The encoder with its family's pooling and a linear head (timm's for timm families, so a timm
    state dict of the same architecture loads with ``strict=True``)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    return create_encoder(model, num_classes=num_classes, **overrides)


def encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``encoder`` (stored beside exported weights)."""
    return cast("GroupedEncoder", encoder).config()


def name_for_config(family: str, config: dict[str, Any]) -> str | None:
    """The registry name whose architecture ``config`` has (drop path defaults follow it)."""
    keys = ("embed_dim", "depths", "depth", "embed_dims", "layers", "width_factor")
    for name, spec in MODELS.items():
        if spec["family"] != family:
            continue
        shared = [k for k in keys if k in spec and k in config]
        if shared and all(_plain(spec[k]) == _plain(config[k]) for k in shared):
            return name
    return None


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
