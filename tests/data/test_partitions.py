"""Hive-partitioned inputs: partition values as columns, an unknown layout and partitions with
other columns named, and only new files read by an append (listing and records, no Ray except
the one prepare)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data.inputs import select
from fearec_dist.data.inspect import dump_dataset
from fearec_dist.data.partitions import check_partition_columns, list_input_files, unconsumed
from fearec_dist.data.prepare import prepare_dataset
from fearec_dist.errors import DataError


def _parquet(path, **cols) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def test_partition_values_layout_and_columns(tmp_path):
    log = tmp_path / "log"
    _parquet(log / "dt=2026-12-04" / "p.parquet", user_id=["a"], item_id=["1"], timestamp=[1])
    _parquet(log / "dt=2026-12-05" / "p.parquet", user_id=["b"], item_id=["2"], timestamp=[2])
    files = list_input_files(str(log), None, (".parquet",))
    assert [f.partition for f in files] == [{"dt": "2026-12-04"}, {"dt": "2026-12-05"}]
    assert check_partition_columns(files, "parquet", None) == ["item_id", "timestamp", "user_id"]
    # a partition whose files have other columns is named
    _parquet(log / "dt=2026-12-06" / "p.parquet", user_id=["c"], item=["3"], timestamp=[3])
    files = list_input_files(str(log), None, (".parquet",))
    with pytest.raises(DataError, match=r"partition dt=2026-12-06 .*extra \['item'\].*item_id"):
        check_partition_columns(files, "parquet", None)
    # a file outside the key=value layout is named
    _parquet(log / "late" / "p.parquet", user_id=["c"], item_id=["3"], timestamp=[3])
    with pytest.raises(DataError, match=r"unknown partition layout at late/p\.parquet"):
        list_input_files(str(log), None, (".parquet",))


def test_select_reads_only_new_files(tmp_path):
    log = tmp_path / "log"
    _parquet(log / "dt=1" / "p.parquet", user_id=["a"], item_id=["1"], timestamp=[1])
    files, record = select(str(log), "parquet", None, None)
    assert [f.rel for f in files] == ["dt=1/p.parquet"] and record["columns"]
    _parquet(log / "dt=2" / "p.parquet", user_id=["a"], item_id=["2"], timestamp=[2])
    new, record2 = select(str(log), "parquet", None, record)
    assert [f.rel for f in new] == ["dt=2/p.parquet"]
    assert set(record2["files"]) == {"dt=1/p.parquet", "dt=2/p.parquet"}
    assert select(str(log), "parquet", None, record2)[0] == []
    # a new partition with other columns than the consumed ones is refused
    _parquet(log / "dt=3" / "p.parquet", user_id=["a"], item_id=["2"], ts=[2])
    with pytest.raises(DataError, match=r"dt=3 .*the consumed partitions"):
        select(str(log), "parquet", None, record2)


@pytest.mark.slow
def test_partition_column_as_the_time(ray_session, tmp_path):
    log = tmp_path / "log"
    _parquet(log / "day=2" / "p.csv.parquet", uid=["a", "b"], iid=["1", "2"])
    _parquet(log / "day=1" / "p.parquet", uid=["a"], iid=["3"])
    data = DataSection(columns={"user": "uid", "item": "iid", "time": "day"})
    meta = prepare_dataset(str(log), "parquet", str(tmp_path / "ds"), data=data, progress=False)
    assert meta["n_interactions"] == 3 and meta["time_range"] == {"min": 1, "max": 2}
    dump_dataset(str(tmp_path / "ds"), str(tmp_path / "d.jsonl"))
    assert '{"user": "a", "items": ["3", "1"], "timestamps": [1, 2]}' in (
        (tmp_path / "d.jsonl").read_text()
    )


@pytest.mark.slow
def test_s3_inputs_are_recorded_with_their_etag(s3_server):
    """On S3 a consumed file is recorded with its ETag: uploading the same bytes again (a new
    LastModified) is not a change; other bytes of the same size are, named with both stamps."""
    bucket = s3_server.create_bucket("etags")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="log/dt=1/a.csv", Body=b"u,i,1\n")
    client.put_object(Bucket=bucket, Key="log/dt=2/b.csv", Body=b"u,j,2\n")
    storage = StorageSection(endpoint_url=s3_server.endpoint_url)
    uri = f"s3://{bucket}/log"
    files = list_input_files(uri, storage, (".csv",))
    assert [f.rel for f in files] == ["dt=1/a.csv", "dt=2/b.csv"]
    assert all(f.etag and len(f.stamp()) == 3 for f in files), files
    consumed = {f.rel: f.stamp() for f in files}
    time.sleep(1.1)  # S3's LastModified has a resolution of one second
    client.put_object(Bucket=bucket, Key="log/dt=1/a.csv", Body=b"u,i,1\n")  # same bytes
    again = list_input_files(uri, storage, (".csv",))
    assert again[0].mtime_ns != files[0].mtime_ns and again[0].etag == files[0].etag
    assert unconsumed(again, consumed, uri) == []
    with pytest.raises(DataError, match=r"dt=1/a\.csv changed"):  # recorded before ETags
        unconsumed(again, {"dt=1/a.csv": files[0].stamp()[:2]}, uri)
    client.put_object(Bucket=bucket, Key="log/dt=2/b.csv", Body=b"u,k,2\n")  # same size
    with pytest.raises(DataError, match=r"dt=2/b\.csv changed since it was consumed .*ETag"):
        unconsumed(list_input_files(uri, storage, (".csv",)), consumed, uri)
