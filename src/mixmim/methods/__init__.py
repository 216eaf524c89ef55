"""Pretraining methods: each a :class:`~mixmim.methods.base.PretrainMethod` mapping images to a
:class:`~mixmim.methods.base.PretrainOutput` (loss, metrics, mask, and a picture on request)."""

from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput
from mixmim.methods.factory import (METHODS, build_pretrainer, create_pretrainer, method_config_class,
                                    method_names)
from mixmim.methods.mixmim import MixMIM, MixMIMConfig

__all__ = ["METHODS", "MixMIM", "MixMIMConfig", "Picture", "PretrainMethod", "PretrainOutput", "build_pretrainer",
           "create_pretrainer", "method_config_class", "method_names"]
