"""The evaluation formulas by hand: weighted k-NN votes (exp(cos / T) over the k nearest, the
temperature deciding between one close neighbour and several far ones), top-k counts, and the
confusion matrix's orientation (rows are the true classes)."""

from __future__ import annotations

import math

import torch

from mixmim.evaluation.knn import knn_scores
from mixmim.evaluation.metrics import confusion_matrix, topk_correct


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_knn_votes_are_exp_cos_over_t_of_the_k_nearest():
    # The query is (1, 0). Class 0: one neighbour at cos 0.9; class 1: two at cos 0.5; class 2: one at
    # cos -1, outside the 3 nearest.
    bank = torch.tensor([_unit(math.acos(0.9)), _unit(math.acos(0.5)), _unit(-math.acos(0.5)), [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # not normalised: the function normalises
    sharp = knn_scores(bank, labels, query, num_classes=3, k=3, temperature=0.07)
    torch.testing.assert_close(sharp, torch.tensor([[math.exp(0.9 / 0.07), 2 * math.exp(0.5 / 0.07), 0.0]]),
                               rtol=1e-5, atol=0.0)
    assert sharp.argmax().item() == 0  # at T = 0.07 the one close neighbour wins
    flat = knn_scores(bank, labels, query, num_classes=3, k=3, temperature=1.0)
    torch.testing.assert_close(flat, torch.tensor([[math.exp(0.9), 2 * math.exp(0.5), 0.0]]), rtol=1e-5, atol=0.0)
    assert flat.argmax().item() == 1  # at T = 1 the two far ones do


def test_topk_counts_a_target_only_within_its_k():
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]])
    targets = torch.tensor([2, 0, 2])  # second best, best, third best
    assert topk_correct(logits, targets, (1, 2, 3)) == [1, 2, 3]


def test_confusion_rows_are_true_classes():
    targets = torch.tensor([0, 0, 1, 2])
    predictions = torch.tensor([1, 1, 1, 0])
    assert confusion_matrix(predictions, targets, 3).tolist() == [[0, 2, 0], [0, 1, 0], [1, 0, 0]]
