"""``data.train_since``: only the training examples whose target is at or after a time.

Each kept example keeps its whole history as input (the last L items before the target, older
than ``train_since`` or not): "fine-tune on the last days" still reads what came before them.
Under leave-one-out the training targets are every item but each user's last two; under the
temporal protocol those before ``valid_start`` (``data/temporal.py``); ``train_since`` then keeps
the ones at or after it. The same functions cut the examples' count (``examples._Count``), the
epoch's rows (``epochs.TrainRows``) and nothing else, so the count, the planner's rows per rank
and the feed agree; the examples' cache key carries the time (``SplitProtocol.cache_key``), and
the examples removed are counted (``train_before_since`` in ``info.json`` and
``results.json["protocol"]``). Pure numpy, vectorised over all users of a batch.
"""

from __future__ import annotations

import numpy as np

from fearec_dist.data.sequences import gather_ranges


def since_filter(
    train_since: int | None,
    offsets: np.ndarray,
    times: np.ndarray | None,
    user_idx: np.ndarray,
    j: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The training positions ``(user_idx, j)`` whose target is at or after ``train_since``
    (all of them when it is None), and how many were removed.

    Args:
        train_since: the time, in the data's unit, or None.
        offsets: (U + 1,) CSR offsets; times: (I,) the interactions' timestamps.
        user_idx, j: (N,) the positions' user indices and 0-based target positions.
    """
    if train_since is None:
        return user_idx, j, 0
    if times is None:
        raise ValueError("data.train_since needs the sequences' timestamps")
    keep = times[np.asarray(offsets, dtype=np.int64)[:-1][user_idx] + j] >= train_since
    return user_idx[keep], j[keep], int(len(keep) - keep.sum())


def loo_train_positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out's training positions as ``sequences.build_loo_examples`` cuts them: for a
    user with s = n - 1 samples, targets j = 1..s but the test (j = s, when s >= 2) and the
    validation (j = s - 1, when s >= 3) ones, which are the last."""
    s = np.maximum(np.diff(np.asarray(offsets, dtype=np.int64)) - 1, 0)
    n_train = s - (s >= 2) - (s >= 3)
    user_idx = np.repeat(np.arange(len(s)), n_train)
    return user_idx, gather_ranges(np.ones(len(s), dtype=np.int64), n_train)


def loo_since_counts(
    offsets: np.ndarray, items: np.ndarray, times: np.ndarray, n_items: int, train_since: int
) -> dict[str, np.ndarray]:
    """The examples' counting pass under leave-one-out with ``train_since`` (one batch of
    sequences): ``n`` (1, 3) train/valid/test rows, ``counts`` (1, N + 1) training targets per
    item, ``before_since`` (1, 1) the training examples removed."""
    samples = np.maximum(np.diff(np.asarray(offsets, dtype=np.int64)) - 1, 0)
    user_idx, j, removed = since_filter(train_since, offsets, times, *loo_train_positions(offsets))
    n = [len(j), int((samples >= 3).sum()), int((samples >= 2).sum())]
    targets = np.asarray(items)[np.asarray(offsets, dtype=np.int64)[:-1][user_idx] + j]
    return {
        "n": np.array([n], dtype=np.int64),
        "counts": np.bincount(targets, minlength=n_items + 1).astype(np.int64)[None, :],
        "before_since": np.array([[removed]], dtype=np.int64),
    }
