"""Top-k recommendations from an export: histories of raw ids -> raw ids with scores.

Shapes: B histories, L max_seq_len, D hidden size, N items, C an item chunk.

1. ``map_histories``: raw ids -> internal ids; unknown ids are dropped and counted
   (``strict`` makes them an error naming them).
2. ``encode``: the exported encoder on the last L known items of each history.
3. ``exact_topk`` (default): ``seq_repr @ weightsᵀ (+ bias)`` in item chunks with a running
   top-k, so memory is B × C scores however large N is; ``ann_topk``: the FAISS index.
4. An empty history (nothing given, or nothing known) is an error, unless
   ``fallback="popularity"``: the most popular items by training counts, labelled
   ``source="popularity"``.

``recommend`` serves one history (the CLI's ``--history``); ``recommend_batch`` a batch of
them, used by the Ray Data job (``serve/batch.py``) on each actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from fearec_dist.data.popularity import popularity_ranking
from fearec_dist.serve.artifact import Export, ServeError
from fearec_dist.serve.index import query_vectors, search

SCORE_CHUNK = 1 << 24  # B × C scores per chunk of the exact top-k (64 MiB of float32)
FALLBACKS = ("none", "popularity")
MAX_NAMED = 10  # unknown ids named in an error


@dataclass
class Histories:
    """Known internal ids of B histories as CSR (oldest first), and what was dropped."""

    offsets: np.ndarray  # (B + 1,) int64
    items: np.ndarray  # int64, internal ids 1..N
    n_unknown: np.ndarray  # (B,) int64 raw ids dropped per history
    unknown: list[str] = field(default_factory=list)  # the first few dropped raw ids

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Recommendations:
    """Top-k for B histories; rows with fewer than k candidates are padded with id 0 / -inf."""

    ids: np.ndarray  # (B, k) int64 internal ids, 0 = none
    scores: np.ndarray  # (B, k) float32
    source: np.ndarray  # (B,) object: "model" | "popularity" | "empty_history"


def map_histories(
    export: Export, offsets: np.ndarray, raw_items: object, strict: bool = False
) -> Histories:
    """Raw item ids (CSR: ``raw_items[offsets[b]:offsets[b + 1]]``) -> known internal ids.

    Raises:
        ServeError: with ``strict``, when any id is not in the export's vocabulary (the error
            names up to ten of them and the total).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    ids = export.ids_of(raw_items)
    known = ids > 0
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n_unknown = np.bincount(row[~known], minlength=len(offsets) - 1).astype(np.int64)
    unknown: list[str] = []
    if (~known).any():
        first = np.flatnonzero(~known)[:MAX_NAMED]
        if isinstance(raw_items, list):
            unknown = [str(raw_items[i]) for i in first]
        else:
            unknown = [str(v) for v in raw_items.take(pa.array(first)).to_pylist()]
        if strict:
            total = int((~known).sum())
            raise ServeError(
                f"{total} item id(s) not in the export's vocabulary: {', '.join(unknown)}"
                f"{' …' if total > len(unknown) else ''} (drop --strict to skip unknown ids)"
            )
    kept = np.concatenate([[0], np.cumsum(np.diff(offsets) - n_unknown)]).astype(np.int64)
    return Histories(kept, ids[known], n_unknown, unknown)


