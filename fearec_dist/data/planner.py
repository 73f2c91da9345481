"""The run's epoch planner: builds each epoch's data (``data/epochs.py``) and hands ranks their
ranges.

``EpochPlanner`` (a Ray actor per run, 0 CPUs: Ray Data's tasks ask for their own) runs epoch e's
job on the first request, materializes it and cuts it into W equal contiguous row ranges
(``plan_epoch``), then starts epoch e + 1 in the background once e is built and asked for, so the
next epoch's pairing overlaps this epoch's training; at most two epochs are alive. The first
epoch of a large run is built in two parts, the head first (``epochs.in_head``; ``head_stats``
counts its rows and the rows that pair with themselves there), then the rest. A failed build
reaches the ranks as a plain ``PlanError`` naming the epoch and the cause.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from fearec_dist.data.epochs import EpochSource, epoch_dataset
from fearec_dist.storage import resolve


class EpochPlan:
    """One part of an epoch's data, split into equal contiguous row ranges, one per rank."""

    def __init__(self, shards: list[Any], rows_per_rank: int, dropped: int, seconds: float):
        self.shards, self.rows_per_rank, self.dropped = shards, rows_per_rank, dropped
        self.seconds = seconds
        self.stats: dict[str, int] = {}
        self.started = self.ready = 0.0  # wall clock (unix s): the part's build began / ended


def plan_epoch(ds: Any, world: int) -> EpochPlan:
    """Materializes ``ds`` and cuts it into ``world`` equal contiguous ranges (the rest dropped)."""
    t0 = time.perf_counter()
    done = ds.materialize()
    n = done.count()
    q = n // world
    parts = done.split_at_indices([q * (r + 1) for r in range(world)])
    return EpochPlan(parts[:world], q, n - q * world, time.perf_counter() - t0)


