"""Leave-one-out examples from time-ordered user sequences (spec/evaluation.md §1, steps 3-4).

Pure numpy, vectorised over all users at once (no Python loop per user). Input is a CSR of
sequences: user ``users[u]``'s items are ``items[offsets[u]:offsets[u + 1]]``, oldest first.

For a user with items i_1..i_n there are n - 1 samples: sample t (t = 2..n) has target i_t and
history the last min(t - 1, L) items before it, left-aligned and right-padded with 0. The last
sample goes to test, the one before to validation, the rest to training; with only 2 samples,
1 train + 1 test; with 1 sample, train only; a user with a single item yields nothing.
valid/test rows also carry ``seen``: the user's *whole* history before the target (not only the
last L), used by the history-masked protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fearec_dist.config import StorageSection
from fearec_dist.data.versions import resolve_version
from fearec_dist.storage import resolve

Split = dict[str, np.ndarray]


def gather_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_start = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total) - row_start)


def build_loo_examples(
    offsets: np.ndarray,
    items: np.ndarray,
    users: np.ndarray,
    max_seq_len: int,
    splits: tuple[str, ...] = ("train", "valid", "test"),
) -> dict[str, Split]:
    """Builds train/valid/test examples.

    Args:
        offsets: (U + 1,) CSR offsets into ``items``.
        items: (I,) item ids, each user's run time-ordered.
        users: (U,) user ids.
        max_seq_len: L.
        splits: which of train/valid/test to build (the others are not computed).

    Returns:
        ``{split: {"history" (N, L) int32, "length" (N,) int32, "target" (N,) int32,
        "user" (N,) int32, "position" (N,) int32}}`` (position: the target's 0-based index in
        its user's sequence); valid/test also ``seen_offsets`` (N + 1,) and ``seen_items`` (S,)
        (CSR of the whole history before the target).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    n_samples = np.maximum(lens - 1, 0)
    # one sample per target position j = 1..n-1 (0-based inside the user)
    user_idx = np.repeat(np.arange(len(lens)), n_samples)
    j = gather_ranges(np.ones(len(lens), dtype=np.int64), n_samples)
    s = n_samples[user_idx]
    split = np.zeros(len(j), dtype=np.int8)  # 0 train, 1 valid, 2 test
    split[(s >= 2) & (j == s)] = 2
    split[(s >= 3) & (j == s - 1)] = 1
    out: dict[str, Split] = {}
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        if name in splits:
            m = split == code
            out[name] = cut_examples(offsets, items, users, user_idx[m], j[m], max_seq_len, code)
    return out


def cut_examples(
    offsets: np.ndarray,
    items: np.ndarray,
    users: np.ndarray,
    user_idx: np.ndarray,
    j: np.ndarray,
    max_seq_len: int,
    seen: bool,
) -> Split:
    """The examples at target positions ``j`` (0-based, >= 1) of users ``user_idx`` (indices
    into ``users``): the last min(j, L) items before the target, left-aligned and right-padded
    with 0; with ``seen``, also the whole history before the target (CSR ``seen_offsets``,
    ``seen_items``). The one cutter of both protocols (``build_loo_examples``,
    ``data/temporal.build_temporal_examples``); the schema is ``build_loo_examples``'.
    """
    offsets, items = np.asarray(offsets, dtype=np.int64), np.asarray(items)
    base = offsets[:-1][user_idx]
    target = items[base + j]
    hist_len = np.minimum(j, max_seq_len)
    hist_start = base + j - hist_len
    cols = np.arange(max_seq_len)
    valid_col = cols[None, :] < hist_len[:, None]
    idx = np.where(valid_col, hist_start[:, None] + cols[None, :], 0)
    history = np.where(valid_col, items[idx] if len(items) else 0, 0).astype(np.int32)
    part: Split = {
        "history": history,
        "length": hist_len.astype(np.int32),
        "target": target.astype(np.int32),
        "user": np.asarray(users)[user_idx].astype(np.int32),
        "position": np.asarray(j).astype(np.int32),
    }
    if seen:
        part["seen_offsets"] = np.concatenate([[0], np.cumsum(j)]).astype(np.int64)
        part["seen_items"] = items[gather_ranges(base, j)].astype(np.int32)
    return part


def sequences_to_csr(item_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A list of per-user arrays -> (offsets (U + 1,) int64, items)."""
    lens = np.array([len(x) for x in item_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    items = np.concatenate(item_lists) if item_lists else np.zeros(0, dtype=np.int32)
    return offsets, items


def list_csr(col: Any) -> tuple[np.ndarray, Any]:
    """A list column (Arrow Array or ChunkedArray) -> (offsets (n + 1,) int64 from 0, values):
    row r's elements are ``values[offsets[r]:offsets[r + 1]]`` (an Arrow array, not copied)."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    offsets = col.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], col.values.slice(offsets[0], offsets[-1] - offsets[0])


def sequences_csr(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A table of ``user``/``items`` rows -> (offsets (U + 1,), items (I,) int32, users (U,))."""
    offsets, values = list_csr(batch.column("items"))
    items = values.to_numpy(zero_copy_only=False).astype(np.int32)
    return offsets, items, batch.column("user").to_numpy().astype(np.int32)


def read_sequences(
    prepared_uri: str, storage: StorageSection | None = None, version: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prepared dataset's sequences as one in-memory CSR, ordered by user id.

    For small and medium data (it reads every sequence into this process); the Ray Data jobs
    read ``<prepared>/sequences`` in parallel instead.

    Args:
        prepared_uri: the output of ``prepare`` (local path or URI), or one version's directory.
        storage: object-storage options.
        version: the dataset version (default: the newest; ``data/versions.resolve_version``).

    Returns:
        ``(offsets (U + 1,) int64, items (I,) int32, users (U,) int32)``: user ``users[u]``'s
        items, oldest first, are ``items[offsets[u]:offsets[u + 1]]``.
    """
    import pyarrow.parquet as pq

    root = resolve_version(prepared_uri, version, storage).uri
    fs, path = resolve(f"{root}/sequences", storage)
    table = pq.read_table(path, filesystem=fs, columns=["user", "items"])
    return sequences_csr(table.sort_by("user"))
