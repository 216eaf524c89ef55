"""mixmim: self-supervised pretraining of vision backbones by mixed and masked image modeling."""

import mixmim.interop.timm_models  # noqa: F401  (registers mixmim_tiny ... mixmim_huge with timm.create_model)
from mixmim.interop.official import convert_official
from mixmim.methods.factory import create_pretrainer
from mixmim.models.registry import create_classifier, create_encoder

__version__ = "0.1.0"
__all__ = ["convert_official", "create_classifier", "create_encoder", "create_pretrainer", "__version__"]
