"""Evaluation scoring: full-ranking metrics of a model, in a worker or from a saved checkpoint.

Owns ``evaluate`` (batches -> ``spec.full_scores`` -> ranks under both protocols -> metric sums,
all-reduced over workers) and ``evaluate_checkpoint`` (``fearec-dist evaluate --checkpoint URI``:
re-score a saved model on valid and test). The latter runs in this process without Ray: the
checkpoint carries the config and the examples' URI, and the valid/test rows are streamed from
there in ``eval_batch_size`` batches.

Scores are ``encode(model, batch) @ item_table(model)ᵀ`` (the model spec), ``eval_batch_size``
rows at a time, so memory is bounded by batch × (n_items + 1) floats whatever the catalogue size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fearec_dist.config import ExperimentConfig, StorageSection
from fearec_dist.data.examples import iter_eval_rows
from fearec_dist.data.feed import eval_batch_from_arrow
from fearec_dist.train.checkpoint import latest_checkpoint, load_state_uri
from fearec_dist.train.device import autocast_for, to_device
from fearec_dist.train.metrics import MetricAccumulator, mask_history_, ranks_from_scores


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    full_scores: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterable[Any],
    topk: list[int],
    device: torch.device,
    amp: str = "off",
    all_reduce: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics over ``batches`` (pyarrow tables or numpy dicts), both protocols.

    Args:
        model: the bare module (never the DDP wrapper: ranks may see unequal batch counts).
        full_scores: (model, batch) -> (B, n_items + 1) scores, e.g. ``spec.full_scores``.
        batches: evaluation rows with ``item_seq``/``seq_len``/``target`` and ``seen``.
        topk: the K of every metric.
        all_reduce: sum the metrics over the workers' process group.

    Returns:
        ``{"hr@K", "ndcg@K", "mrr@K", "masked_…", "n_users"}``.
    """
    model.eval()
    acc = MetricAccumulator(topk)
    for raw in batches:
        batch_np = raw if isinstance(raw, dict) else eval_batch_from_arrow(raw)
        if not len(batch_np["target"]):
            continue
        batch = to_device(batch_np, device)
        with autocast_for(device, amp):
            scores = full_scores(model, batch)
        scores = scores.float()
        scores[:, 0] = float("-inf")  # padding is never a candidate
        target = batch["target"]
        ranks = ranks_from_scores(scores, target)
        if "seen_rows" in batch:
            mask_history_(scores, batch["seen_rows"], batch["seen_items"], target)
        acc.add(ranks, ranks_from_scores(scores, target))
    model.train()
    return acc.result(all_reduce=all_reduce)


def evaluate_checkpoint(uri: str, storage: StorageSection | None = None) -> dict[str, Any]:
    """Loads the checkpoint at ``uri`` (or a run directory's newest) and returns
    ``{"valid": {...}, "test": {...}, ...}``."""
    from fearec_dist.models import get_spec
    from fearec_dist.train.stages import build_run_model

    storage = storage or StorageSection()
    uri = latest_checkpoint(uri, storage)
    state = load_state_uri(uri, storage)
    cfg = ExperimentConfig.from_dict(state["config"], f"{uri} (checkpoint config)")
    data = state["data"]
    spec = get_spec(cfg.model.name)
    model = build_run_model(spec, cfg, data)
    model.load_state_dict(state.get("best_model") or state["model"])
    device = torch.device("cpu")
    out: dict[str, Any] = {"checkpoint": uri, "epochs_run": state["progress"]["epoch"]}
    out["best_epoch"] = state["progress"]["best_epoch"]
    for split in ("valid", "test"):
        batches = iter_eval_rows(data, split, cfg.train.eval_batch_size, storage)
        metrics = evaluate(
            model, spec.full_scores, batches, cfg.train.topk, device, all_reduce=False
        )
        out[split] = {k: v for k, v in metrics.items() if k != "n_users"}
        out[f"n_{split}"] = metrics["n_users"]
    return out
