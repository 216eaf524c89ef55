"""k-nearest-neighbour classification on frozen features: cosine similarity, k = 20, votes weighted by
exp(similarity / 0.07) (the weighted k-NN of Wu et al. 2018, used by DINO and others to compare
self-supervised encoders without training).

Features are the encoder's pooled final-norm output, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_scores(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(N_test, num_classes) class scores: the sum of exp(cos / T) over the k most similar training
    samples of each class. Features need not be normalised (they are here)."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(query), num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[idx].to(weights.device), weights)
        out.append(votes)
    return torch.cat(out)
