"""``fearec-dist daily`` end to end on moto's S3, with a partitioned Parquet log (``dt=…``
partitions of ``data/synthetic.generate_daily_log``) that grows by a day at a time:

- day 1 prepares the dataset, trains cold with a tiny budget and is promoted (no current model);
- day 2 appends a day, starts warm from day 1's run, trains with a real budget and beats it;
- day 3 appends a day, fine-tunes on its last day only (``daily.train_days``) and cannot reach
  ``daily.min_gain`` (100 = +10,000 %): rejected;
- the same day again is a no-op (exit 0); a corrupt partition fails the day (exit 1);

with the pointer, its history and the decisions checked after each, every run traced to its
dataset version, and the scores of both exports checked against the run's own evaluation.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from fearec_dist.cli import main
from fearec_dist.config import load_config
from fearec_dist.data.examples import examples_table, iter_eval_rows
from fearec_dist.data.synthetic import DAY, generate_daily_log, write_daily_log
from fearec_dist.data.temporal import SplitProtocol
from fearec_dist.data.versions import list_versions, resolve_version
from fearec_dist.pipeline.compare import ExportScorer, score_export
from fearec_dist.pipeline.daily import run_daily
from fearec_dist.pipeline.pointer import list_decisions, read_state
from fearec_dist.serve.artifact import load_export
from fearec_dist.serve.export import read_item_vocab
from fearec_dist.storage import list_children, read_json, write_bytes

pytestmark = pytest.mark.slow
START = 1_793_491_200  # 2026-11-01T00:00:00Z
BUCKET = "daily-e2e"
BASE = {
    "data": {"format": "prepared", "path": f"s3://{BUCKET}/prepared", "max_seq_len": 20,
             "split": "temporal", "valid_days": 1, "test_days": 1},
    "model": {"name": "sasrec", "hidden_size": 32, "n_layers": 1, "n_heads": 2, "inner_size": 64},
    "train": {"batch_size": 64, "lr": 5e-3, "seed": 7},
    "run": {"storage_path": f"s3://{BUCKET}/runs", "workers": 1, "cpus_per_worker": 0.5,
            "progress_every_s": 0},
    "daily": {"name": "shop"},
}  # fmt: skip
# day 1: a tiny budget (one epoch, lr 1e-5: about a random model); day 2: a real one
DAYS = {
    1: ["train.epochs=1", "train.lr=1e-5"],
    2: ["daily.warm_epochs=2"],
    3: [
        "daily.warm_epochs=1",
        "daily.train_days=1",
        "daily.min_gain=100",
        "daily.warm_optimizer=false",
    ],
}
LOG = f"s3://{BUCKET}/log"
POINTER = f"s3://{BUCKET}/runs/pipelines/shop"


def _tables() -> list[pa.Table]:
    return generate_daily_log(150, 60, 9, start=START, active=0.9, steps=(2, 4),
                              rewire=0.02, new_items=0.1, seed=5)  # fmt: skip


def _add_day(tables: list[pa.Table], day: int) -> None:
    """Writes day ``day`` (1-based) as its dt= partition."""
    write_daily_log(LOG, [tables[day - 1]], start=START + (day - 1) * DAY)


@pytest.fixture(scope="module")
def days(ray_session, s3_server, tmp_path_factory):
    """Days 1-3 through ``run_daily`` (local mode on the session's Ray); their decisions and the
    pointer read after each."""
    s3_server.create_bucket(BUCKET)
    tables = _tables()
    for day in range(1, 7):  # the history before the first daily job
        _add_day(tables, day)
    config = tmp_path_factory.mktemp("daily") / "daily.yaml"
    config.write_text(yaml.safe_dump(BASE))
    out = {"config": config, "tables": tables}
    for n, (day, overrides) in enumerate(DAYS.items()):
        if n:
            _add_day(tables, 6 + n)
        record = run_daily(load_config(config, overrides), LOG, "parquet", mode="local")
        out[day] = (record, read_json(f"{POINTER}/current.json"))
    return out


def _results(record: dict) -> dict:
    return read_json(f"{record['run']}/results.json")


def _lineage(version: int) -> dict:
    return {"uri": f"s3://{BUCKET}/prepared", "version": version}


def test_day_1_cold_and_promoted(days):
    record, pointer = days[1]
    assert record["decision"] == "promoted" and record["current"] is None
    assert record["reason"].startswith("no current model")
    assert record["warm_start"] is None and record["generation"] == 1
    assert record["data"] == _lineage(1) and record["appended"] is True
    # the pointer names this run's export, its data version and its test scores
    assert pointer["run"] == record["run"] and pointer["export"] == f"{record['run']}/export"
    assert pointer["data"] == _lineage(1) and pointer["generation"] == 1
    assert pointer["test"]["hr@10"] == record["new"]["test"]["hr@10"]
    assert read_json(f"{POINTER}/history/1.json") == pointer
    results = _results(record)
    assert {k: results["data"][k] for k in ("uri", "version")} == _lineage(1)
    assert results["daily"]["decision"] == "promoted"
    assert read_json(f"{pointer['export']}/manifest.json")["data"] == _lineage(1)


def test_day_2_warm_better_and_promoted(days):
    (first, _), (record, pointer) = days[1], days[2]
    assert record["data"] == _lineage(2) and record["warm_start"] == first["run"]
    results = _results(record)
    assert results["config"]["train"]["warm_start"] == first["run"]
    lineage = results["warm_start"]  # the start's source and its data version, in the run
    assert lineage["source_run"] == first["run"] and lineage["data"] == _lineage(1)
    assert record["new"]["warm_start"] == lineage
    assert lineage["optimizer"] is True  # daily.warm_optimizer: Adam's moments carried too
    assert results["config"]["train"]["epochs"] == 2  # daily.warm_epochs on a warm day
    new, current = record["new"]["test"], record["current"]["test"]
    assert record["decision"] == "promoted", record["reason"]
    assert new["hr@10"] > current["hr@10"] + 0.2, record["reason"]
    assert new["n_users"] == current["n_users"] > 50  # the same test rows for both
    assert record["current"]["run"] == first["run"] and record["current"]["generation"] == 1
    assert pointer["generation"] == 2 and pointer["previous"] == 1
    assert pointer["run"] == record["run"] and pointer["data"] == _lineage(2)
    assert results["daily"]["new"]["test"]["hr@10"] == new["hr@10"]


def test_new_model_scores_equal_its_runs_own_test_metrics(days):
    """The export path and the run's evaluation are one code path: equal numbers."""
    for day in (1, 2, 3):
        record = days[day][0]
        scored, run = record["new"]["test"], _results(record)["test"]
        for key in ("hr@10", "ndcg@10", "mrr@10", "masked_hr@10", "hr@20"):
            assert scored[key] == pytest.approx(run[key], abs=1e-9), (day, key)
        assert scored["unknown"]["unknown_targets"] == 0  # it knows every item of its version


def test_day_3_rejected_pointer_unchanged(days):
    (_, before), (record, pointer) = days[2], days[3]
    assert record["decision"] == "rejected" and record["generation"] == 2
    assert record["data"] == _lineage(3)
    # daily.train_days: only the last day's targets before the validation window
    since = _results(record)["config"]["data"]["train_since"]
    assert _results(record)["warm_start"]["optimizer"] is False  # daily.warm_optimizer=false
    assert since == record["protocol"]["valid_start"] - DAY
    assert record["current"]["test"]["hr@10"] > 0.01  # so no hr@10 <= 1 can be 101x it
    assert "relative gain >= 10000.00%" in record["reason"]
    assert pointer == before  # current.json is unchanged
    assert list_children(f"{POINTER}/history") == ["1.json", "2.json"]
    assert _results(record)["daily"]["decision"] == "rejected"
    decisions = [d["decision"] for d in list_decisions(POINTER)]
    assert decisions == ["promoted", "promoted", "rejected"]


def test_noop_rerun_and_failing_day(days, s3_server, capsys):
    argv = ["daily", "--config", str(days["config"]), "--input", LOG, "--local",
            "--set", "train.epochs=1"]  # fmt: skip
    before = read_json(f"{POINTER}/current.json")
    runs = set(list_children(f"s3://{BUCKET}/runs"))
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do: no new data, and dataset version 3 was already decided (rejected" in out
    noop = json.loads(out.strip().splitlines()[-1])  # --json: the record, one line
    assert noop["decision"] == "noop" and noop["generation"] == 2 and noop["appended"] is False
    assert set(list_children(f"s3://{BUCKET}/runs")) == runs  # no run trained
    assert [v.version for v in list_versions(f"s3://{BUCKET}/prepared")] == [1, 2, 3]

    # a corrupt partition: the day fails at the append, non-zero, the pointer unchanged
    write_bytes(f"{LOG}/dt=2026-11-10/part-00000.parquet", b"PAR1 not parquet at all")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "failed at step append" in err and "pointer is unchanged (generation 2" in err
    assert read_json(f"{POINTER}/current.json") == before
    assert [v.version for v in list_versions(f"s3://{BUCKET}/prepared")] == [1, 2, 3]
    assert set(list_children(f"s3://{BUCKET}/runs")) == runs
    failed = list_decisions(POINTER)[-1]
    assert failed["decision"] == "failed" and failed["step"] == "append"
    assert read_state(POINTER).generation == 2


def test_scoring_an_export_that_misses_items(days):
    """Day 1's export on version 3's rows, cut later than its own data: history items it does
    not know are dropped from its input, unknown targets and rows with nothing known are
    misses."""
    first = days[1][0]
    export = load_export(f"{first['run']}/export")
    v3 = resolve_version(f"s3://{BUCKET}/prepared", 3).uri
    meta = read_json(f"{v3}/meta.json")
    raw = read_item_vocab(v3, meta["n_items"], None)
    scorer = ExportScorer.build(export, raw)
    unknown = np.flatnonzero(~scorer.known[1:]) + 1  # dataset ids day 1 never saw
    assert len(unknown) > 0
    hi = meta["time_range"]["max"]
    protocol = SplitProtocol("temporal", hi - DAY, hi - DAY // 2)
    scores = score_export(f"{first['run']}/export", v3, protocol, load_config().train, None)
    counts = scores["unknown"]
    assert counts["dropped_history"] > 0 and counts["rows"] == scores["n_users"]
    assert scores["hr@20"] <= 1 - counts["unknown_targets"] / counts["rows"] + 1e-9

    # the query of a row = the encoder on its last L known items, translated by raw id
    table = next(iter_eval_rows(v3, 20, "test", 64, protocol=protocol))
    batch = next(scorer.batches([table]))
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    query = scorer.encode(torch.nn.Module(), tensors)
    ids_of = dict(zip(export.raw_ids.to_pylist(), range(1, export.n_items + 1), strict=True))
    for row in range(min(8, len(batch["target"]))):
        seen = batch["seen_items"][batch["seen_rows"] == row]
        known = [ids_of[raw[i - 1]] for i in seen if raw[i - 1] in ids_of][-20:]
        item_seq = torch.zeros(1, export.max_seq_len, dtype=torch.long)
        item_seq[0, : len(known)] = torch.tensor(known)
        want = export.encoder(item_seq, torch.tensor([len(known)]))
        assert torch.allclose(query[row], want[0], atol=1e-6), row

    # a row whose whole history is unknown to the export: target 0 (never a candidate)
    rows = {"history": np.array([[unknown[0]] + [0] * 19]), "length": np.array([1]),
            "target": np.array([1]), "user": np.array([1]), "position": np.array([1]),
            "seen_offsets": np.array([0, 1]), "seen_items": np.array([unknown[0]])}  # fmt: skip
    lone = next(scorer.batches([examples_table(rows)]))
    assert lone["target"].tolist() == [0]


def test_results_and_pointer_carry_lineage_in_json(days):
    """Every decision file is JSON on S3 with the data version its run trained on."""
    for record in list_decisions(POINTER):
        if record["decision"] != "failed":
            assert record["new"]["data"] == record["data"], record["file"]
            results = _results(record)
            assert results["data"]["version"] == record["data"]["version"], record["file"]
            manifest = read_json(f"{record['new']['export']}/manifest.json")
            assert manifest["data"] == record["data"], record["file"]
    json.dumps(read_json(f"{POINTER}/current.json"))
