"""MixedAE's homologous attention (Chen et al. 2023, section 3.2, eq. 6) as an attention plan for any
encoder with the :class:`~mixmim.models.token_dropping.TokenDroppingEncoder` interface, and the TopK
sampling accuracy of Figure 6."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(index: Tensor, sources: Tensor) -> Tensor:
    """MixedAE section 4.5, Figure 6: the share of kept keys that come from the query's own image.
    ``index``: (B, H, N, K) kept key positions; ``sources``: (B, N) image id per position, negative
    for tokens of no image (the class token: as a key it counts as a miss, as a query it is skipped)."""
    b, h, n, k = index.shape
    kept = sources.gather(1, index.reshape(b, -1)).reshape(b, h, n, k)
    hits = (kept == sources[:, None, :, None]).float().mean(dim=-1)  # (B, H, N)
    # A weighted mean, not boolean indexing: no host synchronisation inside the forward pass.
    queries = (sources >= 0)[:, None, :].float().expand(b, h, n)
    return (hits * queries).sum() / queries.sum().clamp(min=1)


@dataclass(eq=False)
class TopK:
    """Homologous attention (eq. 6): every query keeps its ``k`` highest scores ``q k^T / sqrt(d)``
    and the softmax runs over those only (all of them when ``k`` is at least the sequence length).
    The class token takes part like any token, as a query and as a key: eq. 6 replaces the ViT's
    self-attention as it is, and the encoder is told nothing about the images.

    ``sources``: optional ``(B, L)`` image ids of the patches (the sequence's prefix tokens are not
    counted). They are read only to *measure* the TopK sampling accuracy of Figure 6, never to
    attend; after the block has run, ``accuracy`` holds the share of the ``k`` kept keys that are
    patches of the query's own image, averaged over heads and patch queries (a 0-d tensor)."""

    k: int
    sources: Tensor | None = None
    accuracy: Tensor | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        """``(B, H, N, D)`` queries, keys, values -> attended values: softmax over each query's TopK
        scores, every other key weight 0."""
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
        n = scores.shape[-1]
        top, index = scores.topk(min(int(self.k), n), dim=-1)
        # Scatter the K weights back into a dense row: exactly K keys per query even when scores tie
        # (a threshold on the K-th value would keep every tied key). Softmax in at least float32 as
        # the scores may be bf16 under autocast.
        weights = top.to(torch.promote_types(top.dtype, torch.float32)).softmax(dim=-1).to(v.dtype)
        attn = torch.zeros(scores.shape, dtype=v.dtype, device=v.device).scatter(-1, index, weights)
        if dropout_p:
            attn = F.dropout(attn, dropout_p)
        if self.sources is not None:
            with torch.no_grad():
                b = q.shape[0]
                ids = self.sources.to(device=q.device, dtype=torch.long).expand(b, -1)
                prefix = torch.full((b, n - ids.shape[1]), -1, dtype=torch.long, device=q.device)
                self.accuracy = topk_accuracy(index, torch.cat([prefix, ids], dim=1))
        return attn @ v
