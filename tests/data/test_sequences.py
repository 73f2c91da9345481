"""Leave-one-out examples on a hand-made example (spec/evaluation.md §1 steps 3-4)."""

from __future__ import annotations

import numpy as np

from fearec_dist.data.sequences import build_loo_examples, sequences_to_csr


def _examples(seqs, L):
    offsets, items = sequences_to_csr([np.array(s) for s in seqs])
    return build_loo_examples(offsets, items, np.arange(10, 10 + len(seqs)), L)


def test_loo_split_by_hand():
    out = _examples([[1, 2, 3, 4, 5], [7, 8], [9], [3, 4, 5]], L=3)
    train, valid, test = out["train"], out["valid"], out["test"]
    # user 10: targets 2, 3 train; 4 valid; 5 test. user 11: 1 sample -> train.
    # user 12: a single item, no sample. user 13: 2 samples -> 1 train + 1 test, no valid.
    assert train["target"].tolist() == [2, 3, 8, 4]
    assert train["user"].tolist() == [10, 10, 11, 13]
    assert train["history"].tolist() == [[1, 0, 0], [1, 2, 0], [7, 0, 0], [3, 0, 0]]
    assert train["length"].tolist() == [1, 2, 1, 1]
    assert valid["target"].tolist() == [4] and valid["history"].tolist() == [[1, 2, 3]]
    assert test["target"].tolist() == [5, 5] and test["user"].tolist() == [10, 13]
    # truncation keeps the most recent L items; the test history contains the valid item
    assert test["history"].tolist() == [[2, 3, 4], [3, 4, 0]]
    assert test["length"].tolist() == [3, 2]


def test_seen_is_the_whole_history_not_only_the_last_L():
    out = _examples([[1, 2, 3, 4, 5, 6]], L=2)
    test = out["test"]
    assert test["history"].tolist() == [[4, 5]]
    seen = test["seen_items"][test["seen_offsets"][0] : test["seen_offsets"][1]]
    assert seen.tolist() == [1, 2, 3, 4, 5]
    valid = out["valid"]
    assert valid["seen_items"].tolist() == [1, 2, 3, 4]


def test_counts_match_the_beauty_formula():
    # n - 3 train samples per user of length n >= 4 (spec: 131,413 on Beauty)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 100, rng.integers(5, 30)).tolist() for _ in range(200)]
    out = _examples(seqs, L=50)
    assert len(out["train"]["target"]) == sum(len(s) - 3 for s in seqs)
    assert len(out["valid"]["target"]) == len(out["test"]["target"]) == 200


def test_item_counts_and_popularity_counts_follow_the_split():
    """The examples' item counts are the training examples' targets; the popularity counts are
    every training interaction (the targets plus each user's first item); neither sees a
    valid or test target. Users of 1..6 items cover every leave-one-out case."""
    import pyarrow as pa

    from fearec_dist.data.examples import _Count
    from fearec_dist.data.popularity import training_counts

    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, 9, n) for n in (1, 2, 3, 4, 5, 6, 6, 2)]
    offsets, items = sequences_to_csr(seqs)
    split = build_loo_examples(offsets, items, np.arange(1, len(seqs) + 1), max_seq_len=4)
    expected = np.bincount(split["train"]["target"], minlength=9)
    batch = pa.table(
        {
            "user": pa.array(np.arange(1, len(seqs) + 1, dtype=np.int32)),
            "items": pa.array([s.astype(np.int32) for s in seqs], pa.list_(pa.int32())),
        }
    )
    counted = _Count(8)(batch)
    np.testing.assert_array_equal(counted["counts"][0], expected)
    assert counted["n"][0].tolist() == [len(split[k]["target"]) for k in ("train", "valid", "test")]
    firsts = np.bincount([s[0] for s in seqs if len(s) >= 2], minlength=9)
    np.testing.assert_array_equal(training_counts(offsets, items, 8), expected + firsts)
