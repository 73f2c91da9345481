"""The temporal protocol (data/temporal.py): a hand-made log with known times, its counts, the
training cut, the popularity baseline by hand, the refusals; and a 2-worker run whose metrics
equal a 1-process re-evaluation.

The hand-made log (day d = T0 + d days; validation [day 10, day 20), test from day 20)::

    user  (item, day) ...                       train targets  valid row        test row
    1     (1,1) (2,2) (3,3) (4,11) (5,12) (2,21) (6,22)   2, 3   4 (cold)     2 | 1 2 3 4 5
    2     (2,4) (1,5) (7,15) (8,25)                    1      7 (cold)         8 (cold)
    3     (5,12) (3,13) (1,22)                         -      no history       1 | 5 3
    4     (1,1) (3,6)                                  3      -                -
    5     (9,21)                                       -      -                no history
    6     (3,7) (1,8) (2,9) (4,30)                     1, 2   -                4 (cold)
    7     (2,1) (6,16)                                 -      6 (cold)         -
    8     (1,2) (3,14)                                 -      3 | 1            -

Items seen before day 10 (warm): 1 (5 interactions), 2 (4), 3 (3); every other item is cold.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fearec_dist.cli import main
from fearec_dist.config import ConfigError, DataSection, load_config
from fearec_dist.data.examples import build_examples, count_examples, count_summary
from fearec_dist.data.sequences import sequences_to_csr
from fearec_dist.data.temporal import (
    LOO,
    SplitProtocol,
    build_temporal_examples,
    resolve_protocol,
    temporal_positions,
)
from fearec_dist.errors import DataError
from fearec_dist.train.evaluate import chunked_ranks, evaluate_popularity

DAY = 86_400
T0 = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
HAND = {
    1: [(1, 1), (2, 2), (3, 3), (4, 11), (5, 12), (2, 21), (6, 22)],
    2: [(2, 4), (1, 5), (7, 15), (8, 25)],
    3: [(5, 12), (3, 13), (1, 22)],
    4: [(1, 1), (3, 6)],
    5: [(9, 21)],
    6: [(3, 7), (1, 8), (2, 9), (4, 30)],
    7: [(2, 1), (6, 16)],
    8: [(1, 2), (3, 14)],
}
N_ITEMS = 9
CUTS = SplitProtocol("temporal", T0 + 10 * DAY, T0 + 20 * DAY)
COUNTS = {"n_train": 6, "n_valid": 4, "n_test": 4, "cold_valid": 3, "cold_test": 2,
          "no_history_valid": 1, "no_history_test": 1}  # fmt: skip


def hand_csr() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    offsets, items = sequences_to_csr([np.array([i for i, _ in s]) for s in HAND.values()])
    times = np.array([T0 + d * DAY for s in HAND.values() for _, d in s], dtype=np.int64)
    return offsets, items, times, np.array(list(HAND), dtype=np.int32)


def write_prepared(root, sequences=HAND, fmt: str = "atomic", n_items: int = N_ITEMS) -> str:
    """A prepared dataset by hand: sequences (user, items, timestamps) and meta.json."""
    (root / "sequences").mkdir(parents=True)
    table = pa.table(
        {
            "user": pa.array(list(sequences), pa.int32()),
            "items": pa.array(
                [[i for i, _ in s] for s in sequences.values()], pa.list_(pa.int32())
            ),
            "timestamps": pa.array(
                [[int(T0 + d * DAY) for _, d in s] for s in sequences.values()],
                pa.list_(pa.int64()),
            ),
        }
    )
    pq.write_table(table, root / "sequences" / "part-0.parquet")
    meta = {"n_users": len(sequences), "n_items": n_items, "n_interactions": 0,
            "sources": {"input": "hand", "format": fmt, "files": 1}}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root)


# ------------------------------------------------------------------ the cut, by hand (no Ray)


def test_rows_and_counts_by_hand() -> None:
    offsets, items, times, users = hand_csr()
    out = build_temporal_examples(offsets, items, times, users, 3, *CUTS.cuts())
    train, valid, test = out["train"], out["valid"], out["test"]
    assert list(zip(train["user"], train["target"])) == [(1, 2), (1, 3), (2, 1), (4, 3), (6, 1),
                                                         (6, 2)]  # fmt: skip
    assert train["history"].tolist()[1] == [1, 2, 0]  # u1's target 3 after 1 2
    assert list(zip(valid["user"], valid["target"])) == [(1, 4), (2, 7), (7, 6), (8, 3)]
    assert list(zip(test["user"], test["target"])) == [(1, 2), (2, 8), (3, 1), (6, 4)]
    # the last L = 3 items as history, the whole history before the target as seen
    assert test["history"][0].tolist() == [3, 4, 5] and test["length"][0] == 3
    seen = test["seen_items"][test["seen_offsets"][0] : test["seen_offsets"][1]]
    assert seen.tolist() == [1, 2, 3, 4, 5]
    assert test["history"][2].tolist() == [5, 3, 0]  # u3: its validation-window items
    _, skipped = temporal_positions(offsets, times, *CUTS.cuts())
    assert skipped == {"no_history_valid": 1, "no_history_test": 1}  # users 3 and 5


def test_counting_pass_in_process_by_hand(tmp_path) -> None:
    uri = write_prepared(tmp_path / "prep")
    totals = count_examples(uri, N_ITEMS, CUTS, batch_size=3)  # three batches of users
    assert count_summary(totals, CUTS) == COUNTS
    assert totals["interactions"].tolist() == [0, 5, 4, 3, 0, 0, 0, 0, 0, 0]
    assert totals["counts"].tolist() == [0, 2, 2, 2, 0, 0, 0, 0, 0, 0]  # training targets


def test_cuts_as_days_iso_and_epoch_resolve_alike(tmp_path) -> None:
    uri = write_prepared(tmp_path / "prep")
    days = DataSection(split="temporal", valid_days=10, test_days=10)  # newest: day 30
    iso = DataSection(split="temporal", valid_start="2020-01-11", test_start=T0 + 20 * DAY)
    zoned = DataSection(split="temporal", valid_start="2020-01-11T02:00:00+02:00", test_days=10)
    for data in (days, iso, zoned):
        assert resolve_protocol(data, uri) == CUTS
    # the span prepare records in meta.json (no scan of the timestamps): the same cuts
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    meta["time_range"] = {"min": T0 + DAY, "max": T0 + 30 * DAY + 0.5}
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta))
    assert resolve_protocol(days, uri) == CUTS
    assert resolve_protocol(DataSection(), uri) == LOO
    # YAML reads an unquoted date as a date: taken as midnight UTC, kept as ISO text
    cfg = load_config(None, ["data.split=temporal", "data.valid_start=2020-01-11",
                             "data.test_start=2020-01-21T00:00:00Z"])  # fmt: skip
    assert cfg.data.valid_start == "2020-01-11" and resolve_protocol(cfg.data, uri) == CUTS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.split=temporal", "data.test_days=3"], "exactly one of data.valid_start and"),
        (["data.valid_days=3"], "data.valid_days is set but data.split is loo"),
        (["data.split=temporal", "data.valid_start=yesterday", "data.test_days=1"], "ISO-8601"),
        (["data.split=temporal", "data.valid_days=0", "data.test_days=1"], "must be > 0"),
        (["data.split=temporal", "data.valid_start=20", "data.test_start=10"], "before"),
        (["data.split=weekly"], "data.split: 'weekly' is not one of loo, temporal"),
        (["data.split=temporal", "data.format=seqtxt", "data.valid_days=1", "data.test_days=1"],
         "data.format seqtxt has positions only"),
    ],
)  # fmt: skip
def test_bad_protocol_keys_are_refused_naming_them(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_cuts_outside_the_data_and_seqtxt_data_are_refused(tmp_path, capsys) -> None:
    uri = write_prepared(tmp_path / "prep")
    late = DataSection(split="temporal", valid_days=1, test_start="2021-01-01")
    with pytest.raises(DataError, match="after the newest interaction: nothing to test on"):
        resolve_protocol(late, uri)
    # milliseconds given for a log in seconds: the cut lies after the data
    ms = DataSection(split="temporal", valid_start=(T0 + 10 * DAY) * 1000, test_days=5)
    with pytest.raises(DataError, match="not before the test window"):
        resolve_protocol(ms, uri)
    early = DataSection(split="temporal", valid_start=T0, test_days=5)
    with pytest.raises(DataError, match="nothing to train on"):
        resolve_protocol(early, uri)
    seqtxt = write_prepared(tmp_path / "seqtxt", fmt="seqtxt")
    cuts = ["data.split=temporal", "data.valid_days=10", "data.test_days=10"]
    args = ["evaluate", "--baseline", "popularity", "--data", seqtxt]
    assert main(args + [x for cut in cuts for x in ("--set", cut)]) == 1
    assert "prepared from seqtxt input, whose times are positions" in capsys.readouterr().err


def test_candidates_leave_cold_items_out_of_the_ranking() -> None:
    """``chunked_ranks`` with a candidate mask equals the full matrix with the other columns
    at -inf, in every chunk size."""
    gen = torch.Generator().manual_seed(0)
    query, weights = torch.randn(7, 4, generator=gen), torch.randn(12, 4, generator=gen)
    target = torch.tensor([1, 3, 5, 7, 9, 11, 2])
    candidates = torch.rand(12, generator=gen) < 0.6
    candidates[0], candidates[target] = False, True
    scores = query @ weights.T
    scores[:, ~candidates] = -math.inf
    want = (scores > scores.gather(1, target[:, None])).sum(1) + 1
    for chunk in (1, 5, 12):
        ranks, _ = chunked_ranks(query, weights, None, target, item_chunk=chunk,
                                 candidates=candidates)  # fmt: skip
        assert ranks.tolist() == want.tolist()


def test_popularity_baseline_by_hand_through_the_cli(tmp_path, capsys) -> None:
    """Counts before day 10: 1 -> 5, 2 -> 4, 3 -> 3 (the candidates); ties go to the target.
    valid: u1 4, u2 7, u7 6 cold (misses); u8 target 3 rank 3 (1 and 2 beat it), masked
    (history {1}) rank 2. test: u2 8 and u6 4 cold; u1 target 2 rank 2 (masked, 1 being in
    its history: 1), u3 target 1 rank 1."""
    uri = write_prepared(tmp_path / "prep")
    cuts = [
        "data.split=temporal",
        "data.valid_start=2020-01-11",
        f"data.test_start={T0 + 20 * DAY}",
    ]
    args = ["evaluate", "--baseline", "popularity", "--data", uri]
    args += [x for cut in cuts for x in ("--set", cut)]
    protocol = resolve_protocol(load_config(None, cuts).data, uri)
    out = evaluate_popularity(uri, 3, topk=[1, 2, 3, 10], protocol=protocol)
    valid, test = out["valid"], out["test"]
    assert out["protocol"] == {"split": "temporal", "valid_start": T0 + 10 * DAY,
                               "test_start": T0 + 20 * DAY,
                               **{k: v for k, v in COUNTS.items() if k != "n_train"}}  # fmt: skip
    assert (out["n_valid"], out["n_test"]) == (4, 4)
    assert valid["hr@1"] == 0 and valid["hr@3"] == 0.25 and valid["mrr@10"] == 1 / 12
    assert valid["warm_hr@3"] == 1 and valid["warm_hr@2"] == 0
    assert valid["warm_ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert valid["masked_mrr@10"] == 1 / 8 and valid["warm_masked_mrr@10"] == 0.5
    assert test["hr@1"] == 0.25 and test["warm_hr@1"] == 0.5 and test["hr@2"] == 0.5
    assert test["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 4)
    assert test["masked_hr@1"] == 0.5 and test["warm_masked_ndcg@10"] == 1
    # the command line: the same numbers (its K: 5, 10, 20), the protocol's counts
    assert main([*args, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["protocol"] == out["protocol"]
    for split in ("valid", "test"):
        tens = {k: v for k, v in out[split].items() if k.endswith("@10")}
        assert {k: cli[split][k] for k in tens} == tens
    # the table, its warm rows and the protocol line
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "valid warm" in printed and "protocol: temporal" in printed
    assert "cold targets (misses; warm rows score them apart): 3 / 2" in printed
    # leave-one-out counts every target as a candidate's rank: other numbers, no warm keys
    assert main(["evaluate", "--baseline", "popularity", "--data", uri, "--json"]) == 0
    loo = json.loads(capsys.readouterr().out)
    assert loo["protocol"]["split"] == "loo" and "warm_hr@1" not in loo["valid"]
    assert main([*args, "--set", "train.lr=0.1"]) == 2  # a key a baseline would ignore


# ------------------------------------------------------------------- through Ray (slow tests)


@pytest.mark.slow
def test_examples_and_training_cut_through_ray(ray_session, tmp_path) -> None:
    """The counting job and the epoch job: the counts by hand, a cache apart from LOO's, and no
    training example at or after valid_start (partners too)."""
    from fearec_dist.data.epochs import EpochSource, epoch_dataset

    uri = write_prepared(tmp_path / "prep")
    info = build_examples(uri, 3, protocol=CUTS)
    assert {k: getattr(info, k) for k in COUNTS} == COUNTS
    assert info.uri.endswith(f"-temporal-{T0 + 10 * DAY}-{T0 + 20 * DAY}")
    loo = build_examples(uri, 3)
    assert loo.uri != info.uri and loo.n_train == 10 and loo.protocol == LOO
    assert build_examples(uri, 3, protocol=CUTS) == info  # the cache, found again

    times = {(u, p): T0 + d * DAY for u, s in HAND.items() for p, (_, d) in enumerate(s)}
    source = EpochSource(uri, 3, seed=0, pair=True, n_examples=info.n_train, block_rows=2,
                         partner_ids=True, protocol=CUTS)  # fmt: skip
    rows = epoch_dataset(source, 0).to_pandas()
    assert len(rows) == info.n_train
    for user, pos, pos_user, pos_pos in rows[["user", "pos", "pos_user", "pos_pos"]].values:
        assert times[(user, pos)] < CUTS.valid_start
        assert times[(pos_user, pos_pos)] < CUTS.valid_start
    assert sorted(zip(rows["user"], rows["pos"])) == [(1, 1), (1, 2), (2, 1), (4, 1), (6, 1),
                                                      (6, 2)]  # fmt: skip


def random_log(n_users: int = 120, seed: int = 11) -> dict[int, list[tuple[int, float]]]:
    """Users of 10-40 interactions, one a day from T0 (each at its own hour): items 1-40
    Zipf-popular from the start, items 41-45 only from day 20 on (cold after a day-20 cut)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, 41) ** 0.8
    log = {}
    for user in range(1, n_users + 1):
        n = int(rng.integers(10, 41))
        items = rng.choice(np.arange(1, 41), n, p=popularity / popularity.sum())
        late = (np.arange(n) >= 20) & (rng.random(n) < 0.3)
        items[late] = rng.integers(41, 46, late.sum())
        log[user] = [(int(i), d + rng.random()) for d, i in enumerate(items)]
    return log


