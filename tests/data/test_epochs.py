"""The streaming training feed (data/epochs.py): partners, determinism, mixing, bounded buffer."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fearec_dist.data.epochs import EpochSource, TrainRows, pair_and_scatter
from fearec_dist.data.feed import ShuffleBuffer, shard_batches, table_to_rows
from fearec_dist.data.planner import start_planner


def _sequences(n_users: int, n_items: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 12, n_users)
    items = [rng.integers(1, n_items + 1, n).astype(np.int32) for n in lens]
    return pa.table(
        {
            "user": pa.array(np.arange(1, n_users + 1, dtype=np.int32)),
            "items": pa.array(items, type=pa.list_(pa.int32())),
        }
    )


def _examples(n_users: int = 60, n_items: int = 12, seed: int = 0) -> pa.Table:
    return TrainRows(8)(_sequences(n_users, n_items, seed))


def test_train_rows_are_the_leave_one_out_training_examples() -> None:
    seqs = _sequences(5, 9, 1)
    rows = table_to_rows(TrainRows(4)(seqs))
    for user, items in zip(seqs["user"].to_pylist(), seqs["items"].to_pylist()):
        mine = np.flatnonzero(rows["user"] == user)
        # targets items[1..n-3]: the last two are valid/test (spec evaluation.md §1); with 3
        # items 1 train + 1 test, with 2 items train only
        s = len(items) - 1
        last_train = s - 2 if s >= 3 else 1 if s >= 1 else 0
        assert sorted(rows["pos"][mine].tolist()) == list(range(1, last_train + 1))
        for i in mine:
            t = int(rows["pos"][i])
            assert rows["target"][i] == items[t]
            hist = items[max(0, t - 4) : t]
            assert rows["history"][i][: len(hist)].tolist() == hist
            assert rows["length"][i] == len(hist) and not rows["history"][i][len(hist) :].any()


def _paired(table: pa.Table, epoch: int, block_rows: int = 50) -> dict[str, np.ndarray]:
    chunks = [table_to_rows(t) for t in pair_and_scatter(table, 3, epoch, True, block_rows, True)]
    assert all(len(c["target"]) <= block_rows for c in chunks)
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_partner_has_the_same_target_and_is_another_member_unless_alone() -> None:
    table = _examples()
    out = _paired(table, 0)
    assert len(out["target"]) == table.num_rows
    key = {(u, p): i for i, (u, p) in enumerate(zip(out["user"], out["pos"]))}
    sizes = Counter(out["target"].tolist())
    for i in range(len(out["target"])):
        j = key[(out["pos_user"][i], out["pos_pos"][i])]
        assert out["target"][j] == out["target"][i]
        assert (j == i) == (sizes[int(out["target"][i])] == 1)
        assert (out["pos_history"][i] == out["history"][j]).all()
        assert out["pos_length"][i] == out["length"][j]


def test_output_depends_on_content_not_row_order() -> None:
    table = _examples()
    shuffled = table.take(np.random.default_rng(5).permutation(table.num_rows))
    a, b = _paired(table, 2), _paired(shuffled, 2)
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert not (a["pos_user"] == _paired(table, 3)["pos_user"]).all()  # re-drawn each epoch


def _chi_square_uniform(draws: dict[tuple, list], members: dict[tuple, list]) -> tuple[float, int]:
    """Pooled chi-square of each example's partners against uniform over the other members."""
    stat, dof = 0.0, 0
    for ex, seen in draws.items():
        others = [m for m in members[ex] if m != ex]
        if len(others) < 2:
            continue
        counts = Counter(seen)
        expected = len(seen) / len(others)
        stat += sum((counts.get(o, 0) - expected) ** 2 / expected for o in others)
        dof += len(others) - 1
    return stat, dof


def test_partner_distribution_is_uniform_over_epochs() -> None:
    table = _examples(n_users=40, n_items=30, seed=2)
    draws: dict[tuple, list] = defaultdict(list)
    members: dict[tuple, list] = {}
    for epoch in range(300):
        out = _paired(table, epoch)
        for u, p, pu, pp in zip(out["user"], out["pos"], out["pos_user"], out["pos_pos"]):
            draws[(int(u), int(p))].append((int(pu), int(pp)))
        if epoch == 0:
            groups = defaultdict(list)
            for u, p, t in zip(out["user"], out["pos"], out["target"]):
                groups[int(t)].append((int(u), int(p)))
            for group in groups.values():
                for ex in group:
                    members[ex] = group
    stat, dof = _chi_square_uniform(draws, members)
    assert dof > 100
    # Wilson-Hilferty: (X/k)^(1/3) is about normal; z < 3.1 is p > 1e-3 (one-sided)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5
    assert z < 3.1, (stat, dof, z)


