"""Evaluation is float32 whatever ``train.amp`` says: the numbers a run reports are the ones
``fearec-dist evaluate`` reproduces (spec/evaluation.md §2: ties go to the target, so rounding
products to bf16 would turn near-ties into ties and inflate every metric)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fearec_dist.train.evaluate import evaluate

CPU = torch.device("cpu")
V, D, B = 2001, 64, 64


class FixedQueries:
    """A scorer whose queries are fixed float32 rows (the encoder's output), against a table."""

    def __init__(self, query: torch.Tensor, table: torch.Tensor) -> None:
        self.query, self.table = query, table

    def encode(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.query[batch["user"]]

    def item_table(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.table, None


def near_tie_case() -> tuple[FixedQueries, dict[str, np.ndarray], np.ndarray]:
    """Queries, their target rows, and for every row many items whose float32 score is just
    above the target's (by far less than bf16's resolution): the float64 ranks, by hand."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, D, generator=g)
    query = torch.randn(B, D, generator=g)
    target = torch.arange(1, B + 1)
    for i in range(B):  # 20 near-duplicates of each target row, nudged towards the query
        rows = torch.arange(B + 1 + 20 * i, B + 1 + 20 * (i + 1))
        table[rows] = table[target[i]] + 2e-5 * query[i] * (1 + torch.rand(20, 1, generator=g))
    scores = query.double() @ table.double().T  # (B, V)
    scores[:, 0] = -np.inf
    own = scores.gather(1, target[:, None])
    ranks = (scores > own).sum(1).numpy() + 1
    batch = {
        "item_seq": np.zeros((B, 4), np.int64),
        "seq_len": np.ones(B, np.int64),
        "target": target.numpy(),
        "user": np.arange(B, dtype=np.int64),
    }
    return FixedQueries(query, table), batch, ranks


def test_near_ties_rank_the_same_with_bf16_autocast_on_and_off():
    scorer, batch, ranks = near_tie_case()
    assert (ranks > 20).all()  # every target has 20 near-duplicates just above it
    topk = [V]  # every rank counts: MRR@V is the mean of 1 / rank

    def metrics(amp: str) -> dict[str, float]:
        return evaluate(torch.nn.Module(), scorer, [batch], topk, CPU, amp, all_reduce=False)

    off, bf16 = metrics("off"), metrics("bf16")
    assert off[f"mrr@{V}"] == pytest.approx(float(np.mean(1.0 / ranks)), rel=1e-6)
    for key, value in off.items():
        assert bf16[key] == value, key
    # and inside an enclosing autocast (the trainer's), scoring still does not round
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = metrics("off")
    assert inside == off


# A run trained under train.amp=bf16 reports the test metrics `evaluate --checkpoint` reproduces
# in float32: tests/train/test_trainer_ray.py::test_sampled_softmax_with_sparse_items_on_two_workers
# trains with bf16 and compares the two (one run serves both checks).
