"""Scoring two exports on the same test rows, and the promotion decision.

Shapes: B rows of a batch, D hidden size, V = N + 1 item ids of the dataset (row 0 padding),
M items of an export (its own ids 1..M, matched to the dataset's by raw id).

Both the promoted ("current") model and the day's new model are scored through their exports by
one path: the day's test rows (``data/examples.iter_eval_rows`` under the new run's temporal cuts)
-> ``ExportScorer`` (the export's encoder on each row's whole history, items translated to the
export's ids by raw id, then ``serve/recommend``'s ``Histories`` and ``encode``) ->
``train/evaluate.evaluate`` (the same full-ranking code and metric names as training). What a
model does not know:

- a history item unknown to the export is dropped from its input (the encoder gets the last L
  items it knows, as ``recommend`` does);
- a target unknown to the export, or a row with no known history item at all, is a miss;
- candidates are the items the export knows among the protocol's warm items (seen before the
  new run's training cut ``valid_start``).

A model that knows every item (the new one: it was trained on this dataset version) is scored
exactly as its run scored its test rows, so its numbers equal the run's ``results.json`` test
metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fearec_dist.config import StorageSection, TrainSection
from fearec_dist.data.examples import iter_eval_rows
from fearec_dist.data.feed import eval_batch_from_arrow
from fearec_dist.data.popularity import read_training_counts
from fearec_dist.data.temporal import SplitProtocol
from fearec_dist.serve.artifact import Export, load_export
from fearec_dist.serve.export import read_item_vocab
from fearec_dist.serve.recommend import Histories, encode
from fearec_dist.storage import read_json
from fearec_dist.train.evaluate import evaluate

Batch = dict[str, torch.Tensor]


@dataclass
class ExportScorer:
    """An export as ``evaluate``'s ``Scorer``, in the dataset's item ids.

    ``to_export[i]`` is the export's id of dataset item i (0: unknown to the export); the item
    table has a row per dataset id (zeros where unknown: never a candidate)."""

    export: Export
    to_export: np.ndarray  # (V,) int64
    weights: torch.Tensor  # (V, D) float32
    bias: torch.Tensor | None  # (V,) or None
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, export: Export, dataset_raw: list[str]) -> ExportScorer:
        """Matches the export's items to the dataset's (``dataset_raw[i - 1]`` = raw id of i)."""
        to_export = np.concatenate([[0], export.ids_of(dataset_raw)]).astype(np.int64)
        known = to_export > 0
        weights = np.zeros((len(to_export), export.weights.shape[1]), dtype=np.float32)
        weights[known] = export.weights[to_export[known] - 1]
        bias = None
        if export.bias is not None:
            bias_np = np.zeros(len(to_export), dtype=np.float32)
            bias_np[known] = export.bias[to_export[known] - 1]
            bias = torch.from_numpy(bias_np)
        counts = {"rows": 0, "unknown_targets": 0, "no_known_history": 0, "dropped_history": 0}
        return cls(export, to_export, torch.from_numpy(weights), bias, counts)

    @property
    def known(self) -> np.ndarray:
        """(V,) bool: the dataset items this export knows."""
        return self.to_export > 0

    def batches(self, tables: Any) -> Any:
        """Evaluation rows (pyarrow) -> ``evaluate``'s numpy batches; a row without any known
        history item gets target 0 (padding: never a candidate), so it counts as a miss."""
        for table in tables:
            batch = eval_batch_from_arrow(table)
            n = len(batch["target"])
            known = self.to_export[batch["seen_items"]] > 0
            per_row = np.bincount(batch["seen_rows"][known], minlength=n)
            c = self.counts
            c["rows"] += n
            c["unknown_targets"] += int((self.to_export[batch["target"]] == 0).sum())
            c["no_known_history"] += int((per_row == 0).sum())
            c["dropped_history"] += int((~known).sum())
            batch["target"] = np.where(per_row > 0, batch["target"], 0)
            yield batch

    def encode(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, D): the export's encoder on each row's last L known history items (the whole
        history, ``seen``, translated; unknown items dropped)."""
        rows = batch["seen_rows"].cpu().numpy()
        ids = self.to_export[batch["seen_items"].cpu().numpy()]
        n = len(batch["target"])
        keep = ids > 0
        lengths = np.bincount(rows[keep], minlength=n)
        items = ids[keep]
        empty = np.flatnonzero(lengths == 0)
        if len(empty):  # a placeholder input (item 1): those rows are misses already
            items = np.insert(items, np.cumsum(lengths)[empty] - lengths[empty], 1)
            lengths[empty] = 1
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        histories = Histories(offsets, items, np.zeros(n, dtype=np.int64))
        return encode(self.export, histories).to(batch["target"].device)

    def item_table(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weights, self.bias


def warm_items(prepared_uri: str, protocol: SplitProtocol, storage: StorageSection) -> np.ndarray:
    """(V,) bool: items with an interaction before the training cut (the protocol's candidates)."""
    meta = read_json(f"{prepared_uri}/meta.json", storage)
    counts = read_training_counts(prepared_uri, int(meta["n_items"]), storage,
                                  before=protocol.valid_start)  # fmt: skip
    return counts > 0


def score_export(
    export_uri: str,
    prepared_uri: str,
    protocol: SplitProtocol,
    train: TrainSection,
    storage: StorageSection,
    warm: np.ndarray | None = None,
) -> dict[str, Any]:
    """An export's test metrics on a dataset version's test rows under ``protocol``.

    Args:
        export_uri: the export directory.
        prepared_uri: the dataset version's directory (its rows, raw item ids, warm items).
        protocol: the temporal cuts the rows are cut with (the new run's).
        train: ``topk``, ``eval_batch_size``, ``eval_item_chunk``.
        storage: object-storage options.
        warm: (V,) the warm items (``warm_items``; computed when None).

    Returns:
        ``evaluate``'s metrics (``hr@K``, …, ``n_users``) plus ``"unknown"``: rows, targets
        unknown to the export, rows without any known history item, history items dropped.
    """
    export = load_export(export_uri, storage)
    meta = read_json(f"{prepared_uri}/meta.json", storage)
    raw = read_item_vocab(prepared_uri, int(meta["n_items"]), storage)
    scorer = ExportScorer.build(export, raw)
    if warm is None:
        warm = warm_items(prepared_uri, protocol, storage)
    rows = iter_eval_rows(prepared_uri, export.max_seq_len, "test", train.eval_batch_size,
                          storage, protocol=protocol)  # fmt: skip
    metrics = evaluate(torch.nn.Module(), scorer, scorer.batches(rows), list(train.topk),
                       torch.device("cpu"), all_reduce=False, item_chunk=train.eval_item_chunk,
                       warm=warm & scorer.known)  # fmt: skip
    return metrics | {"unknown": dict(scorer.counts)}


def decide(new: float, current: float | None, metric: str, min_gain: float) -> tuple[bool, str]:
    """Whether the new model replaces the current one, and why, in one line.

    Promoted when there is no current model, or when new > current and (new - current) >=
    min_gain x current. A tie keeps the current model (no churn for nothing).
    """
    if current is None:
        return True, f"no current model: the first model of the pipeline ({metric} {new:.4f})"
    gain = (new - current) / current if current > 0 else (np.inf if new > 0 else 0.0)
    need = f"needs > {current:.4f} and a relative gain >= {min_gain:.2%}"
    if new > current and new - current >= min_gain * current:
        return True, f"{metric} {new:.4f} beats {current:.4f} by {gain:+.2%} ({need})"
    return False, f"{metric} {new:.4f} vs current {current:.4f} ({gain:+.2%}); {need}"