def test_shuffle_buffer_draws_every_row_once_and_is_seeded() -> None:
    def run(seed: int) -> list[int]:
        buf, out = ShuffleBuffer(50, np.random.default_rng(seed)), []
        for lo in range(0, 400, 30):
            buf.add(
                {"target": np.arange(lo, min(lo + 30, 400)), "x": np.zeros((30, 2))[: 400 - lo]}
            )
            while buf.n >= 50:
                out += buf.draw(16)["target"].tolist()
        while buf.n >= 16:
            out += buf.draw(16)["target"].tolist()
        return out

    a = run(0)
    assert len(a) == len(set(a)) and set(a) <= set(range(400)) and len(a) >= 400 - 16
    assert a == run(0) and a != run(1)


def _blocks(n_items: int, rows: int, block_rows: int, seed: int) -> list[pa.Table]:
    """Chunks like the epoch job's: 8 target partitions, each permuted and cut, chunk order
    randomised."""
    rng = np.random.default_rng(seed)
    target = rng.zipf(1.3, rows) % n_items + 1
    part = target % 8
    chunks = []
    for p in range(8):
        idx = rng.permutation(np.flatnonzero(part == p))
        for lo in range(0, len(idx), block_rows):
            t = target[idx[lo : lo + block_rows]]
            chunks.append(
                pa.table(
                    {
                        "history": pa.FixedSizeListArray.from_arrays(
                            pa.array(np.ones(len(t) * 2, np.int32)), 2
                        ),
                        "length": pa.array(np.full(len(t), 2, np.int32)),
                        "target": pa.array(t.astype(np.int32)),
                        "user": pa.array(np.zeros(len(t), np.int32)),
                    }
                )
            )
    return [chunks[i] for i in rng.permutation(len(chunks))]


def test_batches_from_the_buffer_are_as_mixed_as_an_iid_draw() -> None:
    """Each chunk holds 1/8 of the targets; batches drawn straight from chunks would see few
    targets. Through the buffer the distinct targets per batch match an i.i.d. draw."""
    blocks = _blocks(n_items=5000, rows=60_000, block_rows=512, seed=0)
    all_targets = np.concatenate([b["target"].to_numpy() for b in blocks])
    stats: dict[str, float] = {}

    def draws(skip: int = 0) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(1)
        kw = {"batch_size": 128, "steps": 400, "buffer_size": 16_384, "rng": rng, "skip": skip}
        return list(shard_batches(iter(blocks), **kw, stats=stats))

    batches = draws()
    assert len(batches) == 400 and stats["skipped"] == stats["read"] - 400 * 128
    assert stats["read"] <= len(all_targets)  # the stream is closed, not read to its end
    distinct = np.mean([len(np.unique(b["target"])) for b in batches])
    rng = np.random.default_rng(2)
    iid = np.mean([len(np.unique(rng.choice(all_targets, 128, replace=False))) for _ in range(400)])
    straight = np.mean([len(np.unique(b["target"].to_numpy()[:128])) for b in blocks[:400]])
    assert distinct >= 0.97 * iid, (distinct, iid)
    assert straight < 0.9 * iid  # the trap the buffer avoids (a chunk is one partition)
    # resume: skipping the first k draws yields exactly the remaining batches
    again = draws(skip=150)
    assert len(again) == 250
    for x, y in zip(again, batches[150:]):
        assert (x["target"] == y["target"]).all()


