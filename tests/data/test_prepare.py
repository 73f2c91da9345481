"""The prepare job through real Ray Data: vocab, ordering, filters and their counts, errors,
the shared datasets' known sizes, and s3:// -> s3:// against moto's server equal to local."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.config import DataSection
from fearec_dist.data import prepare as prepare_mod
from fearec_dist.data.inspect import format_summary
from fearec_dist.data.prepare import prepare_dataset
from fearec_dist.data.sequences import read_sequences
from fearec_dist.data.versions import resolve_version
from fearec_dist.errors import DataError
from fearec_dist.storage import read_json, resolve
from tests.conftest import shared_dataset

pytestmark = pytest.mark.slow


def _write_csv(path, rows):
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def _v(out, name=""):
    """A path inside the newest version of the prepared dataset at ``out``."""
    return f"{resolve_version(str(out)).uri}/{name}".rstrip("/")


def _sequences(out):
    table = pq.read_table(_v(out, "sequences"))
    return {r["user"]: r["items"] for r in table.to_pylist()}


def test_vocab_order_ties_and_meta(ray_session, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # user b's two items at the same time keep input order (file order, then row order)
    _write_csv(log / "a.csv", [("b", "20", 5), ("a", "3", 2), ("a", "20", 1)])
    _write_csv(log / "b.csv", [("b", "100", 5), ("b", "3", 1)])
    meta = prepare_dataset(str(log), "csv", str(tmp_path / "out"), progress=False)
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (2, 3, 5)
    items = pq.read_table(_v(tmp_path / "out", "vocab/items.parquet")).to_pydict()
    assert items["raw"] == ["3", "20", "100"] and items["id"] == [1, 2, 3]  # numeric sort
    assert items["count"] == [2, 2, 1]
    # a = user 1: 20 (t=1) then 3 (t=2); b = user 2: 3 (t=1), then 20, 100 (t=5, input order)
    assert _sequences(tmp_path / "out") == {1: [2, 1], 2: [1, 2, 3]}
    on_disk = read_json(_v(tmp_path / "out", "meta.json"))
    assert on_disk["n_items"] == 3 and on_disk["dropped"] == {}
    assert "interactions" in format_summary(meta)


def test_filters_are_counted(ray_session, tmp_path):
    rows = [(f"u{u}", f"i{i}", t) for u in range(4) for t, i in enumerate(range(u + 2))]
    _write_csv(tmp_path / "log.csv", rows)  # user u has u + 2 interactions
    data = DataSection(min_user_inter=4)
    meta = prepare_dataset(
        str(tmp_path / "log.csv"), "csv", str(tmp_path / "o"), data=data, progress=False
    )
    assert meta["n_users"] == 2  # u2 (4) and u3 (5) stay
    assert meta["dropped"] == {"user_min_inter": 2 + 3}  # the item filter is off: no key
    assert meta["n_interactions"] == meta["n_read"] - 5


def test_rating_threshold_and_iterated_k_core_counts(ray_session, tmp_path):
    # u5's only row is rated 1 -> dropped by the threshold. Pass 1 drops items c, d (1 row each),
    # leaving u2, u3 with one row each; pass 2 drops them; then a and b keep 2 rows each: stable.
    rows = [("u1", "a", 1, 5), ("u1", "b", 2, 5), ("u2", "a", 1, 5), ("u2", "c", 2, 5)]
    rows += [("u3", "b", 1, 5), ("u3", "d", 2, 5), ("u4", "a", 1, 5), ("u4", "b", 2, 4)]
    rows += [("u5", "a", 1, 1)]
    (tmp_path / "log.csv").write_text(
        "user_id,item_id,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in rows)
    )
    data = DataSection(min_user_inter=2, min_item_inter=2, rating_threshold=3)
    meta = prepare_dataset(
        str(tmp_path / "log.csv"), "csv", str(tmp_path / "o"), data=data, progress=False
    )
    assert meta["dropped"] == {
        "rating_below_threshold": 1,
        "item_min_inter": 2,
        "user_min_inter": 2,
    }
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (2, 2, 4)
    summary = format_summary(meta)
    assert "item_min_inter" in summary and "rating_below_threshold" in summary


def test_output_that_is_not_a_prepared_dataset_is_refused(ray_session, tmp_path):
    _write_csv(tmp_path / "log.csv", [("u", "i", 1), ("u", "j", 2)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"already holds notes\.txt"):
        prepare_dataset(str(tmp_path / "log.csv"), "csv", str(out), progress=False)
    assert (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    prepare_dataset(str(tmp_path / "log.csv"), "csv", str(out), progress=False)
    _write_csv(tmp_path / "log.csv", [("u", "i", 1)])  # a new version; the first stays
    meta = prepare_dataset(str(tmp_path / "log.csv"), "csv", str(out), progress=False)
    assert meta["n_interactions"] == 1 and meta["version"] == 2 and meta["parent"] == 1
    assert len(read_sequences(str(out))[1]) == 1 and len(read_sequences(str(out), None, 1)[1]) == 2


def test_synthetic_format_and_attributes(ray_session, tmp_path):
    data = DataSection(synthetic_users=60, synthetic_items=30, seed=1)
    meta = prepare_dataset("", "synthetic", str(tmp_path / "s"), data=data, progress=False)
    assert meta["n_users"] == 60 and meta["n_items"] <= 30
    assert meta["sequence_length"]["min"] >= 20 and meta["sources"]["format"] == "parquet"
    # attributes: ids of items outside the interaction vocab are counted, not kept
    _write_csv(tmp_path / "log.csv", [("u", "1", 1), ("u", "2", 2), ("u", "3", 3)])
    attrs = tmp_path / "item2attributes.json"
    attrs.write_text(json.dumps({"1": ["y", "x"], "2": ["y"], "99": ["z"]}))
    meta = prepare_dataset(
        str(tmp_path / "log.csv"),
        "csv",
        str(tmp_path / "a"),
        attributes_uri=str(attrs),
        progress=False,
    )
    assert meta["n_attributes"] == 2 and meta["attribute_items_not_in_vocab"] == 1
    table = pq.read_table(_v(tmp_path / "a", "attributes.parquet")).to_pydict()
    assert table == {"item": [1, 2], "attrs": [[2, 1], [2]]}  # x = 1, y = 2


def test_relative_paths_come_back_absolute(ray_session, tmp_path, monkeypatch):
    """The train workers run in Ray's own working directory: a relative ``--data`` or
    ``data.prepared_path`` must reach them as an absolute path (it once failed with a
    FileNotFoundError under ``/tmp/ray/session_*/artifacts``)."""
    from fearec_dist.config import load_config
    from fearec_dist.data.datasets import ensure_prepared
    from fearec_dist.data.examples import build_examples

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "data.format=synthetic",
            "data.synthetic_users=30",
            "data.synthetic_items=20",
            "data.prepared_path=rel/prep",
        ],
    )
    out = ensure_prepared(cfg, progress=False)
    assert out.startswith(str(tmp_path / "rel/prep/versions/1-"))  # the version's directory
    cfg = load_config(None, ["data.format=prepared", "data.path=rel/prep"])
    assert ensure_prepared(cfg) == out
    # examples counted from the relative path, then found again from the absolute one: the
    # cached info names where they lie now
    counted = build_examples("rel/prep", 20)
    found = build_examples(str(tmp_path / "rel/prep"), 20)
    assert counted.uri == found.uri and found.uri.startswith(out)  # resolved: absolute
    assert found.prepared_uri == out and found.data == {
        "uri": str(tmp_path / "rel/prep"),
        "version": 1,
    }


def test_bad_input_fails_and_writes_nothing(ray_session, tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\nu,i,1\nu,j,-3\n")
    with pytest.raises(DataError, match=r"log\.csv: row 2.*negative"):
        prepare_dataset(str(tmp_path / "log.csv"), "csv", str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(str(tmp_path / "nope"), "csv", str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interactions"):
        prepare_dataset(str(tmp_path / "empty.csv"), "csv", str(tmp_path / "o"), progress=False)


def test_beauty_sizes(ray_session, tmp_path):
    beauty = shared_dataset("beauty", "Beauty.txt")
    attrs = shared_dataset("beauty", "Beauty_item2attributes.json")
    meta = prepare_dataset(
        str(beauty), "seqtxt", str(tmp_path / "b"), attributes_uri=str(attrs), progress=False
    )
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (22_363, 12_101, 198_502)
    assert meta["n_attributes"] == 637 and meta["items_with_attributes"] == 12_101


def test_ml100k_sizes(ray_session, tmp_path):
    inter = shared_dataset("ml-100k", "ml-100k.inter")
    item = shared_dataset("ml-100k", "ml-100k.item")
    meta = prepare_dataset(
        str(inter), "atomic", str(tmp_path / "m"), attributes_uri=str(item), progress=False
    )
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (943, 1_682, 100_000)
    assert meta["n_attributes"] == 19  # genres


def _reference(table: pa.Table) -> dict[str, list[str]]:
    """Per-user sequences computed directly (numpy), in raw ids, in the documented order:
    the integer timestamp, then input order."""
    users = sorted(set(table["user_id"].to_pylist()))
    uid = {u: i for i, u in enumerate(users)}
    u = np.array([uid[x] for x in table["user_id"].to_pylist()])
    it = table["item_id"].to_pylist()
    t = table["timestamp"].to_numpy().astype(np.int64)
    order = np.lexsort((np.arange(len(u)), t, u))
    out: dict[str, list[str]] = {}
    for k in order:
        out.setdefault(users[u[k]], []).append(it[k])
    return out


def _raw_sequences(out) -> dict[str, list[str]]:
    items = pq.read_table(_v(out, "vocab/items.parquet")).sort_by("id").column("raw").to_pylist()
    table = pq.read_table(_v(out, "sequences"))
    return {r["user_raw"]: [items[i - 1] for i in r["items"]] for r in table.to_pylist()}


def test_grouping_over_many_partitions_matches_reference(
    ray_session, synthetic_log, tmp_path, monkeypatch
):
    monkeypatch.setattr(prepare_mod, "ROWS_PER_PARTITION", 500)  # ~10 hash partitions
    out = tmp_path / "out"
    meta = prepare_dataset(str(synthetic_log.path), "parquet", str(out), progress=False)
    assert meta["sources"]["files"] == synthetic_log.n_files
    assert _raw_sequences(out) == _reference(synthetic_log.table)
    schema = pq.read_schema(next(Path(_v(out, "sequences")).glob("*.parquet")))
    assert str(schema.field("timestamps").type) == "list<element: int64>"
    offsets, items, users = read_sequences(str(out))
    assert users.tolist() == list(range(1, meta["n_users"] + 1))
    assert items[offsets[0] : offsets[1]].tolist() == _sequences(out)[1]


def test_s3_to_s3_equals_local(ray_session, s3_server, synthetic_log, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "ROWS_PER_PARTITION", 2000)
    bucket = s3_server.create_bucket("logs")
    s3_server.upload_dir(synthetic_log.path, bucket, "raw")
    prepare_dataset(str(synthetic_log.path), "parquet", str(tmp_path / "out"), progress=False)
    meta = prepare_dataset(
        f"s3://{bucket}/raw", "parquet", f"s3://{bucket}/prepared", progress=False
    )
    assert meta["n_interactions"] == synthetic_log.table.num_rows
    assert meta["sources"]["files"] == synthetic_log.n_files
    fs, path = resolve(_v(f"s3://{bucket}/prepared", "sequences"))
    remote = pq.read_table(path, filesystem=fs).sort_by("user")
    assert remote.equals(pq.read_table(_v(tmp_path / "out", "sequences")).sort_by("user"))
    for name in ("vocab/items.parquet", "vocab/users"):
        fs, path = resolve(_v(f"s3://{bucket}/prepared", name))
        here = pq.read_table(_v(tmp_path / "out", name)).sort_by("id")
        assert pq.read_table(path, filesystem=fs).sort_by("id").equals(here)
    assert read_json(_v(f"s3://{bucket}/prepared", "meta.json"))["n_users"] == meta["n_users"]
    assert "testing" not in json.dumps(meta)  # credentials never reach outputs
    offsets, _, users = read_sequences(f"s3://{bucket}/prepared")
    assert len(users) == meta["n_users"] and offsets[-1] == meta["n_interactions"]


def test_unreachable_endpoint_is_named(ray_session, tmp_path):
    import time

    from tests.conftest import free_port

    data = DataSection()
    data.storage.endpoint_url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"127\.0\.0\.1"):
        prepare_dataset(
            "s3://nobucket/raw", "parquet", str(tmp_path / "o"), data=data, progress=False
        )
    assert time.monotonic() - start < 30
