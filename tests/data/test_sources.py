"""URIs -> filesystems: listing, globs, JSON round trips, redaction, and a real S3 endpoint."""

from __future__ import annotations

import time

import pytest

from fearec_dist.config import StorageSection
from fearec_dist.data.errors import DataError
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

    storage = StorageSection(endpoint_url=f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"endpoint http://127\.0\.0\.1:\d+"):
        list_files("s3://bucket/logs", storage)
    assert time.monotonic() - start < 30
