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

from fearec_dist.storage import resolve


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
    first_user: int = 0,
) -> pa.Table:
    """Generates ``user_id``, ``item_id`` (strings, as raw logs have), ``timestamp`` (int64 s).

    Rows come out shuffled (not grouped by user or time), like a real event log. ``first_user``
    numbers the users from there (a chunk of a larger log: the item chains and popularity are
    the same in every chunk of one ``seed``, the users' own draws differ).
    """
    rng = np.random.default_rng(seed if first_user == 0 else [seed, first_user])
    succ = chain_successors(n_items, seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    pop_items = np.random.default_rng(seed).permutation(np.arange(1, n_items + 1))
    if first_user == 0:  # the original stream of draws (the single-chunk log is unchanged)
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
            "user_id": pa.array([f"u{u}" for u in (user + first_user)[perm]]),
            "item_id": pa.array([f"i{i}" for i in items[perm]]),
            "timestamp": pa.array(ts[perm].astype(np.int64)),
        }
    )


CHUNK_USERS = 50_000  # users generated (and held as Python strings) at a time


def write_synthetic(uri: str, n_files: int = 4, storage=None, n_users: int = 2000, **kwargs) -> int:
    """Writes a generated log as Parquet files under ``uri``; returns the row count.

    Up to ``CHUNK_USERS`` users: one log cut into ``n_files`` files. Larger logs are generated
    and written ``CHUNK_USERS`` users at a time (a file each), so memory stays bounded.
    """
    import pyarrow.parquet as pq

    fs, root = resolve(uri, storage)
    fs.create_dir(root, recursive=True)
    if n_users > CHUNK_USERS:
        rows = 0
        for i, first in enumerate(range(0, n_users, CHUNK_USERS)):
            part = generate_log(min(CHUNK_USERS, n_users - first), first_user=first, **kwargs)
            pq.write_table(part, f"{root}/part-{i:05d}.parquet", filesystem=fs)
            rows += part.num_rows
        return rows
    table = generate_log(n_users, **kwargs)
    per = -(-table.num_rows // n_files)
    for i in range(n_files):
        part = table.slice(i * per, per)
        pq.write_table(part, f"{root}/part-{i:03d}.parquet", filesystem=fs)
    return table.num_rows
