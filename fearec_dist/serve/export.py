"""``fearec-dist export --run DIR|URI``: a trained run -> a servable export directory.

Shapes: B histories, L max_seq_len, D hidden size, N items.

    checkpoint (best validation weights) -> model -> item table  -> items.parquet
                                               \\-> encoder     -> encoder.pt2 (torch.export)
    prepared vocab + training counts ------------------------------^
    [FAISS index over the table] -> index-<kind>.faiss;  manifest.json last

Why ``torch.export`` (``.pt2``) and not TorchScript: both trace every model here on CPU
(FEARec's rfft-built band projections are constant buffers by the time ``forward`` runs, its
delays are ``topk`` + ``gather``, and dropout is the identity in eval mode), but TorchScript is
deprecated in current PyTorch, and ``torch.export`` gives a symbolic batch dimension that is
checked at export time (a graph that secretly fixed B would fail to export, not serve wrong
answers), an artifact that ``torch.export.load`` reads with nothing but torch, and
``move_to_device_pass`` to run the CPU-exported program on a GPU. docs/serving.md has the
details and the measured differences.
"""

from __future__ import annotations

import io
import math
import posixpath
import time
import uuid
from typing import Any

import numpy as np
import torch
from torch import nn

from fearec_dist.config import StorageSection
from fearec_dist.data.examples import ExamplesInfo, dense, iter_eval_rows
from fearec_dist.serve.artifact import (
    ENCODER,
    EXPORT_VERSION,
    ITEMS,
    MANIFEST,
    SCORING,
    ServeError,
    index_file,
    items_table,
    vocab_checksum,
)
from fearec_dist.tracking import log_export
from fearec_dist.train.build import rebuild_model

VERIFY_ROWS = 256  # test histories the exported encoder is checked on, against the model
MAX_BATCH = 1 << 20


class SequenceEncoder(nn.Module):
    """The model's ``spec.encode`` as a module of two tensors (what torch.export traces).

    Args (forward):
        item_seq: (B, L) int64, the most recent L items oldest first, right-padded with 0.
        seq_len: (B,) int64 in 1..L.

    Returns:
        seq_repr (B, D) float32.
    """

    def __init__(self, model: nn.Module, encode: Any) -> None:
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        return self.encode(self.model, {"item_seq": item_seq, "seq_len": seq_len})


