"""Checkpoints in and out: the public release's names, safetensors, timm."""

from mixmim.interop.official import convert_official, to_official

__all__ = ["convert_official", "to_official"]
