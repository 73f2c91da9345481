"""What a train worker reads: its stream of the epoch's examples, as fixed-size batches.

The epoch's examples come from the run's ``EpochPlanner`` (``data/planner.py``): rank r asks for
epoch e and gets its equal, contiguous share of the epoch's paired and permuted chunks as a
``MaterializedDataset``. ``TrainFeed.epoch`` streams it block by block (``prefetch_blocks`` in
flight) into a ``ShuffleBuffer`` of ``shuffle_buffer`` examples and draws every batch uniformly
from the buffer, with a generator seeded by (seed, epoch, rank): the batches of an epoch are a
function of the config, so a run is reproducible with W workers and ``epoch(e, skip=k)`` resumes
exactly at batch k (the first k draws are replayed without training on them).

Memory: at most ``(shuffle_buffer + prefetch_blocks × block_rows)`` examples of (2L + 4) int32 in
the worker, whatever the size of the data. Every rank runs the same number of steps
(``n_train // (batch_size × world)``); the rows past the last whole batch are ``skipped``
(counted, fewer than a batch per rank, different rows every epoch).

Batch schema (numpy, then torch): ``item_seq`` int64 (B, L), ``seq_len`` int64 (B,), ``target``
int64 (B,), ``user`` int64 (B,) and, for models that need a partner, ``pos_seq`` (B, L) and
``pos_len`` (B,).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fearec_dist.data.examples import dense


class ShuffleBuffer:
    """A bounded pool of examples; batches are drawn uniformly without replacement from it.

    Deterministic for a given generator and input sequence. ``add`` appends rows; ``draw``
    returns ``batch_size`` rows chosen uniformly from the pool and fills their slots with the
    pool's last rows (O(batch) per draw, no reallocation).
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = capacity, rng
        self.cols: dict[str, np.ndarray] | None = None
        self.n = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        m = len(rows["target"])
        if self.cols is None:
            size = self.capacity + m
            self.cols = {k: np.empty((size, *v.shape[1:]), v.dtype) for k, v in rows.items()}
        need = self.n + m
        if need > len(self.cols["target"]):
            self.cols = {
                k: np.concatenate([v[: self.n], np.empty((need - self.n, *v.shape[1:]), v.dtype)])
                for k, v in self.cols.items()
            }
        for k, v in rows.items():
            self.cols[k][self.n : need] = v
        self.n = need

    def full(self) -> bool:
        return self.n >= self.capacity

    def draw(self, batch_size: int) -> dict[str, np.ndarray]:
        assert self.cols is not None and self.n >= batch_size
        idx = self.rng.choice(self.n, batch_size, replace=False)
        out = {k: v[idx] for k, v in self.cols.items()}
        # move the tail rows that were not drawn into the drawn slots below the new end
        new_n = self.n - batch_size
        holes = np.sort(idx[idx < new_n])
        tail = np.arange(new_n, self.n)
        movers = tail[~np.isin(tail, idx)]
        for v in self.cols.values():
            v[holes] = v[movers]
        self.n = new_n
        return out


