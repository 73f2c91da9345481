"""Same-target partner sampling (spec fearec.md §8) and the per-worker batch feed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fearec_dist.data.examples import assign_buckets
from fearec_dist.data.feed import TrainFeed, draw_partners


def test_partner_has_same_target_and_is_never_self_unless_singleton():
    target = np.array([5, 7, 5, 9, 5, 7])
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = draw_partners(target, rng)
        assert (target[p] == target).all()
        assert p[3] == 3  # singleton -> itself
        others = np.arange(len(target)) != 3
        assert (p[others] != np.arange(len(target))[others]).all()


def test_partner_is_uniform_over_the_other_members():
    target = np.array([1, 1, 1, 1, 2])
    rng = np.random.default_rng(1)
    counts = Counter(int(draw_partners(target, rng)[0]) for _ in range(6000))
    assert set(counts) == {1, 2, 3}
    for c in counts.values():
        assert c == pytest.approx(2000, rel=0.08)


def test_lpt_buckets_balance_counts():
    counts = np.array([0, 100, 50, 50, 30, 20, 10, 10, 5, 5])
    b = assign_buckets(counts, 3)
    loads = np.bincount(b[1:], weights=counts[1:], minlength=3)
    assert loads.max() - loads.min() <= 30
    assert b[0] == 0


class _FakeShard:
    """Stands in for a Ray DataIterator: yields whole buckets as numpy dicts."""

    def __init__(self, buckets):
        self.buckets = buckets

    def iter_batches(self, **_):
        yield from self.buckets


def _bucket(b, n, L=4):
    rng = np.random.default_rng(b)
    return {
        "history": rng.integers(1, 50, (n, L)).astype(np.int32),
        "length": np.full(n, L, np.int32),
        "target": rng.integers(1, 5, n).astype(np.int32) + 10 * b,
        "user": np.arange(n, dtype=np.int32),
        "bucket": np.full(n, b, np.int32),
    }


def test_feed_yields_exact_steps_with_partners_and_pads_when_dry():
    shard = _FakeShard([_bucket(0, 30), _bucket(1, 25)])
    feed = TrainFeed(shard, batch_size=8, steps=9, seed=3, rank=0, window=2, needs_partner=True)
    batches = list(feed.epoch(0))
    assert len(batches) == 9
    for b in batches:
        assert b["item_seq"].shape == (8, 4) and b["pos_seq"].shape == (8, 4)
    assert feed.padded == 8 * (9 - 55 // 8)
    # the same epoch and seed give the same batches
    again = list(
        TrainFeed(shard, batch_size=8, steps=9, seed=3, rank=0, window=2, needs_partner=True).epoch(
            0
        )
    )
    assert all((a["target"] == b["target"]).all() for a, b in zip(batches, again))


def test_feed_skips_surplus_and_counts_it():
    shard = _FakeShard([_bucket(0, 30), _bucket(1, 25)])
    feed = TrainFeed(shard, batch_size=8, steps=2, seed=3, rank=0, window=1, needs_partner=False)
    batches = list(feed.epoch(1))
    assert len(batches) == 2 and "pos_seq" not in batches[0]
    assert feed.skipped == 55 - 16 and feed.padded == 0
