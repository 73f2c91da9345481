"""Metric values on hand-computed ranks (spec/evaluation.md §2-3)."""

from __future__ import annotations

import math

import pytest
import torch

from fearec_dist.train.metrics import MetricAccumulator, mask_history_, ranks_from_scores


def test_rank_counts_strictly_greater_and_ties_favour_target():
    scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.5, 0.1], [-math.inf, 0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([2, 1])
    assert ranks_from_scores(scores, target).tolist() == [2, 4]


def test_metric_values():
    acc = MetricAccumulator([1, 3])
    ranks = torch.tensor([1, 3, 7])
    acc.add(ranks, ranks)
    out = acc.result(all_reduce=False)
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@3"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert out["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert out["n_users"] == 3


def test_history_mask_removes_seen_items_but_never_the_target():
    scores = torch.tensor([[-math.inf, 0.9, 0.8, 0.7, 0.1]])
    target = torch.tensor([3])
    assert ranks_from_scores(scores, target).item() == 3
    # history {1, 3}: item 1 masked, target 3 kept although it is in the history
    mask_history_(scores, torch.tensor([0, 0]), torch.tensor([1, 3]), target)
    assert scores[0, 1] == -math.inf and scores[0, 3] == pytest.approx(0.7)
    assert ranks_from_scores(scores, target).item() == 2
