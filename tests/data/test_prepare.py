"""The prepare job through real Ray Data: vocab, ordering, filters and their counts, errors,
the shared datasets' known sizes, and s3:// -> s3:// against moto's server equal to local."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fearec_dist.config import DataSection
from fearec_dist.data.errors import DataError
from fearec_dist.data.prepare import format_summary, prepare_dataset
from tests.conftest import shared_dataset

pytestmark = pytest.mark.slow


def _write_csv(path, rows):
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def _sequences(out):
    table = pq.read_table(f"{out}/sequences")
    return {r["user"]: r["items"] for r in table.to_pylist()}


def test_vocab_order_ties_and_meta(ray_session, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # user b's two items at the same time keep input order (file order, then row order)
    _write_csv(log / "a.csv", [("b", "20", 5), ("a", "3", 2), ("a", "20", 1)])
    _write_csv(log / "b.csv", [("b", "100", 5), ("b", "3", 1)])
    meta = prepare_dataset(str(log), "csv", str(tmp_path / "out"), progress=False)
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (2, 3, 5)
    items = pq.read_table(tmp_path / "out/vocab/items.parquet").to_pydict()
    assert items["raw"] == ["3", "20", "100"] and items["id"] == [1, 2, 3]  # numeric sort
    assert items["count"] == [2, 2, 1]
    # a = user 1: 20 (t=1) then 3 (t=2); b = user 2: 3 (t=1), then 20, 100 (t=5, input order)
    assert _sequences(tmp_path / "out") == {1: [2, 1], 2: [1, 2, 3]}
    on_disk = json.loads((tmp_path / "out/meta.json").read_text())
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
    assert meta["dropped"] == {"user_min_inter": 2 + 3}
    assert meta["n_interactions"] == meta["n_read"] - 5


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


def test_s3_to_s3_equals_local(ray_session, s3_server, tmp_path):
    from fearec_dist.data.synthetic import generate_log

    table = generate_log(150, 40, seed=3)
    local = tmp_path / "log"
    local.mkdir()
    for i in range(3):  # a multi-file dataset
        pq.write_table(table.slice(i * 2000, 2000), local / f"part-{i}.parquet")
    bucket = s3_server.create_bucket("logs")
    s3_server.upload_dir(local, bucket, "raw")
    prepare_dataset(str(local), "parquet", str(tmp_path / "out"), progress=False)
    meta = prepare_dataset(
        f"s3://{bucket}/raw", "parquet", f"s3://{bucket}/prepared", progress=False
    )
    assert meta["n_interactions"] == table.num_rows
    from fearec_dist.data.sources import resolve

    fs, path = resolve(f"s3://{bucket}/prepared/sequences")
    remote = pq.read_table(path, filesystem=fs).sort_by("user")
    assert remote.equals(pq.read_table(tmp_path / "out/sequences").sort_by("user"))
    assert "testing" not in json.dumps(meta)  # credentials never reach outputs


def test_unreachable_endpoint_is_named(ray_session, tmp_path):
    from tests.conftest import free_port

    data = DataSection()
    data.storage.endpoint_url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError, match=r"127\.0\.0\.1"):
        prepare_dataset(
            "s3://nobucket/raw", "parquet", str(tmp_path / "o"), data=data, progress=False
        )
