"""Encoders and decoders; nothing here knows about losses or training."""

from mixmim.models.mixmim_vit import MixMIMTransformer
from mixmim.models.registry import create_classifier, create_encoder, model_names

__all__ = ["MixMIMTransformer", "create_classifier", "create_encoder", "model_names"]
