"""``prepare --append`` through real Ray Data: equal to a full prepare of the union (raw ids,
order, timestamps, counts), stable ids, what it refuses, and its commit under a kill and a
rival writer (real subprocesses of the CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.cli import main
from fearec_dist.config import DataSection
from fearec_dist.data.examples import build_examples
from fearec_dist.data.inspect import dataset_info, dump_dataset
from fearec_dist.data.prepare import NothingNew, prepare_dataset
from fearec_dist.data.sequences import read_sequences
from fearec_dist.data.versions import gc_versions, list_versions, resolve_version
from fearec_dist.errors import DataError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# day 1: u1 spans both days; u2 has equal timestamps (input order: a.csv row 2 before row 3)
DAY1 = {
    "a.csv": [("u1", "10", 5), ("u2", "11", 3), ("u2", "12", 3), ("u3", "10", 9)],
    "b.csv": [("u1", "12", 1), ("u2", "11", 3), ("u1", "12", 1)],  # a duplicate row
}
# day 2: new users (u4, 7) and items (13, 2); u1's new rows are older than some of day 1
# (out of order across partitions) and one ties with day 1 (t=5: day 1's row first)
DAY2 = {
    "a.csv": [("u4", "13", 2), ("u1", "13", 5), ("u1", "2", 0), ("7", "10", 4)],
    "b.csv": [("u3", "11", 9), ("u3", "11", 9), ("u2", "2", 1)],
}


def _write_day(root: Path, day: str, files: dict) -> None:
    part = root / f"dt={day}"
    part.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        body = "".join(f"{u},{i},{t}\n" for u, i, t in rows)
        (part / name).write_text("user_id,item_id,timestamp\n" + body)


def _dump(uri: str, tmp_path: Path, version: int | None = None) -> dict:
    out = tmp_path / f"dump-{abs(hash((uri, version)))}.jsonl"
    dump_dataset(uri, str(out), version)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return {x["user"]: (x["items"], x["timestamps"]) for x in lines}


@pytest.fixture(scope="module")
def appended(ray_session, tmp_path_factory):
    """day 1 prepared, then day 2 appended; and the union prepared at once."""
    tmp = tmp_path_factory.mktemp("append")
    log, union = tmp / "log", tmp / "union"
    _write_day(log, "1", DAY1)
    prepare_dataset(str(log), "csv", str(tmp / "ds"), progress=False)
    _write_day(log, "2", DAY2)
    meta = prepare_dataset(str(log), "csv", str(tmp / "ds"), progress=False, append=True)
    _write_day(union, "1", DAY1)
    _write_day(union, "2", DAY2)
    full = prepare_dataset(str(union), "csv", str(tmp / "full"), progress=False)
    return tmp, meta, full


def test_append_equals_a_full_prepare_of_the_union(appended, tmp_path):
    tmp, meta, full = appended
    got, want = _dump(str(tmp / "ds"), tmp_path), _dump(str(tmp / "full"), tmp_path)
    assert got == want
    assert want["u1"] == (["2", "12", "12", "10", "13"], [0, 1, 1, 5, 5])  # the documented order
    assert want["u2"] == (["2", "11", "12", "11"], [1, 3, 3, 3])
    for key in ("n_users", "n_items", "n_interactions", "n_read"):
        assert meta[key] == full[key], key
    assert meta["sequence_length"] == full["sequence_length"]
    assert meta["time_range"] == full["time_range"] == {"min": 0, "max": 9}
    assert (meta["version"], meta["parent"], meta["kind"]) == (2, 1, "append")
    assert meta["this_version"] == {
        "files": 2, "rows_read": 7, "interactions": 7, "new_users": 2, "new_items": 2,
        "buckets_written": 1, "buckets_copied": 0, "rebucketed": False,
    }  # fmt: skip
    assert meta["user_buckets"] == full["user_buckets"] == 1  # small data: one bucket


def test_ids_are_stable_and_new_ones_come_after(appended, tmp_path):
    tmp = appended[0]
    v1, v2 = (resolve_version(str(tmp / "ds"), v).uri for v in (1, 2))
    items1 = pq.read_table(f"{v1}/vocab/items.parquet").to_pydict()
    items2 = pq.read_table(f"{v2}/vocab/items.parquet").to_pydict()
    assert items1["raw"] == ["10", "11", "12"]
    assert items2["raw"] == ["10", "11", "12", "2", "13"]  # new after the max, sorted numerically
    assert items2["id"] == [1, 2, 3, 4, 5] and items2["count"] == [3, 4, 3, 2, 2]
    users1 = dict(zip(*pq.read_table(f"{v1}/vocab/users").to_pydict().values()))
    users2 = dict(zip(*pq.read_table(f"{v2}/vocab/users").to_pydict().values()))
    assert {raw: i for i, raw in users1.items()} == {"u1": 1, "u2": 2, "u3": 3}
    assert {raw: i for i, raw in users2.items()} == {"u1": 1, "u2": 2, "u3": 3, "7": 4, "u4": 5}
    # version 1 is untouched and still readable
    assert _dump(str(tmp / "ds"), tmp_path, 1)["u1"] == (["12", "12", "10"], [1, 1, 5])
    offsets, _, users = read_sequences(str(tmp / "ds"))
    assert users.tolist() == [1, 2, 3, 4, 5] and offsets[-1] == 14


def test_nothing_new_changed_file_and_refusals(appended, tmp_path, capsys):
    tmp = appended[0]
    log, ds = tmp / "log", str(tmp / "ds")
    with pytest.raises(NothingNew, match="nothing new"):
        prepare_dataset(str(log), "csv", ds, progress=False, append=True)
    argv = ["prepare", "--append", "--input", str(log), "--format", "csv", "--output", ds]
    assert main(argv) == 0 and "nothing new" in capsys.readouterr().out  # the CLI: exit 0
    assert [v.version for v in list_versions(ds)] == [1, 2]
    with pytest.raises(DataError, match="consumed .*log .*csv.*not"):
        prepare_dataset(str(tmp / "union"), "csv", ds, progress=False, append=True)
    changed = tmp_path / "log"
    _write_day(changed, "1", DAY1)
    prepare_dataset(str(changed), "csv", str(tmp_path / "c"), progress=False)
    time.sleep(0.01)
    (changed / "dt=1" / "b.csv").write_text("user_id,item_id,timestamp\nu9,1,1\n")
    with pytest.raises(DataError, match=r"dt=1/b\.csv changed since it was consumed"):
        prepare_dataset(str(changed), "csv", str(tmp_path / "c"), progress=False, append=True)
    kcore = DataSection(min_user_inter=2)
    prepare_dataset(str(changed), "csv", str(tmp_path / "k"), data=kcore, progress=False)
    with pytest.raises(DataError, match="k-core filters.*global"):
        prepare_dataset(str(changed), "csv", str(tmp_path / "k"), progress=False, append=True)
    with pytest.raises(DataError, match="holds no prepared dataset"):
        prepare_dataset(str(changed), "csv", str(tmp_path / "none"), progress=False, append=True)


def _cli(*args: str, env: dict) -> subprocess.Popen:
    """``fearec-dist ARGS`` in a process of its own (joining the session's Ray)."""
    cmd = [sys.executable, "-m", "fearec_dist", *args]
    full_env = os.environ | {"PYTHONPATH": str(REPO)} | env
    return subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited early: {proc.communicate()[1][-3000:]}")
        assert time.time() < deadline, "the writer never reached its commit"
        time.sleep(0.2)


def test_killed_append_and_a_rival_commit(ray_session, tmp_path):
    """Two writers of version 2: the one that commits first wins, the other fails naming the
    version and leaves nothing committed. A writer killed before its commit leaves version 2
    readable and intact, and a run reads it."""
    log, ds = tmp_path / "log", str(tmp_path / "ds")
    _write_day(log, "1", DAY1)
    prepare_dataset(str(log), "csv", ds, progress=False)
    _write_day(log, "2", DAY2)
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    args = ("prepare", "--append", "--input", str(log), "--format", "csv", "--output", ds)
    gate = tmp_path / "gate"
    loser = _cli(*args, env=env | {"FEAREC_DIST_COMMIT_GATE": str(gate)})
    try:
        _wait_for(Path(f"{gate}.waiting"), loser)
        prepare_dataset(str(log), "csv", ds, progress=False, append=True)  # commits version 2
        gate.write_text("go")
        _, err = loser.communicate(timeout=120)
    finally:
        loser.kill()
    assert loser.returncode == 1 and "version 2 was committed by another writer" in err
    assert [v.version for v in list_versions(ds)] == [1, 2]
    assert len(os.listdir(tmp_path / "ds" / "versions")) == 2  # the loser removed its files

    _write_day(log, "3", {"a.csv": [("u5", "10", 1)]})
    gate2 = tmp_path / "gate2"
    killed = _cli(*args, env=env | {"FEAREC_DIST_COMMIT_GATE": str(gate2)})
    try:
        _wait_for(Path(f"{gate2}.waiting"), killed)
        killed.send_signal(signal.SIGKILL)  # every file of version 3 written, no commit
        killed.wait(timeout=30)
    finally:
        killed.kill()
    assert [v.version for v in list_versions(ds)] == [1, 2]
    assert len(os.listdir(tmp_path / "ds" / "versions")) == 3  # its files, uncommitted
    info = build_examples(ds, 5)  # what a run reads: version 2
    assert (info.data_version, info.n_users) == (2, 5)
    assert dataset_info(ds)["version"] == 2
    done = gc_versions(ds, keep=1, orphan_age_s=0)
    assert done["removed"] == [1] and len(done["orphans"]) == 1 and done["kept"] == [2]
    with pytest.raises(DataError, match="version 1 does not exist"):
        resolve_version(ds, 1)
    # the killed append is simply run again
    meta = prepare_dataset(str(log), "csv", ds, progress=False, append=True)
    assert (meta["version"], meta["n_users"]) == (3, 6)


def test_attributes_are_appended_for_new_items(ray_session, tmp_path):
    """Existing items keep their attribute ids; new items get theirs, new tokens numbered after
    the maximum; without --attributes an append carries the parent's over."""
    log, ds = tmp_path / "log", str(tmp_path / "ds")
    attrs = tmp_path / "item2attributes.json"
    attrs.write_text(json.dumps({"10": ["y"], "11": ["x", "y"], "12": ["x"]}))
    _write_day(log, "1", DAY1)
    prepare_dataset(str(log), "csv", ds, attributes_uri=str(attrs), progress=False)
    attrs.write_text(json.dumps({"10": ["z"], "13": ["z", "a"], "2": ["y"]}))  # 10 changes: kept
    _write_day(log, "2", DAY2)
    meta = prepare_dataset(str(log), "csv", ds, attributes_uri=str(attrs), progress=False,
                           append=True)  # fmt: skip
    v2 = resolve_version(ds).uri
    table = pq.read_table(f"{v2}/attributes.parquet").to_pydict()
    vocab = pq.read_table(f"{v2}/vocab/attributes.parquet").to_pydict()
    assert vocab == {"id": [1, 2, 3, 4], "raw": ["x", "y", "a", "z"]}
    # items 10, 11, 12 = ids 1, 2, 3 (kept); 2 = 4, 13 = 5 (new)
    assert table == {"item": [1, 2, 3, 4, 5], "attrs": [[2], [1, 2], [1], [2], [4, 3]]}
    assert (meta["n_attributes"], meta["items_with_attributes"]) == (4, 5)
    _write_day(log, "3", {"a.csv": [("u1", "10", 11)]})
    prepare_dataset(str(log), "csv", ds, progress=False, append=True)
    v3 = resolve_version(ds).uri
    assert pq.read_table(f"{v3}/attributes.parquet").to_pydict() == table


@pytest.mark.parametrize("case", ["kept", "kept-shuffled", "rebucketed"])
def test_append_over_many_buckets_equals_the_union(ray_session, synthetic_log, tmp_path,
                                                   monkeypatch, case):  # fmt: skip
    """The same equality when users are numbered over many buckets and merged over many hash
    partitions (the session's synthetic log: 150 users spread over 3 files, ~5k rows). At 500
    rows a partition the append keeps the parent's 32 buckets and hands each task its buckets'
    new records from the materialized blocks, or (kept-shuffled) hash-shuffles them; at 4000 the
    parent has one bucket, too few for the union's two partitions, so the append re-buckets it.
    A last append of one row rewrites one bucket and copies the others byte for byte."""
    from fearec_dist.data import buckets as buckets_mod
    from fearec_dist.data import prepare as prepare_mod

    rebucketed = case == "rebucketed"
    monkeypatch.setattr(prepare_mod, "ROWS_PER_PARTITION", 4000 if rebucketed else 500)
    if case == "kept-shuffled":
        monkeypatch.setattr(buckets_mod, "BROADCAST_BYTES", 0)
    log, union = tmp_path / "log", tmp_path / "union"
    for i in range(synthetic_log.n_files):
        for root in (log, union) if i < 2 else (union,):
            (root / f"dt={i}").mkdir(parents=True)
            src = synthetic_log.path / f"part-{i}.parquet"
            (root / f"dt={i}" / "part.parquet").write_bytes(src.read_bytes())
    first = prepare_dataset(str(log), "parquet", str(tmp_path / "ds"), progress=False)
    (log / "dt=2").symlink_to(union / "dt=2", target_is_directory=True)
    meta = prepare_dataset(str(log), "parquet", str(tmp_path / "ds"), progress=False, append=True)
    full = prepare_dataset(str(union), "parquet", str(tmp_path / "full"), progress=False)
    dumped = _dump(str(tmp_path / "ds"), tmp_path)
    assert dumped == _dump(str(tmp_path / "full"), tmp_path)
    assert (meta["n_users"], meta["n_interactions"]) == (full["n_users"], full["n_interactions"])
    assert meta["sequence_length"] == full["sequence_length"]
    _, _, users = read_sequences(str(tmp_path / "ds"))
    assert sorted(users.tolist()) == list(range(1, meta["n_users"] + 1))  # dense, no gaps
    assert (first["user_buckets"], meta["user_buckets"]) == ((1, 8) if rebucketed else (32, 32))
    assert meta["this_version"]["rebucketed"] is rebucketed
    # one more row for one user: one bucket rewritten, the others copied as they were
    row = pq.read_table(synthetic_log.path / "part-0.parquet").slice(0, 1)
    user, item = row["user_id"][0].as_py(), row["item_id"][0].as_py()
    late = row.set_column(row.schema.get_field_index("timestamp"), "timestamp",
                          pa.array([10**12], row.schema.field("timestamp").type))  # fmt: skip
    (log / "dt=3").mkdir()
    pq.write_table(late, log / "dt=3" / "part.parquet")
    last = prepare_dataset(str(log), "parquet", str(tmp_path / "ds"), progress=False, append=True)
    done = last["this_version"]
    assert (done["buckets_written"], done["rebucketed"]) == (1, False)
    assert done["buckets_written"] + done["buckets_copied"] == len(
        list(Path(resolve_version(str(tmp_path / "ds"), 2).uri, "sequences").iterdir())
    )
    want = dict(dumped)
    want[user] = (want[user][0] + [item], want[user][1] + [10**12])
    assert _dump(str(tmp_path / "ds"), tmp_path) == want
    before, after = (Path(resolve_version(str(tmp_path / "ds"), v).uri) for v in (2, 3))
    same = [
        p.name for p in (before / "sequences").iterdir()
        if p.read_bytes() == (after / "sequences" / p.name).read_bytes()
    ]  # fmt: skip
    assert len(same) == done["buckets_copied"]


def test_append_on_s3_rewrites_touched_buckets_and_copies_the_rest(
    ray_session, s3_server, synthetic_log, tmp_path, monkeypatch
):
    """On S3 (moto): bucket files written by the tasks, untouched ones copied server-side, and
    the appended version equal to a prepare of the union, read back through the dump."""
    from fearec_dist.data import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "ROWS_PER_PARTITION", 500)  # 32 buckets
    bucket = s3_server.create_bucket("append-buckets")
    local = tmp_path / "log"
    for i in range(2):
        (local / f"dt={i}").mkdir(parents=True)
        (local / f"dt={i}" / "part.parquet").write_bytes(
            (synthetic_log.path / f"part-{i}.parquet").read_bytes()
        )
    s3_server.upload_dir(local, bucket, "log")
    log, ds = f"s3://{bucket}/log", f"s3://{bucket}/ds"
    prepare_dataset(log, "parquet", ds, progress=False)
    row = pq.read_table(synthetic_log.path / "part-2.parquet").slice(0, 2)  # 1-2 users
    (local / "dt=2").mkdir()
    pq.write_table(row, local / "dt=2" / "part.parquet")
    s3_server.upload_dir(local / "dt=2", bucket, "log/dt=2")
    meta = prepare_dataset(log, "parquet", ds, progress=False, append=True)
    done = meta["this_version"]
    assert done["buckets_copied"] >= 28 and done["buckets_written"] <= 2
    full = prepare_dataset(str(local), "parquet", str(tmp_path / "full"), progress=False)
    assert _dump(ds, tmp_path) == _dump(str(tmp_path / "full"), tmp_path)
    assert (meta["n_users"], meta["n_interactions"]) == (full["n_users"], full["n_interactions"])
