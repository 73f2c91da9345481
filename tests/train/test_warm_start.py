"""Warm starts (train/warm_start.py) and ``data.train_since`` (data/since.py).

Ray-free: every model warm-started from a source whose raw-id -> id mapping is NOT the identity
(vocabularies built by hand: the match must go through raw ids), the rows of shared items copied,
new ones fresh, everything else the source's, the source's scores reproduced; BERT4Rec's mask
row and bias; S3Rec's attribute table; the optimizer's per-row state (Adam, SparseAdam, and the
conversion between them); the source read from a checkpoint and from an export on disk; the
refusals, each naming both sides; ``train_since``'s exact rows and counts on a hand-made log.
One real run on 2 workers, warm-started from a previous run's directory on an appended version.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fearec_dist.config import ConfigError, load_config
from fearec_dist.data.epochs import TrainRows
from fearec_dist.data.examples import ExamplesInfo, count_examples, count_summary, examples_uri
from fearec_dist.data.sequences import sequences_to_csr
from fearec_dist.data.temporal import (
    LOO,
    SplitProtocol,
    build_split_examples,
    protocol_record,
    resolve_protocol,
)
from fearec_dist.errors import DataError
from fearec_dist.models import build_model, get_spec
from fearec_dist.serve.export import write_export
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.build import build_optimizer, build_train_state, check_warm_start
from fearec_dist.train.progress import Progress
from fearec_dist.train.warm_source import WarmSource, read_source
from fearec_dist.train.warm_start import (
    WarmStart,
    carry_optimizer,
    match_rows,
    warm_state_dict,
)

MODELS = ("sasrec", "fearec", "bert4rec", "lightsans", "s3rec")
SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1}
L = 6
# the source's items and this run's: shared items at other ids, two new ones, one gone
SRC_RAW = ["a", "b", "c", "d", "e", "f", "z"]
DST_RAW = ["c", "a", "x", "b", "f", "y", "e", "d"]
SHARED = ["a", "b", "c", "d", "e", "f"]
NEW = ["x", "y"]
SRC_ATTR, DST_ATTR = ["p", "q", "r"], ["r", "p", "s", "q"]  # S3Rec: attribute tokens
SRC_ATTR_TABLE = torch.tensor([[0, 0], [1, 2], [2, 0], [3, 0], [1, 3], [2, 0], [3, 1], [1, 0]])
DST_ATTR_TABLE = torch.tensor([[0, 0], [1, 0], [2, 4], [3, 0], [4, 0], [1, 0], [2, 0], [4, 1],
                               [3, 0]])  # fmt: skip


def sid(raw: str) -> int:
    return SRC_RAW.index(raw) + 1


def did(raw: str) -> int:
    return DST_RAW.index(raw) + 1


def make(name: str, raw: list[str], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {}
    if name == "s3rec":
        kw["item_attributes"] = SRC_ATTR_TABLE if raw is SRC_RAW else DST_ATTR_TABLE
    model = build_model(name, n_items=len(raw), max_seq_len=L, **SMALL, **kw)
    if name == "bert4rec" and raw is SRC_RAW:  # its bias starts at zeros: tell them apart
        with torch.no_grad():
            model.output_bias.normal_()
    return model


def source_of(model: torch.nn.Module, name: str, **fields) -> WarmSource:
    return WarmSource(
        path="/runs/src/checkpoint_000001",
        kind="checkpoint",
        run="/runs/src",
        model=name,
        model_params=dict(SMALL),
        max_seq_len=L,
        data={"uri": "/data/ds", "version": 1},
        weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        item_raw=SRC_RAW,
        attr_raw=pa.array(SRC_ATTR) if name == "s3rec" else None,
        **fields,
    )


def warm_for(source: WarmSource, attrs: bool) -> WarmStart:
    return WarmStart(
        source,
        match_rows(source.item_raw, DST_RAW),
        match_rows(SRC_ATTR, DST_ATTR) if attrs else None,
    )


@pytest.mark.parametrize("name", MODELS)
def test_rows_by_raw_id_for_every_model(name: str) -> None:
    src, dst = make(name, SRC_RAW, seed=1), make(name, DST_RAW, seed=2)
    fresh = copy.deepcopy(dst.state_dict())
    warm = warm_for(source_of(src, name), attrs=name == "s3rec")
    assert warm.record(False)["items_copied"] == 6 and warm.items.added == 2
    dst.load_state_dict(warm_state_dict(dst, warm))
    s_emb, d_emb = src.item_embedding.weight, dst.item_embedding.weight
    for raw in SHARED:
        assert torch.equal(d_emb[did(raw)], s_emb[sid(raw)]), raw
    for raw in NEW:  # fresh, as a cold start's, and no source row
        assert torch.equal(d_emb[did(raw)], fresh["item_embedding.weight"][did(raw)])
        assert not any(torch.equal(d_emb[did(raw)], row) for row in s_emb)
    assert torch.equal(d_emb[0], s_emb[0])  # padding: shapes FEARec's and LightSANs' output
    if name in ("bert4rec", "s3rec"):  # the [MASK] row, after the items on both sides
        assert d_emb.shape[0] == len(DST_RAW) + 2 and torch.equal(d_emb[-1], s_emb[-1])
    if name == "bert4rec":
        for raw in SHARED:
            assert dst.output_bias[did(raw)] == src.output_bias[sid(raw)]
        assert all(dst.output_bias[did(raw)] == 0 for raw in NEW)  # fresh: zeros
    if name == "s3rec":  # attribute rows by raw token (row = id - 1); "s" is new
        s_att, d_att = src.feature_embedding.weight, dst.feature_embedding.weight
        for token in SRC_ATTR:
            assert torch.equal(d_att[DST_ATTR.index(token)], s_att[SRC_ATTR.index(token)])
        new_row = DST_ATTR.index("s")
        assert torch.equal(d_att[new_row], fresh["feature_embedding.weight"][new_row])
    tables = {"item_embedding.weight", "output_bias", "feature_embedding.weight"}
    for key, value in dst.state_dict().items():
        if key not in tables:
            assert torch.equal(value, src.state_dict()[key]), key
    # the warm model scores a history of shared items as the source did
    spec, hist = get_spec(name), ["c", "a", "e", "b"]
    batch = lambda ids: {"item_seq": torch.tensor([ids + [0] * (L - len(ids))]),  # noqa: E731
                         "seq_len": torch.tensor([len(ids)])}  # fmt: skip
    with torch.no_grad():
        want = spec.full_scores(src.eval(), batch([sid(r) for r in hist]))
        got = spec.full_scores(dst.eval(), batch([did(r) for r in hist]))
    shared_src, shared_dst = [sid(r) for r in SHARED], [did(r) for r in SHARED]
    torch.testing.assert_close(got[0, shared_dst], want[0, shared_src], atol=1e-5, rtol=0)


def train_steps(model: torch.nn.Module, optimizer, sparse: bool, steps: int = 3) -> None:
    """A few real steps: every parameter gets a gradient (the table a row-sparse one)."""
    ids = torch.tensor([1, 2, 3, 2, len(model.item_embedding.weight) - 2])
    for _ in range(steps):
        optimizer.zero_grad()
        rows = torch.nn.functional.embedding(ids, model.item_embedding.weight, sparse=sparse)
        loss = rows.pow(2).sum() + sum(
            p.pow(2).sum() for n, p in model.named_parameters() if n != "item_embedding.weight"
        )
        loss.backward()
        optimizer.step()


def moments(optimizer, param: torch.nn.Parameter) -> dict:
    inner = [optimizer] if not hasattr(optimizer, "dense") else [optimizer.dense, optimizer.sparse]
    for opt in inner:
        if param in opt.state:
            return opt.state[param]
    raise KeyError("no state")


@pytest.mark.parametrize(
    ("name", "src_sparse", "dst_sparse", "src_decay"),
    [
        ("sasrec", False, False, 0.0),
        ("sasrec", True, True, 0.0),
        ("bert4rec", False, True, 0.1),
        ("sasrec", True, False, 0.0),
    ],  # fmt: skip
)
def test_optimizer_state_carried_by_raw_id(name, src_sparse, dst_sparse, src_decay) -> None:
    """Adam's and SparseAdam's per-row moments follow the rows; a source trained with the other
    sparse_item_updates (or with AdamW's two groups) is converted; then a step runs."""
    src, dst = make(name, SRC_RAW, seed=1), make(name, DST_RAW, seed=2)
    src_opt = build_optimizer(src, 1e-2, 0.0 if src_sparse else src_decay, src_sparse)
    train_steps(src, src_opt, src_sparse)
    source = source_of(src, name, optimizer=src_opt.state_dict(), weight_decay=src_decay)
    warm = warm_for(source, attrs=False)
    dst.load_state_dict(warm_state_dict(dst, warm))
    dst_opt = build_optimizer(dst, 1e-2, 0.0, dst_sparse)
    carry_optimizer(warm, dst, dst_opt, 0.0, dst_sparse)
    table_src, table_dst = src.item_embedding.weight, dst.item_embedding.weight
    got, want = moments(dst_opt, table_dst), moments(src_opt, table_src)
    assert int(got["step"]) == int(want["step"]) == 3
    assert want["exp_avg"][sid("b")].abs().sum() > 0  # b was trained: a real moment
    for key in ("exp_avg", "exp_avg_sq"):
        for raw in SHARED:
            assert torch.equal(got[key][did(raw)], want[key][sid(raw)]), (key, raw)
        for raw in NEW:
            assert not got[key][did(raw)].any(), (key, raw)
        assert torch.equal(got[key][-1], want[key][-1])  # the row after the items
    if name == "bert4rec":  # the bias's moments by raw id too
        got_b, want_b = moments(dst_opt, dst.output_bias), moments(src_opt, src.output_bias)
        assert got_b["exp_avg"][did("c")] == want_b["exp_avg"][sid("c")] != 0
    layer = "LayerNorm.weight"  # a parameter copied whole: its state too
    got_l = moments(dst_opt, dict(dst.named_parameters())[layer])
    want_l = moments(src_opt, dict(src.named_parameters())[layer])
    assert torch.equal(got_l["exp_avg_sq"], want_l["exp_avg_sq"])
    train_steps(dst, dst_opt, dst_sparse, steps=1)  # the carried state is usable
    assert int(moments(dst_opt, table_dst)["step"]) == 4


# ---------------------------------------------------------------- sources on disk, refusals


def write_version(root: Path, n: int, raw: list[str], attrs: list[str] | None = None,
                  table: torch.Tensor | None = None) -> str:  # fmt: skip
    """A committed dataset version by hand: its item vocabulary (and attribute vocabulary and
    table), meta.json and commit."""
    vdir = root / "versions" / f"{n}-ab{n}"
    (vdir / "vocab").mkdir(parents=True)
    ids = pa.array(np.arange(1, len(raw) + 1, dtype=np.int32))
    counts = pa.array(np.ones(len(raw), dtype=np.int64))
    pq.write_table(pa.table({"id": ids, "raw": pa.array(raw), "count": counts}),
                   vdir / "vocab" / "items.parquet")  # fmt: skip
    if attrs is not None:
        aid = pa.array(np.arange(1, len(attrs) + 1, dtype=np.int32))
        pq.write_table(pa.table({"id": aid, "raw": pa.array(attrs)}),
                       vdir / "vocab" / "attributes.parquet")  # fmt: skip
        lists = [[int(a) for a in row if a] for row in table[1:]]
        items = pa.array(np.arange(1, len(raw) + 1, dtype=np.int32))
        pq.write_table(pa.table({"item": items, "attrs": pa.array(lists, pa.list_(pa.int32()))}),
                       vdir / "attributes.parquet")  # fmt: skip
    (vdir / "meta.json").write_text(json.dumps({"n_items": len(raw), "n_users": 3}))
    (root / "_commits").mkdir(exist_ok=True)
    commit = {"version": n, "dir": f"versions/{n}-ab{n}", "parent": n - 1 or None}
    (root / "_commits" / f"{n}.json").write_text(json.dumps(commit))
    return str(vdir)


def info_for(root: Path, vdir: str, version: int, n_items: int, max_seq_len: int = L):
    return ExamplesInfo(uri=f"{vdir}/examples/x", prepared_uri=vdir, max_seq_len=max_seq_len,
                        n_items=n_items, n_users=3, data_uri=str(root),
                        data_version=version)  # fmt: skip


def overrides(name: str = "sasrec", **keys) -> list[str]:
    params = SMALL | {k: v for k, v in keys.items() if not k.startswith(("train.", "data."))}
    out = [f"model.name={name}"] + [f"model.{k}={v}" for k, v in params.items()]
    return out + [f"{k}={v}" for k, v in keys.items() if k.startswith(("train.", "data."))]


def write_run(tmp_path: Path, name: str = "sasrec"):
    """Dataset versions 1 (SRC_RAW) and 2 (DST_RAW) by hand, and a run directory of ``name``
    on version 1 whose checkpoint holds other best weights than its last ones."""
    root = tmp_path / "ds"
    v1 = write_version(root, 1, SRC_RAW, SRC_ATTR, SRC_ATTR_TABLE)
    v2 = write_version(root, 2, DST_RAW, DST_ATTR, DST_ATTR_TABLE)
    cfg = load_config(None, overrides(name))
    src_info = info_for(root, v1, 1, len(SRC_RAW))
    model = make(name, SRC_RAW, seed=1)
    opt = build_optimizer(model, 1e-2, 0.0)
    state = ckpt.TrainState(model, opt, Progress())
    state.keep_best()  # the best epoch: these weights
    best = copy.deepcopy(state.best_model)
    train_steps(model, opt, False)  # the last epoch moved on
    run = tmp_path / "runs" / "src"
    (run / "checkpoint_000001").mkdir(parents=True)
    ckpt.save_state(run / "checkpoint_000001", state.to_state([], cfg.to_dict(), src_info))
    return root, v2, run, best


@pytest.fixture
def checkpoint_run(tmp_path):
    return write_run(tmp_path)


def test_checkpoint_source_through_build_train_state(checkpoint_run) -> None:
    """A run directory as train.warm_start: its newest checkpoint's BEST weights, rows by raw
    id through the versions' vocabularies, the lineage record, the optimizer carried."""
    root, v2, run, best = checkpoint_run
    cfg = load_config(None, overrides(**{"train.warm_start": str(run),
                                         "train.warm_start_optimizer": "true"}))  # fmt: skip
    info = info_for(root, v2, 2, len(DST_RAW))
    assert check_warm_start(cfg, info) is not None  # the driver's check: the same refusals
    state = build_train_state(get_spec("sasrec"), cfg, info, torch.device("cpu"), fresh=True)
    emb = state.module.item_embedding.weight
    for raw in SHARED:
        assert torch.equal(emb[did(raw)], best["item_embedding.weight"][sid(raw)])
    assert state.warm_start == {
        "source": f"{run}/checkpoint_000001", "source_run": str(run), "kind": "checkpoint",
        "model": "sasrec", "data": {"uri": str(root), "version": 1}, "items_copied": 6,
        "items_added": 2, "items_dropped": 1, "attributes_copied": None, "optimizer": True,
    }  # fmt: skip
    assert int(moments(state.optimizer, emb)["step"]) == 3
    saved = state.to_state([], cfg.to_dict(), info)  # the checkpoint carries the record
    assert saved["warm_start"] == state.warm_start
    resumed = build_train_state(get_spec("sasrec"), cfg, info, torch.device("cpu"), fresh=False)
    assert resumed.warm_start is None  # a resumed run restores; it never re-warm-starts
    resumed.restore(saved, 0)
    assert resumed.warm_start == state.warm_start


def test_export_source_and_its_refusal_of_the_optimizer(checkpoint_run, tmp_path) -> None:
    root, v2, _, _ = checkpoint_run
    src = make("sasrec", SRC_RAW, seed=3).eval()
    out = str(tmp_path / "export")
    write_export(out, src, get_spec("sasrec"), "sasrec", dict(SMALL), SRC_RAW,
                 np.zeros(len(SRC_RAW) + 1, dtype=np.int64),
                 lineage={"uri": str(root), "version": 1}, say=lambda *_: None)  # fmt: skip
    source = read_source(out)
    assert (source.kind, source.data, list(source.item_raw.to_pylist())) == (
        "export", {"uri": str(root), "version": 1}, SRC_RAW)  # fmt: skip
    info = info_for(root, v2, 2, len(DST_RAW))
    cfg = load_config(None, overrides(**{"train.warm_start": out}))
    state = build_train_state(get_spec("sasrec"), cfg, info, torch.device("cpu"), fresh=True)
    for raw in SHARED:
        assert torch.equal(state.module.item_embedding.weight[did(raw)],
                           src.item_embedding.weight[sid(raw)])  # fmt: skip
    assert state.warm_start["kind"] == "export" and state.warm_start["optimizer"] is False
    cfg = load_config(None, overrides(**{"train.warm_start": out,
                                         "train.warm_start_optimizer": "true"}))  # fmt: skip
    with pytest.raises(ConfigError, match="warm_start_optimizer.*is an export"):
        check_warm_start(cfg, info)


def refusal(checkpoint_run, info=None, **keys) -> str:
    root, v2, run, _ = checkpoint_run
    name = keys.pop("name", "sasrec")
    cfg = load_config(None, overrides(name, **{"train.warm_start": str(run)}, **keys))
    info = info or info_for(root, v2, 2, len(DST_RAW))
    with pytest.raises(ConfigError) as err:
        check_warm_start(cfg, info)
    return str(err.value)


def test_refusals_name_both_sides(checkpoint_run, tmp_path) -> None:
    root, v2, run, _ = checkpoint_run
    other = tmp_path / "other"
    vo = write_version(other, 2, DST_RAW)
    msg = refusal(checkpoint_run, info_for(other, vo, 2, len(DST_RAW)))
    assert f"dataset {root} (version 1)" in msg and f"dataset {other} (version 2)" in msg
    msg = refusal(checkpoint_run, info_for(root, v2, 0, len(DST_RAW)))
    assert "version 1" in msg and "version 0" in msg
    msg = refusal(checkpoint_run, name="fearec")
    assert "'sasrec'" in msg and "'fearec'" in msg
    msg = refusal(checkpoint_run, hidden_size=32)
    assert "item_embedding.weight has shape (8, 16) in the source, (9, 32)" in msg
    assert "model.hidden_size 16 (source) vs 32 (this run)" in msg
    msg = refusal(checkpoint_run, n_layers=2)
    assert "only in this run ['trm_encoder.layer.1." in msg and "model.n_layers 1" in msg
    msg = refusal(checkpoint_run, info_for(root, v2, 2, len(DST_RAW), max_seq_len=9))
    assert "data.max_seq_len 6, this run has 9" in msg
    msg = refusal(checkpoint_run, n_heads=4)
    assert "model.n_heads 2 (source) vs 4 (this run)" in msg
    with pytest.raises(ConfigError, match="warm_start_optimizer: true needs train.warm_start"):
        load_config(None, ["train.warm_start_optimizer=true"])


def test_s3rec_from_a_checkpoint_matches_attributes_through_both_vocabularies(tmp_path):
    """S3Rec from a run directory: item and attribute rows through the two versions'
    vocabularies on disk (the attribute table of this run read as training reads it)."""
    root, v2, run, best = write_run(tmp_path, "s3rec")
    cfg = load_config(None, overrides("s3rec", **{"train.warm_start": str(run)}))
    info = info_for(root, v2, 2, len(DST_RAW))
    state = build_train_state(get_spec("s3rec"), cfg, info, torch.device("cpu"), fresh=True)
    assert torch.equal(state.module.attribute_ids, DST_ATTR_TABLE)
    src_att, att = best["feature_embedding.weight"], state.module.feature_embedding.weight
    for token in SRC_ATTR:
        assert torch.equal(att[DST_ATTR.index(token)], src_att[SRC_ATTR.index(token)]), token
    emb = state.module.item_embedding.weight
    assert torch.equal(emb[did("d")], best["item_embedding.weight"][sid("d")])
    assert torch.equal(emb[-1], best["item_embedding.weight"][-1])  # [MASK]
    assert state.warm_start["attributes_copied"] == 3


# -------------------------------------------------------------------------- data.train_since

DAY = 86_400
T0 = int(datetime(2021, 3, 1, tzinfo=UTC).timestamp())
# user -> [(item, day)]; leave-one-out trains on all but each user's last two items:
# 1: 2@2 3@5 4@6 (valid 5@8, test 1@9); 2: 3@4 (test 4@7); 3: 1@6 (valid 2@7, test 3@8); 4: 5@2
LOG = {
    1: [(1, 1), (2, 2), (3, 5), (4, 6), (5, 8), (1, 9)],
    2: [(2, 3), (3, 4), (4, 7)],
    3: [(5, 5), (1, 6), (2, 7), (3, 8)],
    4: [(4, 1), (5, 2)],
}


def log_csr():
    offsets, items = sequences_to_csr([np.array([i for i, _ in s]) for s in LOG.values()])
    times = np.array([T0 + d * DAY for s in LOG.values() for _, d in s], dtype=np.int64)
    return offsets, items, times, np.array(list(LOG), dtype=np.int32)


def write_log(root: Path) -> str:
    (root / "sequences").mkdir(parents=True)
    table = pa.table({
        "user": pa.array(list(LOG), pa.int32()),
        "items": pa.array([[i for i, _ in s] for s in LOG.values()], pa.list_(pa.int32())),
        "timestamps": pa.array([[T0 + d * DAY for _, d in s] for s in LOG.values()],
                               pa.list_(pa.int64())),
    })  # fmt: skip
    pq.write_table(table, root / "sequences" / "part-0.parquet")
    meta = {"n_users": 4, "n_items": 5, "n_interactions": 15,
            "time_range": {"min": T0 + DAY, "max": T0 + 9 * DAY},
            "sources": {"input": "hand", "format": "csv", "files": 1}}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root)


