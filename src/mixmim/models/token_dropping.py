"""The second, small encoder interface: what MAE and MixedAE need beyond the group map.

MAE drops the hidden patches before the encoder (He et al. 2022 section 3; MixedAE section 3.1) and
MixedAE chooses, in every block, the keys each query attends to (MixedAE section 3.2, eq. 6). A
hierarchical encoder needs every position of its grid for windows and patch merging, so only a plain
ViT offers this (:class:`~mixmim.models.vit.ViTEncoder`); methods test for it with
``isinstance(encoder, TokenDroppingEncoder)`` and never reach into the ViT's modules.

An *attention plan* tells one block how to attend: anything with ``attend(q, k, v, dropout_p)``. The
encoder computes the block's queries, keys and values and hands them over; the plan returns the
attended values. The encoder knows nothing of what a plan does (MixedAE's TopK plan lives in
:mod:`mixmim.methods.homologous`), and a plan knows nothing of the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AttentionPlan(Protocol):
    """One block's way of attending. ``q, k, v``: ``(B, heads, N, head_dim)``, queries not yet
    scaled; returns ``(B, heads, N, head_dim)``. ``dropout_p``: the block's attention dropout (0 in
    eval mode)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor: ...


@runtime_checkable
class TokenDroppingEncoder(Protocol):
    """What MAE and MixedAE ask of an encoder (besides :meth:`embed` of the group-map interface).

    ``num_prefix_tokens``: the tokens in front of the patches (the class token); ``num_blocks``: the
    blocks a per-block list of plans must cover. The token layout of both paths is
    ``[prefix tokens, patches]``."""

    num_prefix_tokens: int

    @property
    def num_blocks(self) -> int: ...

    def embed(self, images: Tensor, groups: Tensor | None = None) -> Tensor:
        """Pixels -> ``(B, L, C)`` patch tokens, positions not added."""
        ...

    def forward_kept(self, tokens: Tensor, keep_index: Tensor) -> Tensor:
        """MAE's encoder: ``tokens`` ``(B, L, C)`` from :meth:`embed`, ``keep_index`` ``(B, n)`` the
        patches to keep -> ``(B, P + n, C)`` after the final norm: the prefix tokens, then the kept
        patches in ``keep_index`` order. The other patches are dropped (never computed), each kept
        patch carries its own position."""
        ...

    def forward_plans(self, tokens: Tensor, plans: Sequence[AttentionPlan | None],
                      layer_embed: Tensor | None = None, *, accumulate: bool = True) -> Tensor:
        """Every patch, block i attending by ``plans[i]`` (None: global attention) -> ``(B, P + L, C)``
        *before* the final norm. ``layer_embed`` ``(B, L, C)`` is added to the patches at the input of
        every block (the prefix tokens get none); ``accumulate=False`` keeps it out of the residual
        stream (every block reads ``x + e``, none writes it)."""
        ...

    def final_norm(self, x: Tensor) -> Tensor:
        """The encoder's final LayerNorm, on every token."""
        ...