def head_stats(plan: EpochPlan, counts: np.ndarray | None, pair: bool) -> dict[str, int]:
    """The head's rows and users, and (models with a partner) ``head_self_paired``: its rows
    whose target has no other member among the head's rows although it has in the whole
    training set (``counts``: training examples per target), so they pair with themselves."""
    cols: dict[str, list[np.ndarray]] = {"target": [], "user": []}
    for shard in plan.shards:
        for b in shard.select_columns(["target", "user"]).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            cols["target"].append(b["target"]), cols["user"].append(b["user"])
    target = np.concatenate(cols["target"]) if cols["target"] else np.zeros(0, np.int64)
    users = np.concatenate(cols["user"]) if cols["user"] else np.zeros(0, np.int64)
    stats = {"head_rows": len(target) + plan.dropped, "head_users": len(np.unique(users))}
    if pair and counts is not None:
        # the dropped rows (fewer than one per rank) are not looked at: a lower bound by < W
        ids, n = np.unique(target, return_counts=True)
        alone = ids[(n == 1) & (counts[ids] > 1)]
        stats["head_self_paired"] = int(np.isin(target, alone).sum())
    return stats


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
    """Builds epoch datasets on request and the next one ahead (the actor's body).

    An epoch is one part (``"all"``), or, for the first epoch when ``head > 0``, two: ``"head"``
    (a seeded ``head`` share of users, built first and small) and ``"rest"``. Ranks ask for
    part ``i`` of epoch ``e`` with ``shard(e, rank, i)``.
    """

    def __init__(
        self,
        source: EpochSource,
        world: int,
        epochs: int | None = None,
        *,
        head: float = 0.0,
        counts_uri: str | None = None,
        ahead: bool = True,
    ) -> None:
        self.epochs = epochs  # the run's epoch count: nothing is built ahead past the last
        self.source, self.world, self.head, self.ahead = source, world, head, ahead
        self.counts_uri = counts_uri
        self.plans: dict[tuple[int, int], EpochPlan] = {}
        self.errors: dict[tuple[int, int], BaseException] = {}
        self.building: dict[int, list[threading.Event]] = {}
        self.requested = -1  # the latest epoch a rank asked for
        self.lock = threading.Lock()

    def parts(self, epoch: int) -> tuple[str, ...]:
        return ("head", "rest") if epoch == 0 and self.head > 0 else ("all",)

    def _counts(self) -> np.ndarray | None:
        if self.counts_uri is None:
            return None
        fs, path = resolve(self.counts_uri, self.source.storage)
        return pq.read_table(path, filesystem=fs).column("count").to_numpy()

    def _build(self, epoch: int) -> None:
        ctx = DataContext.get_current()  # per thread: set it in the thread that executes
        ctx.execution_options.preserve_order = True  # block order = plan order, not timing
        ctx.enable_progress_bars = False
        events, failed = self.building[epoch], None
        for i, part in enumerate(self.parts(epoch)):
            try:
                if failed is not None:
                    raise failed
                started = time.time()
                ds = epoch_dataset(self.source, epoch, part=part, head=self.head)
                plan = plan_epoch(ds, self.world)
                if part == "head":
                    plan.stats = head_stats(plan, self._counts(), self.source.pair)
                plan.started, plan.ready = started, time.time()
                self.plans[(epoch, i)] = plan
            except BaseException as err:  # handed to the ranks that ask for this epoch
                failed = err
                self.errors[(epoch, i)] = plan_error(epoch, err)
            finally:
                events[i].set()
        self._ahead(epoch)

    def _start(self, epoch: int) -> list[threading.Event]:
        with self.lock:
            if epoch not in self.building:
                self.building[epoch] = [threading.Event() for _ in self.parts(epoch)]
                threading.Thread(target=self._build, args=(epoch,), daemon=True).start()
            return self.building[epoch]

    def _ahead(self, epoch: int) -> None:
        """Starts epoch + 1 once ``epoch`` is built and asked for: it overlaps this epoch's
        training, not its build (on few CPUs two builds only slow each other down), and at most
        two epochs are alive."""
        another = self.epochs is None or epoch + 1 < self.epochs
        with self.lock:
            built = epoch in self.building and all(e.is_set() for e in self.building[epoch])
        if self.ahead and another and built and epoch <= self.requested:
            self._start(epoch + 1)

    def rows_per_rank(self) -> int:
        """Rows every rank gets of every epoch (see ``rows_per_rank``)."""
        return rows_per_rank(self.source.n_examples, self.world, self.head)

    def shard(self, epoch: int, rank: int, part: int = 0) -> dict[str, Any]:
        """Part ``part`` of ``epoch`` for ``rank``: ``shard`` (its dataset), ``rows`` (rows per
        rank), ``dropped`` (rows of the part no rank gets), ``seconds`` (to build it),
        ``parts`` (the epoch's part count), ``name``, ``stats``, ``started_unix`` and
        ``ready_unix`` (when its build began and ended)."""
        with self.lock:
            self.requested = max(self.requested, epoch)
        events = self._start(epoch)
        events[part].wait()
        self._ahead(epoch)
        if (epoch, part) in self.errors:
            raise self.errors[(epoch, part)]
        if part == 0:
            # every rank asks for epoch e only after all ranks finished e - 1 (the epoch's
            # report is a barrier): older plans free their blocks, this one and the next stay
            with self.lock:
                for old in [k for k in self.plans if k[0] < epoch]:
                    del self.plans[old]
                for old in [e for e in self.building if e < epoch]:
                    del self.building[old]
        plan = self.plans[(epoch, part)]
        return {
            "shard": plan.shards[rank],
            "rows": plan.rows_per_rank,
            "dropped": plan.dropped,
            "seconds": plan.seconds,
            "parts": len(events),
            "name": self.parts(epoch)[part],
            "stats": plan.stats,
            "started_unix": plan.started,
            "ready_unix": plan.ready,
        }


def rows_per_rank(n_examples: int, world: int, head: float) -> int:
    """The rows each of ``world`` ranks gets of every epoch: ``n_examples // world``, one fewer
    when the first epoch comes in two parts (head, rest), each cut into ``world`` equal ranges
    with its own remainder dropped. The train loop sizes every epoch's steps from it."""
    return n_examples // world - (1 if head > 0 else 0)


def start_planner(
    source: EpochSource, world: int, epochs: int | None = None, **options: Any
) -> Any:
    """The run's ``EpochPlanner`` actor (0 CPUs: Ray Data's tasks ask for their own);
    ``options``: ``head``, ``counts_uri``, ``ahead`` (see ``EpochPlannerImpl``)."""
    actor = ray.remote(num_cpus=0, max_concurrency=8)(EpochPlannerImpl)
    return actor.remote(source, world, epochs, **options)
