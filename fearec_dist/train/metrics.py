"""Full-ranking metrics (spec/evaluation.md §2-3), summed per worker and all-reduced once.

Shapes: B rows in an evaluation batch, V = n_items + 1 score columns (column 0 is padding).

Both protocols come from one pass of scores:
- RecBole (keys ``hr@K``, ``ndcg@K``, ``mrr@K``): history kept among the candidates.
- history-masked (keys ``masked_hr@K``, …): every item of the user's whole history before the target
  scored -inf, the target itself never masked (FMLP-Rec/BSARec style, with -inf instead of 0).

rank = 1 + #{items c != target : score_c > score_target}: ties go to the target, no sort needed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

METRICS = ("hr", "ndcg", "mrr")


def ranks_from_scores(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of the target among all columns.

    Args:
        scores: (B, V) float scores; column 0 (padding) must already be -inf.
        target: (B,) long item ids.

    Returns:
        (B,) long ranks, 1 = best.
    """
    target_score = scores.gather(1, target[:, None])  # (B, 1)
    return (scores > target_score).sum(dim=1) + 1


def mask_history_(
    scores: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor, target: torch.Tensor
) -> None:
    """In place: scores[seen_rows[i], seen_items[i]] = -inf, then the targets' own scores restored.

    Args:
        scores: (B, V) scores.
        seen_rows: (S,) row index of each history entry.
        seen_items: (S,) item id of each history entry.
        target: (B,) item ids, never masked.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    keep = scores[rows, target].clone()
    scores[seen_rows, seen_items] = float("-inf")
    scores[rows, target] = keep


def metric_sums(ranks: torch.Tensor, topk: list[int], prefix: str = "") -> dict[str, float]:
    """Sums (not means) of HR/NDCG/MRR@K over the batch, so shards can be added up."""
    ranks_f = ranks.double()
    out: dict[str, float] = {}
    for k in topk:
        hit = ranks <= k
        out[f"{prefix}hr@{k}"] = float(hit.sum())
        out[f"{prefix}ndcg@{k}"] = float((hit / torch.log2(ranks_f + 1.0)).sum())
        out[f"{prefix}mrr@{k}"] = float((hit / ranks_f).sum())
    return out


def metric_names(topk: list[int]) -> list[str]:
    names = [f"{m}@{k}" for k in topk for m in METRICS]
    return names + [f"masked_{n}" for n in names]


class MetricAccumulator:
    """Adds per-batch sums; ``result()`` all-reduces (when a process group is up) and divides."""

    def __init__(self, topk: list[int]) -> None:
        self.topk = list(topk)
        self.names = metric_names(self.topk)
        self.sums = np.zeros(len(self.names), dtype=np.float64)
        self.count = 0

    def add(self, ranks: torch.Tensor, masked_ranks: torch.Tensor) -> None:
        sums = metric_sums(ranks, self.topk) | metric_sums(masked_ranks, self.topk, "masked_")
        self.sums += np.array([sums[n] for n in self.names])
        self.count += int(ranks.numel())

    def result(self, all_reduce: bool = True) -> dict[str, float]:
        totals = np.append(self.sums, self.count)
        if all_reduce:
            totals = _all_reduce_sum(totals)
        count = totals[-1]
        if count == 0:
            return {n: math.nan for n in self.names} | {"n_users": 0}
        means = {n: float(v / count) for n, v in zip(self.names, totals[:-1])}
        return means | {"n_users": int(count)}


def _all_reduce_sum(values: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()
