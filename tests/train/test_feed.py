"""Same-target partner sampling (spec fearec.md §8); the feed itself: tests/data/test_epochs.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fearec_dist.data.epochs import draw_partners


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
