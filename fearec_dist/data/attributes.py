"""Item attributes for S3Rec: RecBole ``.item`` token_seq columns or ``item2attributes.json``.

Written as ``attributes.parquet`` (``item``: our item id, ``attrs``: list of attribute ids
1..n_attributes; 0 is padding) beside the sequences. Attribute tokens are numbered in sorted
order, counting only the attributes of items that are in the interaction vocabulary; items of
the file outside that vocabulary are counted in meta.json, not kept.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.data.versions import resolve_version
from fearec_dist.errors import DataError
from fearec_dist.storage import exists, read_bytes, resolve

ATOMIC_FIELD = "class"  # RecBole S3Rec's default `item_attribute`


def read_attribute_tokens(uri: str, storage: StorageSection | None) -> dict[str, list[str]]:
    """raw item id -> attribute tokens, from either supported file type."""
    data = read_bytes(uri, storage)
    if uri.endswith(".json"):
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri}: not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise DataError(f"{uri}: expected an object mapping item id -> list of attributes")
        for key, value in raw.items():
            if not isinstance(value, list):
                raise DataError(f"{uri}: item {key!r}: attributes must be a list")
        return {str(k): [str(a) for a in v] for k, v in raw.items()}
    lines = io.StringIO(data.decode("utf-8")).read().splitlines()
    if not lines:
        raise DataError(f"{uri}: empty attribute file")
    header = [h.split(":", 1) for h in lines[0].split("\t")]
    names = [h[0] for h in header]
    if "item_id" not in names or ATOMIC_FIELD not in names:
        raise DataError(f"{uri}: an atomic .item file needs item_id and {ATOMIC_FIELD} columns")
    i_item, i_attr = names.index("item_id"), names.index(ATOMIC_FIELD)
    out = {}
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataError(f"{uri}: line {line_no}: {len(fields)} fields, header has {len(names)}")
        out[fields[i_item]] = fields[i_attr].split()
    return out


def write_attributes(
    uri: str,
    item_raw: list[str],
    out: str,
    storage: StorageSection | None,
    parent_uri: str | None = None,
) -> dict[str, Any]:
    """Writes ``<out>/attributes.parquet`` and ``<out>/vocab/attributes.parquet`` (id, raw
    token); returns the meta.json entries.

    ``parent_uri``: the version an append builds on. Its attribute ids and rows are kept as they
    are; items that had no attributes there get theirs from ``uri``, and tokens it did not know
    are numbered after its maximum (sorted among themselves).
    """
    tokens = read_attribute_tokens(uri, storage)
    index = {raw: i + 1 for i, raw in enumerate(item_raw)}
    vocab_list: list[str] = []
    old_items: list[int] = []
    old_lists: list[list[int]] = []
    if parent_uri and exists(f"{parent_uri}/attributes.parquet", storage):
        if not exists(f"{parent_uri}/vocab/attributes.parquet", storage):
            raise DataError(
                f"{parent_uri}: its attributes were written without their vocabulary (before "
                "versions); prepare with --attributes again instead of appending them"
            )
        vocab_list = (
            _read(f"{parent_uri}/vocab/attributes.parquet", storage)
            .sort_by("id")["raw"]
            .to_pylist()
        )
        old = _read(f"{parent_uri}/attributes.parquet", storage)
        old_items, old_lists = old["item"].to_pylist(), old["attrs"].to_pylist()
    have = set(old_items)
    fresh = {raw: ts for raw, ts in tokens.items() if raw in index and index[raw] not in have}
    known = set(vocab_list)
    vocab_list += sorted({t for ts in fresh.values() for t in ts} - known)  # ids stay contiguous
    vocab = {t: i + 1 for i, t in enumerate(vocab_list)}
    items = old_items + [index[raw] for raw in fresh]
    lists = old_lists + [[vocab[t] for t in ts] for ts in fresh.values()]
    order = np.argsort(items, kind="stable")
    table = pa.table(
        {
            "item": pa.array(np.asarray(items, dtype=np.int32)[order]),
            "attrs": pa.array([lists[i] for i in order], pa.list_(pa.int32())),
        }
    )
    fs, root = resolve(out, storage)
    fs.create_dir(f"{root}/vocab", recursive=True)
    pq.write_table(table, f"{root}/attributes.parquet", filesystem=fs)
    ids = pa.array(np.arange(1, len(vocab_list) + 1, dtype=np.int32))
    pq.write_table(pa.table({"id": ids, "raw": pa.array(vocab_list, pa.string())}),
                   f"{root}/vocab/attributes.parquet", filesystem=fs)  # fmt: skip
    return {
        "n_attributes": len(vocab),
        "items_with_attributes": len(items),
        "attribute_items_not_in_vocab": sum(raw not in index for raw in tokens),
    }


def _read(uri: str, storage: StorageSection | None) -> pa.Table:
    fs, path = resolve(uri, storage)
    return pq.read_table(path, filesystem=fs)


def read_attribute_table(prepared_uri: str, storage: StorageSection | None, n_items: int) -> Any:
    """``attributes.parquet`` -> a dense (n_items + 1, max attrs) long tensor (0 = padding), or
    None when the prepared dataset has no attributes."""
    import torch

    prepared_uri = resolve_version(prepared_uri, storage=storage).uri  # a root: its newest
    uri = f"{prepared_uri}/attributes.parquet"
    if not exists(uri, storage):
        return None
    fs, path = resolve(uri, storage)
    table = pq.read_table(path, filesystem=fs)
    items = table.column("item").to_numpy()
    lists = table.column("attrs").to_pylist()
    width = max((len(a) for a in lists), default=1) or 1
    dense = np.zeros((n_items + 1, width), dtype=np.int64)
    for item, attrs in zip(items, lists):
        dense[item, : len(attrs)] = attrs
    return torch.from_numpy(dense)
