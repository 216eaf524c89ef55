"""MixMIM encoders in timm's model registry: ``timm.create_model("mixmim_base")`` and friends.

Weights exported by ``mixmim export`` (``<stem>.safetensors`` + ``<stem>.json``) load with

    timm.create_model("mixmim_base", pretrained=True, pretrained_cfg_overlay=dict(file="x.safetensors"))

The JSON next to the file supplies the exported configuration (image size, windows, learnable
positions); its architecture (widths, depths, heads) must be the named model's. Keyword arguments
win over both (``img_size=384, window_size=[16, 16, 24, 12]`` resizes the position table and the
relative position tables at load time, MixMIM section 3). Exports carry no head, so the default
``num_classes`` is 0 (pooled features); pass ``num_classes=N`` for a new head.

timm's feature extraction works as for timm's own hierarchical models:
``timm.create_model("mixmim_base", features_only=True)`` returns the four stage maps (NCHW, strides
4/8/16/32; ``out_indices`` picks stages) through the encoder's ``forward_intermediates``.

Importing this module registers the models (``import mixmim`` does it).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from mixmim.models.registry import MODELS, model_names, split_overrides

_ARCHITECTURE = ("embed_dim", "depths", "num_heads", "patch_size")


def _cfg() -> dict[str, Any]:
    return {"url": "", "num_classes": 0, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}


# The other families are timm's own models (vit_*, swin_*, pvt_v2_*, resnetv2_*_bit): their exports load
# into timm.create_model(<the JSON's timm_model>) directly, so only the MixMIM encoders need entries.
MIXMIM_MODELS = model_names("mixmim")
default_cfgs = generate_default_cfgs({name: _cfg() for name in MIXMIM_MODELS})


def _filter(state: dict, model, source_grid: tuple[int, int] | None = None) -> dict:
    from mixmim.models.resize import resize_state_dict

    return resize_state_dict(state, model, source_grid)


def _create(variant: str, pretrained: bool = False, **kwargs: Any):
    # Imported here, not at the top: this module is imported right after timm itself (see
    # mixmim._timm_hook), possibly while the encoder module is still importing timm.
    from mixmim.interop.meta import read_pair_meta
    from mixmim.models.mixmim_vit import MixMIMTransformer

    encoder, _ = split_overrides(variant, {})
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    info = read_pair_meta(overlay["file"]) if pretrained and overlay.get("file") else None
    saved = info["config"] if info else None
    source_grid = None
    if saved:
        clash = {k: (saved[k], encoder[k]) for k in _ARCHITECTURE
                 if k in saved and k in encoder and list(map(int, _as_list(saved[k]))) != list(_as_list(encoder[k]))}
        if clash:
            raise ValueError(f"{overlay['file']} holds another architecture than {variant}: "
                             + ", ".join(f"{k}={a} (not {b})" for k, (a, b) in clash.items()))
        encoder.update({k: v for k, v in saved.items() if k != "num_classes"})
        img = saved.get("img_size", 224)
        img = (img, img) if isinstance(img, int) else tuple(img)
        patch = saved.get("patch_size", 4)
        source_grid = (img[0] // patch, img[1] // patch)
    encoder.update(kwargs)
    # features_only: timm's FeatureGetterNet calls forward_intermediates (one entry per stage).
    out_indices = encoder.pop("out_indices", tuple(range(len(encoder["depths"]))))
    return build_model_with_cfg(MixMIMTransformer, variant, pretrained,
                                pretrained_filter_fn=partial(_filter, source_grid=source_grid),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **encoder)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs: Any):
        return _create(name, pretrained, **kwargs)

    spec = MODELS[name]
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"{name}: C = {spec['embed_dim']}, H = {tuple(spec['num_heads'])}, B = {tuple(spec['depths'])}."
    return create


# One timm entry point per named configuration (mixmim_tiny ... mixmim_huge), as module attributes.
for _name in MIXMIM_MODELS:
    globals()[_name] = register_model(_entrypoint(_name))


# timm names its ResNet-v2 BiT models by depth and width (resnetv2_50x1_bit ... resnetv2_152x4_bit) and fixes
# both in the entry point; a Hub export of any other depth or width (a test's tiny one) names this one,
# which takes them as arguments. Same class, stem and weight-standardised convolutions as timm's BiT.
default_cfgs.update(generate_default_cfgs({"mixmim_resnetv2_bit": {**_cfg(), "first_conv": "stem.conv",
                                                                   "classifier": "head.fc"}}))


@register_model
def mixmim_resnetv2_bit(pretrained: bool = False, **kwargs: Any):
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    kwargs.setdefault("layers", (3, 4, 6, 3))
    return build_model_with_cfg(ResNetV2, "mixmim_resnetv2_bit", pretrained, feature_cfg=dict(flatten_sequential=True),
                                stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8), **kwargs)
