"""The method contract: everything the training loop, the command line and the pictures may ask of a
pretraining method, in one place (issue 22). Nothing outside ``mixmim.methods`` needs to know which
method it drives, and a method needs to know nothing of the loop.

The loop calls exactly::

    out = method(images)                       # a training step: out.loss (0-d), out.metrics
    with torch.no_grad():                      # in eval mode, only when it draws
        out = method(images, picture=True)     # out.picture for mixmim.viz.reconstruction
    method.encoder, method.num_groups, method.batch_multiple, method.lr_batch(global_batch)
    method.no_weight_decay(), method.no_weight_decay_keywords(), method.repeated_blocks()

A training step does no picture work: the tensors a picture needs beyond the loss (decoded colour
bins, upsampled predictions, greyed inputs) are made only when ``picture=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder
    from mixmim.models.token_dropping import TokenDroppingEncoder

    class Encoder(GroupedEncoder, nn.Module):
        """For the type checker only: a method's encoder, a module with the group-map interface (every
        family is one: ``class ViTEncoder(GroupedEncoder, VisionTransformer)``)."""

    class TokenDroppingModule(Encoder, TokenDroppingEncoder):
        """For the type checker only: the encoder of MAE and MixedAE, which also drops tokens (the plain
        ViT; :func:`mixmim.methods.mae.require_token_dropping` checks it)."""


@dataclass
class Picture:
    """What a reconstruction grid needs (``mixmim.viz.reconstruction``), in the method's own units.

    - ``inputs``: (B, C, H, W) what the encoder saw, in normalised pixels (MixMIM: the mixed images;
      SimMIM: masked cells at 0, the data mean; MAE: dropped patches at 0; MixedAE: the mixed sample
      that holds each image).
    - ``reconstruction``: (S, L, P) predicted patches of the S decoded sequences in
      :func:`~mixmim.methods.patches.patchify` order, P = cell * cell * C, already in pixel units
      (SimMIM's colour bins decoded to their centre colours, coarse targets repeated over their
      pixels).
    - ``hidden``: (S, L) bool, the cells each sequence is scored on; ``sources``: (S,) the image
      each sequence reconstructs; ``target``: (S, L, P) what each sequence was asked to predict.
    - ``cell``: pixels per side of a predicted patch; ``norm_pix``: the target is normalised per
      patch (the picture then borrows each hidden patch's mean and variance, or draws it raw).
    """

    inputs: Tensor
    reconstruction: Tensor
    hidden: Tensor
    sources: Tensor
    cell: int
    norm_pix: bool
    target: Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.inputs.shape[1])


@dataclass
class PretrainOutput:
    """``loss``: 0-d tensor to minimise. ``metrics``: what the method reports besides its loss (e.g.
    MixedAE's ``recon_loss``, ``contrastive_loss``, ``topk_acc_layer<i>``), plain floats. ``mask``:
    the mask or group map the step used, in the method's own layout (pass it back as ``mask=`` to
    replay the step). ``picture``: filled only when the method is called with ``picture=True``."""

    loss: Tensor
    mask: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    picture: Picture | None = None


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks: its own ``repeated_blocks()`` where it has one, else the
    ``blocks`` of the encoder or of each of its ``layers``/``stages``."""
    own = getattr(encoder, "repeated_blocks", None)
    if callable(own):
        return list(own())
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.Module):
        return list(cast("Iterable[nn.Module]", blocks))  # a ModuleList or Sequential of blocks
    stages = getattr(encoder, "layers", None) or getattr(encoder, "stages", None) or []
    return [blk for stage in stages for blk in getattr(stage, "blocks", [])]


