"""The export directory: what ``fearec-dist export`` writes and everything else reads.

Shapes: N items (internal ids 1..N; the padding row 0 is not exported), D hidden size,
B histories, L max_seq_len.

Layout (local path or any URI)::

    <export>/items.parquet     id:int32 (1..N, in order), raw:string (the vocab's raw item id),
                               embedding:fixed_size_list<float32>[D], bias:float32 (only for
                               models with an item bias: BERT4Rec), train_count:int64 (training
                               interactions, for --fallback popularity)
    <export>/encoder.pt2       the sequence encoder, a torch.export program:
                               (item_seq (B, L) int64, seq_len (B,) int64) -> seq_repr (B, D)
    <export>/index-<kind>.faiss   optional FAISS index over the embeddings (kind ivf|hnsw|flat)
    <export>/manifest.json     written last (its presence marks a complete export): model,
                               dims, max_seq_len, scoring, vocab checksum, test metrics, …

The score of item i for a history is ``seq_repr · embedding_i (+ bias_i)``. Loading checks the
export version, that ``items.parquet`` holds ids 1..N in order with D-wide embeddings, and that
the checksum of its raw ids equals the manifest's: an export whose table was swapped, edited or
comes from another vocabulary is refused, since every id it returned would be another item.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fearec_dist.config import StorageSection
from fearec_dist.serve.index import deserialize, set_search_params
from fearec_dist.storage import read_bytes, read_json

EXPORT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
ENCODER = "encoder.pt2"
SCORING = "dot product of the encoder's seq_repr with items.parquet's embedding, plus its bias"


class ServeError(ValueError):
    """A bad export, history or input; the CLI prints it and exits non-zero."""


def index_file(kind: str) -> str:
    return f"index-{kind}.faiss"


def vocab_checksum(raw_ids: pa.Array | list[str]) -> str:
    """sha256 of the raw item ids in internal-id order (id 1 first), newline-joined.

    Raw ids never contain a newline (every input format splits on whitespace or columns).
    """
    values = raw_ids.to_pylist() if isinstance(raw_ids, (pa.Array, pa.ChunkedArray)) else raw_ids
    return "sha256:" + hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()


@dataclass
class Export:
    """A loaded export. ``raw_ids[j]`` is the raw id of internal id j + 1; ``weights`` row j
    (and ``bias[j]``) belong to the same item."""

    uri: str
    manifest: dict[str, Any]
    raw_ids: pa.Array  # (N,) string
    weights: np.ndarray  # (N, D) float32
    bias: np.ndarray | None  # (N,) float32
    train_counts: np.ndarray  # (N + 1,) int64, index = internal id, 0 for padding
    encoder: Any = None  # callable (item_seq, seq_len) -> (B, D), once loaded
    index: Any = None  # the FAISS index, once loaded
    device: str = "cpu"
    _id_of: Any = field(default=None, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.raw_ids)

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    def ids_of(self, raw: pa.Array | list[str]) -> np.ndarray:
        """Raw item ids -> internal ids (int64), 0 where the id is not in the vocabulary."""
        if self._id_of is None:  # a hash index built once (pandas caches it in the Index)
            import pandas as pd

            self._id_of = pd.Index(self.raw_ids.to_numpy(zero_copy_only=False))
        values = raw.cast(pa.string()) if isinstance(raw, pa.Array) else pa.array(raw, pa.string())
        pos = self._id_of.get_indexer(values.to_numpy(zero_copy_only=False))
        return pos.astype(np.int64) + 1

    def raw_of(self, ids: np.ndarray) -> pa.Array:
        """Internal ids (1..N) -> raw ids."""
        return self.raw_ids.take(pa.array(np.asarray(ids, dtype=np.int64) - 1))


def items_table(
    raw_ids: list[str] | pa.Array,
    weights: np.ndarray,
    bias: np.ndarray | None,
    train_counts: np.ndarray,
) -> pa.Table:
    """``items.parquet``'s table for ids 1..N. ``train_counts`` is (N + 1,) (index 0 padding)."""
    n, dim = weights.shape
    flat = pa.array(np.ascontiguousarray(weights, dtype=np.float32).reshape(-1))
    cols: dict[str, pa.Array] = {
        "id": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        "raw": pa.array(raw_ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    }
    if bias is not None:
        cols["bias"] = pa.array(np.asarray(bias, dtype=np.float32))
    cols["train_count"] = pa.array(np.asarray(train_counts[1:], dtype=np.int64))
    return pa.table(cols)


def load_export(
    uri: str,
    storage: StorageSection | None = None,
    *,
    device: str = "cpu",
    with_encoder: bool = True,
    with_index: bool = False,
) -> Export:
    """Reads and checks an export directory.

    Args:
        uri: the export directory (local path or URI).
        storage: object-storage options.
        device: where the encoder runs (``cpu``, ``cuda``, ``cuda:1``).
        with_encoder: load ``encoder.pt2``.
        with_index: load the FAISS index named in the manifest (ServeError when there is none).

    Raises:
        ServeError: no manifest, another export version, or a table that does not match its
            manifest (vocab checksum, ids, width), each naming the file.
    """
    import pyarrow.parquet as pq

    root = uri.rstrip("/")
    try:
        manifest = read_json(f"{root}/{MANIFEST}", storage)
    except FileNotFoundError:
        raise ServeError(
            f"{root}: no {MANIFEST}, so not a complete export (run fearec-dist export --run …)"
        ) from None
    if manifest.get("export_version") != EXPORT_VERSION:
        raise ServeError(
            f"{root}/{MANIFEST}: export_version {manifest.get('export_version')!r}, this "
            f"fearec-dist reads version {EXPORT_VERSION}; re-export the run"
        )
    table = pq.read_table(io.BytesIO(read_bytes(f"{root}/{ITEMS}", storage)))
    export = _check_items(root, manifest, table)
    if with_encoder:
        export.encoder = load_encoder(read_bytes(f"{root}/{manifest['encoder']['file']}", storage))
        export.encoder = move_encoder(export.encoder, device)
        export.device = device
    if with_index:
        info = manifest.get("index")
        if not info:
            raise ServeError(
                f"{root}: this export has no ANN index; export it with --index ivf|hnsw, or "
                "drop --ann (the exact top-k)"
            )

        export.index = deserialize(read_bytes(f"{root}/{info['file']}", storage))
        set_search_params(export.index, info["kind"], info["params"])
    return export


def _check_items(root: str, manifest: dict[str, Any], table: pa.Table) -> Export:
    where = f"{root}/{ITEMS}"
    for name in ("id", "raw", "embedding", "train_count"):
        if name not in table.column_names:
            raise ServeError(f"{where}: no column {name!r}")
    n, dim = int(manifest["n_items"]), int(manifest["hidden_size"])
    ids = table.column("id").to_numpy()
    if len(ids) != n or not np.array_equal(ids, np.arange(1, n + 1)):
        raise ServeError(f"{where}: expected ids 1..{n} in order, as {MANIFEST} says")
    raw = table.column("raw").combine_chunks()
    checksum = vocab_checksum(raw)
    if checksum != manifest["vocab_checksum"]:
        raise ServeError(
            f"{where}: the vocabulary checksum {checksum} does not match {MANIFEST}'s "
            f"{manifest['vocab_checksum']}; the table was changed or belongs to another export. "
            "Refusing to serve it: re-export the run"
        )
    emb = table.column("embedding").combine_chunks()
    if emb.type.list_size != dim:
        raise ServeError(f"{where}: embeddings are {emb.type.list_size} wide, expected {dim}")
    # a writable copy: Arrow's buffers are read-only, and torch wants to own what it wraps
    weights = np.array(emb.values.to_numpy().reshape(n, dim), dtype=np.float32)
    has_bias = bool(manifest["has_bias"])
    if has_bias != ("bias" in table.column_names):
        raise ServeError(f"{where}: bias column presence does not match {MANIFEST}'s has_bias")
    bias = table.column("bias").to_numpy().astype(np.float32) if has_bias else None
    counts = np.concatenate([[0], table.column("train_count").to_numpy()]).astype(np.int64)
    return Export(root, manifest, raw, weights, bias, counts)


def load_encoder(blob: bytes) -> Any:
    """``encoder.pt2`` bytes -> the exported program (plain torch; no fearec_dist needed)."""
    import torch

    return torch.export.load(io.BytesIO(blob))


def move_encoder(program: Any, device: str) -> Any:
    """An exported program -> a callable module on ``device``.

    The program was exported on CPU; ``move_to_device_pass`` rewrites its weights and the
    device arguments recorded in the graph (e.g. the mask built with ``device=item_seq.device``).
    """
    import torch

    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()
