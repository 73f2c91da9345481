"""The batch job: its actor function on bad input (in this process), then on a real local Ray
instance (one row per user, the same answers as the one-history path, a failed job leaves no
output), and on s3:// (moto): an export and a prepared dataset in a bucket, batch-recommended
from and to the bucket."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.serve.conftest import N_USERS, raw_item


@pytest.mark.slow
def test_batch_over_a_prepared_dataset(ray_session, make_export, tmp_path):
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.batch import run_batch
    from fearec_dist.serve.recommend import recommend

    run, out = make_export("sasrec")
    summary = run_batch(
        str(out), str(run.prepared), str(tmp_path / "top"), k=7, actors=1,
        cpus_per_actor=0.5, batch_size=32, progress=False,
    )  # fmt: skip
    assert summary["users"] == N_USERS and summary["by_source"] == {"model": N_USERS}
    table = pq.read_table(tmp_path / "top").sort_by("user_id")
    assert table.num_rows == N_USERS
    assert sorted(table.column("user_id").to_pylist()) == sorted(f"u{u}" for u in range(1, 121))
    assert table.schema.field("item_ids").type == pa.list_(pa.string())
    assert json.loads((tmp_path / "top" / "_summary.json").read_text())["users"] == N_USERS
    # each row equals the one-history answer for the user's whole sequence (raw ids)
    export = load_export(str(out))
    rows = {r["user_id"]: r for r in table.to_pylist()}
    for u in (1, 2, 57, 120):
        one = recommend(export, [raw_item(int(i)) for i in run.sequences[u - 1]], k=7)
        assert rows[f"u{u}"]["item_ids"] == one.item_ids
        np.testing.assert_allclose(rows[f"u{u}"]["scores"], one.scores, rtol=1e-5, atol=1e-5)


def _raw_users(run) -> pa.Table:
    history = [raw_item(int(i)) for i in run.sequences[5]]
    return pa.table(
        {
            "user_id": ["alice", "bob", "carol", "dave"],
            "item_ids": [history, [*history, "ghost-1", "ghost-2"], [], ["ghost-3"]],
        }
    )


@pytest.mark.parametrize("fallback", ["none", "popularity"])
def test_actor_rows_for_bad_input(make_export, fallback):
    """The actor's batch function in this process (no Ray): unknown ids dropped and counted,
    an empty history a row with no items or with the popularity ranking, labelled."""
    from fearec_dist.serve.batch import OUTPUT_SCHEMA, BatchRecommender

    run, out = make_export("sasrec")
    options = {
        "k": 5, "ann": False, "exclude_seen": False, "fallback": fallback, "strict": False,
        "device": "cpu", "threads": 1, "prepared": None, "same_vocab": False,
    }  # fmt: skip
    table = BatchRecommender(str(out), options, {})(_raw_users(run))
    assert table.schema == OUTPUT_SCHEMA
    rows = {r["user_id"]: r for r in table.to_pylist()}
    assert (
        rows["alice"]["item_ids"] == rows["bob"]["item_ids"] and len(rows["bob"]["item_ids"]) == 5
    )
    assert [rows[u]["n_unknown"] for u in ("alice", "bob", "carol", "dave")] == [0, 2, 0, 1]
    assert rows["alice"]["source"] == "model"
    for user in ("carol", "dave"):
        if fallback == "popularity":
            assert rows[user]["source"] == "popularity" and len(rows[user]["item_ids"]) == 5
        else:
            assert rows[user]["source"] == "empty_history" and rows[user]["item_ids"] == []


def test_actor_rows_for_a_prepared_dataset(make_export):
    """Prepared input: internal ids used as they are when the vocabularies match, translated
    through the raw ids otherwise; both give the same rows, with raw user ids."""
    from fearec_dist.serve.batch import BatchRecommender

    run, out = make_export("sasrec")
    batch = pq.read_table(run.prepared / "sequences", columns=["user", "items"]).slice(0, 20)
    options = {
        "k": 5, "ann": False, "exclude_seen": True, "fallback": "none", "strict": True,
        "device": "cpu", "threads": 1, "prepared": str(run.prepared), "same_vocab": True,
    }  # fmt: skip
    same = BatchRecommender(str(out), options, {})(batch)
    translated = BatchRecommender(str(out), options | {"same_vocab": False}, {})(batch)
    assert same.equals(translated)
    users = batch.column("user").to_pylist()
    assert same.column("user_id").to_pylist() == [f"u{u}" for u in users]
    for row, u in zip(same.to_pylist(), users):  # --exclude-seen: none of the user's items
        assert not set(row["item_ids"]) & {raw_item(int(i)) for i in run.sequences[u - 1]}


def test_actor_rows_strict(make_export):
    from fearec_dist.serve.artifact import ServeError
    from fearec_dist.serve.batch import BatchRecommender

    run, out = make_export("sasrec")
    options = {
        "k": 5, "ann": False, "exclude_seen": False, "fallback": "none", "strict": True,
        "device": "cpu", "threads": 1, "prepared": None, "same_vocab": False,
    }  # fmt: skip
    udf = BatchRecommender(str(out), options, {})
    with pytest.raises(ServeError, match="3 item id.s. not in the export's vocabulary: ghost-1"):
        udf(_raw_users(run))
    with pytest.raises(ServeError, match="empty history .no known item. for user.s. carol"):
        udf(_raw_users(run).slice(2, 1))


@pytest.mark.slow
def test_batch_strict_failure_removes_the_output(ray_session, make_export, tmp_path):
    from fearec_dist.serve.artifact import ServeError
    from fearec_dist.serve.batch import run_batch

    run, out = make_export("sasrec")
    (tmp_path / "in").mkdir()
    pq.write_table(_raw_users(run), tmp_path / "in" / "users.parquet")
    kw = {"k": 5, "actors": 1, "cpus_per_actor": 0.5, "progress": False}
    with pytest.raises(ServeError, match="not in the export's vocabulary: ghost-1, ghost-2"):
        run_batch(str(out), str(tmp_path / "in"), str(tmp_path / "top"), strict=True, **kw)
    assert not (tmp_path / "top").exists()  # the partial output is removed
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "x.parquet").write_text("")
    with pytest.raises(ServeError, match="is not empty"):
        run_batch(str(out), str(tmp_path / "in"), str(tmp_path / "top"), **kw)


@pytest.mark.slow
def test_batch_on_s3(ray_session, s3_server, make_export, capsys):
    """An export and a prepared dataset in a bucket -> the batch job (ANN) -> top-k Parquet in
    the bucket. (Exporting the Ray trainer's own run directory on s3:// is in
    tests/train/test_s3_run.py.)"""
    from fearec_dist.cli import main

    run, out = make_export("sasrec", "hnsw")
    bucket = s3_server.create_bucket("serve")
    s3_server.upload_dir(out, bucket, "export")
    s3_server.upload_dir(run.prepared, bucket, "prepared")
    capsys.readouterr()
    argv = [
        *("recommend", "--export", f"s3://{bucket}/export", "--input", f"s3://{bucket}/prepared"),
        *("--output", f"s3://{bucket}/top", "-k", "5", "--ann", "--cpus-per-actor", "0.5"),
    ]
    assert main(argv) == 0
    assert f"for {N_USERS:,} users" in capsys.readouterr().out
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint_url, region="us-east-1")
    table = pq.read_table(f"{bucket}/top", filesystem=fs)
    assert table.num_rows == N_USERS == len(set(table.column("user_id").to_pylist()))
    assert all(len(ids) == 5 for ids in table.column("item_ids").to_pylist())
