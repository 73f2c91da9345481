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


DAY = 86_400


def generate_daily_log(
    n_users: int = 2000,
    n_items: int = 500,
    days: int = 30,
    *,
    start: int = 1_793_491_200,  # 2026-11-01T00:00:00Z
    active: float = 0.3,
    steps: tuple[int, int] = (2, 8),
    noise: float = 0.15,
    rewire: float = 0.03,
    new_items: float = 0.2,
    seed: int = 0,
) -> list[pa.Table]:
    """A log of ``days`` days whose structure drifts, one table per day (the daily jobs' input).

    The structure of ``generate_log`` (cyclic item chains, Zipf jumps) with a time axis:

    - **chains drift**: every day a fraction ``rewire`` of the items have their successors
      permuted among themselves (the successor map stays a permutation);
    - **popularity drifts**: the Zipf ranking is re-drawn a little every day (one random swap
      per 20 items) and items born in the last 3 days are moved to its head (new releases);
    - **the catalogue grows**: a fraction ``new_items`` of the items is born on a uniform day
      after the first; before it an item is never drawn (a successor not born yet is replaced
      by a popularity draw among the born ones);
    - **users come back**: each day every user is active with probability ``active`` and walks
      ``steps`` items (uniform, inclusive) from where their last day ended, at sorted times
      inside the day. A user's first day starts with a popularity draw.

    Rows of each day come out shuffled, as a real event log's would; ``timestamp`` is int64
    seconds from ``start`` (a UTC midnight). Deterministic in ``seed``.
    """
    rng = np.random.default_rng([seed, 20261206])
    succ = chain_successors(n_items, seed)
    born = np.zeros(n_items + 1, dtype=np.int64)
    late = rng.random(n_items + 1) < new_items
    born[late] = rng.integers(1, max(days, 2), int(late.sum()))
    born[0] = days + 1  # padding: never drawn
    zipf = 1.0 / np.arange(1, n_items + 1) ** 0.8
    order = rng.permutation(np.arange(1, n_items + 1))  # popularity ranking, most popular first
    current = np.zeros(n_users, dtype=np.int64)  # each user's last item (0: never active)
    tables = []
    for day in range(days):
        if day:  # drift: successors permuted among a few items, the ranking shuffled a little
            moved = rng.choice(np.arange(1, n_items + 1), max(2, int(rewire * n_items)), False)
            succ[moved] = succ[rng.permutation(moved)]
            for _ in range(max(1, n_items // 20)):
                a, b = rng.integers(0, n_items, 2)
                order[[a, b]] = order[[b, a]]
        alive = born <= day
        fresh = order[(born[order] > day - 3) & alive[order] & (born[order] > 0)]
        ranking = np.concatenate([fresh, order[~np.isin(order, fresh) & alive[order]]])
        weights = zipf[: len(ranking)] / zipf[: len(ranking)].sum()
        users = np.flatnonzero(rng.random(n_users) < active)
        lengths = rng.integers(steps[0], steps[1] + 1, len(users))
        rows_user, rows_item = [], []
        for k in range(int(lengths.max(initial=0))):
            walking = users[lengths > k]
            draws = ranking[rng.choice(len(ranking), len(walking), p=weights)]
            nxt = succ[current[walking]]
            jump = (current[walking] == 0) | (rng.random(len(walking)) < noise) | ~alive[nxt]
            current[walking] = np.where(jump, draws, nxt)
            rows_user.append(walking)
            rows_item.append(current[walking])
        user = np.concatenate(rows_user) if rows_user else np.zeros(0, np.int64)
        item = np.concatenate(rows_item) if rows_item else np.zeros(0, np.int64)
        # times: each user's steps at increasing offsets inside the day (rows are in step order)
        by_user = np.argsort(user, kind="stable")
        values = rng.integers(0, DAY, len(user))
        ts = np.empty(len(user), dtype=np.int64)
        ts[by_user] = start + day * DAY + values[np.lexsort((values, user[by_user]))]
        perm = rng.permutation(len(user))
        tables.append(
            pa.table(
                {
                    "user_id": pa.array([f"u{u}" for u in user[perm]]),
                    "item_id": pa.array([f"i{i}" for i in item[perm]]),
                    "timestamp": pa.array(ts[perm]),
                }
            )
        )
    return tables


def write_daily_log(
    uri: str, tables: list[pa.Table], start: int = 1_793_491_200, storage=None
) -> list[str]:
    """Writes one Hive partition per day, ``dt=YYYY-MM-DD/part-00000.parquet``; returns the
    partition names in day order."""
    import datetime as dt

    import pyarrow.parquet as pq

    fs, root = resolve(uri, storage)
    names = []
    for day, table in enumerate(tables):
        name = "dt=" + dt.datetime.fromtimestamp(start + day * DAY, dt.UTC).strftime("%Y-%m-%d")
        fs.create_dir(f"{root}/{name}", recursive=True)
        pq.write_table(table, f"{root}/{name}/part-00000.parquet", filesystem=fs)
        names.append(name)
    return names