def export_encoder(model: nn.Module, encode: Any, max_seq_len: int) -> Any:
    """``torch.export`` of the eval-mode encoder with a dynamic batch dimension (L is fixed).

    Returns:
        the ``ExportedProgram``.
    """
    # contiguous buffers (FEARec's band projections are transposed views): the .pt2 writer
    # warns about, and may mis-place on a GPU, a tensor that covers only part of its storage
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_contiguous():
                module._buffers[name] = buf.contiguous()
    encoder = SequenceEncoder(model.eval(), encode).eval()
    # an example batch of 2 (batch sizes 0 and 1 are specialised by torch.export)
    item_seq = torch.zeros(2, max_seq_len, dtype=torch.long)
    item_seq[:, 0] = 1
    seq_len = torch.ones(2, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(
            encoder, (item_seq, seq_len), dynamic_shapes=({0: batch}, {0: batch})
        )


def default_output(run_uri: str, checkpoint_uri: str) -> str:
    """``<run dir>/export``; for a checkpoint directory, beside it in its run directory."""
    import os

    run = run_uri.rstrip("/")
    if checkpoint_uri.rstrip("/") == run:
        run = posixpath.dirname(run) if "://" in run else os.path.dirname(os.path.abspath(run))
    return f"{run}/export"


def read_item_vocab(prepared_uri: str, n_items: int, storage: StorageSection) -> list[str]:
    """Raw item ids of internal ids 1..N from ``<prepared>/vocab/items.parquet``."""
    import pyarrow.parquet as pq

    from fearec_dist.storage import read_bytes

    uri = f"{prepared_uri.rstrip('/')}/vocab/items.parquet"
    try:
        table = pq.read_table(io.BytesIO(read_bytes(uri, storage)), columns=["id", "raw"])
    except FileNotFoundError:
        raise ServeError(f"{uri} does not exist: the run's prepared data has moved") from None
    table = table.sort_by("id")
    ids = table.column("id").to_numpy()
    if len(ids) != n_items or not np.array_equal(ids, np.arange(1, n_items + 1)):
        raise ServeError(
            f"{uri}: holds {len(ids)} items, the checkpoint's model has {n_items}; the prepared "
            "data was replaced after training"
        )
    return table.column("raw").to_pylist()


def export_run(
    run_uri: str,
    output_uri: str | None = None,
    index: str | None = None,
    storage: StorageSection | None = None,
    index_params: dict[str, int] | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Exports a run directory's newest checkpoint (or a checkpoint directory).

    Args:
        run_uri: a run directory or one of its ``checkpoint_*`` directories (path or URI).
        output_uri: the export directory (default ``<run dir>/export``).
        index: ``flat``, ``ivf`` or ``hnsw`` to build an ANN index too; None for none.
        storage: object-storage options (default: the AWS environment variables).
        index_params: overrides of the index defaults (``serve/index.py``).
        say: where progress lines go.

    Returns:
        the written manifest (``"uri"`` added).
    """
    from fearec_dist.data.popularity import read_training_counts
    from fearec_dist.storage import redact
    from fearec_dist.train.checkpoint import latest_checkpoint, load_state_uri

    storage = storage or StorageSection()
    checkpoint = latest_checkpoint(run_uri, storage)
    out = (output_uri or default_output(run_uri, checkpoint)).rstrip("/")
    _check_output(out, storage)
    state = load_state_uri(checkpoint, storage)
    model, spec, cfg, data = rebuild_model(state, checkpoint)
    n_items = data.n_items
    say(
        f"[fearec-dist] exporting {cfg.model.name} ({n_items:,} items, "
        f"L={data.max_seq_len}) from {redact(checkpoint)} -> {redact(out)}"
    )
    progress = state["progress"]
    manifest = write_export(
        out,
        model,
        spec,
        cfg.model.name,
        cfg.model.params,
        read_item_vocab(data.prepared_uri, n_items, storage),
        # the popularity fallback counts what the model trained on (temporal: before the cut)
        read_training_counts(data.prepared_uri, n_items, storage, before=data.valid_start),
        metrics={
            "test": progress.get("test", {}),
            "valid": progress.get("valid", {}),
            "best_epoch": progress.get("best_epoch"),
        },
        source={
            "checkpoint": redact(checkpoint),
            "prepared": redact(data.prepared_uri),
            "examples_fingerprint": data.fingerprint,
        },
        protocol=data.protocol_record(),
        lineage=data.data,
        warm_start=state.get("warm_start"),
        verify_on=_test_histories(data, storage),
        index=index,
        index_params=index_params,
        storage=storage,
        say=say,
    )
    # the manifest on the MLflow run the weights came from (a tracked run's results.json)
    run_dir = default_output(run_uri, checkpoint).removesuffix("/export")
    log_export(run_dir, manifest, storage, say)
    return manifest


def write_export(
    out: str,
    model: nn.Module,
    spec: Any,
    model_name: str,
    model_config: dict[str, Any],
    raw_ids: list[str],
    train_counts: np.ndarray,
    *,
    metrics: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    protocol: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    warm_start: dict[str, Any] | None = None,
    verify_on: tuple[torch.Tensor, torch.Tensor] | None = None,
    index: str | None = None,
    index_params: dict[str, int] | None = None,
    storage: StorageSection | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Writes the export of ``model`` to ``out`` (items, encoder, [index], manifest last).

    Args:
        out: the export directory (an existing one should be cleared first).
        model: the model in eval mode; ``spec`` its ModelSpec.
        model_name, model_config: recorded in the manifest.
        raw_ids: (N,) raw item ids of internal ids 1..N.
        train_counts: (N + 1,) training interactions per id (``data/popularity.py``).
        metrics, source: recorded in the manifest (test metrics, where the weights came from).
        protocol: the run's evaluation protocol (``results.json["protocol"]``), recorded.
        lineage: ``{"uri", "version"}`` of the dataset the model trained on (the manifest's
            ``data``).
        warm_start: the run's ``train.warm_start`` lineage (the manifest's ``warm_start``;
            None for a cold start).
        verify_on: (item_seq (T, L), seq_len (T,)) histories on which the exported encoder is
            compared with the model (the max difference goes into the manifest), or None.
        index, index_params: the ANN index to build (``serve/index.py``), or None.
        storage: object-storage options.
        say: where progress lines go.

    Returns:
        the manifest (``"uri"`` added).
    """
    from fearec_dist.storage import redact, write_bytes, write_json

    start = time.time()
    storage = storage or StorageSection()
    max_seq_len = int(model.max_seq_len)
    with torch.no_grad():
        weights, bias = spec.item_table(model)  # (N + 1, D), (N + 1,) or None
        weights = weights[1:].float().numpy().copy()
        bias = None if bias is None else bias[1:].float().numpy().copy()
    table = items_table(raw_ids, weights, bias, train_counts)
    write_bytes(f"{out}/{ITEMS}", _parquet_bytes(table), storage)

    program = export_encoder(model, spec.encode, max_seq_len)
    blob = io.BytesIO()
    torch.export.save(program, blob)
    write_bytes(f"{out}/{ENCODER}", blob.getvalue(), storage)
    max_diff = math.nan
    if verify_on is not None:
        with torch.no_grad():
            want = spec.encode(model, {"item_seq": verify_on[0], "seq_len": verify_on[1]})
            max_diff = float((want - program.module()(*verify_on)).abs().max())

    manifest: dict[str, Any] = {
        "export_version": EXPORT_VERSION,
        # unique per export: two exports of one dataset share the vocab checksum, not this
        "export_id": uuid.uuid4().hex,
        "model": model_name,
        "model_config": model_config,
        "n_items": len(raw_ids),
        "hidden_size": int(weights.shape[1]),
        "max_seq_len": max_seq_len,
        "has_bias": bias is not None,
        "scoring": SCORING,
        "vocab_checksum": vocab_checksum(raw_ids),
        "encoder": {
            "file": ENCODER,
            "format": "torch.export",
            "inputs": {
                "item_seq": "(B, L) int64: the most recent L items, oldest first, right-padded "
                "with 0; ids from items.parquet",
                "seq_len": "(B,) int64 in 1..L",
            },
            "output": "seq_repr (B, D) float32",
            "torch_version": torch.__version__,
            "max_abs_diff_vs_model": max_diff,
        },
        "metrics": metrics or {},
        "source": source or {},
        "protocol": protocol or {},
        "data": lineage or {},  # {"uri", "version"} of the dataset the model trained on
        "warm_start": warm_start,  # the source its training started from (None: cold)
        "index": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if index:
        manifest["index"] = write_index(index, weights, bias, index_params, out, storage, say)
    manifest["seconds"] = round(time.time() - start, 2)
    write_json(f"{out}/{MANIFEST}", manifest, storage)  # last: the commit marker
    say(
        f"[fearec-dist] export written to {redact(out)} in {manifest['seconds']:.1f} s "
        f"(encoder matches the model to {max_diff:.1e})"
    )
    return manifest | {"uri": out}


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_index(
    kind: str,
    weights: np.ndarray,
    bias: np.ndarray | None,
    params: dict[str, int] | None,
    out: str,
    storage: StorageSection,
    say: Any,
) -> dict[str, Any]:
    from fearec_dist.serve.index import build_index, import_faiss, serialize
    from fearec_dist.storage import write_bytes

    start = time.time()
    faiss = import_faiss()
    built, used = build_index(kind, weights, bias, params)
    write_bytes(f"{out}/{index_file(kind)}", serialize(built), storage)
    seconds = round(time.time() - start, 2)
    say(f"[fearec-dist] {kind} index over {len(weights):,} items in {seconds:.1f} s ({used})")
    return {
        "kind": kind,
        "file": index_file(kind),
        "metric": "inner_product",
        "params": used,
        "bias_column": bias is not None,
        "faiss_version": faiss.__version__,
        "build_seconds": seconds,
    }


def _test_histories(
    data: ExamplesInfo, storage: StorageSection
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Up to VERIFY_ROWS of the run's test histories (item_seq (T, L), seq_len (T,)), cut from
    the prepared sequences; None when they cannot be read."""
    try:
        rows = iter_eval_rows(data.prepared_uri, data.max_seq_len, "test", VERIFY_ROWS, storage)
        rows = next(rows, None)
    except (OSError, ValueError, FileNotFoundError, KeyError):
        return None
    if rows is None or rows.num_rows == 0:
        return None
    rows = rows.slice(0, VERIFY_ROWS)
    item_seq = torch.from_numpy(dense(rows.column("history")).astype(np.int64))
    return item_seq, torch.from_numpy(rows.column("length").to_numpy().astype(np.int64))


def _check_output(out: str, storage: StorageSection) -> None:
    """Replaces a previous export at ``out``; refuses a location holding anything else."""
    from fearec_dist.storage import list_children, resolve

    children = list_children(out, storage)
    ours = {MANIFEST, ITEMS, ENCODER} | {index_file(k) for k in ("flat", "ivf", "hnsw")}
    foreign = sorted(set(children) - ours)
    if foreign:
        raise ServeError(
            f"--output {out} already holds {', '.join(foreign[:5])}, which is not an export; "
            "choose a new or empty location"
        )
    fs, path = resolve(out, storage)
    if MANIFEST in children:  # first, so a half-replaced export is never taken as complete
        fs.delete_file(f"{path}/{MANIFEST}")
    for name in sorted(set(children) - {MANIFEST}):
        fs.delete_file(f"{path}/{name}")
