"""The model every classification task trains: a pretrained encoder with its head, and what the tasks
share about it (building it from any weights a user holds, its optimiser groups, its files)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mixmim.config import ConfigError
from mixmim.evaluation.layer_decay import param_groups as layer_decay_groups
from mixmim.interop.meta import CLASSIFIER_FORMAT
from mixmim.interop.pretrained import build_encoder, input_size
from mixmim.interop.weights import Pretrained, open_weights
from mixmim.models.registry import encoder_args, encoder_config
from mixmim.models.resize import detection_windows
from mixmim.training.optim import decay_groups

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder

    class Encoder(GroupedEncoder, nn.Module):
        """For the type checker only: the encoder of a transfer task, a module of an encoder family
        (``class ViTEncoder(GroupedEncoder, VisionTransformer)``) with timm's classification API."""

        def get_classifier(self) -> nn.Module: ...

# Drop path when fine-tuning, by encoder (MixMIM section 3: 0.1 / 0.2 / 0.3 for B / L / H; timm's and MAE's
# habits for the other families); 0.1 for a model not listed.
FINETUNE_DROP_PATH: dict[str, float] = {"mixmim_large": 0.2, "mixmim_huge": 0.3, "vit_large": 0.2, "swin_large": 0.2,
                                        "pvt_v2_b5": 0.3}

__all__ = ["FINETUNE_DROP_PATH", "CLASSIFIER_FORMAT", "Classifier", "build_classifier", "classifier_groups",
           "classifier_payload",
           "resolve_model"]


class Classifier(nn.Module):
    """``encoder`` (with its family's pooling and head) as one module whose state names start with
    ``encoder.``, so its training checkpoints read back as encoder weights everywhere."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = cast("Encoder", encoder)  # every encoder family is one

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def repeated_blocks(self) -> list[nn.Module]:
        return self.encoder.repeated_blocks()


def resolve_model(config: Any) -> Pretrained:
    """Read the weights ``config.checkpoint`` names and write the encoder's resolved name, input size,
    windows and drop path into ``config.model`` (what config.yaml then shows)."""
    pretrained = open_weights(config.checkpoint, config.model.name)
    m = config.model
    shape = {k: getattr(m, k) for k in ARCHITECTURE_KEYS if getattr(m, k, None) is not None}
    if shape and pretrained.source == "random":  # a randomly initialised encoder takes the shape it is given
        accepted = set(encoder_args(pretrained.family))
        unknown = sorted(set(shape) - accepted)
        if unknown:
            raise ConfigError(f"config key 'model.{unknown[0]}': a {pretrained.family} encoder has no such option")
        pretrained.config.update(shape)
    elif shape:
        differs = {k: v for k, v in shape.items() if _same(pretrained.config.get(k)) != _same(v)}
        if differs:
            key, value = next(iter(differs.items()))
            raise ConfigError(f"config key 'model.{key}': {value}, but {config.checkpoint} holds an encoder with "
                              f"{key}={pretrained.config.get(key)}; weights cannot change shape (leave it out)")
    m.name = pretrained.model_name or m.name
    img_size, _ = input_size(pretrained, m.img_size)
    m.img_size = img_size if isinstance(img_size, int) else int(img_size[0])
    if m.drop_path_rate is None:
        m.drop_path_rate = FINETUNE_DROP_PATH.get(pretrained.model_name or "", 0.1)  # "": not a registry name
    return pretrained


# The encoder's shape in ``model``: a random initialisation takes them; a checkpoint's weights fix them.
ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio")


def _same(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def build_classifier(pretrained: Pretrained, config: Any, num_classes: int) -> Classifier:
    """The encoder of ``pretrained`` at the configured size and windows with a ``num_classes`` head."""
    m = config.model
    encoder = build_encoder(pretrained, img_size=m.img_size, window_size=m.window_size, num_classes=num_classes,
                            drop_path_rate=m.drop_path_rate, **m.options)
    if m.grad_checkpointing and hasattr(encoder, "set_grad_checkpointing"):
        cast("GroupedEncoder", encoder).set_grad_checkpointing(True)
    return Classifier(encoder)


def dense_encoder(pretrained: Pretrained, config: Any, side: int, mixmim_windows: bool) -> nn.Module:
    """The encoder of a detector or segmenter: ``side`` px input, no head, the configured drop path and
    windows, or MixMIM's detection windows (section 3: 16, and 32 on blocks 6/12/18 of stage 3) on a
    MixMIM encoder when ``mixmim_windows`` and ``model.window_size`` is not set."""
    m = config.model
    windows = m.window_size
    if windows is None and mixmim_windows and pretrained.family == "mixmim":
        windows = detection_windows(pretrained.config["depths"])
    encoder = build_encoder(pretrained, img_size=side, window_size=windows, num_classes=0,
                            drop_path_rate=m.drop_path_rate, **m.options)
    if m.grad_checkpointing and hasattr(encoder, "set_grad_checkpointing"):
        cast("GroupedEncoder", encoder).set_grad_checkpointing(True)
    return encoder


def classifier_groups(model: Classifier, optim: Any) -> list[dict[str, Any]]:
    """Layer-wise decay groups of the encoder (``optim.layer_decay``; None: one scale) with weight
    decay on every matrix except what the encoder declares."""
    if optim.layer_decay is None:
        return decay_groups(model.encoder, optim.weight_decay)
    return layer_decay_groups(model.encoder, optim.weight_decay, optim.layer_decay, optim.layer_decay_rule)


def classifier_payload(model: Classifier, classes: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """What ``model.pt`` holds: the encoder-with-head state dict (the family's own names), the
    constructor arguments that rebuild it, and the class names."""
    encoder = model.encoder
    return {"format": CLASSIFIER_FORMAT, "model": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
            "encoder_config": encoder_config(encoder), "family": getattr(encoder, "family", "mixmim"),
            "classes": classes, **extra}