class PretrainMethod(nn.Module, ABC):
    """Base of every pretraining method: images -> :class:`PretrainOutput`.

    Attributes a method sets in its constructor: ``encoder`` (the backbone, any
    :class:`~mixmim.models.base.GroupedEncoder`; the only part transferred), ``config`` (its options
    dataclass), ``cell`` (pixels per side of a predicted patch), ``in_chans`` (image channels). The
    class attribute ``name`` is the method's name in configs and ``create_pretrainer``."""

    name: ClassVar[str] = ""
    # Constructor arguments the factory gives the encoder of a family (registry family name) unless
    # the user overrides them: a method's own defaults for a backbone (MAE: fixed positions on a ViT).
    encoder_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    encoder: Encoder
    config: Any
    cell: int
    in_chans: int

    @property
    def num_groups(self) -> int:
        """Images per mixed sample (1 for SimMIM and MAE): a picture batch or ``mixmim reconstruct``
        takes a multiple of it."""
        return 1

    @property
    def batch_multiple(self) -> int:
        """Every (micro-)batch must be a multiple of this (MixedAE: whole groups of 1/r images)."""
        return 1

    @property
    def norm_pix(self) -> bool:
        """Whether the target is normalised per patch (MAE's ``norm_pix_loss``)."""
        return bool(getattr(self.config, "norm_pix_loss", False))

    def lr_batch(self, global_batch: int) -> int:
        """The batch size the learning-rate scaling rule ``lr = base_lr x batch / 256`` counts, for a
        step of ``global_batch`` images (every method but MixedAE's "samples" reading: the images)."""
        return int(global_batch)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides the 1-d parameters and biases."""
        return set()

    def no_weight_decay_keywords(self) -> set[str]:
        """Substrings of parameter names excluded from weight decay."""
        return set()

    def head_blocks(self) -> list[nn.Module]:
        """The decoder's or prediction head's repeated blocks (none for a linear head)."""
        decoder = getattr(self, "decoder", None)
        return list(decoder.repeated_blocks()) if decoder is not None else []

    def repeated_blocks(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: the encoder's blocks, then the decoder's or head's."""
        return encoder_blocks(self.encoder) + self.head_blocks()

    def wants_picture(self, picture: bool | None) -> bool:
        """Resolve ``forward``'s ``picture`` argument: a picture only when asked for."""
        return bool(picture)

    @abstractmethod
    def forward(self, images: Tensor, mask: Tensor | None = None, *, picture: bool | None = None) -> PretrainOutput:
        """``images``: (B, C, H, W) normalised; ``mask``: the method's mask layout (drawn when None);
        ``picture``: also return what a reconstruction grid needs (``out.picture``)."""


class VersionedState:
    """Mixin for a method whose weights mean something else than they did in an earlier version of
    this code: it keeps ``method_version`` (a buffer) in its state, and loading a state of another
    version, or of none, fails in one line that says why instead of running the new code on weights
    trained for the old one (a state that holds none of the method's keys is left to
    ``load_state_dict``). Subclasses set ``state_version`` and ``state_changes``."""

    state_version: ClassVar[int]
    state_changes: ClassVar[str]

    def init_state_version(self: Any) -> None:
        self.register_buffer("method_version", torch.tensor(self.state_version), persistent=True)
        self._register_load_state_dict_pre_hook(self._check_state_version)

    def _check_state_version(self: Any, state_dict, prefix, local_metadata, strict, missing, unexpected,
                             errors) -> None:
        # (PyTorch passes strict=True to every module's hook whatever the caller asked, so the
        # check cannot depend on it.)
        if not any(key.startswith(prefix) for key in state_dict):
            return
        saved = state_dict.get(prefix + "method_version")
        if saved is not None and int(saved) == self.state_version:
            return
        found = "no method_version (it was made before versions were recorded)" if saved is None else \
            f"method_version {int(saved)}"
        raise ValueError(f"this {self.name} checkpoint has {found}; this code is version {self.state_version} "
                         f"({self.state_changes}) and would give other results with its weights; its encoder still "
                         "transfers (mixmim knn/linprobe/finetune read only the encoder), or set the state's "
                         f"method_version to {self.state_version} to take the weights as they are")


def default_in_chans(encoder: nn.Module) -> int:
    """The image channels an encoder was built for (its constructor's ``in_chans``, 3 if unknown)."""
    config = getattr(encoder, "config", None)
    if callable(config):
        return int(config().get("in_chans", 3))
    return 3
