"""Evaluation scoring: full-ranking metrics of a model, in a worker, from a saved checkpoint, or
of the popularity baseline.

Owns ``evaluate`` (batches -> ``spec.encode`` -> ranks against every item row of
``spec.item_table``, ``item_chunk`` rows at a time, under both protocols -> metric sums,
all-reduced over workers), ``evaluate_checkpoint`` (``fearec-dist evaluate --checkpoint URI``:
re-score a saved model on valid and test) and ``evaluate_popularity`` (``fearec-dist evaluate
--baseline popularity --data URI``: every item ranked by its training count). The latter two run
in this process without Ray: the valid/test rows are streamed from the prepared sequences in
``eval_batch_size`` batches, for every user or a fixed seeded sample of them.

Shapes: B rows of a batch, D the representation size, V = n_items + 1 item rows (row 0 is
padding), C = ``item_chunk``. Scores are ``encode(model, batch) @ item_table(model)ᵀ (+ bias)``
computed C item rows at a time, and only the count of items beating the target is kept per
chunk, so memory is bounded by B × C scores whatever the catalogue size (the (B, V) matrix never
exists). The result is exact: rank = 1 + Σ over chunks of #{items c ≠ target, c ≠ 0 :
score_c > score_target}, the same count as over the full matrix.

Precision: scores are computed and compared in float32 (float64 stays float64: the popularity
baseline's counts), whatever ``train.amp`` says. Under a bf16 autocast the products would be
rounded to 8 bits of mantissa, many items would tie with the target, and ties go to the target
(spec/evaluation.md §2): metrics would be inflated on a GPU (random D = 64 tables at 400k items:
NDCG@10 +9 %), and differ from ``fearec-dist evaluate``'s on the CPU for the same weights. Only
the encoder may run under autocast, when ``train.eval_amp`` asks; its output is cast to float32
before it is scored. The target's score is computed once per row as a batched dot product and
compared with every chunk's scores; only an item whose score differs from the target's by the
rounding of a different summation order (a near-duplicate item row) can be counted otherwise
than a full matrix would count it. The target's own column is excluded by index, never by
comparison, so it never beats itself.

The temporal protocol (``data/temporal.py``) hands ``evaluate`` the items seen before the
training cut (``warm``): only they are candidates (the model at the cut knows no other), a row
whose target is cold counts as a miss in the usual metrics, and ``warm_…`` metrics score the warm
targets alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fearec_dist.config import StorageSection, TrainSection
from fearec_dist.data.examples import count_examples, count_summary, iter_eval_rows, sample_users
from fearec_dist.data.feed import eval_batch_from_arrow
from fearec_dist.data.popularity import read_training_counts
from fearec_dist.data.temporal import LOO, SplitProtocol, protocol_record
from fearec_dist.data.versions import resolve_version
from fearec_dist.models.spec import scores_against
from fearec_dist.storage import read_json
from fearec_dist.train.build import rebuild_model
from fearec_dist.train.checkpoint import latest_checkpoint, load_state_uri
from fearec_dist.train.device import autocast_for, to_device
from fearec_dist.train.metrics import MetricAccumulator

Batch = dict[str, torch.Tensor]
BASELINES = ("popularity",)
BASELINE_SEED = 2026  # the users sampled for a baseline when no seed is given
MISS = 2**62  # the rank of a cold target: beyond every K


class Scorer(Protocol):
    """What ``evaluate`` needs of a model: a ``ModelSpec``, or a baseline's small object."""

    def encode(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, D) query of each row."""
        ...

    def item_table(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights (V, D), bias (V,) or None) the queries are scored against."""
        ...


