"""Weights and checkpoints in and out: the public release's names, training checkpoints (atomic,
checksummed), pretrained weights for transfer, safetensors exports, timm registration."""
