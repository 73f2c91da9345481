"""Readers for each input format, run inside Ray Data tasks (one task per input file).

Every reader returns the same standard table: ``user`` (string), ``item`` (string), ``time``
(float64), ``order`` (int64: file index << 40 | row, the stable tie-break on input order) and,
when the input has one, ``rating`` (float64). Bad input raises ``DataError`` naming the file and
the row (1-based, header not counted) or column.

Formats:
- ``parquet`` / ``csv``: columns ``user_id``, ``item_id``, ``timestamp`` (RecBole's names),
  optional ``rating``; ``columns`` maps other names (``{"user": "uid", ...}``). Other columns are
  ignored and listed in meta.json. CSV timestamps may be numbers or ISO-8601 strings.
- ``atomic``: RecBole ``.inter``, tab-separated, ``name:type`` headers.
- ``seqtxt``: one line per user, ``user item item …``, already time-ordered (time = position).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fearec_dist.errors import DataError

STANDARD = {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating"}
ROW_BITS = 40


def _column_names(columns: dict[str, str] | None) -> dict[str, str]:
    names = dict(STANDARD)
    for key, value in (columns or {}).items():
        if key not in STANDARD:
            raise DataError(f"--columns: unknown field {key!r}; use user, item, time, rating")
        names[key] = value
    return names


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _ids(table: pa.Table, col: str, path: str, what: str) -> pa.Array:
    """The id column as strings; null, blank or NaN ids are errors naming the first bad row."""
    arr = table.column(col).combine_chunks().cast(pa.string())
    trimmed = pc.utf8_trim_whitespace(arr)
    bad = pc.or_kleene(pc.equal(trimmed, ""), pc.equal(pc.utf8_lower(trimmed), "nan"))
    bad = pc.fill_null(bad, True).to_numpy(zero_copy_only=False)
    if bad.any():
        row = _first_bad(bad)
        raise DataError(
            f"{path}: row {row + 1}, column {col!r}: empty, missing or NaN {what} id"
            f" ({arr[row].as_py()!r})"
        )
    return arr


# Parsers tried in order on a string timestamp column: epoch numbers, then ISO-8601 without and
# with a zone (pyarrow parses each vectorised; a column that mixes them falls back to per row).
_STRING_TIME_TYPES = (pa.float64(), pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"))


def _parse_time_strings(arr: pa.Array) -> np.ndarray | None:
    """Seconds as float64, or None when no single parser reads every non-null value."""
    for tp in _STRING_TIME_TYPES:
        try:
            parsed = pc.cast(arr, tp)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        if pa.types.is_timestamp(tp):
            parsed = pc.divide(pc.cast(pc.cast(parsed, pa.int64()), pa.float64()), 1e9)
        return parsed.to_numpy(zero_copy_only=False).astype(np.float64)
    return None


def _timestamps(table: pa.Table, col: str, path: str) -> np.ndarray:
    """The time column as float64 seconds (or the input's own unit); validated."""
    arr = table.column(col).combine_chunks()
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        out = _parse_time_strings(arr)
        if out is None:  # mixed styles or a bad value: parse row by row, naming the first bad one
            out = np.empty(len(arr))
            for i, value in enumerate(arr):
                one = _parse_time_strings(pa.array([value.as_py()], pa.string()))
                if one is None:
                    raise DataError(
                        f"{path}: row {i + 1}, column {col!r}: cannot parse timestamp "
                        f"{value.as_py()!r}"
                    )
                out[i] = one[0]
    else:
        numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_null)
        if not any(is_type(arr.type) for is_type in numeric):
            raise DataError(f"{path}: column {col!r} of type {arr.type} is not a timestamp")
        out = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(out)
    if bad.any():
        raise DataError(f"{path}: row {_first_bad(bad) + 1}, column {col!r}: missing timestamp")
    if (out < 0).any():
        row = _first_bad(out < 0)
        raise DataError(f"{path}: row {row + 1}, column {col!r}: negative timestamp {out[row]}")
    return out


def standardise(
    table: pa.Table, path: str, file_index: int, columns: dict[str, str] | None
) -> tuple[pa.Table, list[str]]:
    """Validates a raw table and returns (standard table, names of ignored columns)."""
    names = _column_names(columns)
    required = [names["user"], names["item"], names["time"]]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.column_names)}"
            " (map other names with --columns user=…,item=…,time=…)"
        )
    used = {*required, names["rating"]}
    ignored = [c for c in table.column_names if c not in used]
    n = table.num_rows
    cols = {
        "user": _ids(table, names["user"], path, "user"),
        "item": _ids(table, names["item"], path, "item"),
        "time": pa.array(_timestamps(table, names["time"], path)),
        "order": pa.array((np.int64(file_index) << ROW_BITS) + np.arange(n, dtype=np.int64)),
    }
    if names["rating"] in table.column_names:
        try:
            rating = table.column(names["rating"]).combine_chunks().cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{path}: column {names['rating']!r} is not numeric") from None
        cols["rating"] = rating
    return pa.table(cols), ignored


def read_parquet_file(data: bytes, path: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def read_csv_file(data: bytes, path: str, delimiter: str = ",") -> pa.Table:
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
        )
    except pa.ArrowInvalid as err:  # ragged rows: "Expected 3 columns, got 4: ..."
        raise DataError(f"{path}: {err}") from None


def read_atomic_file(data: bytes, path: str) -> tuple[pa.Table, dict[str, str]]:
    """RecBole atomic file: a tab-separated header of ``name:type`` fields."""
    text_head = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    fields = text_head.split("\t")
    if not all(":" in f for f in fields):
        raise DataError(f"{path}: header must be tab-separated name:type fields, got {text_head!r}")
    names = [f.split(":", 1)[0] for f in fields]
    types = [f.split(":", 1)[1] for f in fields]
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n, t in zip(names, types) if "token" in t},
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: {err}") from None
    return table, dict(zip(names, types))


def read_seqtxt_file(data: bytes, path: str, file_index: int) -> pa.Table:
    """``user item item …`` per line -> standard rows; time = position in the line."""
    users, items, times = [], [], []
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}: line {line_no}: user {parts[0]!r} has no items")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
        times.extend(range(len(parts) - 1))
    n = len(items)
    return pa.table(
        {
            "user": pa.array(users, pa.string()),
            "item": pa.array(items, pa.string()),
            "time": pa.array(np.asarray(times, dtype=np.float64)),
            "order": pa.array((np.int64(file_index) << ROW_BITS) + np.arange(n, dtype=np.int64)),
        }
    )


def read_any(
    data: bytes,
    path: str,
    fmt: str,
    file_index: int,
    columns: dict[str, str] | None,
    partition: dict[str, str] | None = None,
) -> tuple[pa.Table, list[str]]:
    """Dispatches on ``fmt``; returns (standard table, ignored column names). ``partition``:
    the file's Hive/Delta partition values, added as string columns before validation."""
    if fmt == "seqtxt":
        return read_seqtxt_file(data, path, file_index), []
    if fmt == "parquet":
        raw = read_parquet_file(data, path)
    elif fmt == "csv":
        raw = read_csv_file(data, path)
    elif fmt == "atomic":
        raw, _ = read_atomic_file(data, path)
    else:
        raise DataError(f"unknown format {fmt!r}")
    for key, value in (partition or {}).items():
        if key in raw.column_names:
            raise DataError(f"{path}: column {key!r} is also a partition key ({key}={value})")
        raw = raw.append_column(key, pa.array([value] * raw.num_rows, pa.string()))
    return standardise(raw, path, file_index, columns)