@pytest.mark.slow
def test_epoch_plan_pairs_across_files_and_is_the_same_in_every_run(ray_session, tmp_path):
    """The Ray Data job: target groups spread over 3 files (and users over both ranks) are
    paired whole; two planners with the same seed give both ranks identical data; another
    epoch gives another order and other partners."""
    import ray

    seqs = _sequences(300, 25, 4)
    (tmp_path / "sequences").mkdir()
    for i in range(3):
        pq.write_table(seqs.slice(i * 100, 100), tmp_path / "sequences" / f"part-{i}.parquet")
    n = TrainRows(8)(seqs).num_rows
    params = EpochSource(
        prepared_uri=str(tmp_path),
        max_seq_len=8,
        seed=11,
        pair=True,
        n_examples=n,
        block_rows=64,
        partition_bytes=16_000,  # several partitions: the hash shuffle, not the one-block path
        partner_ids=True,
    )

    def collect(planner, epoch: int) -> list[dict[str, np.ndarray]]:
        out = []
        for rank in range(2):
            got = ray.get(planner.shard.remote(epoch, rank), timeout=300)
            ds, q, dropped = got["shard"], got["rows"], got["dropped"]
            assert got["parts"] == 1 and got["name"] == "all"
            rows = [
                table_to_rows(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
            ]
            out.append({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
            assert len(out[-1]["target"]) == q and 2 * q + dropped == n
        return out

    first, second = start_planner(params, 2, ahead=False), start_planner(params, 2, ahead=False)
    a, b, c = collect(first, 0), collect(second, 0), collect(first, 1)
    for r in range(2):
        for k in a[r]:
            assert (a[r][k] == b[r][k]).all(), (r, k)
    assert not (a[0]["target"] == c[0]["target"]).all()
    both = {k: np.concatenate([a[0][k], a[1][k]]) for k in a[0]}
    file_of = (both["user"] - 1) // 100
    key = {(u, p): i for i, (u, p) in enumerate(zip(both["user"], both["pos"]))}
    partner = np.array([key[(u, p)] for u, p in zip(both["pos_user"], both["pos_pos"])])
    assert (both["target"][partner] == both["target"]).all()
    assert (file_of[partner] != file_of).mean() > 0.4  # partners come from the other files
    ray.kill(first), ray.kill(second)


def test_a_failed_epoch_build_reaches_the_rank_as_a_plain_error_naming_the_cause(
    ray_session, tmp_path
):
    """A broken sequences file fails the epoch's Ray Data job inside the planner actor; the rank
    asking for the epoch gets one readable error (which epoch, the cause's text), not a
    ``SystemError`` from re-raising a Ray-wrapped exception through another actor call."""
    import ray

    from fearec_dist.data.planner import PlanError

    (tmp_path / "sequences").mkdir()
    (tmp_path / "sequences" / "part-0.parquet").write_bytes(b"not parquet at all")
    params = EpochSource(
        prepared_uri=str(tmp_path), max_seq_len=8, seed=1, pair=True, n_examples=10
    )
    planner = start_planner(params, 1, ahead=False)
    with pytest.raises(PlanError, match=r"building epoch 1's training data failed") as err:
        ray.get(planner.shard.remote(0, 0), timeout=300)
    assert "part-0.parquet" in str(err.value) or "Parquet" in str(err.value)
    ray.kill(planner)


# --- the first epoch's head: a seeded share of users trained while the rest is paired whole ---


def test_head_is_a_seeded_uniform_share_of_users_and_only_for_large_epochs() -> None:
    from fearec_dist.data.epochs import head_fraction, in_head

    users = np.arange(1, 200_001, dtype=np.int32)
    head = in_head(users, 0.1, seed=5)
    assert abs(head.mean() - 0.1) < 4 * (0.1 * 0.9 / len(users)) ** 0.5
    assert (head == in_head(users, 0.1, seed=5)).all()  # a function of the seed
    assert (head != in_head(users, 0.1, seed=6)).sum() > 10_000
    assert not (in_head(users, 0.05, seed=5) & ~head).any()  # a smaller head is inside it
    # users in id order are not taken in blocks: the head's ids spread over the whole range
    assert abs(np.median(users[head]) - 100_000) < 5_000
    assert not in_head(users, 0.0, seed=5).any()
    assert head_fraction(1000, 8000) == 1000 / 8000
    assert head_fraction(1000, 7999) == 0.0 and head_fraction(0, 10**9) == 0.0


def test_head_and_rest_split_the_training_examples_exactly_once() -> None:
    seqs = _sequences(400, 30, 6)
    keys = {}
    for keep in (None, ("head", 0.3, 9), ("rest", 0.3, 9)):
        rows = table_to_rows(TrainRows(8, keep)(seqs))
        keys[keep[0] if keep else "all"] = set(zip(rows["user"].tolist(), rows["pos"].tolist()))
    assert keys["head"] and keys["rest"] and not keys["head"] & keys["rest"]
    assert keys["head"] | keys["rest"] == keys["all"]


def test_rest_rows_pair_over_the_whole_set_head_included_uniformly() -> None:
    """The rest of the first epoch: every example (head included) is a partner candidate; only
    the rest's rows are emitted; over many epochs a rest row's partners are uniform over all
    the other members of its target group."""
    from fearec_dist.data.epochs import in_head

    table = _examples(n_users=40, n_items=30, seed=2)
    users = table.column("user").to_numpy()
    head = (0.4, 3)
    draws: dict[tuple, list] = defaultdict(list)
    from_head = 0
    for epoch in range(300):
        chunks = [table_to_rows(c) for c in pair_and_scatter(table, 3, epoch, True, 50, True,
                                                             drop_head=head)]  # fmt: skip
        out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        assert not in_head(out["user"], *head).any()
        assert len(out["user"]) == (~in_head(users, *head)).sum()
        from_head += in_head(out["pos_user"], *head).sum()
        for u, p, pu, pp in zip(out["user"], out["pos"], out["pos_user"], out["pos_pos"]):
            draws[(int(u), int(p))].append((int(pu), int(pp)))
    groups: dict[int, list] = defaultdict(list)
    for u, p, t in zip(users, table.column("pos").to_numpy(), table.column("target").to_numpy()):
        groups[int(t)].append((int(u), int(p)))
    members = {ex: g for g in groups.values() for ex in g}
    assert from_head > 0  # partners do come from the head's users
    stat, dof = _chi_square_uniform(draws, members)
    assert dof > 50
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5
    assert z < 3.1, (stat, dof, z)


def _head_params(tmp_path) -> tuple[EpochSource, int, pa.Table]:
    seqs = _sequences(300, 150, 4)  # ~8 examples per target: some alone among the head's
    (tmp_path / "sequences").mkdir()
    for i in range(3):
        pq.write_table(seqs.slice(i * 100, 100), tmp_path / "sequences" / f"part-{i}.parquet")
    n = TrainRows(8)(seqs).num_rows
    counts = np.bincount(TrainRows(8)(seqs).column("target").to_numpy(), minlength=151)
    pq.write_table(pa.table({"count": pa.array(counts)}), tmp_path / "counts.parquet")
    params = EpochSource(prepared_uri=str(tmp_path), max_seq_len=8, seed=11, pair=True,
                         n_examples=n, block_rows=32, partition_bytes=16_000,
                         partner_ids=True)  # fmt: skip
    return params, n, seqs


@pytest.mark.slow
def test_first_epoch_head_then_rest_cover_the_epoch_and_later_epochs_are_whole(
    ray_session, tmp_path
):
    """Epoch 1 in two parts: the head (a seeded share of users, paired among themselves) and
    the rest (paired over every example); together, over both ranks, every training example
    once but for the rows no rank gets; the same in every run; epoch 2 is one part."""
    import ray

    from fearec_dist.data.epochs import in_head

    params, n, _ = _head_params(tmp_path)
    opts = dict(head=0.25, counts_uri=str(tmp_path / "counts.parquet"), ahead=False)

    def collect(planner, epoch: int) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
        meta, rows = [], []
        for part in range(2 if epoch == 0 else 1):
            for rank in range(2):
                got = ray.get(planner.shard.remote(epoch, rank, part), timeout=300)
                meta.append({k: got[k] for k in ("rows", "dropped", "parts", "name", "stats")})
                t = [table_to_rows(b) for b in got["shard"].iter_batches(
                    batch_size=None, batch_format="pyarrow")]  # fmt: skip
                rows.append({k: np.concatenate([r[k] for r in t]) for k in t[0]})
                assert len(rows[-1]["target"]) == got["rows"]
        return meta, rows

    first, second = start_planner(params, 2, 3, **opts), start_planner(params, 2, 3, **opts)
    meta, rows = collect(first, 0)
    assert [m["name"] for m in meta] == ["head", "head", "rest", "rest"]
    assert all(m["parts"] == 2 for m in meta)
    head = {k: np.concatenate([rows[0][k], rows[1][k]]) for k in rows[0]}
    rest = {k: np.concatenate([rows[2][k], rows[3][k]]) for k in rows[2]}
    assert in_head(head["user"], 0.25, 11).all() and not in_head(rest["user"], 0.25, 11).any()
    assert in_head(head["pos_user"], 0.25, 11).all()  # the head pairs among itself
    assert in_head(rest["pos_user"], 0.25, 11).any()  # the rest pairs with the head too
    seen = list(zip(head["user"], head["pos"])) + list(zip(rest["user"], rest["pos"]))
    dropped = meta[0]["dropped"] + meta[2]["dropped"]
    assert len(set(seen)) == len(seen) == n - dropped
    # the head's stats: its rows and users, and the rows alone in the head but not globally
    stats = meta[0]["stats"]
    assert stats["head_rows"] == len(head["target"]) + meta[0]["dropped"]
    assert stats["head_users"] == len(np.unique(head["user"]))
    counts = pq.read_table(tmp_path / "counts.parquet").column("count").to_numpy()
    ids, k = np.unique(head["target"], return_counts=True)
    alone = ids[(k == 1) & (counts[ids] > 1)]
    assert stats["head_self_paired"] == np.isin(head["target"], alone).sum() > 0
    self_paired = (head["pos_user"] == head["user"]) & (head["pos_pos"] == head["pos"])
    assert self_paired.sum() >= stats["head_self_paired"]
    # the same in every run; epoch 2 is whole
    _, again = collect(second, 0)
    for a, b in zip(rows, again):
        for key in a:
            assert (a[key] == b[key]).all(), key
    meta2, rows2 = collect(first, 1)
    assert [m["name"] for m in meta2] == ["all", "all"]
    assert sum(len(r["target"]) for r in rows2) + meta2[0]["dropped"] == n
    ray.kill(first), ray.kill(second)


@pytest.mark.slow
def test_feed_streams_head_then_rest_and_resumes_exactly_on_two_ranks(ray_session, tmp_path):
    """Each rank's batches run through the head into the rest; a rank resumed at step k (in the
    head or in the rest) yields exactly the batches k.. of the uncut epoch."""
    import ray

    from fearec_dist.data.epochs import in_head
    from fearec_dist.data.feed import TrainFeed

    params, n, _ = _head_params(tmp_path)
    planner = start_planner(params, 2, 2, head=0.25, ahead=False)
    steps = (n // 2 - 1) // 16
    for rank in range(2):
        feed = TrainFeed(planner, rank=rank, batch_size=16, steps=steps, seed=11,
                         shuffle_buffer=48, prefetch_blocks=2)  # fmt: skip
        full = list(feed.epoch(0))
        st = feed.stats
        assert len(full) == steps and st.head["head_rows"] > 0
        assert st.plan_wait_s <= st.first_wait_s <= st.data_wait_s  # the waits before step 1
        assert "head_self_paired" not in st.head  # no counts given: not computed
        heads = [in_head(b["user"], 0.25, 11).mean() for b in full]
        assert heads[0] == 1.0 and heads[-1] == 0.0  # the head first, then the rest
        rows = [ray.get(planner.shard.remote(0, rank, p), timeout=300)["rows"] for p in (0, 1)]
        assert feed.stats.skipped == sum(rows) - steps * 16 and 0 <= feed.stats.skipped < 32
        capped = TrainFeed(planner, rank=rank, batch_size=16, steps=3, seed=11,
                           shuffle_buffer=48, prefetch_blocks=2)  # fmt: skip
        assert [b["target"].tolist() for b in capped.epoch(0)] == [
            b["target"].tolist() for b in full[:3]
        ]
        assert capped.stats.skipped == rows[0] - 3 * 16  # stopped in the head: the rest never read
        for skip in (2, steps - 5):
            again = list(feed.epoch(0, skip=skip))
            assert len(again) == steps - skip
            for x, y in zip(again, full[skip:]):
                for key in x:
                    assert (x[key] == y[key]).all(), (rank, skip, key)
    ray.kill(planner)


def test_a_part_end_drains_the_buffer_before_the_next_part_is_read() -> None:
    """A head smaller than the shuffle buffer trains whole before the rest is asked for (the
    rest may still be building); then the stream goes on into the rest, resumable as before."""
    from fearec_dist.data.feed import PART_END

    head = _blocks(n_items=50, rows=1000, block_rows=100, seed=3)
    head = [t.set_column(3, "user", pa.array(np.ones(t.num_rows, np.int32))) for t in head]
    rest = _blocks(n_items=50, rows=3000, block_rows=100, seed=4)
    touched: list[int] = []

    def stream():
        yield from head
        yield PART_END
        touched.append(produced[0])  # how many batches were out when the rest was asked for
        yield from rest

    produced = [0]
    kw = {"batch_size": 64, "steps": 60, "buffer_size": 2048}
    out = []
    for b in shard_batches(stream(), rng=np.random.default_rng(0), **kw):
        out.append(b)
        produced[0] += 1
    assert touched == [1000 // 64]  # the head's whole batches first, the rest after
    assert len(out) == 60
    users = [b["user"].mean() for b in out]
    assert users[: 1000 // 64] == [1.0] * (1000 // 64) and users[1000 // 64] < 1.0
    again = list(shard_batches(stream(), rng=np.random.default_rng(0), skip=20, **kw))
    for x, y in zip(again, out[20:]):
        assert (x["target"] == y["target"]).all()
