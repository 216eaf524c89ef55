"""Pretraining methods: each a :class:`~mixmim.methods.base.PretrainMethod` mapping images to a
:class:`~mixmim.methods.base.PretrainOutput` (loss, metrics, mask, and a picture on request).

The options of every method (:mod:`mixmim.methods.options`) load without torch: the config system reads
them; the names below are imported on first use."""

from __future__ import annotations

import importlib

_PUBLIC = {
    "METHODS": "mixmim.methods.factory", "build_method": "mixmim.methods.factory",
    "build_pretrainer": "mixmim.methods.factory", "create_pretrainer": "mixmim.methods.factory",
    "method_config_class": "mixmim.methods.factory", "method_names": "mixmim.methods.factory",
    "MixMIM": "mixmim.methods.mixmim", "MixMIMConfig": "mixmim.methods.options",
    "Picture": "mixmim.methods.base", "PretrainMethod": "mixmim.methods.base", "PretrainOutput": "mixmim.methods.base",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixmim.methods' has no attribute {name!r}")