def test_train_since_keeps_targets_from_the_time_on_with_whole_histories(tmp_path) -> None:
    """From day 5 on, loo keeps 1: 3@5 4@6 and 3: 1@6; 2@2, 3@4 and 5@2 are removed (3)."""
    offsets, items, times, users = log_csr()
    full = build_split_examples(LOO, offsets, items, times, users, 3, ("train",))["train"]
    assert list(zip(full["user"], full["target"])) == [(1, 2), (1, 3), (1, 4), (2, 3), (3, 1),
                                                       (4, 5)]  # fmt: skip
    since = SplitProtocol("loo", train_since=T0 + 5 * DAY)
    out = build_split_examples(since, offsets, items, times, users, 3, ("train", "valid", "test"))
    train = out["train"]
    assert list(zip(train["user"], train["target"])) == [(1, 3), (1, 4), (3, 1)]
    assert train["history"].tolist() == [[1, 2, 0], [1, 2, 3], [5, 0, 0]]  # whole histories
    for split in ("valid", "test"):  # evaluation rows are not touched
        want = build_split_examples(LOO, offsets, items, times, users, 3, (split,))[split]
        assert np.array_equal(out[split]["target"], want["target"])
    # the counting pass (in process, 2 users a batch) and the feed's UDF agree with the cut
    uri = write_log(tmp_path / "prep")
    summary = count_summary(count_examples(uri, 5, since, batch_size=2), since)
    assert summary == {"n_train": 3, "n_valid": 2, "n_test": 3, "train_before_since": 3}
    rows = TrainRows(3, protocol=since)(pq.read_table(f"{uri}/sequences"))
    assert list(zip(rows["user"].to_pylist(), rows["target"].to_pylist())) == [
        (1, 3), (1, 4), (3, 1)]  # fmt: skip
    record = protocol_record(since, summary)
    assert record["train_since"] == T0 + 5 * DAY and record["train_before_since"] == 3
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert examples_uri(uri, meta, 3, since) != examples_uri(uri, meta, 3, LOO)  # cache key
    # temporal: training before day 7, validation [7, 8), test from 8; since day 5
    cuts = SplitProtocol("temporal", T0 + 7 * DAY, T0 + 8 * DAY, T0 + 5 * DAY)
    train = build_split_examples(cuts, offsets, items, times, users, 3, ("train",))["train"]
    assert list(zip(train["user"], train["target"])) == [(1, 3), (1, 4), (3, 1)]
    summary = count_summary(count_examples(uri, 5, cuts, batch_size=3), cuts)
    assert (summary["n_train"], summary["train_before_since"]) == (3, 3)  # 2@2 3@4 5@2 removed


