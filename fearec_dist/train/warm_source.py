"""Reading a warm start's source (``train.warm_start``): a run directory (its newest complete
checkpoint), a checkpoint directory or an export directory, into one ``WarmSource``: the
weights to start from (a checkpoint's best validation epoch's, else its last; an export's
encoder's), the model, L, the dataset lineage and the raw ids of its items (and, for a
checkpoint of S3Rec, of its attributes). ``warm_start.py`` checks it and matches its rows.

An export is read without ``serve/`` (which imports ``train/``): its manifest, the ``raw``
column of ``items.parquet`` and the parameters inside ``encoder.pt2`` (a ``torch.export``
program of ``SequenceEncoder(model)``, whose parameter names are ``model.<the model's key>``).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fearec_dist.config import ConfigError, StorageSection, config_from_saved
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.data.merge import read_item_vocab
from fearec_dist.errors import DataError
from fearec_dist.storage import exists, read_bytes, read_json, redact, storage_root
from fearec_dist.train import checkpoint as ckpt

# the export's files (serve/artifact.py's names; that room imports this one, not the reverse)
EXPORT_MANIFEST, EXPORT_ITEMS, EXPORT_ENCODER = "manifest.json", "items.parquet", "encoder.pt2"


@dataclass
class WarmSource:
    """What a warm start reads of its source (``read_source``)."""

    path: str  # the checkpoint or export directory read
    kind: str  # "checkpoint" | "export"
    run: str | None  # its run directory, when known
    model: str
    model_params: dict[str, Any]
    max_seq_len: int
    data: dict[str, Any]  # {"uri", "version"} of the dataset it trained on
    weights: dict[str, torch.Tensor]  # the best validation epoch's (an export: its only ones)
    item_raw: Any  # (N_s,) raw ids of ids 1..N_s
    attr_raw: Any = None  # (A_s,) raw attribute tokens of ids 1..A_s, or None
    optimizer: dict[str, Any] | None = None  # a checkpoint's optimizer state (last epoch's)
    weight_decay: float = 0.0  # the source run's, which set its optimizer's parameter order


def read_raw_vocab(uri: str, storage: StorageSection | None) -> pa.Array:
    """The ``raw`` column of a vocabulary file (``id``, ``raw``) in id order."""
    table = pq.read_table(io.BytesIO(read_bytes(uri, storage)), columns=["id", "raw"])
    return table.sort_by("id").column("raw").combine_chunks()


def _run_of(checkpoint: str) -> str | None:
    """The run directory of a ``checkpoint_*`` directory (None for any other name)."""
    base = checkpoint.rstrip("/")
    return posixpath.dirname(base) if posixpath.basename(base).startswith("checkpoint_") else None


def read_source(uri: str, storage: StorageSection | None = None) -> WarmSource:
    """Reads a run directory, a checkpoint or an export (``manifest.json``) for a warm start."""
    uri = storage_root(uri)
    if exists(f"{uri}/{EXPORT_MANIFEST}", storage):
        return _read_export(uri, storage)
    path = ckpt.latest_checkpoint(uri, storage)
    state = ckpt.load_state_uri(path, storage)
    cfg = config_from_saved(state["config"], f"train.warm_start {redact(path)}")
    info = ExamplesInfo.from_dict(state["data"].get("examples", state["data"]))
    try:
        raw, _ = read_item_vocab(info.prepared_uri, storage)  # the data layer's reader
    except (FileNotFoundError, OSError, DataError) as err:
        raise ConfigError(
            f"train.warm_start: {redact(path)} trained on {redact(info.prepared_uri)}, whose item "
            f"vocabulary cannot be read ({err}); a version removed by `data gc` cannot be warm-"
            "started from: use the run's export, which carries its items"
        ) from None
    if len(raw) != info.n_items:
        raise ConfigError(
            f"train.warm_start: {redact(path)}'s dataset {redact(info.prepared_uri)} lists "
            f"{len(raw)} items, its model has {info.n_items}: that version was replaced"
        )
    attrs = f"{info.prepared_uri}/vocab/attributes.parquet"
    attr_raw = read_raw_vocab(attrs, storage) if exists(attrs, storage) else None
    return WarmSource(
        path=redact(path),
        kind="checkpoint",
        run=redact(uri) if path != uri else _run_of(redact(path)),
        model=cfg.model.name,
        model_params=dict(cfg.model.params),
        max_seq_len=info.max_seq_len,
        data={k: state["data"].get(k, v) for k, v in info.data.items()},
        weights=state.get("best_model") or state["model"],
        item_raw=raw,
        attr_raw=attr_raw,
        optimizer=state.get("optimizer"),
        weight_decay=cfg.train.weight_decay,
    )


def _read_export(uri: str, storage: StorageSection | None) -> WarmSource:
    """An export: its manifest, its items' raw ids and the weights inside ``encoder.pt2``."""
    manifest = read_json(f"{uri}/{EXPORT_MANIFEST}", storage)
    if not manifest.get("data"):
        raise ConfigError(
            f"train.warm_start: the export {redact(uri)} records no dataset lineage (exported "
            "before lineage was written); warm-start from its run directory instead"
        )
    raw = read_raw_vocab(f"{uri}/{EXPORT_ITEMS}", storage)
    program = torch.export.load(io.BytesIO(read_bytes(f"{uri}/{EXPORT_ENCODER}", storage)))
    # the program's parameters are the encoder module's: SequenceEncoder(model) -> "model.<key>"
    weights = {k.removeprefix("model."): v.detach() for k, v in program.state_dict.items()}
    checkpoint = (manifest.get("source") or {}).get("checkpoint")
    return WarmSource(
        path=redact(uri),
        kind="export",
        run=_run_of(checkpoint) if checkpoint else None,
        model=manifest["model"],
        model_params=dict(manifest.get("model_config") or {}),
        max_seq_len=int(manifest["max_seq_len"]),
        data=dict(manifest["data"]),
        weights=weights,
        item_raw=raw,
    )