def table_to_rows(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_fixed_size_list(col.type):
            out[name] = dense(col)
        else:
            out[name] = col.to_numpy()
    return out


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = {
        "item_seq": rows["history"].astype(np.int64),
        "seq_len": rows["length"].astype(np.int64),
        "target": rows["target"].astype(np.int64),
        "user": rows["user"].astype(np.int64),
    }
    if "pos_history" in rows:
        batch["pos_seq"] = rows["pos_history"].astype(np.int64)
        batch["pos_len"] = rows["pos_length"].astype(np.int64)
    return batch


PART_END = None  # in a rank's stream of blocks: the end of one part of the epoch (see below)


def shard_batches(
    blocks: Iterator[pa.Table | None],
    *,
    batch_size: int,
    steps: int,
    buffer_size: int,
    rng: np.random.Generator,
    skip: int = 0,
    stats: dict[str, float] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Exactly ``steps - skip`` model batches from a rank's stream of blocks.

    The buffer fills to ``buffer_size`` examples, then one batch is drawn per block-sized refill;
    at the end of the stream it drains. A ``PART_END`` in the stream (the end of the first
    epoch's head) drains the buffer down to less than a batch before the next part is read, so
    the head trains whole while the rest is still being built. The first ``skip`` draws are made
    and discarded (resume). ``stats`` (if given) gets ``wait_s`` (time spent waiting for blocks),
    ``read`` (rows read from the stream) and ``skipped`` (rows read but never drawn). The stream
    is closed after the last batch, not read to its end: a capped epoch
    (``train.max_steps_per_epoch``) neither reads nor waits for the rows it does not train on.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("wait_s", 0.0)
    buf = ShuffleBuffer(max(buffer_size, batch_size), rng)
    it = iter(blocks)
    produced = 0
    exhausted = draining = False
    read = 0
    while produced < steps:
        while not exhausted and not buf.full():
            if draining and buf.n >= batch_size:
                break  # a part ended: draw from what is in before reading the next part
            draining = False
            t0 = time.perf_counter()
            block = next(it, False)
            stats["wait_s"] += time.perf_counter() - t0
            if block is False:
                exhausted = True
            elif block is PART_END:
                draining = True
            elif block.num_rows:
                buf.add(table_to_rows(block))
                read += block.num_rows
        if buf.n < batch_size:
            raise RuntimeError(
                f"the epoch's stream ended after {produced} of {steps} batches: "
                "the planned row count and the data disagree"
            )
        rows = buf.draw(batch_size)
        if produced >= skip:
            yield to_model_batch(rows)
        produced += 1
    stats["read"], stats["skipped"] = read, buf.n
    close = getattr(it, "close", None)
    if close is not None:  # stops the stream's prefetch (a generator closes its inner ones)
        close()


@dataclass
class FeedStats:
    """What one epoch of a feed waited for and left out: the data columns of the epoch's row."""

    data_wait_s: float = 0.0  # every wait for data (the plan's included)
    plan_wait_s: float = 0.0  # waiting for the epoch's plan alone
    first_wait_s: float = 0.0  # waits before the epoch's first batch (plan and first blocks)
    plan_seconds: float = 0.0  # building the epoch's parts
    skipped: int = 0  # rows of the parts reached that no batch took
    head: dict[str, int] = field(default_factory=dict)  # epoch 1's head: rows, users, self-paired

    def to_row(self) -> dict[str, Any]:
        """The stats as flat epoch-row columns (the head's keys side by side)."""
        row = {k: v for k, v in asdict(self).items() if k != "head"}
        return row | self.head


class TrainFeed:
    """One worker's training batches, epoch by epoch, from the run's ``EpochPlanner`` actor.

    ``stats`` holds the latest epoch's ``FeedStats``; ``steps`` is the same every epoch."""

    def __init__(
        self,
        planner: Any,
        *,
        rank: int,
        batch_size: int,
        steps: int,
        seed: int,
        shuffle_buffer: int,
        prefetch_blocks: int,
    ) -> None:
        self.planner, self.rank, self.batch_size, self.steps = planner, rank, batch_size, steps
        self.seed, self.shuffle_buffer, self.prefetch_blocks = seed, shuffle_buffer, prefetch_blocks
        self.stats = FeedStats()

    def _part(self, epoch: int, part: int) -> dict[str, Any]:
        import ray  # here: the module stays importable without Ray (a GPU box may lack it)

        got = ray.get(self.planner.shard.remote(epoch, self.rank, part))
        got["shard"].context.execution_options.preserve_order = True
        return got

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches ``skip .. steps - 1`` of ``epoch`` (numpy dicts).

        The epoch's parts (one, or the first epoch's head and rest) stream one after the other
        into the same shuffle buffer; waiting for a later part counts as data wait."""
        t0 = time.perf_counter()
        first = self._part(epoch, 0)
        waited = time.perf_counter() - t0
        head = dict(first["stats"]) if first["name"] == "head" else {}
        out = self.stats = FeedStats(waited, waited, math.nan, first["seconds"], head=head)
        if first["parts"] == 1 and first["rows"] < self.steps * self.batch_size:
            raise RuntimeError(
                f"rank {self.rank}: epoch {epoch} has {first['rows']} examples per rank, fewer "
                f"than {self.steps} steps x batch {self.batch_size}; use fewer workers"
            )

        planned = [first["rows"]]  # rows of this rank in the parts it asked for

        def blocks() -> Iterator[pa.Table | None]:
            for i in range(first["parts"]):
                got = first
                if i:  # the end of a part comes before waiting for the next one
                    yield PART_END
                    got = self._part(epoch, i)
                    out.plan_seconds += got["seconds"]
                    planned.append(got["rows"])
                yield from got["shard"].iter_batches(
                    batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_blocks
                )

        stats: dict[str, float] = {}
        rng = np.random.default_rng([self.seed, epoch, self.rank, 23])
        for batch in shard_batches(
            blocks(),
            batch_size=self.batch_size,
            steps=self.steps,
            buffer_size=self.shuffle_buffer,
            rng=rng,
            skip=skip,
            stats=stats,
        ):
            if math.isnan(out.first_wait_s):  # the plan and the first blocks, before training
                out.first_wait_s = out.plan_wait_s + stats["wait_s"]
            yield batch
        out.data_wait_s += stats["wait_s"]
        # rows of the parts it reached that no batch took (fewer than a batch, but for a capped
        # epoch); parts a capped epoch never reached are not counted
        out.skipped = int(sum(planned) - self.steps * self.batch_size)


def eval_batch_from_arrow(table: Any) -> dict[str, np.ndarray]:
    """An evaluation batch (pyarrow) -> numpy: dense history plus the ``seen`` list as CSR.

    Returns ``item_seq`` (B, L) int64, ``seq_len``, ``target``, ``user`` (B,) int64 and
    ``seen_rows``/``seen_items`` (S,) int64: row ``seen_rows[i]`` has seen ``seen_items[i]``.
    """
    hist = table.column("history").combine_chunks()
    out = {
        "item_seq": hist.flatten().to_numpy().reshape(-1, hist.type.list_size).astype(np.int64),
        "seq_len": table.column("length").to_numpy().astype(np.int64),
        "target": table.column("target").to_numpy().astype(np.int64),
        "user": table.column("user").to_numpy().astype(np.int64),
    }
    if "seen" in table.column_names:
        seen = table.column("seen").combine_chunks()
        offsets = seen.offsets.to_numpy()
        counts = np.diff(offsets)
        out["seen_rows"] = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        out["seen_items"] = seen.flatten().to_numpy().astype(np.int64)
    return out
