"""The promotion pointer: one winner per generation on a local disk and on moto's S3 (two days
racing, and threads), a stale ``current.json`` repaired from the history, the decisions' index;
and the daily job's config checks. No Ray."""

from __future__ import annotations

import threading

import pytest

from fearec_dist.cli import main
from fearec_dist.config import ConfigError, load_config
from fearec_dist.data.temporal import DAY, SplitProtocol
from fearec_dist.pipeline.daily import check_daily, day_config
from fearec_dist.pipeline.pointer import (
    PipelineState,
    PromotionConflict,
    list_decisions,
    promote,
    read_state,
    record_decision,
    write_current,
)
from fearec_dist.storage import list_children, read_json, resolve


def _pointer(run: str, version: int = 1) -> dict:
    return {"export": f"{run}/export", "run": run, "data": {"uri": "d", "version": version},
            "test": {"hr@10": 0.5}, "promoted_at": "2026-12-06T00:00:00Z"}  # fmt: skip


def _race(root: str) -> None:
    """Two days read generation 1, both promote: the first wins, the second fails clearly."""
    assert read_state(root).generation == 0
    promote(read_state(root), _pointer("day-1"))
    day_a, day_b = read_state(root), read_state(root)
    assert day_a.generation == day_b.generation == 1 and day_a.current["run"] == "day-1"
    won = promote(day_a, _pointer("day-a", 2))
    assert (won["generation"], won["previous"]) == (2, 1)
    with pytest.raises(PromotionConflict, match=r"generation 2 was promoted by another day "
                       r"\(run day-a\).*day-b\) was not promoted"):  # fmt: skip
        promote(day_b, _pointer("day-b", 2))
    assert read_json(f"{root}/current.json") == read_json(f"{root}/history/2.json") == won
    assert list_children(f"{root}/history") == ["1.json", "2.json"]
    assert read_state(root).current["run"] == "day-a"
    fs, path = resolve(f"{root}/current.json")  # killed between the history and the copy
    fs.delete_file(path)
    assert read_state(root, say=lambda _: None).current["run"] == "day-a"
    assert read_json(f"{root}/current.json") == won


def test_two_days_racing_on_a_local_disk(tmp_path):
    _race(str(tmp_path / "pipelines" / "p"))


def test_two_days_racing_on_s3(s3_server):
    bucket = s3_server.create_bucket("pointer-race")
    _race(f"s3://{bucket}/runs/pipelines/p")


def test_threads_racing_one_winner(tmp_path):
    root = str(tmp_path / "p")
    state = read_state(root)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def day(i: int) -> None:
        barrier.wait()
        try:
            promote(state, _pointer(f"day-{i}"))
            outcomes.append(f"won {i}")
        except PromotionConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=day, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 5, outcomes
    assert read_json(f"{root}/current.json")["run"] == f"day-{winners[0].split()[1]}"


def test_stale_or_missing_current_is_rewritten_from_the_history(tmp_path, capsys):
    root = str(tmp_path / "p")
    promote(read_state(root), _pointer("day-1"))
    promote(read_state(root), _pointer("day-2", 2))
    # a winner of generation 1 that wrote current.json last, after generation 2 was created
    write_current(f"{root}/current.json", read_json(f"{root}/history/1.json"), None)
    state = read_state(root)
    assert state.generation == 2 and state.current["run"] == "day-2"
    assert "current.json is at generation 1, the history at 2" in capsys.readouterr().out
    assert read_json(f"{root}/current.json")["run"] == "day-2"
    (tmp_path / "p" / "current.json").unlink()  # killed between the history and the copy
    assert read_state(root).generation == 2
    assert read_json(f"{root}/current.json")["generation"] == 2


def test_decisions_are_kept_and_found_by_version(tmp_path):
    root = str(tmp_path / "p")
    for version, decision in ((1, "promoted"), (2, "failed"), (2, "rejected")):
        record_decision(root, {"decision": decision, "run": f"r{version}",
                               "data": {"uri": "d", "version": version}})  # fmt: skip
    assert [d["decision"] for d in list_decisions(root)] == ["promoted", "failed", "rejected"]
    assert [d["decision"] for d in list_decisions(root, 2)] == ["failed", "rejected"]


BASE = ["data.path=s3://b/prepared", "data.split=temporal", "data.valid_days=1",
        "data.test_days=1"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["daily.promote_metric=warm_hr@10"], "warm_ metrics score a different set of rows"),
        (["daily.promote_metric=recall@10"], "not one of hr@K, ndcg@K, mrr@K"),
        (["daily.min_gain=-0.1"], "daily.min_gain: must be >= 0"),
        (["daily.name=a/b"], "daily.name"),
        (["daily.index=ivfpq"], "daily.index"),
    ],
)
def test_daily_section_refuses(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + overrides)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["daily.promote_metric=ndcg@50"], r"K=50 is not in train.topk \[5, 10, 20\]"),
        (["data.format=parquet"], "data.path must name the prepared dataset"),
        (["data.split=loo", "data.valid_days=null", "data.test_days=null"], "data.split: tem"),
        (["data.valid_days=null", "data.valid_start=2026-11-01"], "valid_days and data.test"),
        (["data.version=2"], "data.version"),
        (["train.evaluate=false"], "train.evaluate"),
        (["train.warm_start=s3://b/runs/x"], "train.warm_start: the daily job starts from"),
        (["data.train_since=2026-11-01"], "daily.train_days"),
    ],
)
def test_check_daily_refuses(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_daily(load_config(None, BASE + overrides))


def test_check_daily_accepts_a_masked_metric():
    check_daily(load_config(None, BASE + ["daily.promote_metric=masked_ndcg@20"]))


def test_a_warm_day_config():
    """A warm day: the pointer's run as warm start, daily.warm_epochs, data.train_since
    daily.train_days before the validation window; the version pinned, a run of its own."""
    cfg = load_config(None, BASE + ["daily.warm_epochs=2", "daily.train_days=3", "train.epochs=9"])
    protocol = SplitProtocol("temporal", 1_000_000, 1_086_400)
    cold = day_config(cfg, PipelineState("p", 0, None), 4, protocol)
    assert cold.train.warm_start is None and cold.train.epochs == 9
    assert cold.data.train_since is None and cold.data.version == 4
    assert cold.run.name.startswith("daily-v4-")
    state = PipelineState("p", 3, _pointer("s3://b/runs/daily-v3-x", 3))
    warm = day_config(cfg, state, 4, protocol)
    assert warm.train.warm_start == "s3://b/runs/daily-v3-x" and warm.train.epochs == 2
    assert warm.data.train_since == 1_000_000 - 3 * DAY and warm.data.version == 4
    cold = load_config(None, BASE + ["daily.warm_start=false", "daily.warm_epochs=2"])
    again = day_config(cold, state, 4, protocol)
    assert again.train.warm_start is None and again.train.epochs == cold.train.epochs


def test_help_explains_the_steps(capsys):
    with pytest.raises(SystemExit) as done:
        main(["daily", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in ("append --input", "warm-started", "export the run", "same test rows",
                  "daily.min_gain", "history/<G+1>.json", "--format"):  # fmt: skip
        assert words in text, words
