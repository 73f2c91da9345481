"""The streaming training feed: one Ray Data job per epoch, bounded memory in every worker.

Nothing per example is stored on disk: the training examples of an epoch are cut on the fly from
the prepared sequences (``<prepared>/sequences``, user-partitioned Parquet), so the data on disk
is the sequences alone. Per epoch e (seed s)::

    read_parquet(sequences)                      one task per file, streamed
      -> map_batches(TrainRows(L))               examples: history[L], length, target, user, pos
      -> repartition(P, keys=["target"], sort=True)   Ray Data's hash shuffle: every example of
                                                 a target lands in one partition (models that
                                                 need a same-target partner only)
      -> map_batches(PairAndScatter(s, e))       whole partition: canonical order, partner drawn
                                                 uniformly from the *other* members of the
                                                 target group (spec fearec.md §8; a singleton
                                                 pairs with itself), rows permuted, cut into
                                                 chunks of ``block_rows``
      -> randomize_block_order(seed)             chunks in a seeded random order (refs only)
      -> materialize() -> split_at_indices       W equal, contiguous row ranges: rank r's data is
                                                 a function of (seed, epoch, W), not of timing

``EpochPlanner`` (a Ray actor, one per run, no CPU of its own) runs that job for epoch e on the
first request and starts epoch e + 1 in the background as soon as e is built, so from the second
epoch on the pairing and shuffle overlap training (not the build of e); it keeps at most two epochs
alive. Each train worker gets its range as a ``MaterializedDataset`` and streams it block by block
(``prefetch_blocks`` in flight) into a shuffle buffer of ``shuffle_buffer`` examples, from which
batches are drawn (seeded by seed, epoch, rank). A chunk holds the rows of one partition (1/P of
the targets), so a batch drawn straight from one chunk would train on a few targets at a time; a
buffer over many chunks mixes them (the distinct targets per batch match an i.i.d. draw:
tests/data/test_epochs.py).

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

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from fearec_dist.config import StorageSection
from fearec_dist.data.examples import USERS_PER_BATCH, dense, fixed_list, sequences_dataset
from fearec_dist.data.sequences import build_loo_examples, sequences_csr

DATA_TASK_CPUS = 0.25
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


class TrainRows:
    """Ray Data UDF: a batch of user sequences -> their training examples (pyarrow)."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        offsets, items, users = sequences_csr(batch)
        train = build_loo_examples(offsets, items, users, self.max_seq_len, splits=("train",))
        train = train["train"]
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
    table: pa.Table, seed: int, epoch: int, pair: bool, block_rows: int, partner_ids: bool = False
) -> Iterator[pa.Table]:
    """One whole partition -> paired, permuted chunks of ``block_rows`` rows.

    Rows are first put in a canonical order (target, user, position), so the output depends only
    on the partition's content, never on the order the shuffle delivered it in.
    ``partner_ids`` adds ``pos_user``/``pos_pos`` (the partner's user and position: for tests).
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
    for lo in range(0, n, block_rows):
        idx = perm[lo : lo + block_rows]
        yield pa.table(
            {k: fixed_list(v[idx]) if v.ndim == 2 else pa.array(v[idx]) for k, v in cols.items()}
        )


class PairAndScatter:
    """Ray Data UDF over whole partitions (``batch_size=None``); see ``pair_and_scatter``."""

    def __init__(self, seed: int, epoch: int, pair: bool, block_rows: int, ids: bool) -> None:
        self.args = (seed, epoch, pair, block_rows, ids)

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        yield from pair_and_scatter(table, *self.args)


def n_partitions(n_examples: int, max_seq_len: int, partition_bytes: int, minimum: int) -> int:
    """Hash partitions for the pairing shuffle: each at most ``partition_bytes`` of examples."""
    per_example = (max_seq_len + 4) * 4
    return max(minimum, -(-n_examples * per_example // max(partition_bytes, 1)))


def epoch_dataset(
    prepared_uri: str,
    *,
    max_seq_len: int,
    seed: int,
    epoch: int,
    pair: bool,
    n_examples: int,
    block_rows: int = 1024,
    partition_bytes: int = 64 << 20,
    storage: StorageSection | None = None,
    partner_ids: bool = False,
) -> Any:
    """The Ray dataset of epoch ``epoch``'s training examples (lazy; see the module docstring)."""
    ds = sequences_dataset(prepared_uri, storage)
    ds = ds.map_batches(TrainRows(max_seq_len), batch_format="pyarrow",
                        batch_size=USERS_PER_BATCH, num_cpus=DATA_TASK_CPUS)  # fmt: skip
    parts = n_partitions(n_examples, max_seq_len, partition_bytes, minimum=1)
    if pair and parts == 1:  # it all fits one partition: gather it without a hash shuffle
        ds = ds.repartition(1)
    elif pair:
        # one block per partition (the hash-shuffle reduce never splits a partition), so each
        # target group reaches PairAndScatter whole; it sorts the rows itself
        ds = ds.repartition(parts, keys=["target"], sort=False)
    ds = ds.map_batches(
        PairAndScatter(seed, epoch, pair, block_rows, partner_ids),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=DATA_TASK_CPUS,
    )
    # Ray Data coalesces a task's outputs into blocks of up to 128 MiB: cut them back into
    # chunks (a streaming repartition, no shuffle) so that the block order can be randomised
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    return ds.randomize_block_order(
        seed=int(np.random.default_rng([seed, epoch, 29]).integers(2**31))
    )


