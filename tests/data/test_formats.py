"""Each input format, and each bad-input case, named by file and row or column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.data.formats import read_any
from fearec_dist.data.prepare import parse_columns
from fearec_dist.errors import DataError


def _csv(text: str) -> bytes:
    return text.encode()


def test_csv_standard_columns_and_rating():
    table, ignored = read_any(
        _csv("user_id,item_id,timestamp,rating,extra\nu1,i1,10,5,x\nu1,i2,5,3,y\n"),
        "log.csv",
        "csv",
        2,
        None,
    )
    assert table.column("user").to_pylist() == ["u1", "u1"]
    assert table.column("time").to_pylist() == [10.0, 5.0]
    assert table.column("rating").to_pylist() == [5.0, 3.0]
    assert table.column("order").to_pylist() == [2 << 40, (2 << 40) + 1]
    assert ignored == ["extra"]


def test_column_mapping_and_iso_timestamps():
    cols = parse_columns("user=uid, item=iid,time=ts")
    table, _ = read_any(_csv("uid,iid,ts\na,b,2020-01-02T00:00:00\n"), "log.csv", "csv", 0, cols)
    assert table.column("time").to_pylist() == [1577923200.0]


def test_atomic_inter():
    data = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n"
    table, _ = read_any(data, "x.inter", "atomic", 0, None)
    assert table.column("item").to_pylist() == ["242"]
    assert table.column("time").to_pylist() == [881250949.0]


def test_seqtxt_positions_are_time():
    table, _ = read_any(b"1 5 6 7\n2 8 9\n", "Beauty.txt", "seqtxt", 0, None)
    assert table.column("user").to_pylist() == ["1", "1", "1", "2", "2"]
    assert table.column("time").to_pylist() == [0, 1, 2, 0, 1]


def test_iso_timestamps_with_zones_and_mixed_styles():
    text = "user_id,item_id,timestamp\nu,a,2020-01-02T00:00:00Z\nu,b,2020-01-02T01:00:00+01:00\n"
    table, _ = read_any(_csv(text), "log.csv", "csv", 0, None)
    assert table.column("time").to_pylist() == [1577923200.0, 1577923200.0]
    mixed = pa.table(
        {"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": ["5", "1970-01-01"]}
    )
    assert _parquet_rows(mixed).column("time").to_pylist() == [5.0, 0.0]


def test_atomic_token_fields_stay_strings():
    data = b"user_id:token\titem_id:token\ttimestamp:float\n007\t0042\t1.5\n"
    table, _ = read_any(data, "x.inter", "atomic", 0, None)
    assert table.column("user").to_pylist() == ["007"]  # leading zeros kept: ids, not numbers
    assert table.column("item").to_pylist() == ["0042"]


def _parquet_rows(table: pa.Table) -> pa.Table:
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return read_any(buf.getvalue(), "p.parquet", "parquet", 0, None)[0]


def test_parquet_nan_ids_and_timestamp_types():
    with pytest.raises(
        DataError, match=r"p\.parquet: row 2, column 'user_id': empty, missing or NaN"
    ):
        _parquet_rows(
            pa.table({"user_id": [1.0, float("nan")], "item_id": [1, 2], "timestamp": [1, 2]})
        )
    ts = pa.array([0, 86_400], pa.timestamp("s"))
    table = _parquet_rows(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": ts}))
    assert table.column("time").to_pylist() == [0.0, 86_400.0]
    with pytest.raises(DataError, match=r"p\.parquet: column 'timestamp' of type bool"):
        _parquet_rows(pa.table({"user_id": ["u"], "item_id": ["a"], "timestamp": [True]}))


def test_not_a_parquet_file():
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_any(b"hello", "bad.parquet", "parquet", 0, None)


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [1, 2]}), path)
    table, _ = read_any(path.read_bytes(), str(path), "parquet", 0, None)
    assert table.column("user").to_pylist() == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id,item_id\nu,i\n", r"log\.csv: missing column\(s\) timestamp"),
        ("user_id,item_id,timestamp\nu,i,yesterday\n", r"log\.csv: row 1, column 'timestamp'"),
        ("user_id,item_id,timestamp\nu,i,1\nu,i,-5\n", r"row 2.*negative timestamp"),
        ("user_id,item_id,timestamp\nu,,1\n", r"row 1, column 'item_id': empty, missing or NaN"),
        ("user_id,item_id,timestamp\nu,i,1\nu,NaN,1\n", r"row 2, column 'item_id': empty, "),
        ("user_id,item_id,timestamp\n,i,1\n", r"row 1, column 'user_id'"),
        ("user_id,item_id,timestamp\nu,i,\n", r"row 1, column 'timestamp': missing timestamp"),
        ("user_id,item_id,timestamp\nu,i,1,9\n", r"log\.csv: .*columns"),
    ],
)
def test_bad_csv_names_file_and_row(text, message):
    with pytest.raises(DataError, match=message):
        read_any(_csv(text), "log.csv", "csv", 0, None)


def test_bad_atomic_header_and_seqtxt_line():
    with pytest.raises(DataError, match=r"x\.inter: header"):
        read_any(b"user_id\titem_id\n1\t2\n", "x.inter", "atomic", 0, None)
    with pytest.raises(DataError, match=r"B\.txt: line 2: user '2' has no items"):
        read_any(b"1 5 6\n2\n", "B.txt", "seqtxt", 0, None)
    with pytest.raises(DataError, match="unknown field 'usr'"):
        read_any(_csv("a,item_id,timestamp\nu,i,1\n"), "log.csv", "csv", 0, parse_columns("usr=a"))
