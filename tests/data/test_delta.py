"""``--format delta`` against real Delta tables written by the ``deltalake`` package, on a local
disk and on moto's S3: a full prepare of the snapshot, appends of the commits after the recorded
version, compaction adding nothing, and a DELETE refused naming its version."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from fearec_dist.data.delta import storage_options
from fearec_dist.data.inspect import dump_dataset
from fearec_dist.data.prepare import NothingNew, prepare_dataset
from fearec_dist.data.versions import list_versions
from fearec_dist.errors import DataError

deltalake = pytest.importorskip("deltalake")
pytestmark = pytest.mark.slow


def _rows(rows: list[tuple[str, str, int]]) -> pa.Table:
    users, items, times = zip(*rows)
    return pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(times)})


def _dump(uri: str, path) -> dict:
    dump_dataset(uri, str(path))
    return {
        x["user"]: (x["items"], x["timestamps"])
        for x in map(json.loads, path.read_text().splitlines())
    }


def _write(table_uri: str, rows, mode: str = "append") -> None:
    opts = storage_options(table_uri, None) | (
        {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"} if table_uri.startswith("s3://") else {}
    )
    deltalake.write_deltalake(table_uri, _rows(rows), mode=mode, storage_options=opts or None)


def _check_table(table: str, out: str, tmp_path) -> None:
    _write(table, [("a", "1", 1), ("b", "2", 2), ("a", "3", 3)])  # version 0
    _write(table, [("c", "1", 4)])  # version 1
    meta = prepare_dataset(table, "delta", out, progress=False)
    assert (meta["n_users"], meta["n_interactions"]) == (3, 4)
    _write(table, [("a", "9", 2), ("d", "3", 5)])  # version 2: appended
    meta = prepare_dataset(table, "delta", out, progress=False, append=True)
    assert (meta["version"], meta["n_users"], meta["n_items"], meta["n_interactions"]) == (
        2,
        4,
        4,
        6,
    )
    got = _dump(out, tmp_path / "got.jsonl")
    assert got["a"] == (["1", "9", "3"], [1, 2, 3]) and got["d"] == (["3"], [5])
    # compaction rewrites files without changing rows: nothing new
    opts = storage_options(table, None) | (
        {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"} if table.startswith("s3://") else {}
    )
    deltalake.DeltaTable(table, storage_options=opts or None).optimize.compact()
    with pytest.raises(NothingNew):
        prepare_dataset(table, "delta", out, progress=False, append=True)
    # a full prepare of the compacted table is the same data
    full = prepare_dataset(table, "delta", f"{out}-full", progress=False)
    assert full["n_interactions"] == 6 and _dump(f"{out}-full", tmp_path / "full.jsonl") == got
    deltalake.DeltaTable(table, storage_options=opts or None).delete("user_id = 'c'")
    with pytest.raises(DataError, match=r"Delta version 4 \(DELETE\) deletes or changes rows"):
        prepare_dataset(table, "delta", out, progress=False, append=True)
    assert [v.version for v in list_versions(out)] == [1, 2]


def test_delta_local(ray_session, tmp_path):
    _check_table(str(tmp_path / "table"), str(tmp_path / "ds"), tmp_path)


def test_delta_on_s3(ray_session, s3_server, tmp_path):
    bucket = s3_server.create_bucket("lake")
    _check_table(f"s3://{bucket}/events", f"s3://{bucket}/prepared", tmp_path)
