"""Item popularity from the **training** part of each user's sequence (the popularity baseline).

Shapes: U users, I interactions, N = n_items (ids 1..N, 0 = padding).

Leave-one-out (``sequences.build_loo_examples``) holds out a user's last item for test when
the user has at least 3 items, and the one before it for validation when the user has at least
4; everything before those targets is training data (histories and training targets alike),
and a user with a single item makes no example at all. ``training_counts`` counts exactly the
items of the training examples, so a popularity ranking built from it has never seen a valid or
test target (RecBole's ``Pop`` model likewise counts only its training split).
``vocab/items.parquet``'s ``count`` column counts every interaction and is *not* that.

Under the temporal protocol (``data/temporal.py``) the training part is every interaction before
the training cut ``valid_start`` (``before=``), for the validation and the test rows alike: the
model trains on that part only, so its baseline counts the same (and the items it counts are the
warm items, the candidates).

Used by serving's ``--fallback popularity`` (the export stores the counts in ``items.parquet``)
and by the popularity baseline of ``evaluate``.
"""

from __future__ import annotations

import numpy as np

from fearec_dist.config import StorageSection
from fearec_dist.data.sequences import list_csr
from fearec_dist.data.versions import resolve_version
from fearec_dist.storage import resolve


def held_out_per_user(lengths: np.ndarray) -> np.ndarray:
    """(U,) how many items at the end of each sequence are valid/test targets (0, 1 or 2).

    ``build_loo_examples`` makes s = n - 1 samples from n items: test when s >= 2, valid too
    when s >= 3.
    """
    samples = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    return (samples >= 2).astype(np.int64) + (samples >= 3)


def training_counts(
    offsets: np.ndarray,
    items: np.ndarray,
    n_items: int,
    *,
    targets_only: bool = False,
    times: np.ndarray | None = None,
    before: int | None = None,
) -> np.ndarray:
    """Interactions per item id in the training part of every sequence.

    Args:
        offsets: (U + 1,) CSR offsets into ``items`` (each user's run oldest first).
        items: (I,) item ids in 1..n_items.
        n_items: N.
        targets_only: count only the training examples' targets (every training position but
            a user's first item, which is only ever history): the examples' ``item_counts``.
        times, before: the temporal protocol: (I,) timestamps, and the training cut; the
            training part is then every interaction at ``times < before`` (None: leave-one-out).

    Returns:
        (N + 1,) int64 counts; index 0 (padding) is 0.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    # training items per user; a user with one item makes no example, so counts nothing
    keep = np.where(lengths >= 2, lengths - held_out_per_user(lengths), 0)
    # position of each interaction inside its user's run, vectorised
    user = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(items)) - offsets[:-1][user]
    train = pos < keep[user] if before is None else np.asarray(times) < before
    train_items = np.asarray(items)[train & (pos >= int(targets_only))]
    counts = np.bincount(train_items, minlength=n_items + 1).astype(np.int64)
    if len(counts) > n_items + 1:
        raise ValueError(f"item id {len(counts) - 1} is outside 1..{n_items}")
    counts[0] = 0
    return counts


def read_training_counts(
    prepared_uri: str,
    n_items: int,
    storage: StorageSection | None = None,
    before: int | None = None,
) -> np.ndarray:
    """``training_counts`` of a prepared dataset, streamed batch by batch (memory: one batch of
    sequences plus the (N + 1,) counts).

    Args:
        prepared_uri: the output of ``prepare`` (local path or URI).
        n_items: N (``meta.json``'s ``n_items``).
        storage: object-storage options.
        before: the temporal protocol's training cut (``valid_start``); None: leave-one-out.

    Returns:
        (N + 1,) int64 training interactions per item id.
    """
    import pyarrow.dataset as pads

    prepared_uri = resolve_version(prepared_uri, storage=storage).uri  # a root: its newest
    fs, root = resolve(f"{prepared_uri}/sequences", storage)
    total = np.zeros(n_items + 1, dtype=np.int64)
    dataset = pads.dataset(root, filesystem=fs, format="parquet")
    columns = ["items"] if before is None else ["items", "timestamps"]
    for batch in dataset.to_batches(columns=columns, batch_size=65_536):
        offsets, values = list_csr(batch.column("items"))
        times = None
        if before is not None:
            times = list_csr(batch.column("timestamps"))[1].to_numpy(zero_copy_only=False)
        items = values.to_numpy(zero_copy_only=False)
        total += training_counts(offsets, items, n_items, times=times, before=before)
    return total


def popularity_ranking(
    counts: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k most popular item ids, most popular first; ties go to the smaller id.

    Args:
        counts: (N + 1,) interactions per item id (``training_counts``); id 0 is never ranked.
        k: how many to return (fewer when fewer items remain).
        exclude: item ids not to rank (e.g. the user's history), or None.

    Returns:
        ``(ids (k,) int64, counts (k,) int64)``.
    """
    score = np.asarray(counts, dtype=np.int64).copy()
    score[0] = -1
    if exclude is not None and len(exclude):
        score[np.asarray(exclude, dtype=np.int64)] = -1
    n_left = int((score >= 0).sum())
    # stable sort on -count keeps ascending ids inside each tie
    ids = np.argsort(-score, kind="stable")[: min(k, n_left)]
    return ids.astype(np.int64), score[ids]