class EpochPlan:
    """One epoch's data, split into equal contiguous row ranges, one per rank."""

    def __init__(self, shards: list[Any], rows_per_rank: int, dropped: int, seconds: float):
        self.shards, self.rows_per_rank, self.dropped, self.seconds = (
            shards,
            rows_per_rank,
            dropped,
            seconds,
        )


def plan_epoch(ds: Any, world: int) -> EpochPlan:
    """Materializes ``ds`` and cuts it into ``world`` equal contiguous ranges (the rest dropped)."""
    t0 = time.perf_counter()
    done = ds.materialize()
    n = done.count()
    q = n // world
    parts = done.split_at_indices([q * (r + 1) for r in range(world)])
    return EpochPlan(parts[:world], q, n - q * world, time.perf_counter() - t0)


class PlanError(RuntimeError):
    """Building an epoch's data failed. A plain error holding the cause's text and traceback:
    re-raising the cause itself (often a Ray or Arrow error wrapping another) through one more
    actor call makes Ray build an exception class over a class it cannot always subclass, and
    the real message is lost behind a ``SystemError``."""


def plan_error(epoch: int, cause: BaseException) -> PlanError:
    import traceback

    text = "".join(traceback.format_exception(cause)).strip()
    return PlanError(f"building epoch {epoch + 1}'s training data failed: {cause!r}\n{text}")


class EpochPlannerImpl:
    """Builds epoch datasets on request and the next one ahead (the actor's body)."""

    def __init__(self, params: dict[str, Any], world: int, epochs: int | None = None) -> None:
        self.epochs = epochs  # the run's epoch count: nothing is built ahead past the last
        self.params, self.world = params, world
        self.plans: dict[int, EpochPlan] = {}
        self.errors: dict[int, BaseException] = {}
        self.building: dict[int, threading.Event] = {}
        self.lock = threading.Lock()

    def _build(self, epoch: int) -> None:
        from ray.data import DataContext

        ctx = DataContext.get_current()  # per thread: set it in the thread that executes
        ctx.execution_options.preserve_order = True  # block order = plan order, not timing
        ctx.enable_progress_bars = False
        try:
            ds = epoch_dataset(epoch=epoch, **self.params)
            self.plans[epoch] = plan_epoch(ds, self.world)
        except BaseException as err:  # handed to the ranks that ask for this epoch
            self.errors[epoch] = plan_error(epoch, err)
        finally:
            self.building[epoch].set()

    def _start(self, epoch: int) -> threading.Event:
        with self.lock:
            if epoch not in self.building:
                self.building[epoch] = threading.Event()
                threading.Thread(target=self._build, args=(epoch,), daemon=True).start()
            return self.building[epoch]

    def shard(
        self, epoch: int, rank: int, prefetch_next: bool = True
    ) -> tuple[Any, int, int, float]:
        """(rank's dataset, rows per rank, rows dropped this epoch, seconds to build)."""
        self._start(epoch).wait()
        # the next epoch starts once this one is built: it overlaps this epoch's training, not
        # this epoch's build (on few CPUs the two builds would only slow each other down)
        if prefetch_next and (self.epochs is None or epoch + 1 < self.epochs):
            self._start(epoch + 1)
        if epoch in self.errors:
            raise self.errors[epoch]
        # every rank asks for epoch e only after all ranks finished e - 1 (the epoch's report
        # is a barrier): older plans free their blocks, this one and the next stay
        with self.lock:
            for old in [e for e in self.plans if e < epoch]:
                del self.plans[old]
                self.building.pop(old, None)
        plan = self.plans[epoch]
        return plan.shards[rank], plan.rows_per_rank, plan.dropped, plan.seconds


def start_planner(params: dict[str, Any], world: int, epochs: int | None = None) -> Any:
    """The run's ``EpochPlanner`` actor (0 CPUs: Ray Data's tasks ask for their own)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=8)(EpochPlannerImpl)
    return actor.remote(params, world, epochs)
