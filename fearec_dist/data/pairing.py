"""A small dataset's training examples in memory: the same-target pairing and a feed, no Ray.

The trainer builds each epoch with a Ray Data job (``data/epochs.py``: hash partition by target,
then ``draw_partners`` per partition) and streams it to the workers (``data/feed.py``). For a
dataset that fits in one process (Amazon Beauty: 131k training examples) and a machine without
Ray (the GPU bench, ``bench/gpu.py``), this module does the same in memory:

- ``epoch_partners``: each example's FEARec positive is another training example with the same
  target, drawn uniformly among that target's other examples (an example alone with its target
  pairs with itself), re-drawn every epoch from a generator seeded by (seed, epoch). Rows are put
  in the canonical order (target, user, position) first, and the draw is ``draw_partners``, the
  function the Ray job applies to each partition, so the partners are distributed as the
  trainer's (``tests/data/test_pairing.py`` runs the same chi-square test as the real pairing's).
- ``MemoryFeed``: ``TrainFeed``'s interface (``epoch(e, skip=k)`` yielding the batches of
  ``data/feed.py``'s schema, ``steps``, ``rank``, ``stats``) over examples held as numpy arrays,
  so the trainer's ``train_one_epoch`` runs on it unchanged. Each epoch is one seeded uniform
  permutation of the examples cut into ``steps`` batches: the i.i.d. order the streaming feed's
  shuffle buffer approximates.

The examples are ``build_loo_examples``' training split (``data/sequences.py``): ``history``
(N, L), ``length``, ``target``, ``user``, ``position`` (N,).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fearec_dist.data.epochs import draw_partners
from fearec_dist.data.feed import FeedStats, to_model_batch

Examples = dict[str, np.ndarray]


def epoch_partners(
    target: np.ndarray, user: np.ndarray, position: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Each example's same-target partner for ``epoch``: (N,) row indices into the inputs.

    Uniform over the other examples with the same target, the example itself when it is alone.
    Depends on the examples, ``seed`` and ``epoch`` only, not on the order the rows are given in.

    Args:
        target: (N,) target item ids.
        user: (N,) user ids; position: (N,) the target's index in the user's sequence. (user,
            position) identifies an example.
        seed: ``train.seed``.
        epoch: 0-based epoch.

    Returns:
        (N,) int64: row ``partner[i]`` has ``target[i]``; ``partner[i] == i`` only when alone.
    """
    order = np.lexsort((position, user, target))  # canonical: (target, user, position)
    rng = np.random.default_rng([seed, epoch, 17])
    partner = np.empty(len(order), dtype=np.int64)
    partner[order] = order[draw_partners(np.asarray(target)[order], rng)]
    return partner


def paired_epoch(examples: Examples, seed: int, epoch: int) -> Examples:
    """The examples with their epoch's partner: ``pos_history`` (N, L) and ``pos_length`` (N,),
    the columns the Ray job adds (``data/epochs.py``)."""
    partner = epoch_partners(
        examples["target"], examples["user"], examples["position"], seed, epoch
    )
    return examples | {
        "pos_history": examples["history"][partner],
        "pos_length": examples["length"][partner],
    }


class MemoryFeed:
    """``TrainFeed``'s interface over training examples held in memory (one process, no Ray).

    Example::

        train = build_loo_examples(offsets, items, users, 50, splits=("train",))["train"]
        feed = MemoryFeed(train, batch_size=256, seed=2026, pair=True)
        run = StepContext(model, model, spec.loss_terms, optimizer, feed, device, amp="auto")
        stats = train_one_epoch(run, epoch=0)  # train/loop.py

    Args:
        examples: the training split of ``build_loo_examples``.
        batch_size: rows per batch.
        seed: ``train.seed``: the partners and the order of each epoch derive from it.
        pair: draw a same-target partner each epoch (``spec.needs_partner``).
        steps: batches per epoch; default (and at most) every whole batch of the examples.
    """

    def __init__(
        self, examples: Examples, *, batch_size: int, seed: int, pair: bool, steps: int = 0
    ) -> None:
        n = len(examples["target"])
        if n < batch_size:
            raise ValueError(f"{n} training examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.seed, self.pair = examples, batch_size, seed, pair
        self.steps = min(steps, n // batch_size) if steps else n // batch_size
        self.rank = 0
        # nothing is waited for or planned, and there is no first-epoch head (each epoch is
        # built whole); the rows past the last whole batch are left out of every epoch
        self.stats = FeedStats(skipped=n - self.steps * batch_size)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``skip .. steps - 1`` of ``epoch`` (numpy, ``data/feed.py``'s schema)."""
        rows = paired_epoch(self.examples, self.seed, epoch) if self.pair else self.examples
        rows = {k: v for k, v in rows.items() if k != "position"}
        order = np.random.default_rng([self.seed, epoch, 23]).permutation(len(rows["target"]))
        for step in range(skip, self.steps):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield to_model_batch({k: v[idx] for k, v in rows.items()})
