"""The temporal protocol (``data.split: temporal``): train on the past, evaluate on what came next.

Leave-one-out (``sequences.build_loo_examples``) holds out each user's last items, whenever they
happened: one user's test item can be older than another user's training items. The temporal
protocol cuts the log at two times instead, ``valid_start < test_start`` (in the data's own
timestamp unit), as a team that retrains daily evaluates on the days after its training cut::

    training    every next-item target at t < valid_start, with its history (the last L items)
    validation  per user with an interaction in [valid_start, test_start): the FIRST of them,
                given the user's whole history before it (``seen``: every earlier item)
    test        per user with an interaction at t >= test_start: the first of them, likewise
                (its history includes the user's validation-window items)

A user whose window's first interaction is also their first interaction ever has no history to
rank from: the row is skipped and counted (``no_history_valid``, ``no_history_test``). An item
first seen at or after the training cut ``valid_start`` (in the whole log) is *cold*: the model
never met it, so it cannot be ranked. Cold targets stay in the rows and count as misses in the
usual metrics (what early stopping reads); ``warm_*`` metrics score the warm targets alone; only
warm items are candidates (``train/evaluate.py``). The examples' counting pass records the
counts (``cold_valid``, ``cold_test``), and the items seen before the cut
(``item_counts.parquet``'s ``interactions``: every interaction at t < valid_start, which is also
the popularity baseline's count under this protocol).

Timestamps come from ``<prepared>/sequences``' ``timestamps`` column (each user's run
time-ordered, ties in input order). A dataset prepared from ``seqtxt`` has positions there, not
times, and is refused. The cuts are given as ``data.valid_start`` / ``data.test_start`` (ISO-8601
or epoch numbers, ``config/data.cut_time``) or as ``data.valid_days`` / ``data.test_days``,
counted back from the newest timestamp (days of 86,400 units: the data's unit must be seconds).
Under either protocol ``data.train_since`` keeps only the training targets at or after a time
(``data/since.py``); evaluation rows are not affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from fearec_dist.config import ConfigError, DataSection, StorageSection, load_config
from fearec_dist.config.data import PROTOCOL_KEYS, cut_time
from fearec_dist.data.sequences import Split, build_loo_examples, cut_examples, list_csr
from fearec_dist.data.since import loo_train_positions, since_filter
from fearec_dist.data.versions import resolve_version
from fearec_dist.errors import DataError
from fearec_dist.storage import read_json, redact, resolve

DAY = 86_400  # valid_days / test_days are days of 86,400 timestamp units (seconds)


@dataclass(frozen=True)
class SplitProtocol:
    """How examples are cut: ``loo``, or ``temporal`` with its two resolved cut times (in the
    data's timestamp unit); under either, ``train_since`` (``data.train_since``) keeps only the
    training targets at or after it. Small and picklable: it travels into every Ray Data UDF."""

    split: str = "loo"
    valid_start: int | None = None
    test_start: int | None = None
    train_since: int | None = None

    @property
    def temporal(self) -> bool:
        return self.split == "temporal"

    @property
    def needs_times(self) -> bool:
        """Whether the cut reads the sequences' timestamps."""
        return self.temporal or self.train_since is not None

    def cache_key(self) -> str:
        """The examples directory's suffix: a LOO count is never reused for temporal, nor a
        count of every training target for one from ``train_since`` on (or the reverse)."""
        key = f"-temporal-{self.valid_start}-{self.test_start}" if self.temporal else ""
        return key + (f"-since-{self.train_since}" if self.train_since is not None else "")

    def cuts(self) -> tuple[int | None, int | None]:
        return self.valid_start, self.test_start

    def columns(self) -> list[str]:
        """The sequences' columns the cut reads."""
        return ["user", "items", "timestamps"] if self.needs_times else ["user", "items"]

    def describe(self) -> str:
        """One line for the console."""
        if not self.temporal:
            line = "protocol: leave-one-out (each user's last item tests, the one before validates)"
        else:
            line = (
                f"protocol: temporal, training before {_when(self.valid_start)}, validation "
                f"from there, test from {_when(self.test_start)}"
            )
        if self.train_since is not None:
            line += f"; training targets only from {_when(self.train_since)} (data.train_since)"
        return line


LOO = SplitProtocol()


def _when(t: int | None) -> str:
    """``893286638 (1998-04-23T00:30:38Z if seconds)``."""
    if t is None:
        return "-"
    try:
        import datetime as dt

        iso = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(t)
    return f"{t} ({iso} if seconds)"


def sequence_times(batch: Any) -> np.ndarray:
    """(I,) int64 timestamps of a batch of sequences, aligned with ``sequences_csr``'s items."""
    _, values = list_csr(batch.column("timestamps"))
    return values.to_numpy(zero_copy_only=False).astype(np.int64)


def temporal_positions(
    offsets: np.ndarray, times: np.ndarray, valid_start: int, test_start: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """Where each split's targets are, vectorised over all users.

    Args:
        offsets: (U + 1,) CSR offsets; times: (I,) each user's run non-decreasing.
        valid_start, test_start: the cuts.

    Returns:
        ``({split: (user_idx (N,), j (N,))}, {"no_history_valid", "no_history_test"})``: the
        rows' user indices and 0-based target positions (j >= 1), and the users skipped.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    n_users = len(lens)
    user = np.repeat(np.arange(n_users), lens)
    pos = np.arange(len(times)) - offsets[:-1][user]
    early = times < valid_start
    train = early & (pos >= 1)
    out = {"train": (user[train], pos[train])}
    skipped = {}
    for name, start, end in (("valid", valid_start, test_start), ("test", test_start, None)):
        # runs are time-ordered: the first position at or after ``start`` is the count before it
        j = np.bincount(user[times < start], minlength=n_users).astype(np.int64)
        has = j < lens
        if end is not None:  # and the first one falls inside the window
            has &= times[offsets[:-1] + np.minimum(j, np.maximum(lens - 1, 0))] < end
        rows = np.flatnonzero(has & (j >= 1))
        out[name] = (rows, j[rows])
        skipped[f"no_history_{name}"] = int((has & (j == 0)).sum())
    return out, skipped


def temporal_counts(
    offsets: np.ndarray, items: np.ndarray, times: np.ndarray, n_items: int, protocol: SplitProtocol
) -> dict[str, np.ndarray]:
    """The examples' counting pass over one batch of sequences (``examples._Count``): ``n``
    (1, 3) train/valid/test rows, ``skipped`` (1, 2) users without history, and per item
    (1, N + 1): ``counts`` (training targets), ``interactions`` (every interaction before the
    cut), ``valid_targets``, ``test_targets`` (the cold ones are counted from them once the
    whole log's ``interactions`` are known: ``count_summary``)."""
    cut = protocol.valid_start
    where, skipped = temporal_positions(offsets, times, cut, protocol.test_start)
    user_idx, j, before_since = since_filter(protocol.train_since, offsets, times,
                                             *where["train"])  # fmt: skip
    where["train"] = (user_idx, j)
    per_item = {"interactions": items[times < cut]}
    for name, (user_idx, j) in where.items():
        key = "counts" if name == "train" else f"{name}_targets"
        per_item[key] = items[np.asarray(offsets)[:-1][user_idx] + j]
    n = [len(where[split][1]) for split in ("train", "valid", "test")]
    out = {"n": np.array([n], dtype=np.int64)}
    out["skipped"] = np.array([[skipped["no_history_valid"], skipped["no_history_test"]]])
    out["before_since"] = np.array([[before_since]], dtype=np.int64)
    for key, ids in per_item.items():
        out[key] = np.bincount(ids, minlength=n_items + 1).astype(np.int64)[None, :]
    return out


def count_summary(totals: dict[str, np.ndarray], protocol: SplitProtocol) -> dict[str, int]:
    """The example counts of summed ``temporal_counts`` / ``examples._Count`` outputs
    (temporal: also the cold targets and the users skipped)."""
    n = totals["n"]
    out = {"n_train": int(n[0]), "n_valid": int(n[1]), "n_test": int(n[2])}
    if protocol.temporal:
        cold = totals["interactions"] == 0
        out["cold_valid"] = int(totals["valid_targets"][cold].sum())
        out["cold_test"] = int(totals["test_targets"][cold].sum())
        no_history = totals["skipped"]
        out["no_history_valid"], out["no_history_test"] = int(no_history[0]), int(no_history[1])
    if protocol.train_since is not None:
        out["train_before_since"] = int(totals["before_since"][0])
    return out


def build_temporal_examples(
    offsets: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    users: np.ndarray,
    max_seq_len: int,
    valid_start: int,
    test_start: int,
    splits: tuple[str, ...] = ("train", "valid", "test"),
) -> dict[str, Split]:
    """The temporal protocol's examples, in ``build_loo_examples``' schema (valid/test with
    ``seen``, the whole history before the target)."""
    where, _ = temporal_positions(offsets, times, valid_start, test_start)
    return {
        name: cut_examples(offsets, items, users, *where[name], max_seq_len, name != "train")
        for name in ("train", "valid", "test")
        if name in splits
    }


def build_split_examples(
    protocol: SplitProtocol,
    offsets: np.ndarray,
    items: np.ndarray,
    times: np.ndarray | None,
    users: np.ndarray,
    max_seq_len: int,
    splits: tuple[str, ...],
) -> dict[str, Split]:
    """``splits``' examples under ``protocol`` (``times`` is read only where it
    ``needs_times``): the training examples from ``train_since`` on only, when it is set."""
    if protocol.train_since is not None and "train" in splits:
        rest = tuple(s for s in splits if s != "train")
        out = build_split_examples(replace(protocol, train_since=None), offsets, items, times,
                                   users, max_seq_len, rest)  # fmt: skip
        if protocol.temporal:
            user_idx, j = temporal_positions(offsets, times, *protocol.cuts())[0]["train"]
        else:
            user_idx, j = loo_train_positions(offsets)
        user_idx, j, _ = since_filter(protocol.train_since, offsets, times, user_idx, j)
        out["train"] = cut_examples(offsets, items, users, user_idx, j, max_seq_len, False)
        return out
    if not protocol.temporal:
        return build_loo_examples(offsets, items, users, max_seq_len, splits=splits)
    assert times is not None and protocol.valid_start is not None
    assert protocol.test_start is not None
    return build_temporal_examples(offsets, items, times, users, max_seq_len,
                                   protocol.valid_start, protocol.test_start, splits)  # fmt: skip


def time_span(prepared_uri: str, storage: StorageSection | None = None) -> tuple[int, int]:
    """(oldest, newest) timestamp of a prepared dataset: its ``timestamps`` column scanned in
    this process, batch by batch (memory: one batch).

    Raises:
        DataError: the sequences have no timestamps, or no interaction.
    """
    fs, root = resolve(f"{prepared_uri.rstrip('/')}/sequences", storage)
    dataset = pads.dataset(root, filesystem=fs, format="parquet")
    if "timestamps" not in dataset.schema.names:
        raise DataError(
            f"{redact(prepared_uri)}: its sequences have no timestamps column; prepare the log "
            "again (data.split=temporal needs each interaction's time)"
        )
    lo, hi = math.inf, -math.inf
    for batch in dataset.to_batches(columns=["timestamps"], batch_size=65_536):
        values = pc.list_flatten(batch.column("timestamps"))
        if len(values):
            span = pc.min_max(values)
            lo, hi = min(lo, span["min"].as_py()), max(hi, span["max"].as_py())
    if lo > hi:
        raise DataError(f"{redact(prepared_uri)}: no interactions")
    return int(lo), int(hi)


def resolve_protocol(
    data: DataSection, prepared_uri: str, storage: StorageSection | None = None
) -> SplitProtocol:
    """The protocol ``data`` asks for on this prepared dataset, its cuts resolved to times.

    Raises:
        DataError: temporal on a dataset without real timestamps (prepared from seqtxt), or
            cuts that leave nothing to train on or an empty test window (naming the keys and
            the data's time span: a cut in the wrong unit shows here).
    """
    since = None if data.train_since is None else cut_time(data.train_since, "data.train_since")
    if data.split != "temporal" and since is None:
        return LOO
    asked = "data.split=temporal" if data.split == "temporal" else "data.train_since"
    root = resolve_version(prepared_uri, storage=storage).uri  # a root: its newest version
    meta = read_json(f"{root}/meta.json", storage)
    fmt = (meta.get("sources") or {}).get("format")
    if fmt == "seqtxt":
        raise DataError(
            f"{redact(root)}: {asked} needs real timestamps, but this dataset was "
            "prepared from seqtxt input, whose times are positions in each line; use "
            "data.split=loo, or prepare a log with times (parquet, csv, atomic)"
        )
    recorded = meta.get("time_range") or {}  # prepare records it; older datasets: a scan
    if recorded.get("min") is not None and recorded.get("max") is not None:
        lo, hi = int(recorded["min"]), int(recorded["max"])  # as the int64 timestamps truncate
    else:
        lo, hi = time_span(root, storage)
    if since is not None and since > hi:
        raise DataError(
            f"{redact(root)}: data.train_since {_when(since)} is after the newest interaction: "
            f"nothing to train on; the data's timestamps run from {_when(lo)} to {_when(hi)}"
        )
    if data.split != "temporal":
        return SplitProtocol("loo", train_since=since)
    if data.test_start is not None:
        test_start = cut_time(data.test_start, "data.test_start")
    else:
        test_start = math.ceil(hi - float(data.test_days or 0) * DAY)
    if data.valid_start is not None:
        valid_start = cut_time(data.valid_start, "data.valid_start")
    else:
        valid_start = math.ceil(test_start - float(data.valid_days or 0) * DAY)
    span = f"the data's timestamps run from {_when(lo)} to {_when(hi)}"
    if valid_start >= test_start:
        raise DataError(
            f"{redact(root)}: the validation window starts at {valid_start}, not before the "
            f"test window's start {test_start} (data.valid_start/valid_days, data.test_start/"
            f"test_days); {span}"
        )
    if valid_start <= lo:
        raise DataError(
            f"{redact(root)}: the validation window starts at {_when(valid_start)}, at or "
            f"before the oldest interaction: nothing to train on; {span}"
        )
    if test_start > hi:
        raise DataError(
            f"{redact(root)}: the test window starts at {_when(test_start)}, after the newest "
            f"interaction: nothing to test on; {span}"
        )
    if since is not None and since >= valid_start:
        raise DataError(
            f"{redact(root)}: data.train_since {_when(since)} is not before the validation "
            f"window's start {_when(valid_start)}: no training target is left; {span}"
        )
    return SplitProtocol("temporal", valid_start, test_start, since)


RECORD_COUNTS = ("n_valid", "n_test", "cold_valid", "cold_test", "no_history_valid",
                 "no_history_test")  # fmt: skip


def protocol_record(protocol: SplitProtocol, counts: dict[str, Any]) -> dict[str, Any]:
    """``results.json["protocol"]`` (also the export manifest's and ``evaluate``'s): the split,
    its cuts and its counts. Under loo there are no cuts, and cold items and skipped users are
    not counted (None)."""
    out: dict[str, Any] = {"split": protocol.split, "valid_start": protocol.valid_start,
                           "test_start": protocol.test_start}  # fmt: skip
    for key in RECORD_COUNTS:
        counted = protocol.temporal or key in ("n_valid", "n_test")
        out[key] = int(counts.get(key, 0)) if counted else None
    if protocol.train_since is not None:  # the training examples it removed, counted
        out["train_since"] = protocol.train_since
        out["train_before_since"] = int(counts.get("train_before_since", 0))
    return out


def describe_record(record: dict[str, Any]) -> str:
    """``protocol_record``'s content for the console (``evaluate``, ``train``)."""
    protocol = SplitProtocol(record["split"], record.get("valid_start"), record.get("test_start"),
                             record.get("train_since"))  # fmt: skip
    line = protocol.describe()
    if protocol.train_since is not None:
        removed = record["train_before_since"]
        line += f"\n  training examples removed (their targets are before it): {removed:,}"
    if protocol.temporal:
        line += (
            f"\n  {record['n_valid']:,} valid / {record['n_test']:,} test rows; cold targets "
            f"(misses; warm rows score them apart): {record['cold_valid']:,} / "
            f"{record['cold_test']:,}; users skipped without history: "
            f"{record['no_history_valid']:,} / {record['no_history_test']:,}"
        )
    return line


def baseline_protocol(
    prepared_uri: str, overrides: list[str]
) -> tuple[SplitProtocol, StorageSection]:
    """``evaluate --baseline``'s protocol on ``prepared_uri`` and storage options, from its
    ``--set`` items: only the protocol's keys and ``storage.*`` mean anything to a baseline, so
    any other key is refused rather than ignored."""
    allowed = {f"data.{k}" for k in PROTOCOL_KEYS}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in allowed and not key.startswith(("storage.", "data.storage.")):
            raise ConfigError(
                f"--set {key}: a baseline takes only {', '.join(sorted(allowed))} and storage.*"
            )
    cfg = load_config(None, overrides)
    return resolve_protocol(cfg.data, prepared_uri, cfg.storage), cfg.storage
