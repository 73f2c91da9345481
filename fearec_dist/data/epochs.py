"""The streaming training feed: one Ray Data job per epoch, bounded memory in every worker.

Nothing per example is stored on disk: the training examples of an epoch are cut on the fly from
the prepared sequences (``<prepared>/sequences``, user-partitioned Parquet), so the data on disk
is the sequences alone. Per epoch e (seed s)::

    read_parquet(sequences)                      one task per file, streamed
      -> map_batches(TrainRows(L))               examples: history[L], length, target, user, pos
      -> repartition(P, keys=["target"])         Ray Data's hash shuffle (unsorted): every
                                                 example of a target lands in one partition
                                                 (models that need a same-target partner only)
      -> map_batches(PairAndScatter(s, e))       whole partition: canonical order, partner drawn
                                                 uniformly from the *other* members of the
                                                 target group (spec fearec.md §8; a singleton
                                                 pairs with itself), rows permuted, cut into
                                                 chunks of ``block_rows``
      -> randomize_block_order(seed)             chunks in a seeded random order (refs only)
      -> materialize() -> split_at_indices       W equal, contiguous row ranges: rank r's data is
                                                 a function of (seed, epoch, W), not of timing

``EpochPlanner`` (``data/planner.py``: a Ray actor, one per run, no CPU of its own) runs that job
for epoch e on the first request and starts epoch e + 1 in the background as soon as e is built,
so from the second epoch on the pairing and shuffle overlap training (not the build of e); it
keeps at most two epochs alive. Each train worker gets its range as a ``MaterializedDataset``
and streams it block by block (``prefetch_blocks`` in flight) into a shuffle buffer of
``shuffle_buffer`` examples, from which batches are drawn (seeded by seed, epoch, rank). A chunk
holds the rows of one partition (1/P of the targets), so a batch drawn straight from one chunk
would train on a few targets at a time; a buffer over many chunks mixes them (the distinct
targets per batch match an i.i.d. draw: tests/data/test_epochs.py).

The first epoch's head: the job is a barrier (no row reaches a rank before the shuffle has seen
every example). When the training set holds at least ``HEAD_MIN_RATIO`` x
``train.first_epoch_head`` examples, epoch 1 is built in two parts: the head (the examples of a
seeded hash-sample of users, ``in_head``, paired among themselves: small, built first) and the
rest (every other example, paired over the whole training set with the head's rows as
candidates). Ranks train on the head while the rest is built. The one approximation: a head row
whose target has no other member in the head pairs with itself; the planner counts those rows.

Memory: a worker holds the buffer plus the blocks in flight, ``(shuffle_buffer + prefetch_blocks
× block_rows) × (2L + 4) × 4`` bytes at most, whatever the data size; the driver holds nothing
per example; the epoch's paired examples live in the object store, which spills to disk beyond
its cap. Bytes per example per epoch: read from storage as part of its user's sequence
(≈ 4 bytes per interaction), (L + 4) × 4 through the hash shuffle, (2L + 4) × 4 into the object
store and out to one worker.

Exact resume: the batches of (epoch, rank) are a deterministic sequence, so a run resumed at step
k of an epoch regenerates the epoch and replays the buffer's first k draws without training on
them: no batch trained twice, none skipped. Every rank runs the same number of steps
(``rows_per_rank // batch_size``); the rows past the last whole batch are counted as ``skipped``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fearec_dist.config import StorageSection
from fearec_dist.data.examples import (
    DATA_TASK_CPUS,
    USERS_PER_BATCH,
    dense,
    fixed_list,
    sequences_dataset,
)
from fearec_dist.data.sequences import sequences_csr
from fearec_dist.data.temporal import LOO, SplitProtocol, build_split_examples, sequence_times

FIELDS = ("history", "length", "target", "user")
PAIR_FIELDS = ("pos_history", "pos_length")


def draw_partners(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, the index of another row with the same target, uniformly (spec fearec.md §8).

    CSR over rows stable-sorted by target; row i at position p in a group of size c draws
    r ~ U{0..c-2} and takes member r if r < p else r + 1. A singleton group pairs with itself.

    Args:
        target: (N,) target ids (every member of each group present).
        rng: numpy generator.

    Returns:
        (N,) int64 partner row indices.
    """
    n = len(target)
    order = np.argsort(target, kind="stable")
    sorted_t = target[order]
    starts = np.flatnonzero(np.r_[True, sorted_t[1:] != sorted_t[:-1]]) if n else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    pos = np.arange(n) - starts[group]
    size = sizes[group]
    r = np.floor(rng.random(n) * np.maximum(size - 1, 1)).astype(np.int64)
    r = np.where(r >= pos, r + 1, r)
    r = np.where(size == 1, pos, r)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[starts[group] + r]
    return partner


