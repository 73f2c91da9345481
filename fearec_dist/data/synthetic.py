"""Synthetic interaction logs with known sequential and periodic structure (the demo dataset).

The catalogue is cut into cyclic chains of 4-8 items (a chain of period P repeats every P steps).
Each user starts at a random item and follows its chain's successor with probability
``1 - noise``; otherwise (noise) it jumps to an item drawn from a Zipf popularity and continues
along that item's chain. So the next item is predictable from the order of the last items, while
popularity alone predicts poorly: a model that learns order must beat a popularity ranking
(``tests/data/test_synthetic.py`` checks that a bigram predictor does).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def chain_successors(n_items: int, seed: int) -> np.ndarray:
    """(n_items + 1,) successor of every item id 1..n_items inside its cyclic chain."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(1, n_items + 1))
    succ = np.zeros(n_items + 1, dtype=np.int64)
    start = 0
    while start < n_items:
        period = int(rng.integers(4, 9))
        chain = order[start : start + period]
        succ[chain] = np.roll(chain, -1)
        start += period
    return succ


def generate_log(
    n_users: int = 2000,
    n_items: int = 500,
    *,
    min_len: int = 20,
    max_len: int = 50,
    noise: float = 0.15,
    seed: int = 0,
) -> pa.Table:
    """Generates ``user_id``, ``item_id`` (strings, as raw logs have), ``timestamp`` (int64 s).

    Rows come out shuffled (not grouped by user or time), like a real event log.
    """
    rng = np.random.default_rng(seed)
    succ = chain_successors(n_items, seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    pop_items = rng.permutation(np.arange(1, n_items + 1))
    lengths = rng.integers(min_len, max_len + 1, n_users)
    n = int(lengths.sum())
    user = np.repeat(np.arange(n_users), lengths)
    step = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    jumps = rng.random(n) < noise
    jumps[step == 0] = True
    jump_to = pop_items[rng.choice(n_items, size=n, p=popularity)]
    items = np.zeros(n, dtype=np.int64)
    # vectorised over users: walk all users one step at a time (max_len steps)
    first = np.cumsum(lengths) - lengths
    current = np.zeros(n_users, dtype=np.int64)
    for k in range(int(lengths.max())):
        alive = lengths > k
        pos = first[alive] + k
        nxt = np.where(jumps[pos], jump_to[pos], succ[current[alive]])
        current[alive] = nxt
        items[pos] = nxt
    base = rng.integers(1_500_000_000, 1_600_000_000, n_users)
    gaps = rng.integers(60, 86_400, n)
    ts = base[user] + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first] - gaps[first], lengths)
    perm = rng.permutation(n)
    return pa.table(
        {
            "user_id": pa.array([f"u{u}" for u in user[perm]]),
            "item_id": pa.array([f"i{i}" for i in items[perm]]),
            "timestamp": pa.array(ts[perm].astype(np.int64)),
        }
    )


def write_synthetic(uri: str, n_files: int = 4, storage=None, **kwargs) -> int:
    """Writes a generated log as ``n_files`` Parquet files under ``uri``; returns the row count."""
    import pyarrow.parquet as pq

    from fearec_dist.storage import resolve

    table = generate_log(**kwargs)
    fs, root = resolve(uri, storage)
    fs.create_dir(root, recursive=True)
    per = -(-table.num_rows // n_files)
    for i in range(n_files):
        part = table.slice(i * per, per)
        pq.write_table(part, f"{root}/part-{i:03d}.parquet", filesystem=fs)
    return table.num_rows
