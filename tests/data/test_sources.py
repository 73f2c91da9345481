"""URIs -> filesystems: listing, globs, JSON round trips, redaction, and a real S3 endpoint."""

from __future__ import annotations

import time

import pytest

from fearec_dist.config import StorageSection
from fearec_dist.errors import DataError
from fearec_dist.storage import (
    exists,
    fsspec_filesystem,
    list_children,
    list_files,
    read_json,
    redact,
    resolve,
    write_json,
)


def test_redact_and_credentials_in_uris_are_refused():
    assert redact("s3://AKIA:secret@bucket/p?x=1") == "s3://bucket/p"
    assert redact("/local/path") == "/local/path"
    with pytest.raises(DataError) as err:
        resolve("s3://AKIA:secret@bucket/p")
    assert "secret" not in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_list_files_dir_glob_suffix_and_hidden(tmp_path):
    for name in ("a.csv", "b.csv", "c.txt", ".hidden.csv", "_SUCCESS"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("x")
    names = [p.rsplit("/", 1)[1] for p in list_files(str(tmp_path), suffixes=(".csv",))]
    assert names == ["a.csv", "b.csv", "d.csv"]
    assert [p.rsplit("/", 1)[1] for p in list_files(f"{tmp_path}/b*")] == ["b.csv"]
    assert list_files(f"file://{tmp_path}/a.csv") == [f"file://{tmp_path}/a.csv"]
    with pytest.raises(DataError, match="does not exist"):
        list_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no input files"):
        list_files(str(tmp_path), suffixes=(".parquet",))
    assert list_children(str(tmp_path))[:2] == [".hidden.csv", "_SUCCESS"]
    assert list_children(str(tmp_path / "nope")) == []


def test_json_round_trip_local(tmp_path):
    uri = str(tmp_path / "deep" / "meta.json")
    assert not exists(uri)
    write_json(uri, {"n": 1})
    assert exists(uri) and read_json(uri) == {"n": 1}


@pytest.mark.slow
def test_s3_round_trip_pyarrow_and_fsspec(s3_server):
    bucket = s3_server.create_bucket("sources")
    write_json(f"s3://{bucket}/a/meta.json", {"ok": True})
    assert read_json(f"s3://{bucket}/a/meta.json") == {"ok": True}
    assert exists(f"s3://{bucket}/a") and not exists(f"s3://{bucket}/b")
    assert list_files(f"s3://{bucket}/a") == [f"s3://{bucket}/a/meta.json"]
    fs, path = fsspec_filesystem(f"s3://{bucket}/a/meta.json")
    assert fs.cat(path) == b'{\n  "ok": true\n}'


@pytest.mark.slow
def test_unreachable_endpoint_fails_fast_and_names_it():
    from tests.conftest import free_port

    # 3 attempts: the default 10 take 12.75 s of back-off here (docs/data.md)
    storage = StorageSection(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=3)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"endpoint http://127\.0\.0\.1:\d+.*after 3 attempts"):
        list_files("s3://bucket/logs", storage)
    assert time.monotonic() - start < 30


def test_parquet_reads_use_the_file_based_reader_unless_the_env_chooses(ray_session, tmp_path):
    """Ray 2.60's default Parquet reader starts 32 actors per read (9-10 s per tiny read here):
    reads go through the file-based one, unless RAY_DATA_USE_DATASOURCE_V2 says otherwise."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from fearec_dist.storage import read_parquet_dataset

    pq.write_table(pa.table({"user": [1, 2, 3]}), tmp_path / "part-0.parquet")
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    try:
        ctx.use_datasource_v2 = True
        os.environ.pop("RAY_DATA_USE_DATASOURCE_V2", None)
        ds = read_parquet_dataset(str(tmp_path), None)
        assert ctx.use_datasource_v2 is False
        assert sorted(r["user"] for r in ds.take_all()) == [1, 2, 3]
        assert "ReadFilesParquetV2" not in ds.stats() and "ReadParquet" in ds.stats()
        ctx.use_datasource_v2 = True
        os.environ["RAY_DATA_USE_DATASOURCE_V2"] = "1"
        read_parquet_dataset(str(tmp_path), None)
        assert ctx.use_datasource_v2 is True  # the user's environment wins
    finally:
        os.environ.pop("RAY_DATA_USE_DATASOURCE_V2", None)
        ctx.use_datasource_v2 = before