def test_train_since_config_and_resolution(tmp_path) -> None:
    uri = write_log(tmp_path / "prep")
    data = load_config(None, ["data.train_since=2021-03-06"]).data
    assert resolve_protocol(data, uri) == SplitProtocol("loo", train_since=T0 + 5 * DAY)
    data = load_config(None, [f"data.train_since={T0 + 20 * DAY}"]).data
    with pytest.raises(DataError, match="train_since .* after the newest interaction"):
        resolve_protocol(data, uri)
    with pytest.raises(ConfigError, match="train_since .* must come before data.valid_start"):
        load_config(None, ["data.split=temporal", "data.valid_start=2021-03-06",
                           "data.test_days=1", "data.train_since=2021-03-07"])  # fmt: skip
    with pytest.raises(ConfigError, match="data.train_since: 'yesterday' is neither"):
        load_config(None, ["data.train_since=yesterday"])


# ------------------------------------------------------------------ a real run on 2 workers


def write_day(log: Path, day: int, table: pa.Table) -> None:
    (log / f"dt={day}").mkdir(parents=True)
    pq.write_table(table, log / f"dt={day}" / "part-0.parquet")


@pytest.mark.slow
def test_two_workers_warm_start_from_a_run_on_an_appended_version(ray_session, tmp_path):
    """Run A on version 1 (2 workers, 1 epoch); version 2 appends a day with new items; run B
    on version 2 warm-starts from A's run directory (2 workers, the optimizer carried and
    converted to sparse item updates, training targets from day 2 on): it finishes, records
    its lineage in results.json and its checkpoint, every rank started from the same weights,
    and at a tiny learning rate A's best item rows are B's rows for the same raw ids."""
    import pyarrow.compute as pc

    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.data.synthetic import generate_log
    from fearec_dist.data.versions import resolve_version
    from fearec_dist.train.trainer import run_training

    table = generate_log(90, 24, min_len=8, max_len=16, seed=5)
    cut = int(pc.approximate_median(table["timestamp"]).as_py())
    early = table.filter(pc.less(table["timestamp"], cut))
    late = table.filter(pc.greater_equal(table["timestamp"], cut))
    newest = int(pc.max(table["timestamp"]).as_py())
    times = pa.array([newest + k for k in range(1, 6)], pa.int64())
    users, items = ["u1", "u2", "u3", "u1", "u2"], ["new1", "new2", "new1", "new2", "new1"]
    fresh = pa.table({"user_id": users, "item_id": items, "timestamp": times})
    log, ds, runs = tmp_path / "log", str(tmp_path / "ds"), tmp_path / "runs"
    write_day(log, 1, early)
    prepare_dataset(str(log), "parquet", ds, progress=False)
    common = ["data.format=prepared", f"data.path={ds}", "data.max_seq_len=8",
              "model.name=sasrec", "model.hidden_size=16", "model.inner_size=32",
              "model.n_layers=1", "train.epochs=1", "train.batch_size=32",
              "train.evaluate=false", "train.torch_threads=1", "train.shuffle_window=256",
              "train.first_epoch_head=0", "run.workers=2", "run.cpus_per_worker=0.5",
              f"run.storage_path={runs}"]  # fmt: skip
    run_training(load_config(None, [*common, "run.name=src"]), mode="local")
    write_day(log, 2, pa.concat_tables([late, fresh]))
    prepare_dataset(str(log), "parquet", ds, progress=False, append=True)
    v1, v2 = (json.loads(Path(resolve_version(ds, v).uri, "meta.json").read_text())
              for v in (1, 2))  # fmt: skip
    assert v2["n_items"] >= v1["n_items"] + 2
    warm = ["run.name=warm", f"train.warm_start={runs / 'src'}", "train.warm_start_optimizer=true",
            "train.lr=1e-7", "train.softmax=sampled", "train.n_negatives=16",
            "train.sparse_item_updates=true", f"data.train_since={cut}"]  # fmt: skip
    results = run_training(load_config(None, [*common, *warm]), mode="local")
    source = ckpt.latest_checkpoint(str(runs / "src"))
    record = results["warm_start"]
    assert record["start_digest"] and record["ranks_checked"] == 2  # equal on both ranks
    assert {k: v for k, v in record.items() if k != "start_digest"} == {
        "source": source, "source_run": str(runs / "src"), "kind": "checkpoint",
        "model": "sasrec", "data": {"uri": ds, "version": 1}, "items_copied": v1["n_items"],
        "items_added": v2["n_items"] - v1["n_items"], "items_dropped": 0,
        "attributes_copied": None, "optimizer": True, "ranks_checked": 2,
    }  # fmt: skip
    assert results["data"]["version"] == 2 and results["data"]["uri"] == ds
    assert results["protocol"]["train_since"] == cut
    assert results["protocol"]["train_before_since"] > 0 and results["data"]["n_train"] > 0
    state = ckpt.load_state(ckpt.latest_checkpoint(str(runs / "warm")))
    assert state["warm_start"] == record
    start = ckpt.load_state(source)
    before = (start.get("best_model") or start["model"])["item_embedding.weight"]
    after = state["model"]["item_embedding.weight"]
    n_old = v1["n_items"]  # ids are stable: old items keep theirs (matched by raw id anyway)
    torch.testing.assert_close(after[1 : n_old + 1], before[1 : n_old + 1], atol=1e-4, rtol=0)
    assert (after[n_old + 1 :] - before[1:].mean(0)).abs().sum() > 0