def history_tensors(histories: Histories, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR histories -> item_seq (B, L) int64 (last L items, right-padded) and seq_len (B,)."""
    lengths = histories.lengths
    seq_len = np.minimum(lengths, max_seq_len)
    start = histories.offsets[1:] - seq_len  # the last L items of each row
    cols = np.arange(max_seq_len)
    valid = cols[None, :] < seq_len[:, None]
    idx = np.where(valid, start[:, None] + cols[None, :], 0)
    items = histories.items if len(histories.items) else np.zeros(1, dtype=np.int64)
    item_seq = np.where(valid, items[idx], 0)
    return torch.from_numpy(item_seq.astype(np.int64)), torch.from_numpy(seq_len.astype(np.int64))


def encode(export: Export, histories: Histories) -> torch.Tensor:
    """seq_repr (B, D) float32 on the export's device; every history must be non-empty."""
    item_seq, seq_len = history_tensors(histories, export.max_seq_len)
    with torch.no_grad():
        return export.encoder(item_seq.to(export.device), seq_len.to(export.device)).float()


def exact_topk(
    seq_repr: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    exclude: Histories | None = None,
    chunk: int = SCORE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (+ bias), scored in item chunks of ``chunk // B`` rows.

    Args:
        seq_repr: (B, D).
        weights: (N, D) rows of ids 1..N, on seq_repr's device.
        bias: (N,) or None.
        k: how many per row (at most N).
        exclude: per-row ids never to return (the history, for ``--exclude-seen``), or None.
        chunk: scores held at once (B × C).

    Returns:
        ids (B, k) int64 internal ids (0 where fewer than k remain) and scores (B, k) float32.
    """
    B, N = seq_repr.shape[0], weights.shape[0]
    k = min(k, N)
    step = max(k, chunk // max(B, 1))
    best_s = torch.full((B, 0), -torch.inf, device=seq_repr.device)
    best_i = torch.zeros((B, 0), dtype=torch.long, device=seq_repr.device)
    rows = cols = None
    if exclude is not None and len(exclude.items):
        rows = torch.from_numpy(np.repeat(np.arange(B), exclude.lengths)).to(seq_repr.device)
        cols = torch.from_numpy(exclude.items - 1).to(seq_repr.device)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        scores = seq_repr @ weights[lo:hi].T  # (B, C)
        if bias is not None:
            scores = scores + bias[lo:hi]
        if rows is not None:
            inside = (cols >= lo) & (cols < hi)
            scores[rows[inside], cols[inside] - lo] = -torch.inf
        top_s, top_i = scores.topk(min(k, hi - lo), dim=1)
        best_s = torch.cat([best_s, top_s], dim=1)
        best_i = torch.cat([best_i, top_i + lo], dim=1)
        best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=1)
        best_i = best_i.gather(1, order)
    ids = (best_i + 1).cpu().numpy().astype(np.int64)
    scores_np = best_s.cpu().numpy().astype(np.float32)
    ids[~np.isfinite(scores_np)] = 0  # excluded: fewer than k left
    return ids, scores_np


def ann_topk(
    export: Export, seq_repr: torch.Tensor, k: int, exclude: Histories | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from the FAISS index; with ``exclude`` it asks for k + the longest history and
    filters, so a row still gets k items unless the index returned fewer."""

    extra = int(exclude.lengths.max()) if exclude is not None and len(exclude.items) else 0
    queries = query_vectors(seq_repr.cpu().numpy(), export.bias is not None)
    ids, scores = search(export.index, queries, min(k + extra, export.n_items))
    ids[ids < 0] = 0
    scores[ids == 0] = -np.inf
    if extra:
        for b in range(len(ids)):
            seen = exclude.items[exclude.offsets[b] : exclude.offsets[b + 1]]
            drop = np.isin(ids[b], seen)
            ids[b, drop], scores[b, drop] = 0, -np.inf
    order = np.argsort(ids == 0, axis=1, kind="stable")[:, :k]  # keep rank order, 0s last
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def recommend_batch(
    export: Export,
    histories: Histories,
    k: int,
    *,
    ann: bool = False,
    exclude_seen: bool = False,
    fallback: str = "none",
    tables: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Recommendations:
    """Top-k for every history; empty ones get popularity (``fallback``) or no items.

    Args:
        export: a loaded export (encoder, and the index when ``ann``).
        histories: from ``map_histories``.
        k: items per row.
        ann: use the FAISS index instead of the exact scores.
        exclude_seen: never return an item of the row's own history.
        fallback: ``"popularity"``, or ``"none"`` (empty rows get source ``empty_history``).
        tables: the (weights, bias) tensors on the export's device (``item_tables``), reused
            across calls; built when None.
    """
    B = len(histories.offsets) - 1
    ids = np.zeros((B, k), dtype=np.int64)
    scores = np.full((B, k), -np.inf, dtype=np.float32)
    source = np.full(B, "model", dtype=object)
    empty = histories.lengths == 0
    filled = np.flatnonzero(~empty)
    if len(filled):
        sub = select(histories, filled)
        seq_repr = encode(export, sub)
        exclude = sub if exclude_seen else None
        if ann:
            top_i, top_s = ann_topk(export, seq_repr, k, exclude)
        else:
            weights, bias = tables or item_tables(export)
            top_i, top_s = exact_topk(seq_repr, weights, bias, k, exclude)
        ids[filled, : top_i.shape[1]], scores[filled, : top_s.shape[1]] = top_i, top_s
    if empty.any():
        if fallback == "popularity":
            pop_ids, pop_counts = popularity_ranking(export.train_counts, k)
            ids[empty, : len(pop_ids)] = pop_ids
            scores[empty, : len(pop_ids)] = pop_counts.astype(np.float32)
            source[empty] = "popularity"
        else:
            source[empty] = "empty_history"
    return Recommendations(ids, scores, source)


def item_tables(export: Export) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The export's (weights (N, D), bias (N,) or None) as tensors on its device."""
    weights = torch.from_numpy(export.weights).to(export.device)
    bias = None if export.bias is None else torch.from_numpy(export.bias).to(export.device)
    return weights, bias


def select(histories: Histories, rows: np.ndarray) -> Histories:
    """The sub-batch of ``rows`` (CSR kept)."""
    lengths = histories.lengths[rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = histories.offsets[rows]
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(lengths.sum()))
    return Histories(offsets, histories.items[idx], histories.n_unknown[rows])


@dataclass
class Recommendation:
    """One history's answer, in raw ids."""

    item_ids: list[str]
    scores: list[float]
    source: str  # "model" | "popularity"
    n_known: int
    unknown: list[str]  # dropped raw ids (the first ten)
    n_unknown: int


def recommend(
    export: Export,
    history: list[str],
    k: int = 10,
    *,
    ann: bool = False,
    exclude_seen: bool = False,
    strict: bool = False,
    fallback: str = "none",
) -> Recommendation:
    """Top-k raw item ids for one history of raw ids (oldest first).

    Raises:
        ServeError: an unknown id with ``strict``; an empty history (nothing given, or no id
            known) without ``fallback="popularity"``.
    """
    if fallback not in FALLBACKS:
        raise ServeError(f"--fallback {fallback!r}: expected one of {', '.join(FALLBACKS)}")
    hist = map_histories(export, np.array([0, len(history)]), list(history), strict)
    if hist.lengths[0] == 0 and fallback != "popularity":
        why = (
            f"none of its {len(history)} ids is in the export's vocabulary "
            f"({', '.join(hist.unknown)}{' …' if hist.n_unknown[0] > len(hist.unknown) else ''})"
            if history
            else "no item ids given"
        )
        raise ServeError(
            f"empty history: {why}; pass --fallback popularity to get the most popular items"
        )
    recs = recommend_batch(export, hist, k, ann=ann, exclude_seen=exclude_seen, fallback=fallback)
    keep = recs.ids[0] > 0
    return Recommendation(
        item_ids=export.raw_of(recs.ids[0][keep]).to_pylist(),
        scores=[float(s) for s in recs.scores[0][keep]],
        source=str(recs.source[0]),
        n_known=int(hist.lengths[0]),
        unknown=hist.unknown,
        n_unknown=int(hist.n_unknown[0]),
    )
