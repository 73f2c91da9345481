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
    uri: str, item_raw: list[str], out: str, storage: StorageSection | None
) -> dict[str, Any]:
    """Writes ``<out>/attributes.parquet``; returns the meta.json entries."""
    tokens = read_attribute_tokens(uri, storage)
    index = {raw: i + 1 for i, raw in enumerate(item_raw)}
    kept = {t for raw, ts in tokens.items() if raw in index for t in ts}  # ids stay contiguous
    vocab = {t: i + 1 for i, t in enumerate(sorted(kept))}
    items, lists = [], []
    for raw, ts in tokens.items():
        if raw in index:
            items.append(index[raw])
            lists.append([vocab[t] for t in ts])
    order = np.argsort(items)
    table = pa.table(
        {
            "item": pa.array(np.asarray(items, dtype=np.int32)[order]),
            "attrs": pa.array([lists[i] for i in order], pa.list_(pa.int32())),
        }
    )
    fs, root = resolve(out, storage)
    pq.write_table(table, f"{root}/attributes.parquet", filesystem=fs)
    return {
        "n_attributes": len(vocab),
        "items_with_attributes": len(items),
        "attribute_items_not_in_vocab": len(tokens) - len(items),
    }


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