def _scored(x: torch.Tensor) -> torch.Tensor:
    """Queries and item rows as scored: float32 (float64 stays float64: the popularity
    baseline's counts)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def target_scores(
    query: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """Each row's score of its own target, the product ``scores_against`` computes for that
    column, as a batched (1 × D) @ (D × 1) matmul.

    Args:
        query: (B, D).
        weights: (V, D); bias: (V,) or None.
        target: (B,) item ids.

    Returns:
        (B,) scores in the matmul's dtype (bias added as ``scores_against`` adds it).
    """
    scores = (query[:, None, :] @ weights[target][:, :, None])[:, 0, 0]
    return scores if bias is None else scores + bias[target]


def chunked_ranks(
    query: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    seen_rows: torch.Tensor | None = None,
    seen_items: torch.Tensor | None = None,
    item_chunk: int = 65536,
    candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the targets among item rows 1..V-1, history kept and history masked, scoring
    ``item_chunk`` rows of the table at a time.

    rank = 1 + #{c ≠ target, c ≠ 0 : score_c > score_target}; the masked rank also leaves out
    the row's history entries (the target itself never). Summed over chunks, the counts equal
    those of the full (B, V) matrix (``metrics.ranks_from_scores`` and ``mask_history_``).

    Args:
        query: (B, D) representations (``spec.encode``).
        weights: (V, D) item rows, row 0 padding; bias: (V,) or None.
        target: (B,) item ids in 1..V-1.
        seen_rows, seen_items: (S,) history entries (row ``seen_rows[i]`` has seen
            ``seen_items[i]``), or None: the masked ranks are then the kept ones.
        item_chunk: C, the item rows scored at a time (memory: B × C scores and flags).
        candidates: (V,) bool, the items that may beat a target (the temporal protocol's warm
            items), or None for every item.

    Returns:
        ``(ranks, masked_ranks)``, each (B,) long, 1 = best.
    """
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    query, weights = _scored(query), _scored(weights)
    bias = None if bias is None else _scored(bias)
    n_rows, n_cols = query.shape[0], weights.shape[0]
    # autocast off: an enclosing autocast (the trainer's) must not round the products
    with torch.autocast(query.device.type, enabled=False):
        threshold = target_scores(query, weights, bias, target)[:, None]  # (B, 1)
    starts = list(range(0, n_cols, item_chunk))
    bounds: list[int] = [0] * (len(starts) + 1)
    if seen_rows is not None and seen_items is not None:
        # the history entries to mask (never the target), sorted by item: one slice per chunk
        keep = seen_items != target[seen_rows]
        order = torch.argsort(seen_items[keep])
        seen_rows, seen_items = seen_rows[keep][order], seen_items[keep][order]
        edges = torch.tensor([*starts, n_cols], device=seen_items.device)
        bounds = torch.searchsorted(seen_items, edges).tolist()  # one host sync per batch
    beaten = torch.zeros(n_rows, dtype=torch.long, device=query.device)
    beaten_masked = torch.zeros_like(beaten)
    for i, c0 in enumerate(starts):
        c1 = min(c0 + item_chunk, n_cols)
        with torch.autocast(query.device.type, enabled=False):
            scores = scores_against(query, weights[c0:c1], None if bias is None else bias[c0:c1])
        wins = scores > threshold  # (B, C) item beats the row's target
        if c0 == 0:
            wins[:, 0] = False  # padding is never a candidate
        if candidates is not None:
            wins &= candidates[None, c0:c1]
        # the target's own column, taken off by index (no comparison, no host sync)
        inside = (target >= c0) & (target < c1)
        own = wins.gather(1, (target - c0).clamp(0, c1 - c0 - 1)[:, None])[:, 0] & inside
        count = wins.sum(dim=1) - own.long()
        beaten += count
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            assert seen_rows is not None and seen_items is not None
            wins[seen_rows[lo:hi], seen_items[lo:hi] - c0] = False  # the target is not among them
            count = wins.sum(dim=1) - own.long()
        beaten_masked += count
    return beaten + 1, beaten_masked + 1


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    spec: Scorer,
    batches: Iterable[Any],
    topk: list[int],
    device: torch.device,
    amp: str = "off",
    all_reduce: bool = True,
    item_chunk: int = 65536,
    warm: np.ndarray | None = None,
) -> dict[str, float]:
    """Full-ranking metrics over ``batches`` (pyarrow tables or numpy dicts), both protocols.

    Args:
        model: the bare module (never the DDP wrapper: ranks may see unequal batch counts).
        spec: ``encode(model, batch) -> (B, D)`` and ``item_table(model) -> ((V, D), (V,) or
            None)``: a ``ModelSpec``, or a baseline's scorer (``PopularityScorer``).
        batches: evaluation rows with ``item_seq``/``seq_len``/``target`` and ``seen``.
        topk: the K of every metric.
        device: where the batches go (the model's device).
        amp: the autocast of ``encode`` alone (``train.amp`` when ``train.eval_amp``, else
            "off"); the scores and their comparisons are float32 whatever it says.
        all_reduce: sum the metrics over the workers' process group.
        item_chunk: item rows scored at a time (``train.eval_item_chunk``).
        warm: (V,) bool, the temporal protocol's items seen before the training cut (the
            candidates; a cold target is a miss), or None (leave-one-out: every item).

    Returns:
        ``{"hr@K", "ndcg@K", "mrr@K", "masked_…", "n_users"}``; with ``warm`` also
        ``"warm_…"`` (the same metrics over the warm targets only) and ``"n_cold"``.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(topk)
    warm_acc = MetricAccumulator(topk) if warm is not None else None
    weights, bias = spec.item_table(model)
    candidates = None if warm is None else torch.as_tensor(warm, dtype=torch.bool).to(device)
    for raw in batches:
        batch_np = raw if isinstance(raw, dict) else eval_batch_from_arrow(raw)
        if not len(batch_np["target"]):
            continue
        batch = to_device(batch_np, device)
        with autocast_for(device, amp):
            query = spec.encode(model, batch)
        ranks, masked = chunked_ranks(
            query,
            weights,
            bias,
            batch["target"],
            batch.get("seen_rows"),
            batch.get("seen_items"),
            item_chunk,
            candidates,
        )
        if warm_acc is not None:
            hot = candidates[batch["target"]]
            warm_acc.add(ranks[hot], masked[hot])
            ranks, masked = ranks.masked_fill(~hot, MISS), masked.masked_fill(~hot, MISS)
        acc.add(ranks, masked)
    model.train(was_training)
    out = acc.result(all_reduce=all_reduce)
    if warm_acc is not None:  # every rank gets here: the two all-reduces pair up
        warm_out = warm_acc.result(all_reduce=all_reduce)
        out |= {f"warm_{k}": v for k, v in warm_out.items() if k != "n_users"}
        out["n_cold"] = out["n_users"] - warm_out["n_users"]
    return out


def user_sample(n_users: int, k: int, seed: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The users scored: ``sample_users(n_users, k, seed)`` (as ``train.valid_users``) and its
    description for the results: ``{"scored", "of", "seed"}`` (seed None when all are)."""
    users = sample_users(n_users, k, seed)
    if users is None:
        return None, {"scored": n_users, "of": n_users, "seed": None}
    return users, {"scored": len(users), "of": n_users, "seed": seed}


