"""Dataset versions without Ray: the conditional commit (local disk and moto S3, racing
threads), resolving versions (the newest, a given one, a removed one, a version's directory, a
dataset from before versions as version 0), gc, and ``fearec-dist data info|gc`` in process."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.cli import main
from fearec_dist.data.inspect import dataset_info, dump_dataset
from fearec_dist.data.versions import (
    CommitConflict,
    commit_version,
    conditional_create,
    gc_versions,
    list_versions,
    new_version_dir,
    resolve_version,
)
from fearec_dist.errors import DataError
from fearec_dist.storage import write_json


def _race(uri: str, n: int = 8) -> list[bool]:
    """``n`` threads create ``uri`` at once; returns who succeeded."""
    barrier, out = threading.Barrier(n), [False] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = conditional_create(uri, f"writer {i}".encode())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_conditional_create_has_one_winner_locally(tmp_path):
    won = _race(str(tmp_path / "c" / "1.json"))
    assert sum(won) == 1
    assert (tmp_path / "c" / "1.json").read_text() == f"writer {won.index(True)}"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["1.json"]  # no temp files


@pytest.mark.slow
def test_conditional_create_has_one_winner_on_s3(s3_server):
    bucket = s3_server.create_bucket("commits")
    won = _race(f"s3://{bucket}/ds/_commits/1.json")
    assert sum(won) == 1
    body = s3_server.client().get_object(Bucket=bucket, Key="ds/_commits/1.json")["Body"].read()
    assert body.decode() == f"writer {won.index(True)}"


def _fake_version(root, n: int, users: list[str]) -> str:
    """A committed version by hand (layout only: what readers need)."""
    vdir = new_version_dir(str(root), n)
    base = root / vdir
    (base / "sequences").mkdir(parents=True)
    (base / "vocab").mkdir()
    items = pa.array([[1, 2]] * len(users), pa.list_(pa.int32()))
    times = pa.array([[5, 6]] * len(users), pa.list_(pa.int64()))
    table = pa.table({"user": pa.array(range(1, len(users) + 1), pa.int32()), "items": items,
                      "timestamps": times, "user_raw": users})  # fmt: skip
    pq.write_table(table, base / "sequences" / "part-0.parquet")
    vocab = {"id": pa.array([1, 2], pa.int32()), "raw": ["i1", "i2"], "count": [1, 1]}
    pq.write_table(pa.table(vocab), base / "vocab" / "items.parquet")
    meta = {"n_users": len(users), "n_items": 2, "n_interactions": 2 * len(users)}
    write_json(str(base / "meta.json"), meta | {"format_version": 2})
    commit_version(str(root), n, vdir, n - 1 if n > 1 else None, "prepare")
    return str(base)


def test_resolve_versions_and_gc(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(DataError, match="not a prepared dataset"):
        resolve_version(str(root))
    first = _fake_version(root, 1, ["a"])
    second = _fake_version(root, 2, ["a", "b"])
    assert resolve_version(str(root)).uri == second
    assert resolve_version(str(root), 1).uri == first
    assert resolve_version(first).version == 1  # a version's own directory resolves to itself
    with pytest.raises(DataError, match="is version 1, not version 2"):
        resolve_version(first, 2)
    with pytest.raises(DataError, match=r"version 7 does not exist \(committed versions: 1, 2"):
        resolve_version(str(root), 7)
    with pytest.raises(CommitConflict, match="version 2 was committed by another writer"):
        commit_version(str(root), 2, new_version_dir(str(root), 2), 1, "append")
    (root / "versions" / "3-deadbeef").mkdir()  # a writer still at work: kept by gc
    (root / "versions" / "2-0badf00d").mkdir()  # a writer that lost version 2: removed
    assert main(["data", "gc", str(root), "--keep", "1"]) == 0
    assert [v.version for v in list_versions(str(root))] == [2]
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted(
        ["3-deadbeef", second.rsplit("/", 1)[1]]
    )
    with pytest.raises(DataError, match="version 1 does not exist.*data gc"):
        resolve_version(str(root), 1)
    with pytest.raises(DataError, match="version 1 .* is not committed or was removed"):
        resolve_version(first)
    with pytest.raises(DataError, match="--keep: must be >= 1"):
        gc_versions(str(root), 0)


def test_a_dataset_from_before_versions_is_version_0(tmp_path, capsys):
    root = tmp_path / "old"
    (root / "sequences").mkdir(parents=True)
    (root / "vocab").mkdir()
    table = pa.table({"user": pa.array([1], pa.int32()),
                      "items": pa.array([[2, 1]], pa.list_(pa.int32())),
                      "timestamps": pa.array([[3, 4]], pa.list_(pa.int64()))})  # fmt: skip
    pq.write_table(table, root / "sequences" / "part-0.parquet")
    pq.write_table(pa.table({"id": [1, 2], "raw": ["x", "y"], "count": [1, 1]}),
                   root / "vocab" / "items.parquet")  # fmt: skip
    pq.write_table(pa.table({"id": [1], "raw": ["u"]}), root / "vocab" / "users.parquet")
    write_json(str(root / "meta.json"), {"n_users": 1, "n_items": 2, "n_interactions": 2})
    v = resolve_version(str(root))
    assert (v.version, v.uri) == (0, str(root))
    dump_dataset(str(root), str(tmp_path / "d.jsonl"))
    line = json.loads((tmp_path / "d.jsonl").read_text())
    assert line == {"user": "u", "items": ["y", "x"], "timestamps": [3, 4]}
    assert dataset_info(str(root))["versions"][0]["kind"] == "legacy"
    assert main(["data", "info", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["n_users"] == 1
    assert main(["data", "info", str(root), "--version", "3"]) == 1
    assert "version 3 does not exist" in capsys.readouterr().err


def test_lineage_keys(tmp_path):
    """results.json's and the checkpoint's ``data`` carry the dataset and its version; a
    checkpoint written before (the examples info itself as ``data``) still reads."""
    from fearec_dist.data.examples import ExamplesInfo
    from fearec_dist.train.progress import Progress, results_dict

    where = {"uri": "/d/versions/3-ab/examples/L5-x", "prepared_uri": "/d/versions/3-ab"}
    info = ExamplesInfo(**where, max_seq_len=5, n_items=2, n_users=1, data_uri="/d", data_version=3)
    data = results_dict(Progress(), {}, info)["data"]
    assert (data["uri"], data["version"], data["examples"]) == ("/d", 3, info.uri)
    state_data = info.data | {"examples": info.to_dict()}  # what TrainState.to_state writes
    for saved in (state_data, info.to_dict()):
        assert ExamplesInfo.from_dict(saved.get("examples", saved)) == info


def test_data_version_picks_what_a_run_reads(tmp_path):
    from fearec_dist.config import ConfigError, load_config
    from fearec_dist.data.datasets import ensure_prepared

    root = tmp_path / "ds"
    first = _fake_version(root, 1, ["a"])
    second = _fake_version(root, 2, ["a", "b"])
    cfg = load_config(None, [f"data.path={root}"])
    assert ensure_prepared(cfg) == second  # the newest by default
    assert ensure_prepared(load_config(None, [f"data.path={root}", "data.version=1"])) == first
    with pytest.raises(DataError, match="version 5 does not exist"):
        ensure_prepared(load_config(None, [f"data.path={root}", "data.version=5"]))
    with pytest.raises(ConfigError, match="data.version"):
        load_config(None, ["data.version=-1"])