HEAD_MIN_RATIO = 8  # a head is used only when the training set holds 8x its size or more


def head_fraction(head_rows: int, n_train: int) -> float:
    """The share of users in epoch 1's head (``train.first_epoch_head`` examples out of
    ``n_train``), or 0.0 when there is no head (off, or the epoch is small enough to build whole
    before the first step)."""
    if head_rows <= 0 or n_train < HEAD_MIN_RATIO * head_rows:
        return 0.0
    return head_rows / n_train


def in_head(users: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each user is in the head: a seeded hash of the user id below ``fraction``
    (splitmix64, so the head is a uniform sample of users, whatever order ids were given in)."""
    if fraction <= 0.0:
        return np.zeros(len(users), dtype=bool)
    salt = np.uint64(np.random.default_rng([seed, 31]).integers(2**63))
    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


class TrainRows:
    """Ray Data UDF: a batch of user sequences -> their training examples (pyarrow).

    ``keep``: None (every user), ``("head", fraction, seed)`` (only the head's users) or
    ``("rest", fraction, seed)`` (every user but the head's). ``protocol``: which targets are
    training targets (temporal: only those before ``valid_start``; with ``data.train_since``
    only those at or after it, ``data/since.py``).
    """

    def __init__(
        self,
        max_seq_len: int,
        keep: tuple[str, float, int] | None = None,
        protocol: SplitProtocol = LOO,
    ) -> None:
        self.max_seq_len, self.keep, self.protocol = max_seq_len, keep, protocol

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.keep is not None:
            which, fraction, seed = self.keep
            head = in_head(batch.column("user").to_numpy(), fraction, seed)
            batch = batch.filter(pa.array(head if which == "head" else ~head))
        offsets, items, users = sequences_csr(batch)
        times = sequence_times(batch) if self.protocol.needs_times else None
        train = build_split_examples(self.protocol, offsets, items, times, users,
                                     self.max_seq_len, ("train",))["train"]  # fmt: skip
        return pa.table(
            {
                "history": fixed_list(train["history"]),
                "length": pa.array(train["length"]),
                "target": pa.array(train["target"]),
                "user": pa.array(train["user"]),
                "pos": pa.array(train["position"]),
            }
        )


def pair_and_scatter(
    table: pa.Table,
    seed: int,
    epoch: int,
    pair: bool,
    block_rows: int,
    partner_ids: bool = False,
    drop_head: tuple[float, int] | None = None,
) -> Iterator[pa.Table]:
    """One whole partition -> paired, permuted chunks of ``block_rows`` rows.

    Rows are first put in a canonical order (target, user, position), so the output depends only
    on the partition's content, never on the order the shuffle delivered it in.
    ``partner_ids`` adds ``pos_user``/``pos_pos`` (the partner's user and position: for tests).
    ``drop_head=(fraction, seed)``: the head's rows are partner candidates like every other row
    but are not emitted (they were trained in the epoch's head).
    """
    n = table.num_rows
    if n == 0:
        return
    target = table.column("target").to_numpy()
    user = table.column("user").to_numpy()
    pos = table.column("pos").to_numpy()
    order = np.lexsort((pos, user, target))
    history = dense(table.column("history"))[order]
    length = table.column("length").to_numpy()[order]
    target, user, pos = target[order], user[order], pos[order]
    # the partition's identity (its smallest target) keys the generator: the same partition
    # draws the same partners in every run, another partition or epoch draws others
    rng = np.random.default_rng([seed, epoch, int(target[0]), int(n), 17])
    cols: dict[str, Any] = {"history": history, "length": length, "target": target, "user": user}
    if pair:
        partner = draw_partners(target, rng)
        cols["pos_history"] = history[partner]
        cols["pos_length"] = length[partner]
        if partner_ids:
            cols["pos"], cols["pos_user"], cols["pos_pos"] = pos, user[partner], pos[partner]
    perm = rng.permutation(n)
    if drop_head is not None:
        perm = perm[~in_head(user[perm], *drop_head)]
    for lo in range(0, len(perm), block_rows):
        idx = perm[lo : lo + block_rows]
        yield pa.table(
            {k: fixed_list(v[idx]) if v.ndim == 2 else pa.array(v[idx]) for k, v in cols.items()}
        )


class PairAndScatter:
    """Ray Data UDF over whole partitions (``batch_size=None``); see ``pair_and_scatter``."""

    def __init__(
        self,
        seed: int,
        epoch: int,
        pair: bool,
        block_rows: int,
        ids: bool,
        drop_head: tuple[float, int] | None = None,
    ) -> None:
        self.args = (seed, epoch, pair, block_rows, ids, drop_head)

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        yield from pair_and_scatter(table, *self.args)


def n_partitions(n_examples: int, max_seq_len: int, partition_bytes: int, minimum: int) -> int:
    """Hash partitions for the pairing shuffle: each at most ``partition_bytes`` of examples."""
    per_example = (max_seq_len + 4) * 4
    return max(minimum, -(-n_examples * per_example // max(partition_bytes, 1)))


PARTS = ("all", "head", "rest")


@dataclass(frozen=True)
class EpochSource:
    """What every epoch's job reads and how it pairs: the run's fixed inputs to ``epoch_dataset``
    (the planner holds one and builds each epoch from it)."""

    prepared_uri: str
    max_seq_len: int  # L
    seed: int  # train.seed
    pair: bool  # draw a same-target partner (FEARec's positive view)
    n_examples: int  # training examples (sizes the hash partitions and the head)
    block_rows: int = 1024  # data.block_rows
    partition_bytes: int = 64 << 20  # data.partition_mb in bytes
    storage: StorageSection | None = None
    partner_ids: bool = False  # also emit the partner's (user, pos), for tests
    protocol: SplitProtocol = LOO  # which targets train (data/temporal.py)


def epoch_dataset(source: EpochSource, epoch: int, part: str = "all", head: float = 0.0) -> Any:
    """The Ray dataset of epoch ``epoch``'s training examples (lazy; see the module docstring).

    ``part``: ``"all"`` (every example), ``"head"`` (the examples of the share ``head`` of users
    picked by ``in_head``, paired among themselves) or ``"rest"`` (every other example, paired
    over the whole training set, the head's examples included as candidates).
    """
    seed, pair, max_seq_len = source.seed, source.pair, source.max_seq_len
    n_examples, block_rows = source.n_examples, source.block_rows
    if part not in PARTS:
        raise ValueError(f"part: {part!r} is not one of {PARTS}")
    keep, drop = None, None
    if part == "head":
        keep, n_examples = ("head", head, seed), max(1, round(head * n_examples))
    elif part == "rest" and pair:
        drop = (head, seed)  # every example is a candidate; the head's are not emitted
    elif part == "rest":
        keep = ("rest", head, seed)
    ds = sequences_dataset(source.prepared_uri, source.storage, source.protocol)
    ds = ds.map_batches(TrainRows(max_seq_len, keep, source.protocol), batch_format="pyarrow",
                        batch_size=USERS_PER_BATCH, num_cpus=DATA_TASK_CPUS)  # fmt: skip
    parts = n_partitions(n_examples, max_seq_len, source.partition_bytes, minimum=1)
    if pair and parts == 1:  # it all fits one partition: gather it without a hash shuffle
        ds = ds.repartition(1)
    elif pair:
        # one block per partition (the hash-shuffle reduce never splits a partition), so each
        # target group reaches PairAndScatter whole; it sorts the rows itself
        ds = ds.repartition(parts, keys=["target"], sort=False)
    ds = ds.map_batches(
        PairAndScatter(seed, epoch, pair, block_rows, source.partner_ids, drop),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=DATA_TASK_CPUS,
    )
    # Ray Data coalesces a task's outputs into blocks of up to 128 MiB: cut them back into
    # chunks (a streaming repartition, no shuffle) so that the block order can be randomised
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    salt = [] if part == "all" else [PARTS.index(part)]  # "all" keeps its seed from before heads
    return ds.randomize_block_order(
        seed=int(np.random.default_rng([seed, epoch, 29, *salt]).integers(2**31))
    )