def describe_users(sample: dict[str, Any]) -> str:
    """One line for the console, e.g. ``users: a seeded sample of 10,000 of 22,363 (seed 7)``."""
    if sample.get("seed") is None:
        return f"users: all {sample['of']:,}"
    scored, of, seed = sample["scored"], sample["of"], sample["seed"]
    return f"users: a seeded sample of {scored:,} of {of:,} (seed {seed})"


def evaluate_checkpoint(
    uri: str, storage: StorageSection | None = None, users: int = 0, seed: int | None = None
) -> dict[str, Any]:
    """Loads the checkpoint at ``uri`` (or a run directory's newest) and scores it.

    Args:
        uri: a checkpoint directory, or a run directory.
        storage: object-storage options.
        users: score only a fixed seeded sample of this many users (0: every user), on both
            splits, so a model and a baseline can be compared on the same users.
        seed: the sample's seed; default the run's ``train.seed``.

    Returns:
        ``{"valid": {...}, "test": {...}, "n_valid", "n_test", "users", "checkpoint",
        "epochs_run", "best_epoch", "protocol"}`` (the run's protocol: its rows, candidates
        and counts).
    """
    storage = storage or StorageSection()
    uri = latest_checkpoint(uri, storage)
    state = load_state_uri(uri, storage)
    model, spec, cfg, info = rebuild_model(state, uri)
    ids, sample = user_sample(info.n_users, users, cfg.train.seed if seed is None else seed)
    out: dict[str, Any] = {"checkpoint": uri, "epochs_run": state["progress"]["epoch"]}
    out["best_epoch"] = state["progress"]["best_epoch"]
    out["users"], out["protocol"] = sample, info.protocol_record()
    t, cpu, protocol = cfg.train, torch.device("cpu"), info.protocol
    warm = None
    if protocol.temporal:  # the items before the cut, counted as the run counted them
        counts = read_training_counts(info.prepared_uri, info.n_items, storage,
                                      before=protocol.valid_start)  # fmt: skip
        warm = counts > 0
    for split in ("valid", "test"):
        rows = iter_eval_rows(info.prepared_uri, info.max_seq_len, split, t.eval_batch_size,
                              storage, users=ids, protocol=protocol)  # fmt: skip
        metrics = evaluate(model, spec, rows, t.topk, cpu, all_reduce=False,
                           item_chunk=t.eval_item_chunk, warm=warm)  # fmt: skip
        out[split] = {k: v for k, v in metrics.items() if k not in ("n_users", "n_cold")}
        out[f"n_{split}"] = metrics["n_users"]
    return out


