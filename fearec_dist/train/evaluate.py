"""``fearec-dist evaluate --checkpoint URI``: re-score a saved model on valid and test.

Runs in this process without Ray: the checkpoint carries the config and the examples' URI, and
the valid/test rows are streamed from there in ``eval_batch_size`` batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import torch

from fearec_dist.config import ExperimentConfig, StorageSection
from fearec_dist.train.checkpoint import latest_checkpoint, load_state_uri
from fearec_dist.train.loop import evaluate, model_inputs


def iter_split(uri: str, batch_size: int, storage: StorageSection) -> Iterator[pa.Table]:
    from fearec_dist.storage import resolve

    fs, root = resolve(uri, storage)
    for rb in pads.dataset(root, filesystem=fs, format="parquet").to_batches(batch_size=batch_size):
        yield pa.Table.from_batches([rb])


def evaluate_checkpoint(uri: str, storage: StorageSection | None = None) -> dict[str, Any]:
    """Loads the checkpoint at ``uri`` (or a run directory's newest) and returns
    ``{"valid": {...}, "test": {...}, ...}``."""
    from fearec_dist.models import build_model, get_spec

    storage = storage or StorageSection()
    uri = latest_checkpoint(uri, storage)
    state = load_state_uri(uri, storage)
    cfg = ExperimentConfig.from_dict(state["config"], f"{uri} (checkpoint config)")
    data = state["data"]
    spec = get_spec(cfg.model.name)
    model = build_model(
        cfg.model.name,
        n_items=data["n_items"],
        max_seq_len=data["max_seq_len"],
        **cfg.model.params,
        **model_inputs(spec, cfg, data),
    )
    weights = state.get("best_model") or state["model"]
    model.load_state_dict(weights)
    device = torch.device("cpu")
    out: dict[str, Any] = {"checkpoint": uri, "epochs_run": state["progress"]["epoch"]}
    out["best_epoch"] = state["progress"]["best_epoch"]
    for split in ("valid", "test"):
        batches = iter_split(f"{data['uri']}/{split}", cfg.train.eval_batch_size, storage)
        metrics = evaluate(
            model, spec.full_scores, batches, cfg.train.topk, device, all_reduce=False
        )
        out[split] = {k: v for k, v in metrics.items() if k != "n_users"}
        out[f"n_{split}"] = metrics["n_users"]
    return out
