"""The in-memory same-target pairing and feed (data/pairing.py) against the real pairing's rules."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from fearec_dist.data.feed import to_model_batch
from fearec_dist.data.pairing import MemoryFeed, epoch_partners, paired_epoch
from fearec_dist.data.sequences import build_loo_examples
from tests.data.test_epochs import _chi_square_uniform


def _train(n_users: int = 60, n_items: int = 12, seed: int = 0, max_seq_len: int = 8) -> dict:
    """The training examples of random sequences (3..11 items per user)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 12, n_users)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    items = rng.integers(1, n_items + 1, int(lens.sum())).astype(np.int32)
    users = np.arange(1, n_users + 1, dtype=np.int32)
    return build_loo_examples(offsets, items, users, max_seq_len, splits=("train",))["train"]


def _partners(train: dict, seed: int, epoch: int) -> np.ndarray:
    return epoch_partners(train["target"], train["user"], train["position"], seed, epoch)


def test_partner_has_the_same_target_and_is_another_member_unless_alone() -> None:
    train = _train(n_items=150)
    partner = _partners(train, 3, 0)
    sizes = Counter(train["target"].tolist())
    assert 1 in sizes.values() and max(sizes.values()) > 2  # both cases occur
    for i, j in enumerate(partner):
        assert train["target"][j] == train["target"][i]
        assert (j == i) == (sizes[int(train["target"][i])] == 1)
    paired = paired_epoch(train, 3, 0)
    assert (paired["pos_history"] == train["history"][partner]).all()
    assert (paired["pos_length"] == train["length"][partner]).all()


def test_partners_are_seeded_by_seed_and_epoch_not_by_row_order() -> None:
    train = _train()
    ids = list(zip(train["user"].tolist(), train["position"].tolist()))
    a = _partners(train, 3, 2)
    assert (a == _partners(train, 3, 2)).all()
    assert not (a == _partners(train, 3, 3)).all()  # re-drawn each epoch
    assert not (a == _partners(train, 4, 2)).all()  # and per seed
    perm = np.random.default_rng(5).permutation(len(ids))
    b = _partners({k: v[perm] for k, v in train.items()}, 3, 2)
    # the same example gets the same partner whatever order the rows came in
    assert [ids[a[i]] for i in perm] == [ids[perm[j]] for j in b]


def test_partner_distribution_is_uniform_over_epochs() -> None:
    """The chi-square test of the real pairing (tests/data/test_epochs.py), on this one."""
    train = _train(n_users=40, n_items=30, seed=2)
    ids = list(zip(train["user"].tolist(), train["position"].tolist()))
    groups = defaultdict(list)
    for ex, t in zip(ids, train["target"].tolist()):
        groups[t].append(ex)
    members = {ex: groups[t] for ex, t in zip(ids, train["target"].tolist())}
    draws: dict[tuple, list] = defaultdict(list)
    for epoch in range(300):
        for ex, j in zip(ids, _partners(train, 3, epoch)):
            draws[ex].append(ids[j])
    stat, dof = _chi_square_uniform(draws, members)
    assert dof > 100
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5
    assert z < 3.1, (stat, dof, z)


def test_feed_takes_each_example_at_most_once_per_epoch_and_resumes_exactly() -> None:
    train = _train(n_users=80)
    n = len(train["target"])
    feed = MemoryFeed(train, batch_size=16, seed=7, pair=True)
    assert feed.steps == n // 16 and feed.stats.skipped == n - 16 * feed.steps
    cols = zip(train["user"].tolist(), train["history"].tolist(), train["target"].tolist())
    key = {(u, *h, t): i for i, (u, h, t) in enumerate(cols)}  # an example's content
    assert len(key) == n
    epoch = list(feed.epoch(1))
    assert len(epoch) == feed.steps
    expected = to_model_batch(paired_epoch(train, 7, 1))
    assert set(epoch[0]) == set(expected)
    rows = []
    for batch in epoch:
        assert len(batch["target"]) == 16
        for b in range(16):
            i = key[(batch["user"][b], *batch["item_seq"][b], batch["target"][b])]
            rows.append(i)
            assert (batch["pos_seq"][b] == expected["pos_seq"][i]).all()
    assert len(set(rows)) == len(rows) == 16 * feed.steps  # no example twice in an epoch
    resumed = list(feed.epoch(1, skip=3))
    assert all((x["user"] == y["user"]).all() for x, y in zip(resumed, epoch[3:]))
    assert len(resumed) == feed.steps - 3
    assert not (next(feed.epoch(2))["user"] == epoch[0]["user"]).all()
    unpaired = next(MemoryFeed(train, batch_size=16, seed=7, pair=False).epoch(1))
    assert "pos_seq" not in unpaired