@dataclass(frozen=True)
class PopularityScorer:
    """The popularity baseline as a scorer: every query is ones (B, 1) against the (V, 1)
    training counts, so a row's scores are the counts (float64: exact up to 2^53, ties stay
    ties and go to the target, spec/evaluation.md §2). No model: ``evaluate`` gets an empty
    module."""

    counts: torch.Tensor  # (V, 1) float64, row 0 (padding) 0

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> PopularityScorer:
        """(V,) training interactions per item id (``data/popularity.training_counts``)."""
        return cls(torch.as_tensor(np.asarray(counts), dtype=torch.float64)[:, None])

    def encode(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        target = batch["target"]
        return torch.ones(len(target), 1, dtype=self.counts.dtype, device=target.device)

    def item_table(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.counts, None


def evaluate_popularity(
    prepared_uri: str,
    max_seq_len: int = 50,
    storage: StorageSection | None = None,
    users: int = 0,
    seed: int = BASELINE_SEED,
    topk: list[int] | None = None,
    batch_size: int = 512,
    item_chunk: int = 65536,
    protocol: SplitProtocol = LOO,
) -> dict[str, Any]:
    """The popularity baseline on a prepared dataset's valid and test rows.

    Every item is ranked by its count in the training part of every sequence
    (``data/popularity.read_training_counts``: histories and targets of the training examples,
    never a valid or test target), the ranking the serving fallback uses. Rows are cut from the
    sequences as for a checkpoint (``iter_eval_rows``; ``max_seq_len`` only sets the history
    width, ``seen`` is the whole history), so no examples build and no Ray are needed.
    Under the temporal protocol the counts are every interaction before the training cut
    ``valid_start``, for the validation and the test rows alike (the model trains on that part
    only); the items counted are the candidates, a cold target is a miss.

    Args:
        prepared_uri: the output of ``fearec-dist prepare``.
        max_seq_len: L of the rows.
        storage: object-storage options.
        users: score only a fixed seeded sample of this many users (0: every user).
        seed: the sample's seed.
        topk: the K of every metric (default ``train.topk``'s).
        batch_size: rows per batch; item_chunk: items scored at a time.
        protocol: leave-one-out, or temporal cuts (``data/temporal.resolve_protocol``).

    Returns:
        ``{"baseline", "data", "max_seq_len", "valid", "test", "n_valid", "n_test", "users",
        "protocol"}`` (the protocol's counts are over every user, the metrics over the scored).
    """
    storage = storage or StorageSection()
    prepared_uri = resolve_version(prepared_uri, storage=storage).uri  # a root: its newest
    meta = read_json(f"{prepared_uri}/meta.json", storage)
    n_items, n_users = int(meta["n_items"]), int(meta["n_users"])
    warm = None
    if protocol.temporal:  # one pass: the popularity counts and the protocol's counts
        totals = count_examples(prepared_uri, n_items, protocol, storage)
        counts, record = totals["interactions"], count_summary(totals, protocol)
        warm = counts > 0
    else:
        counts = read_training_counts(prepared_uri, n_items, storage)
        record = {}
    scorer = PopularityScorer.from_counts(counts)
    ids, sample = user_sample(n_users, users, seed)
    out: dict[str, Any] = {"baseline": "popularity", "data": prepared_uri}
    out |= {"max_seq_len": max_seq_len, "users": sample}
    topk = list(topk or TrainSection().topk)
    no_model, cpu = torch.nn.Module(), torch.device("cpu")
    for split in ("valid", "test"):
        batches = iter_eval_rows(prepared_uri, max_seq_len, split, batch_size, storage,
                                 users=ids, protocol=protocol)  # fmt: skip
        metrics = evaluate(no_model, scorer, batches, topk, cpu, all_reduce=False,
                           item_chunk=item_chunk, warm=warm)  # fmt: skip
        out[split] = {k: v for k, v in metrics.items() if k not in ("n_users", "n_cold")}
        out[f"n_{split}"] = metrics["n_users"]
        record.setdefault(f"n_{split}", metrics["n_users"])  # loo: the rows scored
    out["protocol"] = protocol_record(protocol, record)
    return out
