"""Pretraining methods: each an nn.Module mapping images to a loss and outputs."""

from mixmim.methods.base import PretrainOutput
from mixmim.methods.factory import create_pretrainer, method_names
from mixmim.methods.mixmim import MixMIM, MixMIMConfig

__all__ = ["MixMIM", "MixMIMConfig", "PretrainOutput", "create_pretrainer", "method_names"]