@pytest.mark.slow
def test_two_worker_temporal_run_equals_one_process_re_evaluation(ray_session, tmp_path) -> None:
    from fearec_dist.train.evaluate import evaluate_checkpoint
    from fearec_dist.train.trainer import run_training

    uri = write_prepared(tmp_path / "prep", random_log(), n_items=45)
    overrides = [f"data.path={uri}", "data.max_seq_len=10",
                 "data.split=temporal", "data.valid_start=2020-01-21", "data.test_start=2020-01-31",
                 "model.name=sasrec", "train.epochs=1", "train.batch_size=32",
                 "train.eval_batch_size=16", "train.eval_item_chunk=7", "run.workers=2",
                 "run.cpus_per_worker=0.5", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=temporal"]  # fmt: skip
    results = run_training(load_config(None, overrides), mode="local")
    protocol = results["protocol"]
    assert protocol["split"] == "temporal" and protocol["valid_start"] == T0 + 20 * DAY
    assert protocol["cold_valid"] > 0 and protocol["cold_test"] > 0
    assert protocol["no_history_valid"] == protocol["no_history_test"] == 0
    with open(tmp_path / "runs" / "temporal" / "results.json") as f:
        assert json.load(f)["protocol"] == protocol
    valid = results["valid"]
    assert valid["hr@10"] < valid["warm_hr@10"]  # cold targets are misses, warm ones score
    again = evaluate_checkpoint(str(tmp_path / "runs" / "temporal"))
    assert again["protocol"] == protocol
    assert (again["n_valid"], again["n_test"]) == (protocol["n_valid"], protocol["n_test"])
    for split in ("valid", "test"):
        assert set(again[split]) == set(results[split])
        for key, value in results[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-9), (split, key)
